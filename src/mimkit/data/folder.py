"""Image folders: labeled (one sub-folder per class) or unlabeled (just images).

Layouts understood by :class:`ImageFolder`::

    root/dog/001.jpg, root/cat/x/002.png, ...   labeled: label = index of the sorted class folder
    root/001.jpg, root/sub/002.png, ...         unlabeled: label = -1 (MIM pretraining needs none)

Images are decoded with PIL and converted to ``mode`` (``"RGB"`` or ``"L"``; 16-bit and float images
are scaled to 8 bits, not clipped: :func:`convert_image`). Unreadable files raise
:class:`~mimkit.errors.DataError` naming the file, or are skipped with ``skip_corrupt=True``.

Scanning (:func:`scan_images`, shared by :class:`ImageFolder` and ``mimkit data prepare``): hidden
names (``.x``) are skipped, and symbolic links are not followed unless ``follow_links=True``; then
only links whose target lies inside the folder are followed, and every real directory and file is
read once (no loops, no duplicates). What was left out is reported in one warning line on stderr.

Pixel limit (:data:`MAX_PIXELS`, a decompression-bomb guard): an image whose header claims more
pixels is refused before it is decoded, by the folder reader, ``data prepare`` and the shard reader
alike (:func:`open_image_checked`); raise it with ``MIMKIT_MAX_PIXELS=N`` or ``max_pixels=N``.

Why this file is long: reading untrusted folders safely is one job (scan with the link policy,
the pixel limit from the header, 16-bit and palette conversion, corrupt-file handling, in-memory
decoding with progress); :mod:`mimkit.data.shards` and the GPU decoder reuse its pieces.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from PIL import Image

from mimkit.errors import DataError

__all__ = [
    "IMG_EXTENSIONS",
    "MAX_PIXELS",
    "FolderScan",
    "ImageFolder",
    "convert_image",
    "load_folder_to_tensor",
    "open_image_checked",
    "resolve_max_pixels",
    "scan_images",
]

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)
"""Default file extensions (matched case-insensitively)."""

_MODES = ("RGB", "L")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


MAX_PIXELS: int = 89_478_485
"""The one pixel limit (width x height) of every decode in mimkit: the folder reader, ``mimkit data
prepare`` and the shard reader refuse a larger image from its header, before decoding it (a
decompression bomb: a few KB of PNG can claim gigapixels). The value is PIL's own default (about
9459 x 9459, 256 MiB as RGB). Raise it per call with ``max_pixels=N`` (``0``: no limit), for a whole
process (training, DataLoader workers) with the environment variable ``MIMKIT_MAX_PIXELS=N``, or with
``mimkit data prepare --max-pixels N``."""

MAX_PIXELS_ENV = "MIMKIT_MAX_PIXELS"

_PIL_OPEN_LOCK = threading.Lock()  # guards the swap of PIL's global limit in open_image_checked


def _new_lock() -> None:  # a child forked while another thread held the lock must not inherit it held
    global _PIL_OPEN_LOCK
    _PIL_OPEN_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock)


def resolve_max_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` when given, else ``$MIMKIT_MAX_PIXELS``, else
    :data:`MAX_PIXELS`. ``0`` means no limit. :class:`DataError` for a negative or non-integer value."""
    where = "max_pixels"
    if max_pixels is None:
        env = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not env:
            return MAX_PIXELS
        where = MAX_PIXELS_ENV
        try:
            max_pixels = int(env)
        except ValueError:
            try:
                f = float(env)
            except ValueError:
                f = -1.0
            max_pixels = int(f) if f >= 0 and f == int(f) else -1
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        shown = os.environ.get(MAX_PIXELS_ENV) if where == MAX_PIXELS_ENV else max_pixels
        raise DataError(f"{where} must be a whole number of pixels >= 0 (0: no limit), got {shown!r}")
    return max_pixels


def _too_large(name: str, w: int, h: int, limit: int) -> str:
    return (f"image too large: {name} is {w}x{h} = {w * h} pixels ({w * h / 1e6:.1f} megapixels), over the limit "
            f"of {limit} pixels (a guard against decompression bombs). If the image is genuine, raise the limit "
            f"with {MAX_PIXELS_ENV}={w * h} in the environment (0: no limit), max_pixels={w * h}, or "
            f"`mimkit data prepare --max-pixels {w * h}`; or skip such files with skip_corrupt")


def open_image_checked(fp: str | os.PathLike[str] | IO[bytes], name: str, max_pixels: int | None = None
                       ) -> Image.Image:
    """``Image.open(fp)`` (header only, not decoded) with the pixel limit applied: :class:`DataError`
    naming ``name``, the size and the limit when ``width * height`` is over it (see :data:`MAX_PIXELS`).

    PIL's own bomb check (``Image.MAX_IMAGE_PIXELS``, a warning at 1x and an error at 2x) is switched
    off for the call so that this limit is the only one (raising it works past PIL's 2x)."""
    limit = resolve_max_pixels(max_pixels)
    with _PIL_OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if limit and w * h > limit:
        im.close()
        raise DataError(_too_large(name, w, h, limit))
    return im


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _norm_exts(extensions: Sequence[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


@dataclass
class FolderScan:
    """What :func:`scan_images` found below ``root``.

    Attributes:
        root: the folder scanned.
        files: every image file below ``root``, in walk order: a directory's files (sorted by name)
            before its sub-directories (sorted, each walked depth-first), hidden names skipped.
        top_dirs: the sub-directories directly in ``root`` that were walked (class folders), sorted.
        follow_links: whether links were followed.
        skipped_links: links not followed (``follow_links=False``): links to directories or to files
            with an image extension.
        outside_links: links whose resolved target is outside the resolved ``root`` (refused).
        repeated: links (or bind mounts, hard links when following) to a directory or file already
            read: a loop or a duplicate, read only once.
        broken_links: links whose target does not exist.
        unreadable: directories that could not be listed.
    """

    root: Path
    files: list[Path] = field(default_factory=list)
    top_dirs: list[str] = field(default_factory=list)
    follow_links: bool = False
    skipped_links: int = 0
    outside_links: int = 0
    repeated: int = 0
    broken_links: int = 0
    unreadable: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """The counts of what was left out (for an index or a log)."""
        return {"skipped_links": self.skipped_links, "outside_links": self.outside_links,
                "repeated": self.repeated, "broken_links": self.broken_links, "unreadable_dirs": len(self.unreadable)}

    def warning(self) -> str | None:
        """One line saying what was left out, or ``None`` when nothing was."""
        parts = []
        if self.skipped_links:
            parts.append(f"{self.skipped_links} symbolic link(s) (links are not followed; pass follow_links=True, "
                         "or --follow-links to `mimkit data prepare`, to follow links that stay inside the folder)")
        if self.outside_links:
            parts.append(f"{self.outside_links} link(s) leading outside the folder (never followed; copy or move "
                         "that data inside it)")
        if self.repeated:
            parts.append(f"{self.repeated} link(s) to a directory or file already read (a loop or a duplicate; "
                         "each is read once)")
        if self.broken_links:
            parts.append(f"{self.broken_links} broken link(s)")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable director(y/ies), e.g. {self.unreadable[0]} (fix the "
                         "permissions)")
        if not parts:
            return None
        return f"warning: {self.root}: skipped " + "; ".join(parts)


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def scan_images(root: str | os.PathLike[str], extensions: Sequence[str] = IMG_EXTENSIONS, *,
                follow_links: bool = False) -> FolderScan:
    """All image files below ``root``: the one scan behind :class:`ImageFolder` and ``mimkit data
    prepare`` (so both read the same files in the same order); see :class:`FolderScan`.

    Symbolic links are skipped unless ``follow_links``; then a link is followed only when its resolved
    target is inside the resolved ``root``, and every real directory and file (by ``(st_dev, st_ino)``)
    is read once, at the first place the walk reaches it: a link loop or a second link to the same
    data adds nothing. Non-regular files (FIFOs, sockets, devices) are skipped. ``root`` itself may be
    a link."""
    root = Path(root).expanduser()
    exts = _norm_exts(extensions)
    real_root = os.path.realpath(root)
    scan = FolderScan(root=root, follow_links=follow_links)
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    stack: list[tuple[Path, tuple[int, int], bool]] = []
    st = os.stat(root)
    stack.append((root, (st.st_dev, st.st_ino), False))
    while stack:
        d, key, top = stack.pop()
        if key in seen_dirs:  # reached again through a link (or a bind mount): a loop or a duplicate
            scan.repeated += 1
            continue
        seen_dirs.add(key)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            scan.unreadable.append(f"{d} ({e.strerror or type(e).__name__})")
            continue
        if top:
            scan.top_dirs.append(d.name)
        subdirs: list[tuple[Path, tuple[int, int], bool]] = []
        for e in entries:
            name = e.name
            if _is_hidden(name):
                continue
            path = d / name
            try:
                if e.is_symlink():
                    if not follow_links:
                        if name.lower().endswith(exts) or e.is_dir():
                            scan.skipped_links += 1
                        continue
                    real = os.path.realpath(path)
                    try:
                        tst = os.stat(real)
                    except OSError:
                        scan.broken_links += 1
                        continue
                    if not _inside(real, real_root):
                        scan.outside_links += 1
                        continue
                    is_dir, is_file = stat.S_ISDIR(tst.st_mode), stat.S_ISREG(tst.st_mode)
                else:  # d_type from the directory listing: no stat per file unless needed
                    is_dir, is_file = e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)
                    tst = e.stat(follow_symlinks=False) if is_dir or (is_file and follow_links) else None
            except OSError:  # vanished while scanning
                continue
            if is_dir:
                subdirs.append((path, (tst.st_dev, tst.st_ino), d is root))
            elif is_file and name.lower().endswith(exts):
                if follow_links:
                    fkey = (tst.st_dev, tst.st_ino)
                    if fkey in seen_files:
                        scan.repeated += 1
                        continue
                    seen_files.add(fkey)
                scan.files.append(path)
        stack.extend(reversed(subdirs))
    return scan


_WARNED: set[str] = set()


def _warn_once(message: str | None) -> None:
    """Print ``message`` to stderr once per process (a folder opened twice warns once)."""
    if message and message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr, flush=True)


def convert_image(im: Image.Image, mode: str) -> Image.Image:
    """``im`` in ``mode`` (``"RGB"`` or ``"L"``), scaling high-bit-depth pixels instead of clipping.

    PIL's own ``convert`` saturates 16-bit grey-scale (``I;16*``, and ``I``) at 255, so those are
    scaled to 8 bits (``v / 257``, 65535 -> 255); 32-bit float images (``F``) are read as ``[0, 1]``
    when their maximum is at most 1, else as ``[0, 255]``. Modes PIL cannot convert directly (e.g.
    ``La``, ``LAB`` -> ``L``) go through RGB(A). Alpha is dropped (PIL's behaviour)."""
    m = im.mode
    if m.startswith("I;16") or m == "I":
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)).convert(mode)
    if m == "F":
        a = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)).convert(mode)
    if m == mode:
        return im.copy()
    try:
        return im.convert(mode)
    except ValueError:
        via = "RGBA" if ("A" in m or "a" in m) else "RGB"
        return im.convert(via).convert(mode)


def _open_image(path: Path, mode: str, max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` fully and convert it to ``mode`` (see :func:`convert_image`); :class:`DataError`
    if that fails or the image is over the pixel limit (:func:`open_image_checked`)."""
    try:
        with open_image_checked(path, str(path), max_pixels) as im:
            im.load()
            return convert_image(im, mode)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(
            f"corrupt or unreadable image: {path} ({type(e).__name__}: {e}). Delete or replace the "
            "file, or pass skip_corrupt=True to skip such files."
        ) from e


class ImageFolder(torch.utils.data.Dataset):
    """A folder of images as a map-style dataset yielding ``(image, label)``.

    Args:
        root: the folder.
        labeled: ``True``: each non-hidden sub-folder of ``root`` is a class (files are searched
            recursively inside it; image files directly in ``root`` are an error). ``False``: all
            images below ``root`` (recursive), label ``-1``. ``"auto"``: labeled when ``root``
            has sub-folders containing images and no images of its own, else unlabeled.
        transform: applied to the PIL image (e.g. torchvision transforms); ``None`` returns the PIL
            image.
        skip_corrupt: see "Corrupt files" below.
        extensions: file name endings to include, case-insensitive.
        mode: PIL mode the images are converted to, ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
        follow_links: follow symbolic links that stay inside ``root`` (each real directory and file
            read once); by default links are skipped. Skipped links are counted in one warning line
            on stderr (see :func:`scan_images`).
        max_pixels: the pixel limit (``None``: ``$MIMKIT_MAX_PIXELS`` or :data:`MAX_PIXELS`; ``0``: no
            limit); a larger image is refused (or skipped, with ``skip_corrupt``) before decoding.

    Attributes:
        samples: ``list[(path, label)]`` in a deterministic (sorted) order.
        classes: sorted class folder names (empty when unlabeled).
        class_to_idx: ``{class name: label}``.
        labeled: whether labels come from class folders.
        bad_files: the distinct corrupt files found so far (by loading or by :meth:`verify`).
        num_skipped: ``len(bad_files)``.
        num_substituted: how many times ``dataset[i]`` returned a substitute sample.
        scan_counts: what the scan left out (:attr:`FolderScan.counts`: links skipped, refused,
            repeated, broken; unreadable directories).

    Corrupt files: by default loading one raises :class:`DataError` naming it. With
    ``skip_corrupt=True``, ``dataset[i]`` on a corrupt file returns the next readable sample
    (``i+1``, ``i+2``, ... wrapping around), which is deterministic; the file is recorded in
    ``bad_files`` (and not decoded again) and ``num_substituted`` is incremented. Inside DataLoader
    worker processes these counters are the worker's copy, so the main process does not see them;
    call :meth:`verify` first to find and drop all bad files up front (this records them in the
    main process and keeps ``len`` exact).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        labeled: bool | Literal["auto"] = "auto",
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        mode: Literal["RGB", "L"] = "RGB",
        *,
        follow_links: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if labeled not in (True, False, "auto"):
            raise ValueError(f"labeled must be True, False or 'auto', got {labeled!r}")
        self.root = Path(root).expanduser()
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.extensions = _norm_exts(extensions)
        self.mode = mode
        self.follow_links = bool(follow_links)
        if max_pixels is not None:
            resolve_max_pixels(max_pixels)  # reject a bad value now
        self.max_pixels = max_pixels
        self.num_substituted = 0
        self.bad_files: list[Path] = []
        self._bad: set[int] = set()

        if not self.root.exists():
            raise DataError(f"image folder not found: {self.root}. Check the path.")
        if not self.root.is_dir():
            raise DataError(f"image folder path is not a directory: {self.root}.")

        scan = scan_images(self.root, self.extensions, follow_links=self.follow_links)
        _warn_once(scan.warning())
        self.scan_counts = scan.counts
        top_images = [p for p in scan.files if p.parent == self.root]
        per_class: dict[str, list[Path]] = {d: [] for d in scan.top_dirs}
        for p in scan.files:
            if p.parent != self.root:
                per_class[p.relative_to(self.root).parts[0]].append(p)

        if labeled == "auto":
            labeled = not top_images and any(per_class.values())
        if labeled:
            if top_images:
                raise DataError(
                    f"{self.root} has image files directly inside it (e.g. {top_images[0].name}) "
                    "but labeled=True expects one sub-folder per class. Move them into class "
                    "folders, or use labeled=False for an unlabeled data set."
                )
            self.classes = sorted(per_class)
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            self.samples: list[tuple[Path, int]] = [
                (p, self.class_to_idx[c]) for c in self.classes for p in per_class[c]
            ]
        else:
            self.classes = []
            self.class_to_idx = {}
            self.samples = [(p, -1) for p in scan.files]
        self.labeled = bool(labeled)
        if not self.samples:
            links = (f" ({scan.skipped_links} symbolic link(s) were skipped: pass follow_links=True, or "
                     "--follow-links to `mimkit data prepare`, to follow those inside the folder)"
                     if scan.skipped_links else "")
            raise DataError(
                f"no images found under {self.root} (extensions {', '.join(self.extensions)}){links}. "
                "Check the path and the file types, or pass extensions=..."
            )

    # -- properties ---------------------------------------------------------------------------

    @property
    def targets(self) -> list[int]:
        """Label of every sample (``-1`` when unlabeled)."""
        return [label for _, label in self.samples]

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when unlabeled)."""
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        """Channels after conversion: 3 for ``"RGB"``, 1 for ``"L"``."""
        return 3 if self.mode == "RGB" else 1

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        kind = f"{self.num_classes} classes" if self.labeled else "unlabeled"
        return f"ImageFolder({str(self.root)!r}, {len(self)} images, {kind}, mode={self.mode})"

    # -- loading ------------------------------------------------------------------------------

    @property
    def num_skipped(self) -> int:
        """Number of distinct corrupt files skipped so far."""
        return len(self.bad_files)

    def _mark_bad(self, index: int) -> None:
        if index not in self._bad:
            self._bad.add(index)
            self.bad_files.append(self.samples[index][0])

    def load(self, index: int) -> tuple[Image.Image, int]:
        """``(PIL image in self.mode, label)`` for ``index``, without ``transform``.

        With ``skip_corrupt=True`` a corrupt file is replaced by the next readable sample (see the
        class docstring); the returned label is that sample's label.

        Raises:
            DataError: the file is corrupt (``skip_corrupt=False``), or every file is corrupt.
        """
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                image = _open_image(path, self.mode, self.max_pixels)
            except DataError:
                if not self.skip_corrupt:
                    raise
                self._mark_bad(i)
                continue
            if step:
                self.num_substituted += 1
            return image, label
        raise DataError(f"every image under {self.root} is corrupt or unreadable.")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """``(transform(image), label)``; ``image`` is a PIL image when ``transform`` is None."""
        image, label = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def verify(self, drop: bool | None = None) -> list[Path]:
        """Decode every file once and return the corrupt ones.

        Args:
            drop: remove the corrupt files from ``samples`` (and record them in ``bad_files``).
                Default: ``self.skip_corrupt``.

        Returns:
            Paths of the files that could not be decoded (empty if all are fine).

        Raises:
            DataError: ``drop`` would leave no images.
        """
        drop = self.skip_corrupt if drop is None else drop
        bad_idx = []
        for i, (path, _) in enumerate(self.samples):
            try:
                _open_image(path, self.mode, self.max_pixels)
            except DataError:
                bad_idx.append(i)
        bad = [self.samples[i][0] for i in bad_idx]
        if drop and bad_idx:
            if len(bad_idx) == len(self.samples):
                raise DataError(f"every image under {self.root} is corrupt or unreadable.")
            bad_set = set(bad_idx)
            self.samples = [s for i, s in enumerate(self.samples) if i not in bad_set]
            self._bad = set()
            known = set(self.bad_files)
            self.bad_files.extend(p for p in bad if p not in known)
        return bad


def _resize(image: Image.Image, size: int | Sequence[int], crop: bool, resample: Image.Resampling) -> Image.Image:
    """To ``size`` (a side, or ``(H, W)``): with ``crop`` scaled to cover it (aspect kept) and
    center-cropped, else resized straight to it."""
    oh, ow = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not crop:
        return image.resize((ow, oh), resample)
    w, h = image.size
    scale = max(oh / h, ow / w)  # for a square output: the shorter side to ``size``
    nw, nh = max(ow, round(w * scale)), max(oh, round(h * scale))
    image = image.resize((nw, nh), resample)
    left, top = (nw - ow) // 2, (nh - oh) // 2
    return image.crop((left, top, left + ow, top + oh))


def load_folder_to_tensor(
    root: str | os.PathLike[str] | ImageFolder,
    size: int | Sequence[int],
    *,
    labeled: bool | Literal["auto"] = "auto",
    mode: Literal["RGB", "L"] = "RGB",
    crop: bool = True,
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bicubic",
    skip_corrupt: bool = False,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    follow_links: bool = False,
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a (small) image folder into one in-memory uint8 tensor.

    Args:
        root: folder path, or an existing :class:`ImageFolder` (then ``labeled``, ``mode``,
            ``skip_corrupt``, ``extensions``, ``follow_links`` and ``max_pixels`` are taken from it).
        size: output side length, or ``(H, W)``.
        crop: ``True``: resize so the image covers ``size`` then center-crop (keeps aspect ratio);
            ``False``: resize straight to ``size``.
        interpolation: PIL resampling filter.
        skip_corrupt: leave out unreadable files instead of raising.
        follow_links, max_pixels: see :class:`ImageFolder`.

    Returns:
        ``images (N, C, size, size) uint8`` with ``C`` = 3 (RGB) or 1 (L), and ``labels (N,)
        int64`` (``-1`` when unlabeled). Memory: ``N * C * size * size`` bytes.

    Raises:
        DataError: missing folder, no images, or a corrupt file (without ``skip_corrupt``).
    """
    folder = (
        root
        if isinstance(root, ImageFolder)
        else ImageFolder(root, labeled=labeled, skip_corrupt=skip_corrupt, extensions=extensions, mode=mode,
                         follow_links=follow_links, max_pixels=max_pixels)
    )
    resample = _RESAMPLE[interpolation]
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for path, label in folder.samples:
        try:
            image = _open_image(path, folder.mode, folder.max_pixels)
        except DataError:
            if not folder.skip_corrupt:
                raise
            if path not in folder.bad_files:
                folder.bad_files.append(path)
            continue
        arrays.append(np.asarray(_resize(image, size, crop, resample), dtype=np.uint8))
        labels.append(label)
    if not arrays:
        raise DataError(f"every image under {folder.root} is corrupt or unreadable.")
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[:, None]  # (N, H, W) -> (N, 1, H, W)
    else:
        stacked = stacked.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return torch.from_numpy(np.ascontiguousarray(stacked)), torch.tensor(labels, dtype=torch.int64)
