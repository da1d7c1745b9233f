"""Loss functions with shape docstrings. All reductions follow MAE unless stated."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: per-patch mean squared error averaged over all masked patches of the batch.

    ``pred, target (S, L, P)``, ``mask (S, L)`` with 1 = masked -> scalar
    ``sum(mask * mean_c (pred - target)^2) / sum(mask)`` (methods_b §1.3: not a per-image mean).
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def masked_reduce(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(mask * per_patch) / sum(mask)`` for any per-patch loss ``(S, L)``."""
    mask = mask.float()
    return (per_patch.float() * mask).sum() / mask.sum().clamp(min=1.0)


def per_patch_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "mse", huber_delta: float = 1.0) -> torch.Tensor:
    """Per-patch distance ``(..., P) x (..., P) -> (...)``: ``mse`` (mean of squares), ``l1`` (mean of
    absolute values), ``huber`` (elementwise Huber with ``huber_delta``, averaged), ``cosine``
    (``1 - cos``)."""
    a, b = a.float(), b.float()
    if kind == "mse":
        return (a - b).pow(2).mean(-1)
    if kind == "l1":
        return (a - b).abs().mean(-1)
    if kind == "huber":
        return F.huber_loss(a, b, reduction="none", delta=huber_delta).mean(-1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=-1)
    raise ValueError(f"unknown distance {kind!r}; choose mse, l1, huber or cosine")


def average_patch_similarity(x: torch.Tensor, include_diagonal: bool = True) -> torch.Tensor:
    """Collapse monitor "Sim": ``mean_b mean_{i,j} cos(x_bi, x_bj)`` for ``x (B, N, D)`` -> scalar.

    With the diagonal (Latent MIM's convention) this is ``mean_b ||mean_i x̂_bi||^2``; without it,
    ``(N * Sim - 1) / (N - 1)`` per image.
    """
    xn = F.normalize(x.float(), dim=-1)
    n = x.shape[1]
    sim = xn.mean(1).pow(2).sum(-1)  # (B,)
    if not include_diagonal:
        sim = (n * sim - 1) / max(n - 1, 1)
    return sim.mean()
