"""Golden loss curves through the real ``mimkit.train.loop.Trainer``: the reference curves of train/.

Two kinds of golden curve, pinning different things:

* **These (Trainer curves, ``tests/golden/trainer/<method>_<variant>.json``, checked by
  ``tests/test_golden_trainer.py``)** run ``Trainer(cfg).train()`` on the first 128 Fashion-MNIST
  images and read what the trainer logs in ``metrics.jsonl`` at every optimizer step (loss, lr,
  grad norm, epoch and the method's own metrics). They pin what ``mimkit.train`` does around the
  method: the data order and flip augmentation of the in-memory loader, the lr rule (``base_lr x
  batch / 256`` or ``optim.lr``) and schedule (linear warmup, from ``min_lr`` where the preset says so,
  then half-cosine, evaluated at the fractional epoch of every step), gradient accumulation (``loss /
  accum`` per micro-batch, one optimizer step and one ``after_step`` per ``accum_iter`` batches, the
  logged loss the mean over the micro-batches), bf16 autocast, the fused-AdamW step and the timing
  of ``after_micro_batch`` / ``after_step`` (Latent MIM's EMA teacher is updated once per optimizer step
  with the momentum at the progress after it; PCAE's after every micro-batch, as its official loop, with
  the momentum of that iteration: twice a step in ``accum2``). Three presets (MAE, Latent MIM, PCAE: a plain pixel
  method and two EMA-teacher methods), each in the variants of ``VARIANTS``.
* **The hand-loop curves (``tests/golden_curves.py``, ``tests/golden/<preset>.json``)** train every
  preset of ``configs/`` with a hand-written loop (fixed lr, one fixed batch, fp32): they pin each
  method's numerics (forward, loss, masks, ``after_step``) for every preset, independently of the
  trainer.

A change to ``mimkit.train`` must leave these numbers unchanged; one that moves them on purpose
says why in its commit and rewrites the files (each run is made twice and written only when the two
are bit-identical)::

    python tests/golden_trainer.py --write                       # every (method, variant)
    python tests/golden_trainer.py --write mae_sched pcae_bf16   # some of them
    python tests/golden_trainer.py                               # print the curves, write nothing

The runs: encoder 32 wide, 2 deep (PCAE 3 deep: its three teacher drop stages), decoder 16 x 1,
the first 128 images, 16 images per optimizer step (8 steps an epoch), 2 epochs = 16 steps, warmup
0.5 epoch = 4 steps (lr rises over steps 1-4, peaks at step 5, then falls), one thread, no kNN, no
picture, no checkpoint but the final one the trainer always writes; the nine runs take ~5 s on one
core. fp32 curves are compared at rel 1e-4; bf16 curves at 1e-4 on the platform that recorded them
(bf16 on the CPU is bit-reproducible there) and loosely elsewhere (other CPU kernels round bf16
differently); the measurements are in ``tests/test_golden_trainer.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "trainer"

PRESETS = {"mae": "mae_fashion_mnist", "latent_mim": "latent_mim_fashion_mnist", "pcae": "pcae_fashion_mnist"}
"""method -> the preset of ``configs/`` its curves start from."""

STEPS = 16  # optimizer steps of every run (2 epochs of 8 steps)
WARMUP_STEPS = 4  # warmup of 0.5 epoch: the lr of steps 1-4 rises, step 5 has the peak lr

BASE = [
    "model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2",
    "data.limit=128", "data.batch_size=16", "train.epochs=2", "optim.warmup_epochs=0.5",
    "train.log_every_steps=1", "train.ckpt_every_steps=1000", "train.num_threads=1", "train.progress_bar=false",
    "train.tensorboard=false", "eval.knn_at_end=false", "eval.knn_every_epochs=0", "eval.picture_at_end=false",
]
"""Overrides of every run (the presets' data set, augmentation, optimizer and method settings stay)."""

METHOD_EXTRA = {
    # MAE / PCAE take the lr from optim.base_lr x effective batch / 256: 0.016 x 16 / 256 = 1e-3 (the
    # presets' 1.5e-3 would give ~1e-4 at batch 16, too little to move the curve)
    "mae": ["optim.base_lr=0.016"],
    # the preset's optim.lr=1.5e-3, min_lr_ratio 0.25 and warmup from min_lr stay
    "latent_mim": ["method.projector.hidden_dim=64"],
    # depth 3: drop_case 0 drops after blocks [0, 1, 2], all three stages (37 -> 18 -> 9 -> 4 teacher tokens)
    "pcae": ["optim.base_lr=0.016", "model.encoder.depth=3"],
}

VARIANTS = {
    "sched": [],  # fp32, one batch of 16 per step
    # two micro-batches of 8 per step: the same effective batch (so the same lr), steps and schedule
    "accum2": ["data.batch_size=8", "optim.accum_iter=2"],
    "bf16": ["train.precision=bf16"],  # bf16 autocast on the CPU (allowed; emulated where the CPU lacks bf16)
}

SERIES = ("loss", "lr", "grad_norm", "epoch")
"""Per-step values recorded from ``metrics.jsonl`` besides the method's metrics (under ``metrics``)."""
NOT_RECORDED = ("step", "img_per_s", "nonfinite")  # timing, and the count that must stay 0


def names() -> list[str]:
    """Every ``<method>_<variant>`` with a fixture."""
    return [f"{m}_{v}" for m in PRESETS for v in VARIANTS]


def split_name(name: str) -> tuple[str, str]:
    for m in PRESETS:
        for v in VARIANTS:
            if name == f"{m}_{v}":
                return m, v
    raise ValueError(f"unknown curve {name!r}; choose from {', '.join(names())}")


def overrides_for(name: str) -> list[str]:
    method, variant = split_name(name)
    return [*BASE, *METHOD_EXTRA[method], *VARIANTS[variant]]


def read_metrics(out_dir: Path) -> dict:
    """The per-step records of ``out_dir/metrics.jsonl`` as ``{"steps", "loss", "lr", "grad_norm",
    "epoch", "metrics": {name: [...]}}``; an event record (a skipped non-finite step, ...) is an error."""
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in recs if "event" in r]
    if events:
        raise RuntimeError(f"the run recorded events, not a clean curve: {events}")
    bad = [r["step"] for r in recs if r.get("nonfinite")]
    if bad:
        raise RuntimeError(f"non-finite steps in the run: {bad}")
    out: dict = {"steps": [r["step"] for r in recs]}
    for key in SERIES:
        out[key] = [r[key] for r in recs]
    extra = sorted({k for r in recs for k in r} - set(SERIES) - set(NOT_RECORDED))
    out["metrics"] = {k: [r.get(k) for r in recs] for k in extra}
    return out


def run_curve(name: str, out_dir: str | Path | None = None, extra: list[str] | tuple = ()) -> dict:
    """Train curve ``name`` with the real :class:`~mimkit.train.loop.Trainer` into ``out_dir`` (a
    temporary directory when ``None``) and return what it logged (:func:`read_metrics`). ``extra``:
    further overrides (measurements only; the fixtures are recorded without). The torch thread count
    the trainer sets (``train.num_threads=1``) is restored afterwards."""
    from mimkit.config import load_config
    from mimkit.train.loop import Trainer

    method, _ = split_name(name)
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix=f"golden-trainer-{name}-") as tmp:
            return run_curve(name, tmp, extra)
    out_dir = Path(out_dir)
    cfg = load_config(ROOT / "configs" / f"{PRESETS[method]}.yaml",
                      [*overrides_for(name), *extra, f"train.out_dir={out_dir}"])
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
    finally:
        torch.set_num_threads(threads)
    curve = read_metrics(out_dir)
    if curve["steps"] != list(range(1, STEPS + 1)):
        raise RuntimeError(f"{name}: logged steps {curve['steps']}, expected 1..{STEPS} (the trainer logs every step)")
    return curve


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def platform() -> dict:
    """What picks the CPU kernels, hence the bf16 rounding: the torch build, ATen's vector ISA, the CPU's
    vector / bf16 / AMX flags and the environment variables that cap them. Two runs with the same
    platform give bit-identical bf16 curves; across platforms bf16 curves differ by up to ~1e-2
    (see ``tests/test_golden_trainer.py``), fp32 ones by ~1e-6."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
    }


def max_rel_diff(a: list, b: list) -> float:
    """Largest ``|a - b| / max(|b|, 1e-12)`` over the pairs (``inf`` when the lengths differ or one is
    missing where the other is not)."""
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            if x is not y:
                return math.inf
            continue
        worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
    return worst


def record(name: str, curve: dict) -> dict:
    method, variant = split_name(name)
    return {"name": name, "method": method, "variant": variant, "preset": PRESETS[method],
            "overrides": overrides_for(name), "platform": platform(), **curve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="run each curve twice and write tests/golden/trainer/<name>.json if the runs agree")
    parser.add_argument("names", nargs="*", help=f"curves (default: all of {', '.join(names())})")
    args = parser.parse_args(argv)
    chosen = args.names or names()
    for n in chosen:
        split_name(n)  # unknown names fail before any run
    GOLDEN.mkdir(parents=True, exist_ok=True)
    failed = []
    for n in chosen:
        curve = run_curve(n)
        print(n, "loss", " ".join(f"{v:.5f}" for v in curve["loss"]))
        print(n, "lr  ", " ".join(f"{v:.2e}" for v in curve["lr"]))
        if not args.write:
            continue
        again = run_curve(n)
        if again != curve:
            diff = {k: max_rel_diff(again[k], curve[k]) for k in SERIES}
            print(f"{n}: two identical runs differ (max rel. diff. {diff}); not written", file=sys.stderr)
            failed.append(n)
            continue
        (GOLDEN / f"{n}.json").write_text(json.dumps(record(n, curve), indent=1) + "\n")
        print(f"{n}: two runs bit-identical; wrote {GOLDEN / f'{n}.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
