"""Optimizer parameter groups and the learning-rate schedule of MAE's pretraining recipe, and the
step plan of a run (:class:`StepPlan`: steps per epoch, total steps, effective batch, peak lr)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimkit.config import Config
from mimkit.errors import ConfigError


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


@dataclass(frozen=True)
class StepPlan:
    """How a run steps: ``batches_per_epoch`` (this rank's loader), ``steps_per_epoch`` (whole
    ``optim.accum_iter`` groups), ``total_steps`` (``train.epochs``, at least 1), ``eff_batch`` (images
    per optimizer step over all processes), ``peak_lr`` (``optim.lr`` or the scaled ``optim.base_lr``)
    and ``min_lr``."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    eff_batch: int
    peak_lr: float
    min_lr: float

    @classmethod
    def of(cls, cfg: Config, batches_per_epoch: int, world_size: int) -> StepPlan:
        o = cfg.optim
        if batches_per_epoch < o.accum_iter:
            raise ConfigError(
                f"an epoch has {batches_per_epoch} batches, fewer than optim.accum_iter={o.accum_iter}; "
                "lower data.batch_size or optim.accum_iter"
            )
        steps_per_epoch = batches_per_epoch // o.accum_iter
        total_steps = max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
        eff_batch = cfg.data.batch_size * o.accum_iter * world_size
        peak_lr = effective_lr(o.base_lr, eff_batch, o.lr)
        min_lr = o.min_lr_ratio * peak_lr if o.min_lr_ratio is not None else o.min_lr
        return cls(batches_per_epoch, steps_per_epoch, total_steps, eff_batch, peak_lr, min_lr)

    def summary(self, cfg: Config, world_size: int, start: str) -> str:
        """The startup line: world size, effective batch, peak lr, steps, ``start`` (where it starts)."""
        o = cfg.optim
        lr_rule = "optim.lr" if o.lr is not None else f"optim.base_lr {o.base_lr:g} x {self.eff_batch}/256"
        return (f"mimkit pretrain {cfg.method.name}: world size {world_size}, effective batch {self.eff_batch} "
                f"({cfg.data.batch_size}/process x {o.accum_iter} accum x {world_size}), peak lr "
                f"{self.peak_lr:.3g} ({lr_rule}), {self.total_steps} steps ({self.steps_per_epoch}/epoch), {start}; "
                f"run directory {Path(cfg.train.out_dir)}")
