"""Reading ``torch.save`` files without running code from them, and mimkit's file checksum.

Every ``.pt``/``.pth``/``.bin`` file mimkit reads goes through :func:`safe_load` (safetensors files
are read with ``safetensors``, which holds no code):

* **file checksum first.** mimkit writes its checkpoints with :func:`append_checksum`: ``torch.save``
  writes a zip archive, and its end-of-central-directory record (the last 22 bytes, comment length
  0) gets the ASCII comment ``mimkit-checksum blake2b-file-v2 <64 hex>``, the BLAKE2b-256 digest of
  the file exactly as ``torch.save`` wrote it (comment length 0, no comment). ``torch.load`` and
  ``zipfile`` read such a file unchanged, and a byte copy keeps the checksum. :func:`safe_load`
  parses the tail, recomputes the digest streaming over the file and compares it *before* anything
  is deserialised: a changed byte is refused without unpickling. A non-empty zip comment that is
  not exactly such a record (another algorithm name, bad hex) is refused, as is a missing checksum
  where a mimkit checkpoint is expected (resume, a sharded checkpoint's ``trainer.pt``) or where the
  file, once safely loaded, is a mimkit training checkpoint (``model``/``optimizer``/``step``).
  Foreign weight files (official MAE ``.pth``, timm and Hugging Face state dicts) carry no checksum
  and load without one.
* **weights only.** Every file is unpickled with ``torch.load(weights_only=True)``: tensors,
  containers and plain values, plus the small allowlist of :func:`allowed_globals` (numpy arrays,
  scalars and dtypes, as in old RNG states; ``argparse.Namespace``, the ``args`` of official
  MAE/CAE training checkpoints). A file that needs any other global is refused with the global's
  name: unpickling it could run code. There is no way around this: mimkit never unpickles such a
  file (nor a sharded checkpoint directory beyond its restricted reader,
  :func:`mimkit.weights.checkpoint.dcp_load`); its weights have to be converted to a plain state
  dict of tensors or to safetensors, with code the user trusts.

One opt-in, an environment variable that prints a warning: ``MIMKIT_ALLOW_UNVERIFIED=1`` loads a
file whose checksum is missing or malformed (still weights only). A checksum that is present and
does not match is always refused.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mimkit.errors import CheckpointError, FileRefusedError

ALLOW_UNVERIFIED = "MIMKIT_ALLOW_UNVERIFIED"
FILE_CHECKSUM_ALGO = "blake2b-file-v2"
_RECORD_PREFIX = b"mimkit-checksum " + FILE_CHECKSUM_ALGO.encode() + b" "
_RECORD_RE = re.compile(rb"mimkit-checksum blake2b-file-v2 ([0-9a-f]{64})")
_EOCD_SIG = b"PK\x05\x06"
_EOCD_LEN = 22
_CHUNK = 4 * 2**20


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# the allowlist


def allowed_globals() -> list:
    """The non-tensor globals :func:`safe_load` accepts beyond torch's own weights-only set: numpy
    arrays, scalars and dtypes (the numpy RNG state of checkpoints of older mimkit versions) and
    ``argparse.Namespace`` (the ``args`` of official MAE / CAE training checkpoints)."""
    import argparse

    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    out: list = [argparse.Namespace, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    # pickles of numpy 1 name the module numpy.core, those of numpy 2 numpy._core
    for old in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{old}._reconstruct"), (multiarray.scalar, f"{old}.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: the dtype classes a pickled dtype is built from
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


# --------------------------------------------------------------------------------------------------
# the file checksum (zip comment)


@dataclass
class Tail:
    """What the end of a file says: ``kind`` is ``record`` (a well-formed mimkit checksum record),
    ``none`` (a zip archive without a comment), ``other`` (a zip archive whose comment is not a
    well-formed record) or ``notzip``; ``eocd``: offset of the end-of-central-directory record."""

    kind: str
    eocd: int = -1
    digest: str | None = None
    comment: bytes = b""


def read_tail(path: str | Path) -> Tail:
    size = os.path.getsize(path)
    n = min(size, _EOCD_LEN + 0xFFFF)
    with open(path, "rb") as f:
        f.seek(size - n)
        tail = f.read(n)
    i = tail.rfind(_EOCD_SIG)
    while i >= 0:
        if len(tail) - i >= _EOCD_LEN:
            (clen,) = struct.unpack_from("<H", tail, i + 20)
            if i + _EOCD_LEN + clen == len(tail):
                comment = tail[i + _EOCD_LEN:]
                eocd = size - n + i
                if not comment:
                    return Tail("none", eocd)
                m = _RECORD_RE.fullmatch(comment)
                if m:
                    return Tail("record", eocd, m.group(1).decode(), comment)
                return Tail("other", eocd, comment=comment)
        i = tail.rfind(_EOCD_SIG, 0, i)
    return Tail("notzip")


def _digest_prefix(f, end: int) -> hashlib.blake2b:
    h = hashlib.blake2b(digest_size=32)
    f.seek(0)
    left = end
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h


def file_digest(path: str | Path, eocd: int) -> str:
    """BLAKE2b-256 of the file as ``torch.save`` wrote it: every byte before the comment-length field
    of the end-of-central-directory record at ``eocd``, then that field as 0."""
    with open(path, "rb") as f:
        h = _digest_prefix(f, eocd + 20)
    h.update(b"\x00\x00")
    return h.hexdigest()


def bytes_digest(path: str | Path) -> str:
    """BLAKE2b-256 of a whole file (the shard manifest of sharded checkpoints)."""
    with open(path, "rb") as f:
        return _digest_prefix(f, os.fstat(f.fileno()).st_size).hexdigest()


def append_checksum(f) -> str:
    """Put the checksum record into the zip comment of the ``torch.save`` archive just written to the
    open file ``f`` (opened for reading and writing); returns the digest."""
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(size - _EOCD_LEN)
    eocd = f.read(_EOCD_LEN)
    if size < _EOCD_LEN or eocd[:4] != _EOCD_SIG or eocd[20:] != b"\x00\x00":
        raise CheckpointError("torch.save did not write a zip archive without a comment; cannot add the checksum")
    h = _digest_prefix(f, size)
    digest = h.hexdigest()
    record = _RECORD_PREFIX + digest.encode()
    f.seek(size - 2)
    f.write(struct.pack("<H", len(record)) + record)
    f.flush()
    return digest


def has_valid_checksum(path: str | Path) -> bool:
    tail = read_tail(path)
    return tail.kind == "record" and file_digest(path, tail.eocd) == tail.digest


# --------------------------------------------------------------------------------------------------
# loading


def looks_like_training_checkpoint(obj) -> bool:
    """A mimkit training checkpoint (what ``train.resume`` reads), recognised after a safe load."""
    return isinstance(obj, dict) and (
        isinstance(obj.get("checksum"), dict)  # the content checksum of older mimkit checkpoints
        or {"model", "optimizer", "step"} <= set(obj)
        or "dcp_manifest" in obj
    )


def _unverified(path: Path, what: str, problem: str, fix: str = "") -> None:
    """Refuse (or, with the opt-in, warn about) a file whose checksum is missing or malformed."""
    if env_flag(ALLOW_UNVERIFIED):
        warn(f"{what} {path} {problem}; loading it unverified because {ALLOW_UNVERIFIED}=1 (still weights only)")
        return
    raise FileRefusedError(
        f"{what} {path} {problem}, so it was not loaded{fix}; if you trust it, set {ALLOW_UNVERIFIED}=1 to load it "
        "unverified (weights only)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _unsafe_globals(path: Path, e: BaseException) -> list[str]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - e.g. the legacy (non-zip) format: read the error instead
        names = []
    if not names:
        names = re.findall(r"GLOBAL (\S+) was not an allowed global", str(e))
        names += re.findall(r"but got <class '([^']+)'>", str(e))
    return sorted(dict.fromkeys(names))


NEVER_UNPICKLED = ("mimkit never unpickles such files: convert the weights to a plain state dict of tensors or to "
                   "safetensors with code you trust")


def _weights_only_reason(e: BaseException) -> str:
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
    return m.group(1).strip()[:200] if m else _first_line(e)


def weights_only_load(path: str | Path, map_location="cpu", what: str = "file", fix: str = ""):
    """``torch.load(weights_only=True)`` with :func:`allowed_globals`; a file needing more is refused
    (:class:`FileRefusedError` naming the globals; there is no opt-in: mimkit never unpickles such a
    file). Unreadable files raise :class:`CheckpointError` ("unreadable or corrupt")."""
    path = Path(path)
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            weights_only = "weights only" in str(e).lower() or "weightsunpickler" in str(e).lower()
            names = _unsafe_globals(path, e) if weights_only else []
            if not names:  # not a refused global: a damaged or foreign byte stream
                reason = _weights_only_reason(e) if weights_only else _first_line(e)
                raise CheckpointError(f"{what} {path} is unreadable or corrupt (UnpicklingError: {reason}){fix}") from e
        except RuntimeError as e:
            if "torchscript" in str(e).lower():
                raise FileRefusedError(f"{what} {path} is a TorchScript archive (it holds code), not a weight file; "
                                       "save the model's state_dict with torch.save and give that file") from e
            raise CheckpointError(f"{what} {path} is unreadable or corrupt (RuntimeError: {_first_line(e)}){fix}") from e
        except Exception as e:  # zip / EOF / format errors of a truncated or foreign file
            raise CheckpointError(f"{what} {path} is unreadable or corrupt ({type(e).__name__}: {_first_line(e)})"
                                  f"{fix}") from e
    raise FileRefusedError(
        f"{what} {path} was not loaded: it needs Python objects outside mimkit's weights-only allowlist "
        f"({', '.join(names)}), and unpickling them can run code; {NEVER_UNPICKLED}")


def safe_load(path: str | Path, map_location="cpu", *, expect_checksum: bool = False, verify: bool = True,
              what: str = "file", fix: str = ""):
    """Read a ``torch.save`` file without running code from it (see the module docstring).

    ``expect_checksum``: the file must be a checksummed mimkit checkpoint (resume, a sharded
    checkpoint's ``trainer.pt``); otherwise a file without a checksum loads when it is not a mimkit
    training checkpoint. A checksum that is present is verified (``verify=False`` skips that, for
    benchmarks only) before the file is deserialised. ``what`` names the file in messages; ``fix`` is
    appended to the message of an unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    tail = read_tail(path)
    if tail.kind == "record":
        if verify and file_digest(path, tail.eocd) != tail.digest:
            raise FileRefusedError(
                f"{what} {path} is corrupt: the file does not match the checksum stored when it was written (damaged "
                f"on disk or in a copy, or changed), so it was not loaded{fix or '; copy or write it again'}")
    elif tail.kind == "other":
        shown = tail.comment[:60].decode("ascii", "replace") + ("..." if len(tail.comment) > 60 else "")
        _unverified(path, what, f"has a malformed mimkit checksum (zip comment {shown!r} is not "
                                f"'mimkit-checksum {FILE_CHECKSUM_ALGO} <64 hex digits>')", fix)
    elif expect_checksum:
        if tail.kind == "none":
            _unverified(path, what, "has no mimkit checksum (written by another tool or an older mimkit)", fix)
        else:
            _unverified(path, what, "is unreadable or corrupt: it is not a zip archive written by torch.save, so it has "
                                    "no mimkit checksum (damaged, truncated or another format)", fix)
    obj = weights_only_load(path, map_location, what, fix)
    if tail.kind in ("none", "notzip") and not expect_checksum and looks_like_training_checkpoint(obj):
        _unverified(path, what, "is a mimkit training checkpoint without a mimkit checksum (written by an older mimkit "
                                "or changed by another tool)", fix)
    return obj
