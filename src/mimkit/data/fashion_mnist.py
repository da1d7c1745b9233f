"""Fashion-MNIST: IDX file reading, locating, downloading and loading into memory.

The data set is 70,000 grey-scale 28x28 images of clothing in 10 classes (60,000 train, 10,000
test), published by Zalando Research as four gzip-compressed IDX files. Where the files come from:

* Debian/Ubuntu: ``apt-get install dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``. Debian re-compressed the files (the gzip header lost the
  embedded file name and time stamp), so their ``.gz`` checksums differ from the official ones while
  the decompressed bytes are identical. :data:`FILES` therefore records both the official MD5 of
  each ``.gz`` file and the MD5 of its decompressed IDX payload, and verification accepts either.
* :func:`download_fashion_mnist` fetches them from the official mirror :data:`BASE_URL`.

IDX format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``0x00 0x00 <dtype> <ndim>``,
``ndim`` big-endian uint32 dimension sizes, then the row-major big-endian payload.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mimkit.errors import DataError

__all__ = [
    "BASE_URL",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FILES",
    "SPLITS",
    "FileChecksum",
    "default_cache_dir",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "verify_fashion_mnist",
    "write_idx",
]

BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""Official download mirror (the zalandoresearch/fashion-mnist README links here)."""


@dataclass(frozen=True)
class FileChecksum:
    """Checksums of one Fashion-MNIST file.

    Attributes:
        gz_md5: MD5 of the official ``.gz`` file, as published in the zalandoresearch README.
        raw_md5: MD5 of the decompressed IDX bytes (identical for the official and the Debian copy).
        num_bytes: size of the decompressed IDX file in bytes.
    """

    gz_md5: str
    raw_md5: str
    num_bytes: int


FILES: dict[str, FileChecksum] = {
    "train-images-idx3-ubyte.gz": FileChecksum(
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a", 47_040_016
    ),
    "train-labels-idx1-ubyte.gz": FileChecksum(
        "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9", 60_008
    ),
    "t10k-images-idx3-ubyte.gz": FileChecksum(
        "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a", 7_840_016
    ),
    "t10k-labels-idx1-ubyte.gz": FileChecksum(
        "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965", 10_008
    ),
}
"""The four official files: name -> checksums (official ``.gz`` MD5 and decompressed MD5)."""

SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""split -> (images file, labels file)."""

FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
"""Per-channel mean of the training images scaled to [0, 1]."""
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)
"""Per-channel standard deviation of the training images scaled to [0, 1]."""
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Class names, index = label."""

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "MIMKIT_DATA"

_FIX_HINT = (
    "Install the data with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts it in "
    f"{DEBIAN_DIR}) or run `mimkit.data.download_fashion_mnist()` (downloads to "
    "~/.cache/mimkit/fashion-mnist), or point $MIMKIT_DATA at a folder containing fashion-mnist/."
)

# ----------------------------------------------------------------------------------------------
# IDX reading / writing
# ----------------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, tuple[str, torch.dtype]] = {
    0x08: (">u1", torch.uint8),
    0x09: (">i1", torch.int8),
    0x0B: (">i2", torch.int16),
    0x0C: (">i4", torch.int32),
    0x0D: (">f4", torch.float32),
    0x0E: (">f8", torch.float64),
}
_TORCH_TO_IDX = {tdtype: code for code, (_, tdtype) in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Return the (decompressed) bytes of an IDX file; gzip is detected by its magic bytes."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"IDX file not found: {p}. Check the path, or re-create / re-download it.")
    if not p.is_file():
        raise DataError(f"IDX path is not a regular file: {p}.")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read IDX file {p}: {e}. Check its permissions.") from e
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"corrupt or truncated gzip file: {p} ({type(e).__name__}: {e}). Delete it and "
                "download / install it again."
            ) from e
    elif p.suffix == ".gz":
        raise DataError(
            f"{p} has a .gz name but is not gzip data (first bytes {data[:4]!r}); the file is "
            "corrupt or was saved wrongly (an HTML error page?). Delete it and download it again."
        )
    return data


def _parse_idx(data: bytes, path: str | os.PathLike[str]) -> torch.Tensor:
    """Parse decompressed IDX bytes into a tensor; ``path`` is only used in error messages."""
    fix = "The file is corrupt or not an IDX file; delete it and download / install it again."
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated: only {len(data)} bytes, no header. {fix}")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        raise DataError(
            f"bad IDX magic number in {path}: {data[:4].hex()} (expected 0000<dtype><ndim> with "
            f"dtype one of {sorted(hex(c) for c in _IDX_DTYPES)}). {fix}"
        )
    if ndim == 0:
        raise DataError(f"IDX file {path} declares 0 dimensions. {fix}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated inside its header ({len(data)} < {header} bytes). {fix}")
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    np_dtype, torch_dtype = _IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d
    expected = header + count * np.dtype(np_dtype).itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {what}: header dims {dims} of dtype {np_dtype} need "
            f"{expected} bytes, file has {len(data)}. {fix}"
        )
    arr = np.frombuffer(data, dtype=np_dtype, count=count, offset=header)
    arr = arr.astype(np_dtype[1:], copy=True)  # native byte order, writable
    return torch.from_numpy(arr).reshape(dims).to(torch_dtype)


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (gzip-compressed or raw) into a tensor.

    Args:
        path: ``*.gz`` or uncompressed IDX file (gzip is detected from the content).

    Returns:
        Tensor with the file's dims, e.g. ``(N, 28, 28) uint8`` for image files and ``(N,) uint8``
        for label files. dtype codes 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
        0x0E float64 are supported.

    Raises:
        DataError: missing file, gzip error, bad magic number, or payload size not matching the
            header. The message names the file.
    """
    return _parse_idx(_read_bytes(path), path)


def write_idx(path: str | os.PathLike[str], tensor: torch.Tensor) -> Path:
    """Write ``tensor`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Args:
        path: destination file.
        tensor: any shape with ``ndim >= 1``; dtype uint8, int8, int16, int32, float32 or float64.

    Returns:
        ``Path(path)``.
    """
    if tensor.dtype not in _TORCH_TO_IDX:
        raise ValueError(f"IDX cannot store dtype {tensor.dtype}; use one of {list(_TORCH_TO_IDX)}")
    if tensor.ndim < 1:
        raise ValueError("IDX needs at least one dimension")
    code = _TORCH_TO_IDX[tensor.dtype]
    header = bytes([0, 0, code, tensor.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in tensor.shape)
    payload = tensor.detach().cpu().contiguous().numpy().astype(_IDX_DTYPES[code][0]).tobytes()
    data = header + payload
    p = Path(path)
    if p.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    p.write_bytes(data)
    return p


# ----------------------------------------------------------------------------------------------
# Locating / verifying
# ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``~/.cache/mimkit/fashion-mnist`` (the default download destination)."""
    return Path.home() / ".cache" / "mimkit" / "fashion-mnist"


def _file_in(folder: Path, name: str) -> Path | None:
    """``folder/name`` (``.gz``) or its uncompressed twin, whichever exists (gz first)."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _missing(folder: Path) -> list[str]:
    return [name for name in FILES if _file_in(folder, name) is None]


def _candidates(root: str | os.PathLike[str] | None) -> list[Path]:
    if root is not None:
        r = Path(root).expanduser()
        return [r, r / "fashion-mnist"]
    out: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        out.append(Path(env).expanduser() / "fashion-mnist")
    out += [DEBIAN_DIR, default_cache_dir()]
    return out


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder holding the four Fashion-MNIST files.

    Search order:

    1. ``root`` if given: ``root`` itself, then ``root/fashion-mnist``. An explicit ``root`` is not
       silently replaced by another copy; if neither holds the files a :class:`DataError` is raised.
    2. ``$MIMKIT_DATA/fashion-mnist`` (when the environment variable is set).
    3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
    4. ``~/.cache/mimkit/fashion-mnist`` (where :func:`download_fashion_mnist` saves by default).

    A folder qualifies when it holds all four files, each either as ``name.gz`` or uncompressed.

    Raises:
        DataError: no candidate holds all four files; lists the folders searched and the fix.
    """
    searched = []
    for folder in _candidates(root):
        missing = _missing(folder)
        if not missing:
            return folder
        state = "does not exist" if not folder.is_dir() else f"missing {', '.join(missing)}"
        searched.append(f"  {folder} ({state})")
    raise DataError("Fashion-MNIST not found. Searched:\n" + "\n".join(searched) + "\n" + _FIX_HINT)


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _check_payload(path: Path, name: str, raw: bytes) -> None:
    """Compare decompressed bytes against the known MD5 of file ``name``."""
    want = FILES[name].raw_md5
    got = _md5(raw)
    if got != want:
        raise DataError(
            f"checksum mismatch for {path}: decompressed MD5 {got}, expected {want} (official "
            f"Fashion-MNIST {name}). The file is corrupt or not the official data; delete it and "
            "re-download / re-install it, or pass verify=False to load a modified copy."
        )


def verify_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path:
    """Check all four files found by :func:`find_fashion_mnist` against :data:`FILES`.

    Accepts the official ``.gz`` files (MD5 of the ``.gz``), re-compressed copies such as Debian's,
    and uncompressed files (MD5 of the decompressed IDX bytes).

    Returns:
        The verified folder.

    Raises:
        DataError: a file is unreadable or its checksum does not match; names the file.
    """
    folder = find_fashion_mnist(root)
    for name, sums in FILES.items():
        path = _file_in(folder, name)
        assert path is not None
        if path.suffix == ".gz" and _md5(path.read_bytes()) == sums.gz_md5:
            continue
        _check_payload(path, name, _read_bytes(path))
    return folder


# ----------------------------------------------------------------------------------------------
# Downloading
# ----------------------------------------------------------------------------------------------


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` into ``dest`` (any urllib scheme, including ``file://``)."""
    with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_fashion_mnist(
    dest: str | os.PathLike[str] | None = None,
    *,
    base_url: str = BASE_URL,
    checksums: Mapping[str, str] | None = None,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download the four Fashion-MNIST ``.gz`` files with MD5 verification.

    Each file is streamed to ``dest/<name>.part``, its MD5 is checked, and only then is it renamed
    (atomically, same folder) to ``dest/<name>``; a checksum mismatch deletes the ``.part`` file and
    raises. Files already present with the right checksum are kept (unless ``force``).

    Args:
        dest: destination folder, created if needed. Default: ``~/.cache/mimkit/fashion-mnist``
            (searched by :func:`find_fashion_mnist`).
        base_url: URL prefix the file names are appended to (default: the official mirror).
            Any urllib scheme works, e.g. ``file:///path/to/mirror/``.
        checksums: ``{file name: expected MD5 of the downloaded file}``; default: the official
            ``.gz`` MD5s from :data:`FILES`. Also selects which files are fetched.
        force: download even if a verified copy is already present.
        timeout: socket timeout in seconds per request.

    Returns:
        The destination folder.

    Raises:
        DataError: network error or checksum mismatch; names the URL / file and the fix.
    """
    folder = Path(dest).expanduser() if dest is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    wanted = dict(checksums) if checksums is not None else {n: s.gz_md5 for n, s in FILES.items()}
    if not base_url.endswith("/"):
        base_url += "/"
    for name, md5 in wanted.items():
        target = folder / name
        if target.is_file() and not force and _file_md5(target) == md5:
            continue
        part = folder / (name + ".part")
        url = base_url + name
        try:
            _fetch(url, part, timeout)
        except (urllib.error.URLError, OSError, ValueError) as e:
            part.unlink(missing_ok=True)
            raise DataError(
                f"download of {url} failed: {e}. Check the network, or install the data with "
                f"`apt-get install dataset-fashion-mnist`, or copy the files into {folder} yourself."
            ) from e
        got = _file_md5(part)
        if got != md5:
            part.unlink(missing_ok=True)
            raise DataError(
                f"checksum mismatch for {name} downloaded from {url}: MD5 {got}, expected {md5}. "
                "The download was corrupted or the mirror changed; the partial file was removed. "
                "Retry, or use `apt-get install dataset-fashion-mnist`."
            )
        os.replace(part, target)
    return folder


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    split: Literal["train", "test"] = "train",
    *,
    verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one Fashion-MNIST split into memory.

    Args:
        root: folder with the files; ``None`` searches as described in :func:`find_fashion_mnist`.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        verify: compare the decompressed bytes against the official MD5s (cheap: the bytes are in
            memory anyway). Set ``False`` to load a modified copy.

    Returns:
        ``images (N, 1, 28, 28) uint8`` and ``labels (N,) int64`` in ``[0, 10)``, on the CPU.

    Raises:
        DataError: files missing or corrupt, checksum mismatch, or image/label counts disagree.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    folder = find_fashion_mnist(root)
    # decompressing and checking the files costs ~0.5 s: keep the last loads, keyed by the files'
    # identity (path, inode, size, mtime), and hand out copies
    try:
        key = (split, verify) + tuple(
            (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
            for p in (_file_in(folder, n) for n in SPLITS[split]) if p is not None for st in (p.stat(),))
    except OSError:
        key = None
    hit = _LOAD_CACHE.get(key) if key is not None else None
    if hit is None:
        hit = _load_split(folder, split, verify)
        if key is not None:
            while len(_LOAD_CACHE) >= 4:
                _LOAD_CACHE.pop(next(iter(_LOAD_CACHE)))
            _LOAD_CACHE[key] = hit
    return hit[0].clone(), hit[1].clone()


_LOAD_CACHE: dict = {}


def _load_split(folder: Path, split: str, verify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = []
    for name in SPLITS[split]:
        path = _file_in(folder, name)
        assert path is not None
        raw = _read_bytes(path)
        if verify:
            _check_payload(path, name, raw)
        tensors.append((path, _parse_idx(raw, path)))
    (img_path, images), (lbl_path, labels) = tensors
    if images.ndim != 3 or images.dtype != torch.uint8:
        raise DataError(
            f"{img_path} holds {images.dtype} data of shape {tuple(images.shape)}, expected uint8 "
            "(N, H, W) images. Replace it with the official file."
        )
    if labels.ndim != 1:
        raise DataError(
            f"{lbl_path} holds data of shape {tuple(labels.shape)}, expected (N,) labels. "
            "Replace it with the official file."
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"image/label count mismatch: {img_path} has {images.shape[0]} images but {lbl_path} "
            f"has {labels.shape[0]} labels. One of the files is from a different data set or split."
        )
    labels = labels.to(torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(FASHION_MNIST_CLASSES)):
        raise DataError(
            f"{lbl_path} contains labels outside [0, {len(FASHION_MNIST_CLASSES)}): "
            f"min {int(labels.min())}, max {int(labels.max())}."
        )
    return images.unsqueeze(1), labels
