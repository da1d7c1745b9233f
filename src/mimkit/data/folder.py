"""Image folders: labeled (one sub-folder per class) or unlabeled (just images).

Layouts understood by :class:`ImageFolder`::

    root/dog/001.jpg, root/cat/x/002.png, ...   labeled: label = index of the sorted class folder
    root/001.jpg, root/sub/002.png, ...         unlabeled: label = -1 (MIM pretraining needs none)

Images are decoded with PIL and converted to ``mode`` (``"RGB"`` or ``"L"``; 16-bit and float images
are scaled to 8 bits, not clipped: :func:`convert_image`). Unreadable files raise
:class:`~mimkit.data.errors.DataError` naming the file, or are skipped with ``skip_corrupt=True``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .errors import DataError

__all__ = ["IMG_EXTENSIONS", "ImageFolder", "convert_image", "load_folder_to_tensor"]

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


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    """All image files below ``folder`` (recursive, sorted, hidden entries skipped)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for f in sorted(filenames):
            if not _is_hidden(f) and f.lower().endswith(exts):
                found.append(Path(dirpath) / f)
    return found


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


def _open_image(path: Path, mode: str) -> Image.Image:
    """Decode ``path`` fully and convert it to ``mode`` (see :func:`convert_image`); :class:`DataError`
    if that fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return convert_image(im, mode)
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

    Attributes:
        samples: ``list[(path, label)]`` in a deterministic (sorted) order.
        classes: sorted class folder names (empty when unlabeled).
        class_to_idx: ``{class name: label}``.
        labeled: whether labels come from class folders.
        bad_files: the distinct corrupt files found so far (by loading or by :meth:`verify`).
        num_skipped: ``len(bad_files)``.
        num_substituted: how many times ``dataset[i]`` returned a substitute sample.

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
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if labeled not in (True, False, "auto"):
            raise ValueError(f"labeled must be True, False or 'auto', got {labeled!r}")
        self.root = Path(root).expanduser()
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.mode = mode
        self.num_substituted = 0
        self.bad_files: list[Path] = []
        self._bad: set[int] = set()

        if not self.root.exists():
            raise DataError(f"image folder not found: {self.root}. Check the path.")
        if not self.root.is_dir():
            raise DataError(f"image folder path is not a directory: {self.root}.")

        top_images = [
            p
            for p in self.root.iterdir()
            if p.is_file() and not _is_hidden(p.name) and p.name.lower().endswith(self.extensions)
        ]
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not _is_hidden(p.name))
        per_class = {d.name: _scan(d, self.extensions) for d in class_dirs}

        if labeled == "auto":
            labeled = not top_images and any(per_class.values())
        if labeled:
            if top_images:
                raise DataError(
                    f"{self.root} has image files directly inside it (e.g. {top_images[0].name}) "
                    "but labeled=True expects one sub-folder per class. Move them into class "
                    "folders, or use labeled=False for an unlabeled data set."
                )
            self.classes = [d.name for d in class_dirs]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            self.samples: list[tuple[Path, int]] = [
                (p, self.class_to_idx[c]) for c in self.classes for p in per_class[c]
            ]
        else:
            self.classes = []
            self.class_to_idx = {}
            self.samples = [(p, -1) for p in _scan(self.root, self.extensions)]
        self.labeled = bool(labeled)
        if not self.samples:
            raise DataError(
                f"no images found under {self.root} (extensions {', '.join(self.extensions)}). "
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
                image = _open_image(path, self.mode)
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
                _open_image(path, self.mode)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a (small) image folder into one in-memory uint8 tensor.

    Args:
        root: folder path, or an existing :class:`ImageFolder` (then ``labeled``, ``mode``,
            ``skip_corrupt`` and ``extensions`` are taken from it).
        size: output side length, or ``(H, W)``.
        crop: ``True``: resize so the image covers ``size`` then center-crop (keeps aspect ratio);
            ``False``: resize straight to ``size``.
        interpolation: PIL resampling filter.
        skip_corrupt: leave out unreadable files instead of raising.

    Returns:
        ``images (N, C, size, size) uint8`` with ``C`` = 3 (RGB) or 1 (L), and ``labels (N,)
        int64`` (``-1`` when unlabeled). Memory: ``N * C * size * size`` bytes.

    Raises:
        DataError: missing folder, no images, or a corrupt file (without ``skip_corrupt``).
    """
    folder = (
        root
        if isinstance(root, ImageFolder)
        else ImageFolder(root, labeled=labeled, skip_corrupt=skip_corrupt, extensions=extensions, mode=mode)
    )
    resample = _RESAMPLE[interpolation]
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for path, label in folder.samples:
        try:
            image = _open_image(path, folder.mode)
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
