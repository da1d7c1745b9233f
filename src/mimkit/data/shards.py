"""Tar shards (webdataset layout) for data that does not fit: writing (``mimkit data prepare``) and a
streaming loader with a shuffle buffer and an exact, resumable position.

Layout of a shard directory::

    OUT/index.json              {"format": "mimkit-shards-v1", "num_samples", "resize", "mode", "classes",
                                 "shards": [{"name", "bytes", "samples"}, ...]}
    OUT/shard-000000.tar        webdataset members: <key>.jpg|png|... (the original file's bytes) or
                                <key>.npy (uint8 (C, N, N), already resized with ``--resize N``), and
                                <key>.cls (the label, when the folder has class sub-folders)
    OUT/shard-000000.idx.npy    int64 (n, 3): the byte offset and size of each sample's image member
                                in the tar, and its label (-1: none)

The tars are plain webdataset shards (``webdataset.WebDataset("OUT/shard-{000000..000099}.tar")``
reads them). mimkit reads an image member straight at its offset from the ``.idx.npy`` table, so it
never scans a tar; ``index.json`` is written last and marks a complete directory.

Order (:class:`ShardLoader`): every epoch the shards are permuted with a generator seeded from
``(seed, epoch)`` and dealt to the ranks in strides (``order[rank::world_size]``); each rank streams
its shards' samples in file order through a shuffle buffer of ``shuffle_buffer`` samples (a
generator seeded from ``(seed, epoch, rank)`` picks which buffered sample leaves). That stream is a
pure function of the index tables and ``(seed, epoch, rank)``, so the loader computes it without any
I/O and ``iter_from(epoch, start_batch)`` -- a mid-epoch resume -- yields exactly the batches an
uninterrupted epoch yields from ``start_batch`` on: nothing has to be saved but the step, and a
resumed run reads only the samples it has not seen. Augmentation randomness is per sample (original
images, CPU transforms in the workers, as :class:`~mimkit.data.FolderLoader`) or per batch
(pre-resized uint8 images, augmented on ``device`` as :class:`~mimkit.data.InMemoryLoader` does:
no JPEG decoding on the input path).

Every rank plays the same number of batches per epoch: the count the rank with the fewest samples
can fill whatever shards it is dealt (the sum of the ``shards // world_size`` smallest shards);
samples past it are dropped for that epoch (as ``drop_last`` drops a partial batch).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import augment as aug
from .errors import DataError
from .folder import ImageFolder, _open_image, _resize, convert_image
from .loaders import _mix, _worker_signals, folder_transform

__all__ = ["FORMAT", "ShardIndex", "ShardLoader", "is_shard_dir", "prepare_shards"]

FORMAT = "mimkit-shards-v1"
INDEX = "index.json"


def is_shard_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory written by :func:`prepare_shards` (it has ``index.json``)."""
    p = Path(path).expanduser() / INDEX
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Add ``name`` holding ``data``; returns the byte offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))
    # the data ends the written part, padded to a 512-byte block: it starts that far back
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _image_payload(path: Path, mode: str, resize: int | None) -> tuple[str, bytes]:
    """``(extension, bytes)`` of one sample: the file itself (checked to decode), or with ``resize``
    the uint8 ``(C, N, N)`` array (shorter side to N, center crop) as ``.npy``."""
    image = _open_image(path, mode)  # raises DataError naming the file when it does not decode
    if resize is None:
        ext = path.suffix.lower().lstrip(".")
        return ("jpg" if ext == "jpeg" else ext), path.read_bytes()
    arr = np.asarray(_resize(image, resize, True, Image.Resampling.BICUBIC), dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr))
    return "npy", buf.getvalue()


def _write_shard(job: tuple[str, list[tuple[int, str, int]], str, int | None, bool]) -> dict:
    """Write one shard (in a worker process): ``(path, [(key, file, label)], mode, resize,
    skip_corrupt)`` -> ``{"name", "bytes", "samples", "bad": [files]}``. Written to a temporary
    name and renamed, with its offset table."""
    out, items, mode, resize, skip_corrupt = job
    out_p = Path(out)
    tmp = out_p.with_name(f".{out_p.name}.tmp-{os.getpid()}")
    rows, bad = [], []
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, file, label in items:
                try:
                    ext, data = _image_payload(Path(file), mode, resize)
                except DataError:
                    if not skip_corrupt:
                        raise
                    bad.append(file)
                    continue
                k = f"{key:09d}"
                off = _member(tar, f"{k}.{ext}", data)
                rows.append((off, len(data), label, ext == "npy"))
                if label >= 0:
                    _member(tar, f"{k}.cls", str(label).encode())
        os.replace(tmp, out_p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    table = np.array([r[:3] for r in rows], dtype=np.int64).reshape(-1, 3)
    np.save(out_p.with_name(out_p.name[: -len(".tar")] + ".idx.npy"), table)
    return {"name": out_p.name, "bytes": out_p.stat().st_size, "samples": len(rows), "bad": bad}


def prepare_shards(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    shard_size: int = 1000,
    resize: int | None = None,
    mode: Literal["RGB", "L"] = "RGB",
    labeled: bool | Literal["auto"] = "auto",
    skip_corrupt: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write the images under ``src`` (an image folder, see :class:`~mimkit.data.ImageFolder`) as tar
    shards of ``shard_size`` samples into ``out`` (see the module docstring); returns the index.

    ``resize``: store uint8 arrays of ``resize x resize`` (shorter side resized, center crop) instead
    of the encoded files, so training skips decoding. ``workers``: processes writing shards in
    parallel. A corrupt image raises :class:`DataError` naming it (``skip_corrupt``: left out and
    listed in the index). ``out`` must be empty or absent; ``index.json`` is written last."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    if resize is not None and resize < 1:
        raise DataError(f"--resize must be a positive image side, got {resize}")
    folder = ImageFolder(src, labeled=labeled, mode=mode, skip_corrupt=skip_corrupt)
    out_p = Path(out).expanduser()
    if out_p.exists() and (not out_p.is_dir() or any(out_p.iterdir())):
        raise DataError(f"{out_p} exists and is not an empty directory; choose a new OUT_DIR or delete it")
    out_p.mkdir(parents=True, exist_ok=True)
    samples = [(i, str(p), int(lab)) for i, (p, lab) in enumerate(folder.samples)]
    jobs = [(str(out_p / f"shard-{j:06d}.tar"), samples[s : s + shard_size], mode, resize, skip_corrupt)
            for j, s in enumerate(range(0, len(samples), shard_size))]
    from tqdm import tqdm

    bar = tqdm(total=len(samples), unit="img", desc=f"writing {len(jobs)} shard(s)", disable=not progress)
    results: list[dict] = []
    try:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for r, job in zip(pool.imap(_write_shard, jobs), jobs):
                    results.append(r)
                    bar.update(len(job[1]))
        else:
            for job in jobs:
                results.append(_write_shard(job))
                bar.update(len(job[1]))
    finally:
        bar.close()
    bad = [f for r in results for f in r.pop("bad")]
    n = sum(r["samples"] for r in results)
    if n == 0:
        raise DataError(f"every image under {folder.root} is corrupt or unreadable; nothing was written")
    index = {"format": FORMAT, "num_samples": n, "resize": resize, "mode": mode,
             "in_chans": 1 if mode == "L" else 3, "classes": list(folder.classes), "source": str(folder.root),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "skipped": bad, "shards": results}
    tmp = out_p / f".{INDEX}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_p / INDEX)
    return index


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


class ShardIndex:
    """A shard directory's index, checked: every shard exists with the size it was written with."""

    def __init__(self, root: str | os.PathLike[str], limit: int | None = None):
        self.root = Path(root).expanduser()
        path = self.root / INDEX
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is missing or unreadable ({e}); re-run `mimkit data prepare` into a new "
                            "directory") from e
        if meta.get("format") != FORMAT:
            raise DataError(f"{path} is not a mimkit shard index (format {meta.get('format')!r}); write the shards "
                            "with `mimkit data prepare SRC_FOLDER OUT_DIR`")
        self.meta = meta
        self.resize: int | None = meta.get("resize")
        self.mode: str = meta.get("mode", "RGB")
        self.in_chans: int = int(meta.get("in_chans", 3))
        self.classes: list[str] = list(meta.get("classes", []))
        self.names: list[str] = []
        self.tables: list[np.ndarray] = []
        left = limit
        for sh in meta["shards"]:
            tar = self.root / sh["name"]
            idx = tar.with_name(sh["name"][: -len(".tar")] + ".idx.npy")
            fix = ("restore it from the source, or re-run `mimkit data prepare` (data.limit can leave out later "
                   "shards)")
            if not tar.is_file():
                raise DataError(f"shard {tar} is missing; {fix}")
            size = tar.stat().st_size
            if size != sh["bytes"]:
                raise DataError(f"shard {tar} has {size} bytes, {sh['bytes']} were written (truncated or "
                                f"replaced); {fix}")
            try:
                table = np.load(idx)
            except (OSError, ValueError) as e:
                raise DataError(f"shard table {idx} is missing or unreadable ({type(e).__name__}); {fix}") from e
            if table.shape != (sh["samples"], 3):
                raise DataError(f"shard table {idx} lists {table.shape[0]} samples, index.json {sh['samples']}; {fix}")
            if left is not None:
                table = table[:left]
                left -= len(table)
            if len(table):
                self.names.append(sh["name"])
                self.tables.append(table)
            if left == 0:
                break
        self.sizes = np.array([len(t) for t in self.tables], dtype=np.int64)
        if not len(self.tables):
            raise DataError(f"{self.root} holds no samples")

    def __len__(self) -> int:
        return int(self.sizes.sum())

    @property
    def num_shards(self) -> int:
        return len(self.tables)

    def samples_per_rank(self, world_size: int) -> int:
        """Samples every rank is sure to be dealt in any epoch (the ``shards // world_size`` smallest)."""
        k = self.num_shards // world_size
        return int(np.sort(self.sizes)[:k].sum())


def shard_stream(index: ShardIndex, *, epoch: int, seed: int, rank: int, world_size: int, shuffle: bool,
                 buffer: int) -> np.ndarray:
    """``(M, 2)`` int64 ``(shard, member)`` in the order rank ``rank`` reads epoch ``epoch`` (see the
    module docstring); computed from the index alone."""
    s = index.num_shards
    if shuffle:
        g = torch.Generator().manual_seed(_mix("shards", seed, epoch))
        order = torch.randperm(s, generator=g).numpy()
    else:
        order = np.arange(s)
    mine = order[: (s // world_size) * world_size][rank::world_size]
    seq = np.concatenate([np.stack([np.full(index.sizes[j], j), np.arange(index.sizes[j])], 1) for j in mine]
                         ) if len(mine) else np.zeros((0, 2), np.int64)
    if not shuffle or buffer <= 1 or len(seq) <= 1:
        return seq.astype(np.int64)
    rng = np.random.default_rng(_mix("buffer", seed, epoch, rank))
    n = len(seq)
    out = np.empty(n, dtype=np.int64)  # positions into seq
    pool: list[int] = []
    picks = rng.integers(0, 1 << 62, size=n)
    o = 0
    for i in range(n):  # fill the buffer; once full, every arrival lets one random buffered sample out
        pool.append(i)
        if len(pool) >= buffer:
            j = int(picks[o] % len(pool))
            out[o] = pool[j]
            pool[j] = pool[-1]
            pool.pop()
            o += 1
    while pool:  # drain in random order
        j = int(picks[o] % len(pool))
        out[o] = pool[j]
        pool[j] = pool[-1]
        pool.pop()
        o += 1
    return seq[out].astype(np.int64)


class _ShardSampler(torch.utils.data.Sampler):
    """Yields ``(shard, member, sample_seed)`` of this rank's epoch from sample ``start`` on."""

    def __init__(self, loader: ShardLoader):
        self.loader = loader
        self.epoch, self.start, self.stop = 0, 0, 0

    def __iter__(self):
        ld = self.loader
        seq = ld.stream(self.epoch)[self.start : self.stop]
        for pos, (sh, m) in enumerate(seq.tolist(), start=self.start):
            yield sh, m, _mix("sample", ld.seed, self.epoch, ld.rank, pos)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class _ShardDataset(torch.utils.data.Dataset):
    """Reads one sample at its offset; items ``(image, label, note)`` as ``_SeededDataset``'s
    (``note``: ``""``, ``"skipped:<what>"`` or ``"error:<message>"``)."""

    def __init__(self, index: ShardIndex, transform: Callable | None, skip_corrupt: bool):
        self.root, self.names, self.tables = index.root, index.names, index.tables
        self.resize, self.mode, self.in_chans = index.resize, index.mode, index.in_chans
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables)

    def _read(self, shard: int, member: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= 8:  # keep a few shards open per worker
                self._files.pop(next(iter(self._files))).close()
            f = self._files[shard] = open(self.root / self.names[shard], "rb")  # noqa: SIM115
        off, size, _ = self.tables[shard][member]
        f.seek(int(off))
        data = f.read(int(size))
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes)")
        return data

    def _decode(self, shard: int, member: int):
        data = self._read(shard, member)
        if self.resize is not None:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if arr.dtype != np.uint8 or arr.shape != (self.in_chans, self.resize, self.resize):
                raise ValueError(f"array {arr.dtype} {arr.shape}, expected uint8 "
                                 f"({self.in_chans}, {self.resize}, {self.resize})")
            return torch.from_numpy(arr.copy())
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return convert_image(im, self.mode)

    def __getitem__(self, key: tuple[int, int, int]):
        shard, member, sample_seed = key
        note = ""
        n = len(self.tables[shard])
        for attempt in range(min(4, n)):  # skip_corrupt: the next sample of the same shard stands in
            m = (member + attempt) % n
            try:
                image = self._decode(shard, m)
                label = int(self.tables[shard][m][2])
                break
            except Exception as e:
                what = f"{self.root / self.names[shard]} sample {m} ({type(e).__name__}: {e})"
                if not self.skip_corrupt:
                    shape = (self.in_chans, 1, 1)
                    return torch.zeros(shape, dtype=torch.uint8), -1, (
                        f"error:corrupt sample in shard {what}. Re-run `mimkit data prepare`, restore the shard, "
                        "or set data.skip_corrupt=true to skip such samples")
                note = (note + "\n" if note else "skipped:") + f"{self.root / self.names[shard]}#{m}"
        else:
            return torch.zeros((self.in_chans, 1, 1), dtype=torch.uint8), -1, (
                f"error:{min(4, n)} corrupt samples in a row in shard {self.root / self.names[shard]}; restore it or "
                "re-run `mimkit data prepare`")
        if self.transform is None:
            return image, label, note
        if torch.utils.data.get_worker_info() is not None:
            torch.manual_seed(sample_seed)
            return self.transform(image), label, note
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.transform(image), label, note


def _collate(items):
    """Stack a batch; a batch holding an error note keeps only the notes (shapes may differ)."""
    images, labels, notes = zip(*items)
    if any(n.startswith("error:") for n in notes):
        return None, None, list(notes)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(notes)


class ShardLoader:
    """Batches from a shard directory (:func:`prepare_shards`) with an exact, resumable position.

    Args:
        root: the shard directory (or an opened :class:`ShardIndex`).
        batch_size: per-rank batch size.
        out_size: output side ``S``.
        mean, std: normalization statistics.
        augment: ``"rrc_flip"``, ``"flip"`` or ``"none"``; original images use the CPU transforms of
            :func:`~mimkit.data.folder_transform` per sample; pre-resized shards the batched
            on-device augmentation of :class:`~mimkit.data.InMemoryLoader`.
        scale, ratio, flip_p: random-resized-crop / flip parameters.
        shuffle_buffer: samples held in the shuffle buffer (1: shard order only).
        num_workers, device, pin_memory, prefetch_factor: as :class:`~mimkit.data.FolderLoader`.
        shuffle: permute shards and use the buffer (else file order).
        seed, rank, world_size: the order's seed and this process's share.
        skip_corrupt: a sample that does not decode is replaced by the next one of its shard and
            listed in :attr:`skipped`; else :class:`DataError` naming the shard.
        limit: use only the first ``limit`` samples (index order).

    ``len(loader)``: batches per epoch, the same on every rank (module docstring). Iteration yields
    ``images (B, C, S, S)`` float32 normalized and ``labels (B,)`` int64 on ``device``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | ShardIndex,
        batch_size: int,
        *,
        out_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        augment: Literal["rrc_flip", "flip", "none"] = "rrc_flip",
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        shuffle_buffer: int = 4096,
        num_workers: int = 4,
        device: torch.device | str = "cpu",
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip_corrupt: bool = False,
        limit: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.index = root if isinstance(root, ShardIndex) else ShardIndex(root, limit)
        ix = self.index
        if ix.num_shards < world_size:
            raise DataError(f"{ix.root} has {ix.num_shards} shard(s), fewer than the {world_size} processes; re-run "
                            "`mimkit data prepare` with a smaller --shard-size (at least one shard per process, "
                            "better several per DataLoader worker)")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.device = torch.device(device)
        self.out_size, self.augment = (int(out_size) if isinstance(out_size, int) else tuple(out_size)), augment
        self.scale, self.ratio, self.flip_p = scale, ratio, flip_p
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.epoch = 0
        self.skipped: dict[str, None] = {}
        self._streams: dict[int, np.ndarray] = {}
        self.pre_resized = ix.resize is not None
        transform = None if self.pre_resized else folder_transform(out_size, mean, std, augment, scale, ratio, flip_p)
        if pin_memory is None:
            pin_memory = self.device.type == "cuda"
        self.pin_memory = pin_memory
        self.sampler = _ShardSampler(self)
        workers = dict(persistent_workers=True, prefetch_factor=prefetch_factor) if num_workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(
            _ShardDataset(ix, transform, skip_corrupt), batch_size=batch_size, sampler=self.sampler,
            num_workers=num_workers, pin_memory=pin_memory, drop_last=True, collate_fn=_collate,
            worker_init_fn=_worker_signals if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # worker base seeds; never the global RNG
            **workers)
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        if len(self) == 0:
            raise ValueError(f"no batches: {ix.samples_per_rank(world_size)} samples per rank < batch_size "
                             f"{batch_size}")

    @property
    def num_samples(self) -> int:
        return self.index.samples_per_rank(self.world_size)

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def stream(self, epoch: int) -> np.ndarray:
        """``(M, 2)`` ``(shard, member)`` this rank reads in ``epoch`` (cached for the current epoch)."""
        if epoch not in self._streams:
            self._streams = {epoch: shard_stream(self.index, epoch=epoch, seed=self.seed, rank=self.rank,
                                                 world_size=self.world_size, shuffle=self.shuffle,
                                                 buffer=self.shuffle_buffer)}
        return self._streams[epoch]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None

    def _augment(self, x: torch.Tensor, epoch: int, batch_index: int) -> torch.Tensor:
        """Pre-resized uint8 batch -> normalized float, augmented on ``device`` (per-batch generator)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(_mix("augment", self.seed, epoch, batch_index, self.rank))
        s = self.out_size
        if self.augment == "rrc_flip":
            x = aug.random_resized_crop_flip(x.float().div_(255), s, self.scale, self.ratio, self.flip_p, g)
        else:
            if self.augment == "flip":
                x = aug.flip_only(x, self.flip_p, g)
            x = x.float().div_(255)
            hw = (s, s) if isinstance(s, int) else tuple(s)
            if tuple(x.shape[-2:]) != hw:
                x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
        return (x - self._mean_t) / self._std_t

    def iter_from(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch, ..., len(self) - 1`` of ``epoch``: the tail of a full pass."""
        total = len(self)
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch must be in [0, {total}], got {start_batch}")
        self.sampler.epoch = int(epoch)
        self.sampler.start = start_batch * self.batch_size
        self.sampler.stop = total * self.batch_size
        non_blocking = self.pin_memory and self.device.type == "cuda"
        for i, (x, y, notes) in enumerate(self.loader, start=start_batch):
            for note in notes:
                if note.startswith("error:"):
                    raise DataError(note[len("error:"):])
                if note.startswith("skipped:"):
                    self.skipped.update(dict.fromkeys(note[len("skipped:"):].split("\n")))
            x = x.to(self.device, non_blocking=non_blocking)
            if self.pre_resized:
                x = self._augment(x, epoch, i)
            yield x, y.to(self.device, torch.int64, non_blocking=non_blocking)

    def __iter__(self):
        return self.iter_from(self.epoch, 0)
