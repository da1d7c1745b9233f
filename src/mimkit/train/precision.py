"""Numeric precision of a run.

Owns: what ``train.precision`` means on a device (:func:`autocast_dtype`: bf16 autocast on GPU by
default, fp32 on CPU unless ``bf16``, fp16 only on GPU; :func:`cpu_has_bf16`), and per run
(:class:`Precision`) the autocast context of the forward pass, the grad scaler (enabled for fp16
only) and whether a non-finite step can be skipped on the device without a host sync.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mimkit.errors import ConfigError


def cpu_has_bf16() -> bool:
    """True when the CPU advertises bf16 instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None`` = fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_bf16():
            print("warning: this CPU has no bf16 instructions; bf16 autocast will be emulated and slow", file=sys.stderr)
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
        return torch.float16
    raise ConfigError(f"unknown train.precision {precision!r}; choose auto, fp32, bf16 or fp16")


class Precision:
    """``train.precision`` on ``device``: :attr:`dtype` (``None``: fp32), :attr:`scaler` (a
    ``GradScaler``, enabled for fp16 only) and :meth:`autocast` for the forward pass."""

    def __init__(self, precision: str, device: torch.device):
        self.device_type = device.type
        self.dtype = autocast_dtype(precision, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self):
        """The autocast context of a forward pass (a disabled one for fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def skips_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        """True when a non-finite step can be skipped on the device (fused AdamW's ``found_inf``) with no
        host sync: the optimizer is fused and no grad scaler runs (fp16 reads the flag every step)."""
        return bool(optimizer.defaults.get("fused")) and not self.scaler.is_enabled()


COMPILE_MIN_STEPS = 1000
"""``train.compile=auto`` compiles on a GPU when at least this many steps are left."""


def resolve_compile(setting: bool | str, device: torch.device, steps_left: int) -> tuple[bool, str]:
    """Whether to ``torch.compile`` the training model, and why (one phrase for the start-up line).

    ``auto``: on a GPU when ``steps_left >= COMPILE_MIN_STEPS`` (compilation takes ~1 minute there and
    a compiled ViT step is 1.2-2x faster, so it pays within a few hundred steps); never on CPU, where
    it does not pay at the budgets mimkit's CPU presets run: fp32 gains nothing (313 vs 333 img/s on the
    standard workload) and bf16 gains ~14 % (575 vs 505 img/s, before the explicit attention path made
    eager faster) for 1-3 minutes of compilation on 2 cores, more than the ~1 minute it would save on
    the quickstart's 702 steps (BENCHMARKS.md, "Standard CPU workload: training throughput")."""
    if setting is True or setting is False:
        return setting, f"train.compile={str(setting).lower()}"
    if device.type != "cuda":
        return False, "train.compile=auto: eager on CPU (compilation does not pay at CPU budgets)"
    if steps_left < COMPILE_MIN_STEPS:
        return False, f"train.compile=auto: eager ({steps_left} steps left, < {COMPILE_MIN_STEPS})"
    return True, f"train.compile=auto: compiled (GPU, {steps_left} steps left)"


def compile_kwargs(mode: str) -> dict:
    """``torch.compile``'s keyword arguments for ``train.compile_mode``: none for ``default``, ``mode=`` for
    ``max-autotune-no-cudagraphs``, and for the CUDA-graph modes the mode's inductor options (what
    ``mode=`` would set) plus ``triton.cudagraph_skip_dynamic_graphs``: a graph with a dynamic size or a
    dynamic integer among its inputs runs without CUDA graphs instead of being recorded once more for
    every new value. Such graphs are SBAM's (its adaptive visible count), and Latent MIM's and PCAE's,
    whose forward reads the step for its momentum metric and schedule: recorded per step they would
    never replay and would hold a graph's memory each."""
    if mode == "default":
        return {}
    from mimkit.config.schema import CUDAGRAPH_COMPILE_MODES

    if mode not in CUDAGRAPH_COMPILE_MODES:
        return {"mode": mode}
    import torch._inductor

    return {"options": {**torch._inductor.list_mode_options(mode), "triton.cudagraph_skip_dynamic_graphs": True}}
