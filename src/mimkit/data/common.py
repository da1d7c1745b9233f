"""What the streaming loaders share (:mod:`.loaders`, :mod:`.gpu`, :mod:`.shards`).

Owns: the seeds derived from ``(tag, seed, epoch, ...)`` (:func:`mix_seed`), the rank-sharded epoch
order (:func:`shard_indices`) and batch count (:func:`num_batches`), the checks of a loader's
batch size and rank (:func:`check_shard`), output sizes (:func:`hw_pair`, :func:`relative_ratio`),
the torchvision CPU transform of folder images (:func:`folder_transform`), the stop-signal policy of
DataLoader workers (:func:`worker_signals`), the notes workers send back about corrupt files
(:func:`take_notes`) and ending a DataLoader's workers (:func:`shutdown_workers`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from PIL import Image

from mimkit.errors import DataError

__all__ = [
    "WORKER_TERM_GRACE_S",
    "check_shard",
    "folder_transform",
    "hw_pair",
    "mix_seed",
    "num_batches",
    "relative_ratio",
    "shard_indices",
    "shutdown_workers",
    "take_notes",
    "worker_signals",
]


def mix_seed(tag: str, *values: int) -> int:
    """A 63-bit seed derived from ``tag`` and integers; stable across processes and runs."""
    h = hashlib.blake2b(tag.encode(), digest_size=8)
    for v in values:
        h.update(int(v).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def shard_indices(
    n: int,
    *,
    epoch: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Sample indices rank ``rank`` visits in ``epoch`` (see :mod:`mimkit.data.loaders`).

    Returns:
        ``(M,)`` int64 CPU tensor, ``M = n // world_size`` (``drop_last``) or
        ``ceil(n / world_size)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if shuffle:
        g = torch.Generator().manual_seed(mix_seed("order", seed, epoch))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if world_size > 1:
        if drop_last:
            order = order[: (n // world_size) * world_size]
        else:
            total = math.ceil(n / world_size) * world_size
            if total > n and n > 0:
                reps = math.ceil(total / n)
                order = order.repeat(reps)[:total]
        order = order[rank::world_size]
    return order


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


def check_shard(batch_size: int, rank: int, world_size: int) -> None:
    """``ValueError`` unless ``batch_size >= 1`` and ``0 <= rank < world_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def hw_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` of an output size given as a side or a pair."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def relative_ratio(ratio: tuple[float, float], out_hw: tuple[int, int]) -> tuple[float, float]:
    """A random-resized-crop aspect range ``w / h`` taken relative to a rectangular output's ``W / H``, so
    crops are not stretched on average when resized to ``(H, W)`` (the range is unchanged for squares)."""
    a = out_hw[1] / out_hw[0]
    return ratio[0] * a, ratio[1] * a


class _CoverCrop:
    """Resize a PIL image so it covers ``(H, W)`` (aspect kept, bicubic), then center-crop to it."""

    def __init__(self, out_hw: tuple[int, int]):
        self.out_hw = out_hw

    def __call__(self, image):
        from .folder import _resize

        return _resize(image, self.out_hw, True, Image.Resampling.BICUBIC)


def folder_transform(
    out_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    augment: Literal["rrc_flip", "flip", "none"] = "rrc_flip",
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> Callable[[Image.Image], torch.Tensor]:
    """torchvision CPU transform: PIL image -> normalized float ``(C, H, W)`` (``out_size``: a side or ``(H, W)``).

    ``"rrc_flip"``: RandomResizedCrop(bicubic) + RandomHorizontalFlip; ``"flip"``: Resize(shorter
    side, bicubic) + CenterCrop + RandomHorizontalFlip; ``"none"``: Resize + CenterCrop. All end
    with ToTensor + Normalize. For a rectangular ``(H, W)`` the crop aspect range is relative to
    ``W / H`` and Resize + CenterCrop becomes a resize that covers ``(H, W)`` then a center crop.
    """
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    out_hw = hw_pair(out_size)
    if out_hw[0] != out_hw[1]:
        if augment not in ("rrc_flip", "flip", "none"):
            raise ValueError(f"augment must be 'rrc_flip', 'flip' or 'none', got {augment!r}")
        if augment == "rrc_flip":
            ops: list[Any] = [T.RandomResizedCrop(out_hw, scale=scale, ratio=relative_ratio(ratio, out_hw),
                                                  interpolation=bicubic), T.RandomHorizontalFlip(flip_p)]
        else:
            ops = [_CoverCrop(out_hw)] + ([T.RandomHorizontalFlip(flip_p)] if augment == "flip" else [])
        return T.Compose([*ops, T.ToTensor(), T.Normalize(list(mean), list(std))])
    if augment == "rrc_flip":
        ops: list[Any] = [
            T.RandomResizedCrop(out_size, scale=scale, ratio=ratio, interpolation=bicubic),
            T.RandomHorizontalFlip(flip_p),
        ]
    elif augment in ("flip", "none"):
        ops = [T.Resize(out_size, interpolation=bicubic), T.CenterCrop(out_size)]
        if augment == "flip":
            ops.append(T.RandomHorizontalFlip(flip_p))
    else:
        raise ValueError(f"augment must be 'rrc_flip', 'flip' or 'none', got {augment!r}")
    ops += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(ops)


WORKER_TERM_GRACE_S = 30
"""Seconds a DataLoader worker keeps serving batches after a SIGTERM (see :func:`worker_signals`)."""


def _deferred_exit(signum, frame) -> None:
    import signal

    signal.alarm(WORKER_TERM_GRACE_S)  # SIGALRM's default action ends the worker then


def worker_signals(_worker_id: int) -> None:
    """``worker_init_fn`` of every loader's DataLoader. Stop signals are the main process's business: it
    finishes its step, saves a checkpoint and stops (the workers follow it). Workers ignore SIGINT (a
    terminal's Ctrl-C reaches the whole process group), SIGHUP (so does a closed terminal's hang-up) and
    SIGUSR1 (SLURM's early warning); a SIGTERM (SLURM signals every process of a job step) ends a worker
    only after :data:`WORKER_TERM_GRACE_S` seconds, so the main process can still finish its step. A
    worker killed mid-step would break the main process's loader."""
    import signal

    for name in ("SIGINT", "SIGHUP", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGTERM, _deferred_exit)


def take_notes(notes: Iterable[str], skipped: dict[str, None]) -> None:
    """The notes of a batch's samples, as workers send them back: ``"error:<message>"`` raises
    :class:`~mimkit.errors.DataError` with the message, ``"skipped:<file>\\n..."`` adds the files to
    ``skipped`` (an ordered set), ``""`` says nothing."""
    for note in notes:
        if note.startswith("error:"):
            raise DataError(note[len("error:"):])
        if note.startswith("skipped:"):
            skipped.update(dict.fromkeys(note[len("skipped:"):].split("\n")))


def shutdown_workers(loader: torch.utils.data.DataLoader) -> None:
    """End a DataLoader's worker processes now (persistent workers otherwise live as long as it)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None
