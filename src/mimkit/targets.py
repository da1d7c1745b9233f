"""Target providers. Pixel targets now; EMA / stop-grad / frozen-teacher providers live beside it."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from mimkit.nn.patch import norm_pix, patchify


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix_loss: bool = True) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p*p*C)``, per-patch normalized when ``norm_pix_loss`` (MAE).

    Computed from the already mean/std-normalized input, in fp32."""
    target = patchify(images.float(), patch_size)
    return norm_pix(target) if norm_pix_loss else target


def cosine_momentum(base: float, fraction: float, final: float = 1.0) -> float:
    """``m(f) = final - (final - base) * (1 + cos(pi f)) / 2``: rises from ``base`` to ``final``."""
    return final - (final - base) * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0))) / 2


class EMATarget(nn.Module):
    """A frozen copy of a module updated as ``theta_t <- m theta_t + (1 - m) theta_s`` over *all*
    parameters (and floating buffers are copied). Call :meth:`update` once per optimizer step."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(source)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module, momentum: float) -> None:
        tgt = [p for p in self.module.parameters()]
        src = [p.detach() for p in source.parameters()]
        if len(tgt) != len(src):
            raise RuntimeError("EMA target and source have different parameter lists")
        if tgt:
            torch._foreach_lerp_(tgt, src, 1.0 - momentum)
        for bt, bs in zip(self.module.buffers(), source.buffers()):
            bt.copy_(bs)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


def cosine_schedule(start: float, end: float, fraction: float) -> float:
    """``end + (start - end) * (1 + cos(pi f)) / 2`` for ``f`` clamped to [0, 1]: ``start`` at 0, ``end`` at 1
    (Latent MIM's regularizer target ``gamma``: 0.75 -> 0.25)."""
    f = min(max(fraction, 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * f)) / 2
