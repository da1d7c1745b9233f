"""What a batch loader is told and what it promises.

Owns: :class:`LoaderSpec`, the settings every loader takes (batch size, output size, normalization,
augmentation, order, this process's share, device and workers), and :class:`Loader`, the protocol
the four loaders follow (:class:`~mimkit.data.InMemoryLoader`, :class:`~mimkit.data.FolderLoader`,
:class:`~mimkit.data.gpu.JpegBatchLoader`, :class:`~mimkit.data.ShardLoader`) and the trainer relies
on: a resumable, rank-sharded epoch (``iter_from``), the corrupt files skipped so far, ``close``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["AugmentFn", "Batch", "Loader", "LoaderSpec"]

Batch = tuple[torch.Tensor, torch.Tensor]
"""``images (B, C, S_h, S_w)`` float32 normalized, ``labels (B,)`` int64 (``-1``: unlabeled), on the device."""

AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""Custom in-memory augmentation: ``(images (B, C, H, W) float in [0, 1], generator) -> images``."""


@dataclass(frozen=True)
class LoaderSpec:
    """The settings every loader takes (each loader documents the ones it does not use).

    Attributes:
        batch_size: per-rank batch size ``B``.
        mean, std: per-channel normalization statistics for images in ``[0, 1]`` (length ``C`` or 1).
        out_size: output side ``S`` or ``(S_h, S_w)``; ``None``: the in-memory images' size (other
            loaders need it).
        augment: ``"rrc_flip"`` (random resized crop + horizontal flip), ``"flip"``, ``"none"`` (or, in
            memory only, an :data:`AugmentFn`).
        scale, ratio, flip_p: random-resized-crop area and aspect ranges, flip probability.
        shuffle: a new random order every epoch (else file/index order).
        drop_last: drop the last incomplete batch (and the samples that do not split evenly across
            ranks); else the last batch is smaller and ranks are padded by wrapping around.
        seed: base seed of the order and augmentation randomness.
        rank, world_size: this process's share of every epoch.
        device: where batches are produced.
        num_workers: DataLoader worker processes (0: the main process).
        pin_memory: ``None``: when ``device`` is CUDA.
        prefetch_factor: batches each worker prepares ahead; ``None``: the loader's own (2; 4 for
            :class:`~mimkit.data.gpu.JpegBatchLoader`).
        skip_corrupt: skip (and record) files that do not decode instead of raising ``DataError``.
    """

    batch_size: int
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    out_size: int | Sequence[int] | None = None
    augment: str | AugmentFn = "rrc_flip"
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    shuffle: bool = True
    drop_last: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device: torch.device | str = "cpu"
    num_workers: int = 4
    pin_memory: bool | None = None
    prefetch_factor: int | None = None
    skip_corrupt: bool = False

    @classmethod
    def resolve(cls, owner: str, batch_size: int | None, spec: LoaderSpec | None, settings: Mapping[str, Any],
                defaults: Mapping[str, Any] | None = None, needs: Sequence[str] = ("mean", "std")) -> LoaderSpec:
        """The spec of a loader constructor called as ``owner(..., batch_size, spec=spec, **settings)``:
        ``spec`` with ``settings`` (and ``batch_size``) replacing its fields, or a new one from
        ``batch_size``, the loader's ``defaults`` and ``settings``. ``TypeError`` for a setting that is
        not a field or a missing one of ``needs``, as for a keyword argument."""
        unknown = sorted(set(settings) - _FIELDS)
        if unknown:
            raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
        given = dict(settings) if batch_size is None else {"batch_size": batch_size, **settings}
        if spec is None:
            if "batch_size" not in given:
                raise TypeError(f"{owner}() needs a batch_size or a spec")
            spec = cls(**{**(defaults or {}), **given})
        elif given:
            spec = dataclasses.replace(spec, **given)
        missing = [n for n in needs if getattr(spec, n) is None]
        if missing:
            raise TypeError(f"{owner}() is missing the setting {missing[0]!r}")
        return spec


_FIELDS = frozenset(f.name for f in dataclasses.fields(LoaderSpec))


@runtime_checkable
class Loader(Protocol):
    """A resumable, rank-sharded batch loader (see :mod:`mimkit.data.loaders` for the order contract).

    ``len(loader)``: batches per epoch on this rank. ``iter_from(epoch, start_batch)`` yields batches
    ``start_batch ..`` of ``epoch``, exactly as an uninterrupted pass over ``epoch`` would. ``streaming``:
    files are read as batches are made, so a corrupt one can be met mid-run (a ``DataError`` at that
    batch, or recorded in ``skipped`` with ``skip_corrupt``); in-memory loaders are not. ``close()``
    ends worker processes and threads (a no-op where there are none)."""

    spec: LoaderSpec
    streaming: bool
    skipped: dict[str, None]

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def iter_from(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def close(self) -> None: ...
