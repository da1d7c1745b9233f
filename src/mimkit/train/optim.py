"""Optimizer parameter groups and the learning-rate schedule of MAE's pretraining recipe."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, skip: set[str] | None = None) -> list[dict]:
    """timm 0.3.2 ``add_weight_decay`` semantics (methods_b §2.5): no decay for 1-D parameters and
    names ending in ``.bias`` (and names in ``skip``); frozen parameters are left out. cls/mask tokens
    (3-D) *are* decayed in MAE pretraining."""
    skip = skip or set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
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


def lr_at(epoch: float, lr: float, warmup_epochs: float, total_epochs: float, min_lr: float = 0.0) -> float:
    """MAE's ``adjust_learning_rate``: linear warmup ``lr * e / warmup`` then half-cosine to ``min_lr``,
    evaluated at the fractional epoch ``e`` of every iteration."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-12)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
