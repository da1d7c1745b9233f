"""Diagnostics of frozen features.

* :func:`patch_similarity` — Latent MIM's collapse monitor "Sim" on the patch tokens of each image
  (cls excluded), with the diagonal (``‖mean_i ĥ_i‖²``, Latent MIM's convention) and without it
  (``(N·Sim − 1)/(N − 1)``). 1.0 means every patch of an image has the same direction (collapse).
* :func:`singular_values` / :func:`effective_rank` — spectrum of an ``(N, D)`` feature matrix and
  Roy & Vetterli's effective rank ``exp(H(p))`` with ``p = σ / Σσ``: ``D`` for a perfectly isotropic
  matrix, 1 for rank one. Features are centred by default (set ``center=False`` for the raw matrix).
* :func:`per_class_accuracy` — accuracy of each class in percent (NaN for a class absent from
  ``labels``).
"""

from __future__ import annotations

import math

import torch

from mimkit.losses import average_patch_similarity


def patch_similarity(tokens: torch.Tensor, has_cls: bool = True, batch_size: int = 1024) -> dict[str, float]:
    """``tokens (N, 1+L, D)`` (or ``(N, L, D)`` with ``has_cls=False``) ->
    ``{"sim": with diagonal, "sim_offdiag": without}``, averaged over images."""
    x = tokens[:, 1:] if has_cls else tokens
    n = x.shape[0]
    if n == 0:
        raise ValueError("no images to measure")
    with_d = 0.0
    without = 0.0
    for i in range(0, n, batch_size):
        chunk = x[i : i + batch_size]
        w = len(chunk) / n
        with_d += w * float(average_patch_similarity(chunk, include_diagonal=True))
        without += w * float(average_patch_similarity(chunk, include_diagonal=False))
    return {"sim": with_d, "sim_offdiag": without, "num_patches": int(x.shape[1])}


def singular_values(feats: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Singular values (descending) of ``feats (N, D)``, in float64."""
    x = feats.double()
    if center:
        x = x - x.mean(0, keepdim=True)
    return torch.linalg.svdvals(x)


def effective_rank(feats_or_sv: torch.Tensor, center: bool = True) -> float:
    """Effective rank ``exp(-Σ p log p)``, ``p = σ/Σσ``. Accepts an ``(N, D)`` matrix or a 1-D vector
    of singular values."""
    s = feats_or_sv.double() if feats_or_sv.ndim == 1 else singular_values(feats_or_sv, center)
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return math.exp(float(-(p * p.log()).sum()))


def spectrum_summary(feats: torch.Tensor, center: bool = True, keep: int = 64) -> dict:
    """Effective rank, dimension, the leading ``keep`` normalised singular values and the number of
    components holding 90 / 99 % of the variance."""
    s = singular_values(feats, center)
    var = s.pow(2)
    cum = var.cumsum(0) / var.sum().clamp_min(1e-300)
    return {
        "effective_rank": effective_rank(s),
        "dim": int(feats.shape[1]),
        "rank90": int((cum < 0.9).sum()) + 1,
        "rank99": int((cum < 0.99).sum()) + 1,
        "singular_values": (s / s[0].clamp_min(1e-300))[:keep].tolist() if s.numel() else [],
    }


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> list[float]:
    """Accuracy (%) of each class ``0..C-1``; NaN where a class has no test sample."""
    num_classes = num_classes or int(labels.max()) + 1
    labels = labels.long().cpu()
    correct = (pred.long().cpu() == labels).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct)
    acc = 100.0 * hits / total
    return [float(a) if t > 0 else float("nan") for a, t in zip(acc.tolist(), total.tolist())]
