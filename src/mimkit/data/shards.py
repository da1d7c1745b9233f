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
never scans a tar (member names are never used); ``index.json`` is written last and marks a complete
directory.

Trust (:class:`ShardIndex`): a shard name in ``index.json`` must be a plain ``shard-NNNNNN.tar`` file
name (no path separator, ``..`` or absolute path) and appear once; every offset-table row must point
at a block-aligned member inside its tar, with a label of the index's classes. Images are refused
from their header when over the pixel limit (:data:`~mimkit.data.folder.MAX_PIXELS`), as the folder
reader and ``data prepare`` refuse them; pre-resized ``.npy`` members are checked from their header
(dtype, shape) before their data is read.

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

Why this file is long: the shard format is written and read here together (the writer, the index
validation that refuses a forged or damaged index, the streaming loader with its exact resume
position), so the layout above has one owner.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mimkit.errors import DataError

from . import augment as aug
from .common import check_shard, folder_transform, mix_seed, shutdown_workers, take_notes, worker_signals
from .folder import ImageFolder, _open_image, _resize, convert_image, open_image_checked, resolve_max_pixels
from .spec import LoaderSpec

__all__ = ["FORMAT", "ShardIndex", "ShardLoader", "is_shard_dir", "prepare_shards"]

FORMAT = "mimkit-shards-v1"
INDEX = "index.json"
SHARD_NAME = re.compile(r"shard-[0-9]{6,}\.tar")
"""The only shard file names an index may list (what :func:`prepare_shards` writes)."""


def is_shard_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory written by :func:`prepare_shards` (it has ``index.json``)."""
    p = Path(path).expanduser() / INDEX
    if not p.is_file():
        return False
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


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


def _image_payload(path: Path, mode: str, resize: int | None, max_pixels: int | None = None) -> tuple[str, bytes]:
    """``(extension, bytes)`` of one sample: the file itself (checked to decode), or with ``resize``
    the uint8 ``(C, N, N)`` array (shorter side to N, center crop) as ``.npy``."""
    image = _open_image(path, mode, max_pixels)  # DataError naming the file: does not decode, or too large
    if resize is None:
        ext = path.suffix.lower().lstrip(".")
        return ("jpg" if ext == "jpeg" else ext), path.read_bytes()
    arr = np.asarray(_resize(image, resize, True, Image.Resampling.BICUBIC), dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr))
    return "npy", buf.getvalue()


def _write_shard(job: tuple[str, list[tuple[int, str, int]], str, int | None, bool, int]) -> dict:
    """Write one shard (in a worker process): ``(path, [(key, file, label)], mode, resize,
    skip_corrupt, max_pixels)`` -> ``{"name", "bytes", "samples", "bad": [files]}``. Written to a
    temporary name and renamed, with its offset table."""
    out, items, mode, resize, skip_corrupt, max_pixels = job
    out_p = Path(out)
    tmp = out_p.with_name(f".{out_p.name}.tmp-{os.getpid()}")
    rows, bad = [], []
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, file, label in items:
                try:
                    ext, data = _image_payload(Path(file), mode, resize, max_pixels)
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


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
"""PIL modes of grey-scale files (palette images count as colour)."""


def file_colour_mode(paths: list[str], sample: int = 64) -> Literal["RGB", "L"]:
    """``L`` when every one of up to ``sample`` files spread evenly over ``paths`` is grey-scale in its
    header (PIL's mode; nothing is decoded), else ``RGB``; unreadable files are left to the writer."""
    from PIL import Image

    if not paths:
        return "RGB"
    step = max(1, len(paths) // sample)
    for path in paths[::step][:sample]:
        try:
            with Image.open(path) as im:
                if im.mode not in GREY_MODES:
                    return "RGB"
        except Exception:  # noqa: BLE001 - reported (or skipped) when the shard writer decodes it
            continue
    return "L"


def prepare_shards(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    shard_size: int = 1000,
    resize: int | None = None,
    mode: Literal["RGB", "L", "auto"] = "auto",
    labeled: bool | Literal["auto"] = "auto",
    skip_corrupt: bool = False,
    workers: int = 1,
    progress: bool = True,
    follow_links: bool = False,
    max_pixels: int | None = None,
) -> dict:
    """Write the images under ``src`` (an image folder, see :class:`~mimkit.data.ImageFolder`) as tar
    shards of ``shard_size`` samples into ``out`` (see the module docstring); returns the index.

    ``resize``: store uint8 arrays of ``resize x resize`` (shorter side resized, center crop) instead
    of the encoded files, so training skips decoding. ``workers``: processes writing shards in
    parallel. A corrupt image raises :class:`DataError` naming it (``skip_corrupt``: left out and
    listed in the index). ``out`` must be empty or absent; ``index.json`` is written last.

    The files are found by the folder reader's scan (:class:`~mimkit.data.ImageFolder`, same files,
    order and labels; ``follow_links`` as there: links are skipped unless it is set, and never leave
    ``src``), so the shards hold exactly the samples :class:`ImageFolder` reads (less the corrupt ones
    with ``skip_corrupt``). ``max_pixels``: the pixel limit (``None``: ``$MIMKIT_MAX_PIXELS`` or
    :data:`~mimkit.data.folder.MAX_PIXELS`; ``0``: none); a larger image counts as unreadable.
    ``mode``: ``RGB``, ``L`` (grey-scale) or ``auto``: ``L`` when every one of up to 64 images spread
    over the folder is grey-scale in its file (read from the headers), else ``RGB``; the index records
    the mode used, and training reads it from there."""
    if mode not in ("RGB", "L", "auto"):
        raise DataError(f"--mode {mode} is not one of RGB, L, auto")
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    if resize is not None and resize < 1:
        raise DataError(f"--resize must be a positive image side, got {resize}")
    limit = resolve_max_pixels(max_pixels)
    if resize is not None and limit and resize * resize > limit:
        raise DataError(f"--resize {resize} makes {resize * resize} pixels per image, over the pixel limit {limit}; "
                        "choose a smaller --resize or raise --max-pixels")
    folder = ImageFolder(src, labeled=labeled, mode="RGB" if mode == "auto" else mode, skip_corrupt=skip_corrupt,
                         follow_links=follow_links, max_pixels=limit)
    if mode == "auto":
        mode = folder.mode = file_colour_mode([p for p, _ in folder.samples])
    out_p = Path(out).expanduser()
    if out_p.exists() and (not out_p.is_dir() or any(out_p.iterdir())):
        raise DataError(f"{out_p} exists and is not an empty directory; choose a new OUT_DIR or delete it")
    out_p.mkdir(parents=True, exist_ok=True)
    samples = [(i, str(p), int(lab)) for i, (p, lab) in enumerate(folder.samples)]
    jobs = [(str(out_p / f"shard-{j:06d}.tar"), samples[s : s + shard_size], mode, resize, skip_corrupt, limit)
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
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "skipped": bad,
             "follow_links": bool(follow_links), "scan": folder.scan_counts, "max_pixels": limit, "shards": results}
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
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != FORMAT:
            raise DataError(f"{path} is not a mimkit shard index (format {fmt!r}); write the shards "
                            "with `mimkit data prepare SRC_FOLDER OUT_DIR`")
        self.meta = meta
        bad = f"{path} was edited or is not from `mimkit data prepare`; re-run it into a new directory"
        resize = meta.get("resize")
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
            raise DataError(f"{path}: resize {resize!r} is not a positive image side; {bad}")
        mode = meta.get("mode", "RGB")
        in_chans = meta.get("in_chans", 1 if mode == "L" else 3)
        if (mode, in_chans) not in (("RGB", 3), ("L", 1)) or isinstance(in_chans, bool):
            raise DataError(f"{path}: mode {mode!r} with in_chans {in_chans!r}, not RGB with 3 or L with 1; {bad}")
        classes = meta.get("classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{path}: classes must be a list of names; {bad}")
        shards = meta.get("shards")
        if not isinstance(shards, list):
            raise DataError(f"{path} has no list of shards; {bad}")
        self.resize: int | None = resize
        self.mode: str = mode
        self.in_chans: int = int(in_chans)
        self.classes: list[str] = list(classes)
        self.names: list[str] = []
        self.tables: list[np.ndarray] = []
        seen: set[str] = set()
        for i, sh in enumerate(shards):  # every entry is checked before any shard is opened
            name = sh.get("name") if isinstance(sh, dict) else None
            if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
                raise DataError(f"{path}: shard entry {i} names {name!r}, not a plain shard file name like "
                                f"shard-000000.tar inside {self.root} (no path separators, '..' or absolute "
                                f"paths); {bad}")
            if name in seen:
                raise DataError(f"{path}: shard {name!r} is listed twice (its samples would be read twice); {bad}")
            seen.add(name)
            for k in ("bytes", "samples"):
                v = sh.get(k)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise DataError(f"{path}: shard {name!r} has {k} {v!r}, not a count; {bad}")
        left = limit
        for sh in shards:
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
                table = np.load(idx, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"shard table {idx} is missing or unreadable ({type(e).__name__}); {fix}") from e
            if table.shape != (sh["samples"], 3):
                raise DataError(f"shard table {idx} lists {table.shape[0] if table.ndim else 0} samples, index.json "
                                f"{sh['samples']}; {fix}")
            _check_table(table, idx, size, len(self.classes), fix)
            table = table.astype(np.int64, copy=False)
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


def _check_table(table: np.ndarray, idx: Path, tar_bytes: int, num_classes: int, fix: str) -> None:
    """Every row of a shard's offset table points at a member inside the tar (data at a 512-byte block
    boundary after its header, ending inside the file) and has a label of the index (-1: none)."""
    if table.dtype.kind not in "iu":
        raise DataError(f"shard table {idx} holds {table.dtype}, not integer offsets; {fix}")
    if not len(table):
        return
    off, size, label = (table[:, k].astype(np.int64) for k in range(3))
    top = num_classes - 1 if num_classes else -1
    wrong = ((off < tarfile.BLOCKSIZE) | (off % tarfile.BLOCKSIZE != 0) | (size < 0) | (off > tar_bytes - size)
             | (label < -1) | (label > top))
    if wrong.any():
        r = int(np.flatnonzero(wrong)[0])
        raise DataError(f"shard table {idx} row {r} (offset {off[r]}, size {size[r]}, label {label[r]}) does not "
                        f"point at a member inside the {tar_bytes}-byte tar with a label in [-1, {top}]; {fix}")


def shard_stream(index: ShardIndex, *, epoch: int, seed: int, rank: int, world_size: int, shuffle: bool,
                 buffer: int) -> np.ndarray:
    """``(M, 2)`` int64 ``(shard, member)`` in the order rank ``rank`` reads epoch ``epoch`` (see the
    module docstring); computed from the index alone."""
    s = index.num_shards
    if shuffle:
        g = torch.Generator().manual_seed(mix_seed("shards", seed, epoch))
        order = torch.randperm(s, generator=g).numpy()
    else:
        order = np.arange(s)
    mine = order[: (s // world_size) * world_size][rank::world_size]
    seq = np.concatenate([np.stack([np.full(index.sizes[j], j), np.arange(index.sizes[j])], 1) for j in mine]
                         ) if len(mine) else np.zeros((0, 2), np.int64)
    if not shuffle or buffer <= 1 or len(seq) <= 1:
        return seq.astype(np.int64)
    rng = np.random.default_rng(mix_seed("buffer", seed, epoch, rank))
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
            yield sh, m, mix_seed("sample", ld.seed, self.epoch, ld.rank, pos)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class _ShardDataset(torch.utils.data.Dataset):
    """Reads one sample at its offset; items ``(image, label, note)`` as ``_SeededDataset``'s
    (``note``: ``""``, ``"skipped:<what>"`` or ``"error:<message>"``)."""

    def __init__(self, index: ShardIndex, transform: Callable | None, skip_corrupt: bool,
                 max_pixels: int | None = None):
        self.root, self.names, self.tables = index.root, index.names, index.tables
        self.resize, self.mode, self.in_chans = index.resize, index.mode, index.in_chans
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.max_pixels = max_pixels
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
            return torch.from_numpy(_npy_uint8(data, (self.in_chans, self.resize, self.resize)))
        name = f"{self.root / self.names[shard]} sample {member}"
        with open_image_checked(io.BytesIO(data), name, self.max_pixels) as im:  # size from the header first
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
                    if isinstance(e, DataError):  # over the pixel limit: the message names it all
                        return torch.zeros(shape, dtype=torch.uint8), -1, f"error:{e}"
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


def _npy_uint8(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """The uint8 C-order array of ``shape`` stored as ``.npy`` bytes, its header checked before any data
    is touched (a crafted header cannot make it allocate more than ``data`` holds)."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        hshape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    else:
        hshape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    n = int(np.prod(shape))
    if dtype != np.uint8 or tuple(hshape) != shape or fortran or len(data) - buf.tell() != n:
        raise ValueError(f"array {dtype} {tuple(hshape)} ({len(data) - buf.tell()} data bytes), expected uint8 "
                         f"{shape}")
    return np.frombuffer(data, dtype=np.uint8, count=n, offset=buf.tell()).reshape(shape).copy()


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
        batch_size, spec, settings: a :class:`~mimkit.data.spec.LoaderSpec` (``spec``, and keyword
            arguments named like its fields, which replace the spec's); of its fields:
        batch_size: per-rank batch size.
        out_size: output side ``S``.
        mean, std: normalization statistics.
        augment: ``"rrc_flip"``, ``"flip"`` or ``"none"``; original images use the CPU transforms of
            :func:`~mimkit.data.folder_transform` per sample; pre-resized shards the batched
            on-device augmentation of :class:`~mimkit.data.InMemoryLoader`.
        scale, ratio, flip_p: random-resized-crop / flip parameters.
        num_workers, device, pin_memory, prefetch_factor: as :class:`~mimkit.data.FolderLoader`.
        shuffle: permute shards and use the buffer (else file order).
        seed, rank, world_size: the order's seed and this process's share.
        skip_corrupt: a sample that does not decode (or is over the pixel limit) is replaced by the
            next one of its shard and listed in :attr:`skipped`; else :class:`DataError` naming the shard.
        drop_last: must be ``True`` (every rank plays the same whole batches).
        shuffle_buffer: samples held in the shuffle buffer (1: shard order only).
        limit: use only the first ``limit`` samples (index order).
        max_pixels: the pixel limit of a decoded image (``None``: ``$MIMKIT_MAX_PIXELS`` or
            :data:`~mimkit.data.folder.MAX_PIXELS`, as the folder reader; ``0``: none), checked from
            the image header before decoding.

    ``len(loader)``: batches per epoch, the same on every rank (module docstring). Iteration yields
    ``images (B, C, S, S)`` float32 normalized and ``labels (B,)`` int64 on ``device``.
    """

    streaming = True

    def __init__(
        self,
        root: str | os.PathLike[str] | ShardIndex,
        batch_size: int | None = None,
        *,
        spec: LoaderSpec | None = None,
        shuffle_buffer: int = 4096,
        limit: int | None = None,
        max_pixels: int | None = None,
        **settings: Any,
    ) -> None:
        sp = self.spec = LoaderSpec.resolve("ShardLoader", batch_size, spec, settings,
                                            needs=("mean", "std", "out_size"))
        batch_size, out_size, mean, std, augment = sp.batch_size, sp.out_size, sp.mean, sp.std, sp.augment
        scale, ratio, flip_p, num_workers, device = sp.scale, sp.ratio, sp.flip_p, sp.num_workers, sp.device
        pin_memory, prefetch_factor = sp.pin_memory, sp.prefetch_factor or 2
        shuffle, seed, rank, world_size, skip_corrupt = sp.shuffle, sp.seed, sp.rank, sp.world_size, sp.skip_corrupt
        if not sp.drop_last:
            raise ValueError("ShardLoader always drops the samples that do not fill a batch; pass drop_last=True")
        check_shard(batch_size, rank, world_size)
        self.index = root if isinstance(root, ShardIndex) else ShardIndex(root, limit)
        ix = self.index
        self.max_pixels = resolve_max_pixels(max_pixels)
        if ix.resize is not None and self.max_pixels and ix.resize * ix.resize > self.max_pixels:
            raise DataError(f"{ix.root} holds {ix.resize}x{ix.resize} images, over the pixel limit {self.max_pixels}; "
                            "raise it with MIMKIT_MAX_PIXELS (0: no limit) if they are genuine")
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
            _ShardDataset(ix, transform, skip_corrupt, self.max_pixels), batch_size=batch_size, sampler=self.sampler,
            num_workers=num_workers, pin_memory=pin_memory, drop_last=True, collate_fn=_collate,
            worker_init_fn=worker_signals if num_workers > 0 else None,
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
        """End the worker processes now."""
        shutdown_workers(self.loader)

    def _augment(self, x: torch.Tensor, epoch: int, batch_index: int) -> torch.Tensor:
        """Pre-resized uint8 batch -> normalized float, augmented on ``device`` (per-batch generator)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed("augment", self.seed, epoch, batch_index, self.rank))
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
            take_notes(notes, self.skipped)
            x = x.to(self.device, non_blocking=non_blocking)
            if self.pre_resized:
                x = self._augment(x, epoch, i)
            yield x, y.to(self.device, torch.int64, non_blocking=non_blocking)

    def __iter__(self):
        return self.iter_from(self.epoch, 0)
