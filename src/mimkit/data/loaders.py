"""Batch loaders with reproducible, resumable, rank-sharded epochs.

Both loaders yield ``(images, labels)``: ``images (B, C, S, S)`` float32, normalized with
``mean``/``std``, on ``device``; ``labels (B,)`` int64 on ``device`` (``-1`` for unlabeled data).

Determinism contract (both loaders):

* The epoch's sample order is ``randperm(N)`` from a CPU generator seeded with ``(seed, epoch)``,
  so it is the same on every rank and every device type.
* Rank ``r`` of ``world_size`` takes the strided shard ``order[r::world_size]`` after the order is
  cut to a multiple of ``world_size`` (``drop_last=True``) or padded by wrapping around
  (``drop_last=False``), so ranks are disjoint (``drop_last=True``) and together cover the data.
* Augmentation randomness depends only on ``(seed, epoch, position, rank)``, never on what ran
  before, so ``iter_from(epoch, start_batch)`` -- used when resuming from a checkpoint -- yields
  exactly the batches an uninterrupted epoch would have yielded from ``start_batch`` on.
* Epochs do not advance by themselves: call ``set_epoch(e)`` (or ``iter_from(e)``) every epoch.

Every loader (these two, :class:`~mimkit.data.gpu.JpegBatchLoader`, :class:`~mimkit.data.ShardLoader`)
follows the :class:`~mimkit.data.spec.Loader` protocol and takes its common settings as a
:class:`~mimkit.data.spec.LoaderSpec` (``spec=``) or as keyword arguments named like its fields.

Why this file is long: the two in-process loaders (in memory, image folder) share one determinism
and resume contract, stated once above and implemented next to it; their common helpers live in
:mod:`mimkit.data.common`, the settings in :class:`~mimkit.data.spec.LoaderSpec`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from mimkit.errors import DataError

from . import augment as aug
from .common import (
    check_shard,
    folder_transform,
    hw_pair,
    mix_seed,
    num_batches,
    relative_ratio,
    shard_indices,
    shutdown_workers,
    take_notes,
    worker_signals,
)
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
)
from .folder import ImageFolder, load_folder_to_tensor
from .spec import AugmentFn, Batch, Loader, LoaderSpec  # noqa: F401 (AugmentFn: its old home)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetInfo",
    "FolderLoader",
    "InMemoryLoader",
    "Loader",
    "LoaderSpec",
    "build_dataset",
    "build_loader",
    "folder_transform",
    "shard_indices",
]

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)

class InMemoryLoader:
    """Batches from a uint8 image tensor kept on ``device``; augmentation runs on ``device``.

    Args:
        images: ``(N, C, H, W)`` uint8. Copied to ``device`` once (kept as uint8: N*C*H*W bytes).
        labels: ``(N,)`` integer labels, or ``None`` (yields ``-1``).
        batch_size, spec, settings: a :class:`~mimkit.data.spec.LoaderSpec` (``spec``, and keyword
            arguments named like its fields, which replace the spec's); of its fields:
        batch_size: per-rank batch size ``B``.
        device: where the data lives and batches are produced.
        mean, std: per-channel normalization statistics for images scaled to ``[0, 1]``
            (length ``C`` or 1).
        augment: ``"rrc_flip"`` (random resized crop + flip, :func:`~mimkit.data.augment.
            random_resized_crop_flip`), ``"flip"``, ``"none"``, or a callable ``(images (B, C, H, W)
            float in [0, 1], generator) -> (B, C, S, S)``.
        out_size: output side ``S``; default ``H`` (requires ``H == W`` unless given). With
            ``"flip"``/``"none"`` and ``S != H`` the whole image is resized (bilinear).
        scale, ratio, flip_p, interpolation: random-resized-crop parameters.
        shuffle: new random order every epoch (else ``0..N-1``).
        drop_last: drop the last incomplete batch (and the samples that do not split evenly
            across ranks); else the last batch is smaller and ranks are padded by wrapping around.
        seed: base seed of the order and augmentation randomness.
        rank, world_size: this process's shard.
        (``num_workers``, ``pin_memory``, ``prefetch_factor`` and ``skip_corrupt`` do not apply.)

    ``len(loader)`` is the number of batches per epoch for this rank. Iteration yields
    ``images (B, C, S, S) float32`` normalized and ``labels (B,) int64``, both on ``device``.
    """

    streaming = False  # the images are in memory: no file is read while batches are made

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        batch_size: int | None = None,
        *,
        spec: LoaderSpec | None = None,
        interpolation: Literal["bilinear", "bicubic"] = "bilinear",
        **settings: Any,
    ) -> None:
        sp = self.spec = LoaderSpec.resolve("InMemoryLoader", batch_size, spec, settings)
        batch_size, device, mean, std, augment = sp.batch_size, sp.device, sp.mean, sp.std, sp.augment
        out_size, scale, ratio, flip_p = sp.out_size, sp.scale, sp.ratio, sp.flip_p
        shuffle, drop_last, seed, rank, world_size = sp.shuffle, sp.drop_last, sp.seed, sp.rank, sp.world_size
        check_shard(batch_size, rank, world_size)
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {images.dtype} {tuple(images.shape)}")
        n, c, h, w = images.shape
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64)
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
        if not (isinstance(augment, str) and augment in ("rrc_flip", "flip", "none") or callable(augment)):
            raise ValueError(f"augment must be 'rrc_flip', 'flip', 'none' or a callable, got {augment!r}")
        if out_size is None:
            if h != w:
                raise ValueError(f"images are {h}x{w} (not square): pass out_size")
            out_size = h
        out_hw = hw_pair(out_size)
        if out_hw[0] != out_hw[1]:
            ratio = relative_ratio(ratio, out_hw)
        if len(mean) not in (1, c) or len(std) not in (1, c):
            raise ValueError(f"mean/std need 1 or {c} entries, got {len(mean)} and {len(std)}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.out_size = int(out_size) if isinstance(out_size, int) else out_hw
        self.out_hw = out_hw
        self.scale = scale
        self.ratio = ratio
        self.flip_p = flip_p
        self.interpolation = interpolation
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skipped: dict[str, None] = {}  # nothing is decoded while batches are made: stays empty
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        if len(self) == 0:
            raise ValueError(
                f"no batches: {self.num_samples} samples per rank < batch_size {batch_size} with "
                "drop_last=True; lower batch_size or pass drop_last=False"
            )

    @property
    def num_samples(self) -> int:
        """Samples this rank visits per epoch (before dropping the last incomplete batch)."""
        n = self.images.shape[0]
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch ``__iter__`` plays (order and augmentation depend on it)."""
        self.epoch = int(epoch)

    def close(self) -> None:
        """Nothing to end (no workers or threads)."""

    def indices(self, epoch: int) -> torch.Tensor:
        """``(num_samples,)`` int64 CPU tensor: the sample order this rank visits in ``epoch``."""
        return shard_indices(
            self.images.shape[0],
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            rank=self.rank,
            world_size=self.world_size,
        )

    def generator(self, epoch: int, batch_index: int) -> torch.Generator:
        """The augmentation RNG for one batch, on ``device``, seeded from (seed, epoch, batch,
        rank)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed("augment", self.seed, epoch, batch_index, self.rank))
        return g

    def _transform(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> normalized float32 ``(B, C, S_h, S_w)``."""
        s = self.out_hw
        same_size = tuple(x.shape[-2:]) == s
        if self.augment == "rrc_flip":
            x = aug.random_resized_crop_flip(
                x.float().div_(255), s, self.scale, self.ratio, self.flip_p, g, self.interpolation
            )
        elif callable(self.augment):
            x = self.augment(x.float().div_(255), g)
        else:
            if self.augment == "flip":
                x = aug.flip_only(x, self.flip_p, g)
            x = x.float().div_(255)
            if not same_size:
                x = F.interpolate(x, size=s, mode="bilinear", align_corners=False, antialias=True)
        return (x - self._mean_t) / self._std_t

    def iter_from(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield batches ``start_batch, ..., len(self) - 1`` of ``epoch``.

        Identical to the tail of a full pass over ``epoch``, so a run resumed at
        ``(epoch, start_batch)`` sees the same data as an uninterrupted one.
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        order = self.indices(epoch).to(self.device)
        b = self.batch_size
        for i in range(start_batch, len(self)):
            idx = order[i * b : (i + 1) * b]
            x = self.images.index_select(0, idx)
            y = self.labels.index_select(0, idx)
            yield self._transform(x, self.generator(epoch, i)), y

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(self.epoch, 0)


# ----------------------------------------------------------------------------------------------
# Folder loader (CPU decoding in worker processes)
# ----------------------------------------------------------------------------------------------


class _SeededSampler(torch.utils.data.Sampler):
    """Yields ``(index, sample_seed)`` for this rank's shard of ``epoch``, from ``start`` on."""

    def __init__(self, n: int, shuffle: bool, drop_last: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.shuffle, self.drop_last = n, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.start = 0

    def indices(self, epoch: int) -> torch.Tensor:
        return shard_indices(
            self.n,
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.indices(self.epoch)[self.start :].tolist()
        for pos, i in enumerate(idx, start=self.start):
            yield i, mix_seed("sample", self.seed, self.epoch, self.rank, pos)

    @property
    def num_samples(self) -> int:
        """Samples in this rank's shard of one epoch."""
        return self.n // self.world_size if self.drop_last else math.ceil(self.n / self.world_size)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class _SeededDataset(torch.utils.data.Dataset):
    """Applies ``transform`` with the torch RNG seeded per sample (reproducible across workers).

    Items are ``(image, label, note)``: ``note`` is ``""``, ``"skipped:<path>..."`` (corrupt files
    skipped while loading this sample, with ``skip_corrupt``) or ``"error:<message>"`` (a corrupt
    file without ``skip_corrupt``; the image is then zeros). Notes travel back from worker
    processes, whose copies of the folder's counters the main process never sees."""

    def __init__(self, folder: ImageFolder, transform: Callable[[Image.Image], torch.Tensor],
                 shape: tuple[int, int, int]):
        self.folder = folder
        self.transform = transform
        self.shape = shape

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, str]:
        index, sample_seed = key
        before = len(self.folder.bad_files)
        try:
            image, label = self.folder.load(index)
        except DataError as e:
            return torch.zeros(self.shape), -1, "error:" + str(e)
        new = self.folder.bad_files[before:]
        note = "skipped:" + "\n".join(str(p) for p in new) if new else ""
        if torch.utils.data.get_worker_info() is not None:
            torch.manual_seed(sample_seed)  # a worker's global RNG belongs to the loader
            return self.transform(image), label, note
        with torch.random.fork_rng(devices=[]):  # main process: leave the caller's RNG alone
            torch.manual_seed(sample_seed)
            return self.transform(image), label, note


class FolderLoader:
    """Batches from an :class:`ImageFolder`, decoded and augmented on the CPU by worker processes.

    Args:
        folder: an :class:`ImageFolder` or a folder path (opened with ``labeled``, ``mode``,
            ``skip_corrupt``, ``follow_links``). Its own ``transform`` is not used.
        batch_size, spec, settings: a :class:`~mimkit.data.spec.LoaderSpec` (``spec``, and keyword
            arguments named like its fields, which replace the spec's); of its fields:
        batch_size: per-rank batch size.
        out_size: output side ``S``.
        mean, std: normalization statistics (length ``C`` or 1).
        augment: ``"rrc_flip"``, ``"flip"`` or ``"none"`` (see :func:`folder_transform`).
        scale, ratio, flip_p: random-resized-crop / flip parameters.
        num_workers: DataLoader worker processes (0 = decode in the main process).
        device: batches are moved there (``non_blocking`` from pinned memory on CUDA).
        pin_memory: default: ``True`` when ``device`` is CUDA.
        persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        prefetch_factor: batches prefetched per worker.
        shuffle, drop_last, seed, rank, world_size: as for :class:`InMemoryLoader`.

    The torch RNG is re-seeded for every sample from ``(seed, epoch, rank, position)``, so the
    augmentation does not depend on ``num_workers`` or on where iteration started.
    ``iter_from(epoch, start_batch)`` skips batches by slicing the index list (nothing is decoded
    for the skipped part).

    A corrupt file raises :class:`DataError` naming it in the main process (not a worker traceback);
    with ``skip_corrupt`` the skipped files, from every worker, collect in :attr:`skipped`. Workers
    leave stop signals to the main process (:func:`~mimkit.data.common.worker_signals`) so that the
    trainer can save a checkpoint on them. :meth:`close` ends persistent workers.
    """

    streaming = True

    def __init__(
        self,
        folder: ImageFolder | str | os.PathLike[str],
        batch_size: int | None = None,
        *,
        spec: LoaderSpec | None = None,
        persistent_workers: bool = True,
        labeled: bool | Literal["auto"] = "auto",
        mode: Literal["RGB", "L"] = "RGB",
        follow_links: bool = False,
        **settings: Any,
    ) -> None:
        sp = self.spec = LoaderSpec.resolve("FolderLoader", batch_size, spec, settings,
                                            needs=("mean", "std", "out_size"))
        batch_size, out_size, mean, std, augment = sp.batch_size, sp.out_size, sp.mean, sp.std, sp.augment
        scale, ratio, flip_p, num_workers, device = sp.scale, sp.ratio, sp.flip_p, sp.num_workers, sp.device
        pin_memory, prefetch_factor = sp.pin_memory, sp.prefetch_factor or 2
        shuffle, drop_last, seed, rank, world_size = sp.shuffle, sp.drop_last, sp.seed, sp.rank, sp.world_size
        skip_corrupt = sp.skip_corrupt
        check_shard(batch_size, rank, world_size)
        if not isinstance(folder, ImageFolder):
            folder = ImageFolder(folder, labeled=labeled, mode=mode, skip_corrupt=skip_corrupt,
                                 follow_links=follow_links)
        self.folder = folder
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.epoch = 0
        self.drop_last = drop_last
        self.sampler = _SeededSampler(len(folder), shuffle, drop_last, seed, rank, world_size)
        transform = folder_transform(out_size, mean, std, augment, scale, ratio, flip_p)
        self.skipped: dict[str, None] = {}  # corrupt files skipped so far (ordered set), all workers
        if pin_memory is None:
            pin_memory = self.device.type == "cuda"
        self.pin_memory = pin_memory
        workers = dict(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
        self.loader = torch.utils.data.DataLoader(
            _SeededDataset(folder, transform, (folder.in_chans, *hw_pair(out_size))),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),  # worker base seeds; not the global RNG
            worker_init_fn=worker_signals if num_workers > 0 else None,
            **(workers if num_workers > 0 else {}),
        )
        if len(self) == 0:
            raise ValueError(
                f"no batches: fewer samples per rank than batch_size {batch_size} with "
                "drop_last=True; lower batch_size or pass drop_last=False"
            )

    def __len__(self) -> int:
        return num_batches(self.sampler.num_samples, self.batch_size, self.drop_last)

    def close(self) -> None:
        """End the worker processes now (persistent workers otherwise live as long as the loader)."""
        shutdown_workers(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch ``__iter__`` plays."""
        self.epoch = int(epoch)

    def indices(self, epoch: int) -> torch.Tensor:
        """``(M,)`` int64: the sample order this rank visits in ``epoch``."""
        return self.sampler.indices(epoch)

    def iter_from(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield batches ``start_batch, ..., len(self) - 1`` of ``epoch`` (see the class doc)."""
        total = len(self)
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch must be in [0, {total}], got {start_batch}")
        self.sampler.epoch = int(epoch)
        self.sampler.start = start_batch * self.batch_size
        non_blocking = self.pin_memory and self.device.type == "cuda"
        for x, y, notes in self.loader:  # the sampler is read here, in the main process
            take_notes(notes, self.skipped)
            yield (
                x.to(self.device, non_blocking=non_blocking),
                y.to(self.device, torch.int64, non_blocking=non_blocking),
            )

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(self.epoch, 0)


# ----------------------------------------------------------------------------------------------
# build_dataset / build_loader
# ----------------------------------------------------------------------------------------------

_FASHION_NAMES = ("fashion_mnist", "fashion-mnist", "fashionmnist", "fmnist")


@dataclass
class DatasetInfo:
    """A data set ready for a loader.

    Exactly one of ``images``/``labels`` (in memory) or ``folder`` (decoded on the fly) is set.

    Attributes:
        name: ``"fashion_mnist"`` or the folder path.
        split: the split asked for.
        images: ``(N, C, H, W)`` uint8 (CPU) for in-memory data sets.
        labels: ``(N,)`` int64 (``-1`` when unlabeled) for in-memory data sets.
        folder: the :class:`ImageFolder` for folder data sets.
        in_chans: image channels ``C``.
        num_classes: number of classes (0 when unlabeled).
        mean, std: normalization statistics to use.
        image_size: ``H`` (= ``W``) of in-memory images; ``None`` for folders.
        classes: class names (empty when unlabeled).
        skipped: corrupt files left out while decoding into memory (``skip_corrupt``); streamed
            folders report theirs through :attr:`FolderLoader.skipped` as they meet them.
    """

    name: str
    split: str
    in_chans: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    folder: ImageFolder | None = None
    image_size: int | None = None
    classes: tuple[str, ...] = field(default_factory=tuple)
    skipped: tuple[str, ...] = field(default_factory=tuple)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        if self.images is not None:
            return int(self.images.shape[0])
        assert self.folder is not None
        return len(self.folder)


def build_dataset(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    root: str | os.PathLike[str] | None = None,
    in_memory_size: int | Sequence[int] | None = None,
    labeled: bool | Literal["auto"] = "auto",
    mode: Literal["RGB", "L"] = "RGB",
    skip_corrupt: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    limit: int | None = None,
    follow_links: bool = False,
) -> DatasetInfo:
    """Open a data set by name or folder path.

    Args:
        source: ``"fashion_mnist"`` (aliases ``"fashion-mnist"``, ``"fmnist"``): loaded into memory
            with :func:`~mimkit.data.load_fashion_mnist`. Otherwise a folder path: if it has a
            sub-folder named ``split`` (e.g. ``root/train``, ``root/val``) that is used, else the
            folder itself; see :class:`~mimkit.data.ImageFolder`.
        split: ``"train"`` or ``"test"`` for Fashion-MNIST; a sub-folder name for folders.
        root: where to look for Fashion-MNIST (default: :func:`find_fashion_mnist`'s search).
        in_memory_size: folders only: decode every image once, resized to this size, into an
            in-memory tensor (:func:`load_folder_to_tensor`) instead of decoding on the fly.
        labeled, mode, skip_corrupt, follow_links: folders only, see :class:`~mimkit.data.ImageFolder`
            (symbolic links are skipped unless ``follow_links``).
        mean, std: override the normalization statistics (defaults: Fashion-MNIST's own; ImageNet's
            for RGB folders; ``(0.5,)`` for grey-scale folders).
        limit: use only the first ``limit`` images (Fashion-MNIST's order; a folder's sorted file
            list, applied before decoding, in memory or streamed). ``None``: all; must be >= 1.

    Returns:
        :class:`DatasetInfo`; pass it to :func:`build_loader`.

    Raises:
        DataError: unknown name / missing folder / missing or corrupt files.
    """
    name = str(source)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of images or None (all), got {limit!r}")
    if name.lower() in _FASHION_NAMES:
        images, labels = load_fashion_mnist(root, split)  # type: ignore[arg-type]
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return DatasetInfo(
            name="fashion_mnist",
            split=split,
            in_chans=1,
            num_classes=len(FASHION_MNIST_CLASSES),
            mean=tuple(mean or FASHION_MNIST_MEAN),
            std=tuple(std or FASHION_MNIST_STD),
            images=images,
            labels=labels,
            image_size=28,
            classes=FASHION_MNIST_CLASSES,
        )
    path = Path(source).expanduser()
    if not path.is_dir():
        raise DataError(
            f"unknown data set {name!r}: not a known name ({', '.join(_FASHION_NAMES)}) and not an "
            "existing folder. Pass 'fashion_mnist' or the path of an image folder."
        )
    if (path / split).is_dir():
        path = path / split
    folder = ImageFolder(path, labeled=labeled, mode=mode, skip_corrupt=skip_corrupt, follow_links=follow_links)
    if limit is not None:
        folder.samples = folder.samples[:limit]
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if mode == "RGB" else ((0.5,), (0.5,))
    info = DatasetInfo(
        name=str(path),
        split=split,
        in_chans=folder.in_chans,
        num_classes=folder.num_classes,
        mean=tuple(mean or default_mean),
        std=tuple(std or default_std),
        folder=folder,
        classes=tuple(folder.classes),
    )
    if in_memory_size is not None:
        info.images, info.labels = load_folder_to_tensor(folder, in_memory_size)
        info.folder = None
        info.image_size = in_memory_size
        info.skipped = tuple(str(p) for p in folder.bad_files)
    return info


def build_loader(
    dataset: DatasetInfo,
    batch_size: int | None = None,
    *,
    spec: LoaderSpec | None = None,
    decode: str = "cpu",
    **settings: Any,
) -> Loader:
    """An :class:`InMemoryLoader` (in-memory data), :class:`FolderLoader` or
    :class:`~mimkit.data.gpu.JpegBatchLoader` for ``dataset``.

    Args:
        dataset: from :func:`build_dataset`; its ``mean``/``std`` are used.
        batch_size, spec: the :class:`~mimkit.data.spec.LoaderSpec` (or its ``batch_size`` and keyword
            settings named like its fields, which replace the spec's; defaults: ``augment="rrc_flip"``,
            ``device="cpu"``, ``num_workers=4``). ``out_size`` defaults to the in-memory image size,
            or 224 for folders.
        decode: folders only: ``"cpu"`` (PIL in the workers), ``"gpu"`` (nvJPEG on ``device``,
            :class:`~mimkit.data.gpu.JpegBatchLoader`) or ``"auto"`` (gpu where it works).
        **settings: LoaderSpec fields, and the chosen loader's own options (``interpolation``, ...).
    """
    fields = {f.name for f in dataclasses.fields(LoaderSpec)}
    extras = {k: v for k, v in settings.items() if k not in fields}
    settings = {k: v for k, v in settings.items() if k in fields}
    spec = LoaderSpec.resolve("build_loader", batch_size, spec, settings, needs=())
    spec = dataclasses.replace(spec, mean=dataset.mean, std=dataset.std)
    if dataset.images is not None:
        return InMemoryLoader(dataset.images, dataset.labels, spec=spec, **extras)
    assert dataset.folder is not None
    spec = dataclasses.replace(spec, out_size=spec.out_size or 224)
    if decode != "cpu":
        from .gpu import JpegBatchLoader, resolve_decode

        if resolve_decode(decode, spec.device) == "gpu":
            return JpegBatchLoader(dataset.folder, spec=spec, **extras)
    return FolderLoader(dataset.folder, spec=spec, **extras)
