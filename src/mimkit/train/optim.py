"""Optimizer parameter groups and the learning-rate schedule of MAE's pretraining recipe."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(
    model: nn.Module, weight_decay: float, skip: set[str] | None = None, no_decay_keywords: tuple[str, ...] = ()
) -> list[dict]:
    """timm 0.3.2 ``add_weight_decay`` semantics: no decay for 1-D parameters and
    names ending in ``.bias`` (and names in ``skip``); frozen parameters are left out. cls/mask tokens
    (3-D) *are* decayed in MAE pretraining. ``no_decay_keywords``: also exempt names containing any
    of these (Latent MIM's code exempts ``bias``, ``norm`` and ``embed``)."""
    skip = skip or set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in no_decay_keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def effective_lr(base_lr: float, effective_batch: int, lr: float | None = None) -> float:
    """``lr`` if given, else ``base_lr * effective_batch / 256`` (MAE's linear scaling)."""
    return lr if lr is not None else base_lr * effective_batch / 256


def lr_at(
    epoch: float, lr: float, warmup_epochs: float, total_epochs: float, min_lr: float = 0.0,
    warmup_from_min_lr: bool = False,
) -> float:
    """MAE's ``adjust_learning_rate``: linear warmup ``lr * e / warmup`` (from ``min_lr`` when
    ``warmup_from_min_lr``) then half-cosine to ``min_lr``, at the fractional epoch ``e`` of every
    iteration."""
    if epoch < warmup_epochs:
        start = min_lr if warmup_from_min_lr else 0.0
        return start + (lr - start) * epoch / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-12)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
