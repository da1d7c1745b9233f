"""The method-agnostic training loop: optimizer groups, schedules, AMP, checkpoints, DDP, logging."""

from mimkit.train.loop import NonFiniteLossError, Trainer, pretrain

__all__ = ["NonFiniteLossError", "Trainer", "pretrain"]
