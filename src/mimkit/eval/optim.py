"""Optimisation pieces shared by the probes and fine-tuning.

* :class:`LARS` — MAE's ``util/lars.py`` semantics: SGD with momentum where parameters with
  ``ndim > 1`` get weight decay and a layer-wise trust ratio ``η·‖w‖/‖g + wd·w‖``; 1-D parameters
  (biases, norms) take a plain momentum step.
* :func:`warmup_cosine` — per-iteration learning rate over fractional epochs: linear warm-up from 0,
  then a half cosine to ``min_lr`` (MAE's ``util/lr_sched.py``).
* :func:`set_lr` — writes ``lr × group['lr_scale']`` into every param group (layer-wise decay).
"""

from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling, as used by MAE's linear probe.

    Update for a parameter ``w`` with gradient ``g`` (``mu`` = momentum buffer, starts at 0)::

        if w.ndim > 1:
            d = g + wd * w
            q = η ‖w‖ / ‖d‖   (1 when either norm is 0)
            d = q * d
        else:
            d = g
        mu = m * mu + d
        w  = w - lr * mu
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    one = torch.ones_like(w_norm)
                    q = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm, one)
                    d = d * q
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


def warmup_cosine(epoch: float, lr: float, epochs: float, warmup_epochs: float, min_lr: float = 0.0) -> float:
    """Learning rate at fractional ``epoch`` (``epoch + it / iters_per_epoch``)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    t = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr × lr_scale`` (``lr_scale`` defaults to 1)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule ``lr = base_lr × batch / 256``."""
    return base_lr * batch_size / 256


def scheduled_batches(
    num_samples: int,
    batch_size: int,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    lr: float,
    warmup_epochs: float,
    min_lr: float,
    generator: torch.Generator,
):
    """Shuffled full batches for ``epochs`` epochs (the last partial batch is dropped: BatchNorm needs
    more than one sample), setting ``optimizer``'s lr by :func:`warmup_cosine` at every iteration.

    Yields ``(epoch, idx)`` with ``idx (batch_size,)`` CPU indices; one ``randperm`` per epoch from
    ``generator``."""
    iters = max(num_samples // batch_size, 1)
    for epoch in range(epochs):
        perm = torch.randperm(num_samples, generator=generator)
        for it in range(iters):
            set_lr(optimizer, warmup_cosine(epoch + it / iters, lr, epochs, warmup_epochs, min_lr))
            yield epoch, perm[it * batch_size : (it + 1) * batch_size]


def epoch_means(losses: list[tuple[int, float]], epochs: int) -> list[float]:
    """``[(epoch, loss), ...]`` -> mean loss of each epoch."""
    sums, counts = [0.0] * epochs, [0] * epochs
    for e, v in losses:
        sums[e] += v
        counts[e] += 1
    return [s / max(c, 1) for s, c in zip(sums, counts)]
