"""Checkpoint files: atomic, checksummed writing and verified, weights-only reading.

A mimkit checkpoint is one ``torch.save`` file (the trainer's full state: ``model``, ``optimizer``,
``scaler``, ``step``, ``rng``, ``config``, ``extra``; see :mod:`mimkit.train.checkpointer`) or, for
``train.strategy=fsdp``, a ``torch.distributed.checkpoint`` (DCP) directory. This module reads and
writes both; which files a run keeps, the run-directory lock and the resume policy live in
:mod:`mimkit.train`.

Verified before it is read (:mod:`mimkit.weights.safe`): :func:`atomic_save` puts a checksum into
the zip comment of the archive ``torch.save`` wrote (``mimkit-checksum blake2b-file-v2 <hex>``, the
BLAKE2b-256 digest of the file's bytes as written). :func:`load_checkpoint` recomputes it over the
file and compares *before* anything is deserialised, then unpickles with
``torch.load(weights_only=True)`` (tensors, containers, plain values and a small allowlist), so no
file, changed or forged, runs code when it is loaded. A checkpoint without a checksum (another
tool's, an older mimkit's) or with a malformed one is refused with a one-line
:class:`~mimkit.errors.CheckpointError` naming the file and the opt-in ``MIMKIT_ALLOW_UNVERIFIED=1``
(loads it unverified, still weights only); a file that needs more than the allowlist is refused
naming the globals, with no opt-in: mimkit never unpickles such a file (the message says to convert
the weights to a plain state dict of tensors or to safetensors with code the user trusts).
Checkpoints of older mimkit versions also carry a content checksum (``checksum``,
``blake2b-tree-v1``, over the unpickled values); it is still checked when such a file is loaded with
the opt-in.

Writing (:func:`atomic_save`): the free space is checked first (nothing is touched when it is too
small), then the state goes to a hidden temporary file in the same directory, is flushed to disk and
renamed over the old file. Any failure (a full disk, which ``torch.save`` reports as a
``RuntimeError``; an interrupt) removes the temporary file and leaves the previous checkpoint as it
was (:func:`atomic_copy` makes byte copies the same way).

Sharded (DCP) directories: torch's own reader unpickles a DCP directory without restriction
(``FileSystemReader.read_metadata`` runs ``pickle.load`` on ``.metadata``;
``DefaultLoadPlanner.load_bytes`` runs ``torch.load`` with full unpickling, not weights only, on the
non-tensor items of the ``*.distcp`` shards, e.g. the optimizer's param groups). mimkit never reads a
directory that way: :func:`dcp_load` passes DCP a reader whose metadata unpickler accepts only DCP's
own metadata classes, tensor sizes and dtypes (:class:`_DCPMetadataUnpickler`), and a planner that
reads the byte items weights only. Integrity is checked as for single files: ``trainer.pt``
(checksummed) holds ``dcp_manifest``, the size and BLAKE2b digest of every other file of the directory, taken by rank 0
when it finalizes the directory; :func:`verify_dcp_files` checks files and sizes (and digests) against
it. A file that does not match, or that the manifest does not list, is refused; a directory without
a manifest (another tool's, an older mimkit's) is read only with ``MIMKIT_ALLOW_UNVERIFIED=1`` (and
then still through the restricted reader). :func:`consolidate_dcp` reads a directory into one
single-process state (export, pictures, ``model.init``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mimkit.errors import CheckpointError, DiskFullError, FileRefusedError
from mimkit.weights.safe import (
    ALLOW_UNVERIFIED,
    NEVER_UNPICKLED,
    allowed_globals,
    append_checksum,
    bytes_digest,
    env_flag,
    safe_load,
    warn,
)

TMP_RE = re.compile(r"^\..+\.tmp-\d+$")


CHECKSUM_ALGO = "blake2b-tree-v1"


_MIB = 2**20




def _digest_into(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        h.update(f"N{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).view(np.uint8).reshape(-1))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _digest_into(h, k)
            _digest_into(h, v)
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest_into(h, v)
    elif isinstance(obj, np.generic):
        _digest_into(h, obj.item())
    elif obj is None or isinstance(obj, bool | int | float | str | bytes):
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())
    else:
        h.update(f"O{type(obj).__name__}:{obj!r}".encode())


def state_digest(state: dict) -> str:
    """BLAKE2b over the checkpoint's content (every key but ``checksum``; tensors by their bytes)."""
    h = hashlib.blake2b(digest_size=32)
    _digest_into(h, {k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


def with_checksum(state: dict) -> dict:
    return {**state, "checksum": {"algorithm": CHECKSUM_ALGO, "digest": state_digest(state)}}


def estimate_bytes(obj) -> int:
    """A slight over-estimate of ``torch.save(obj)``'s size: tensor bytes + 1 MiB + 2 %."""
    total = 0
    seen: set[int] = set()

    def walk(o):
        nonlocal total
        if isinstance(o, torch.Tensor):
            key = id(o)
            if key not in seen:
                seen.add(key)
                total += o.numel() * o.element_size() + 64
        elif isinstance(o, np.ndarray):
            total += o.nbytes + 64
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list | tuple):
            for v in o:
                walk(v)
        else:
            total += 16

    walk(obj)
    return int(total * 1.02) + _MIB


def free_bytes(directory: str | Path) -> int:
    return shutil.disk_usage(directory).free


def check_space(directory: Path, need: int, what: str) -> None:
    """Raise :class:`DiskFullError` when ``directory`` has less than ``need`` bytes free."""
    free = free_bytes(directory)
    if free < need:
        raise DiskFullError(
            f"not enough space for {what}: it needs about {need / _MIB:.1f} MiB, {directory} has "
            f"{free / _MIB:.1f} MiB free; nothing was changed (the previous checkpoint is intact). Free "
            "space or set train.out_dir to a larger disk, then rerun to resume"
        )


def _is_disk_full(e: BaseException, directory: Path, need: int) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e).lower()
    if "no space" in text or "quota" in text:
        return True
    # torch.save reports a failed write as RuntimeError("... file write failed"); ask the disk
    try:
        return free_bytes(directory) < need
    except OSError:
        return False


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_atomically(path: Path, write: Callable, need: int, what: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    check_space(path.parent, need, what)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError | RuntimeError):
            raise  # KeyboardInterrupt, SystemExit: the partial file is gone, the old one intact
        if _is_disk_full(e, path.parent, need):
            free = free_bytes(path.parent) if path.parent.is_dir() else 0
            raise DiskFullError(
                f"disk full while writing {what} {path} (about {need / _MIB:.1f} MiB needed, "
                f"{free / _MIB:.1f} MiB free); the partial file was removed and the previous checkpoint is "
                "intact. Free space or set train.out_dir to a larger disk, then rerun to resume"
            ) from e
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"could not write {what} {path} ({type(e).__name__}: {reason}); the partial file was removed "
            "and the previous checkpoint is intact"
        ) from e
    _fsync_dir(path.parent)
    return path


def shareable(path: str | Path) -> Path:
    """Give a file written by a library that creates it owner-only (safetensors writes ``0600``) the
    mode a plain ``open`` would: ``0666`` less the process umask (``0644`` usually), so an exported
    file can be read by the tools and people it is exported for. A directory: every file in it."""
    path = Path(path)
    mask = os.umask(0)
    os.umask(mask)
    for f in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
        os.chmod(f, 0o666 & ~mask)
    return path


def atomic_save(obj: dict, path: str | Path, checksum: bool = True) -> Path:
    """``torch.save`` to ``path`` atomically (space check, temp file, fsync, rename), with the file
    checksum in the zip comment (see the module docstring; ``checksum=False``: without it, for
    benchmarks). Raises :class:`DiskFullError` / :class:`CheckpointError`."""
    path = Path(path)

    def write(f):
        torch.save(obj, f)
        if checksum:
            append_checksum(f)

    return _write_atomically(path, write, estimate_bytes(obj), "checkpoint")


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Byte copy ``src`` -> ``dst`` atomically (for the numbered copies)."""
    src, dst = Path(src), Path(dst)
    need = src.stat().st_size + _MIB

    def write(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 4 * _MIB)

    return _write_atomically(dst, write, need, "checkpoint copy")


_RESUME_FIX = "; delete it to start over, or point train.resume at another checkpoint"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True,
                    require_checksum: bool = True) -> dict:
    """Read a checkpoint without running code from it, with a one-line :class:`CheckpointError` for
    missing, unreadable, corrupt, unverified or unsafe files (see the module docstring).

    ``require_checksum``: the file must carry mimkit's file checksum (``False``: foreign weight files,
    e.g. an official MAE ``.pth``, load without one unless they are mimkit training checkpoints; a
    checksum that is present is verified all the same). ``verify=False`` skips comparing the checksum
    (benchmarks only); the file is still read weights only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = safe_load(path, map_location, expect_checksum=require_checksum, verify=verify, what="checkpoint",
                      fix=_RESUME_FIX if require_checksum else "")
    if verify and isinstance(state, dict) and isinstance(state.get("checksum"), dict):
        stored = state["checksum"]  # an older mimkit's content checksum (loaded with MIMKIT_ALLOW_UNVERIFIED)
        if stored.get("algorithm") == CHECKSUM_ALGO and stored.get("digest") != state_digest(state):
            raise FileRefusedError(
                f"checkpoint {path} is corrupt: its content does not match the checksum stored when it was "
                "written (damaged on disk or in a copy). Delete it, or point train.resume at another checkpoint."
            )
    return state


def peek_step(path: str | Path) -> int | None:
    """The ``step`` of a checkpoint file without reading its tensors (memory-mapped, weights only, not
    verified: for deciding whether another checkpoint is newer); ``None`` when it cannot be read."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return int(state["step"])
    except Exception:  # noqa: BLE001 - unreadable, damaged or not a checkpoint: nothing to compare
        return None


DCP_TRAINER = "trainer.pt"


DCP_METADATA = ".metadata"


DCP_MANIFEST = "dcp_manifest"


def is_dcp_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file() and (p / DCP_TRAINER).is_file()


def dcp_manifest(directory: Path) -> dict:
    """``{"algorithm", "files": {name: {"size", "blake2b"}}}`` of every file of a DCP directory but
    ``trainer.pt`` (and temporary files)."""
    files = {}
    for p in sorted(Path(directory).iterdir()):
        if p.name == DCP_TRAINER or TMP_RE.match(p.name) or not p.is_file():
            continue
        files[p.name] = {"size": p.stat().st_size, "blake2b": bytes_digest(p)}
    return {"algorithm": "blake2b-256", "files": files}


def verify_dcp_files(path: Path, state: dict, digests: bool = True) -> None:
    """Check the files of the DCP directory ``path`` against the manifest in its ``trainer.pt``
    (``state``): every listed file present with its recorded size and (``digests``) BLAKE2b digest,
    and no file the manifest does not list. Raises :class:`CheckpointError` (a mismatch or an unlisted
    file: :class:`FileRefusedError`); a directory without a manifest is refused unless
    ``MIMKIT_ALLOW_UNVERIFIED=1``."""
    path = Path(path)
    manifest = state.get(DCP_MANIFEST) if isinstance(state, dict) else None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or DCP_METADATA not in files:
        what = "no manifest of its shard files" if not isinstance(files, dict) else f"a manifest without {DCP_METADATA}"
        if env_flag(ALLOW_UNVERIFIED):
            warn(f"sharded checkpoint {path} has {what} in {DCP_TRAINER}; reading it unverified because "
                 f"{ALLOW_UNVERIFIED}=1 (still without running code from it)")
            return
        raise FileRefusedError(
            f"sharded checkpoint {path} has {what} in {DCP_TRAINER} (written by an older mimkit or another tool), so "
            f"its files cannot be verified and it was not read; if you trust it, set {ALLOW_UNVERIFIED}=1")
    for name, rec in files.items():
        if "/" in str(name) or str(name) in (".", "..", DCP_TRAINER) or not isinstance(rec, dict):
            raise FileRefusedError(f"sharded checkpoint {path} has a manifest naming an invalid file {name!r}; delete "
                                   "it or point train.resume at another checkpoint")
        p = path / str(name)
        if not p.is_file():
            raise CheckpointError(f"sharded checkpoint {path} is incomplete: {name} is missing; delete it or point "
                                  "train.resume at another checkpoint")
        if p.stat().st_size != rec.get("size") or (digests and bytes_digest(p) != rec.get("blake2b")):
            raise FileRefusedError(
                f"sharded checkpoint {path} is corrupt: {name} does not match the digest recorded in {DCP_TRAINER} when "
                "it was written (damaged, or replaced), so it was not read; delete it or point train.resume at another "
                "checkpoint")
    extra = sorted(p.name for p in path.iterdir() if p.name != DCP_TRAINER and p.name not in files)
    if extra:
        raise FileRefusedError(
            f"sharded checkpoint {path} holds file(s) its manifest does not list ({', '.join(extra[:5])}), so it was not "
            "read (DCP could read them in place of the verified ones); remove them, or point train.resume at another "
            "checkpoint")


def load_dcp_trainer_state(path: Path, digests: bool = False) -> dict:
    """``trainer.pt`` of a DCP checkpoint directory, verified (its checksum; the shard files against
    its manifest: sizes, and digests with ``digests``). Raises :class:`CheckpointError`."""
    if not (Path(path) / DCP_METADATA).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no DCP .metadata); delete it or point train.resume "
                              "at another checkpoint")
    state = load_checkpoint(Path(path) / DCP_TRAINER)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a mimkit sharded checkpoint (no step in {DCP_TRAINER})")
    verify_dcp_files(Path(path), state, digests=digests)
    return state


def verify_dcp_dir(path: Path) -> dict:
    """Everything DCP will read from ``path`` verified (``trainer.pt``'s checksum, every file's digest);
    call right before ``torch.distributed.checkpoint`` reads the directory. Returns ``trainer.pt``."""
    return load_dcp_trainer_state(path, digests=True)


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file accepting only the globals such a file is made of: DCP's
    metadata classes, the file reader's storage records, ``torch.Size``, dtypes and the layout
    decoder; anything else (a pickle that would run code) raises ``UnpicklingError`` naming it."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str):
        if name in self._ALLOWED.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a DCP .metadata file")


def _dcp_reader(path: Path):
    """A ``FileSystemReader`` whose metadata is read with :class:`_DCPMetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        refused: FileRefusedError | None = None  # DCP wraps reader errors; dcp_load re-raises this one

        def read_metadata(self, *args, **kwargs):
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(meta_path, "rb") as f:
                try:
                    metadata = _DCPMetadataUnpickler(f).load()
                except pickle.UnpicklingError as e:
                    self.refused = FileRefusedError(
                        f"sharded checkpoint {path} was not read: {meta_path} is not plain DCP metadata ({e}) and "
                        f"unpickling it could run code; {NEVER_UNPICKLED}")
                    raise self.refused from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _weights_only_planner(base, path: Path):
    """``base`` (a DCP load planner class) reading the shards' byte items weights only."""

    class WeightsOnlyPlanner(base):
        refused: FileRefusedError | None = None  # DCP wraps planner errors; dcp_load re-raises this one

        def load_bytes(self, read_item, value) -> None:
            fqn = read_item.dest_index.fqn
            try:
                with torch.serialization.safe_globals(allowed_globals()):
                    obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                reason = re.sub(r"\s+", " ", str(e).split("WeightsUnpickler error:")[-1]).strip()[:200]
                self.refused = FileRefusedError(
                    f"sharded checkpoint {path} was not read: its item {fqn} needs Python objects outside the weights-"
                    f"only allowlist ({reason}) and unpickling it could run code; {NEVER_UNPICKLED}")
                raise self.refused from None
            if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, but weights only
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return WeightsOnlyPlanner()


def dcp_load(state: dict, path: Path, *, rebuild: bool = False, no_dist: bool = False) -> dict:
    """``torch.distributed.checkpoint.load`` of the directory ``path`` into ``state`` without running
    code from it (restricted metadata unpickler, weights-only byte items; see the section comment).
    ``rebuild``: fill an empty ``state`` from the checkpoint's own metadata (one process). Errors are
    torch's (DCP's ``CheckpointException`` is a ``BaseException``) or :class:`FileRefusedError`."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    base = _EmptyStateDictLoadPlanner if rebuild else DefaultLoadPlanner
    reader, planner = _dcp_reader(Path(path)), _weights_only_planner(base, Path(path))
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        with warnings.catch_warnings():  # one process: DCP says it reads without a process group
            warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
            if rebuild:  # dcp.load copies back only the keys `state` had: fill it as dcp_to_torch_save does
                from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

                _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
            else:
                dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except (Exception, CheckpointException):
        for part in (reader, planner):
            if getattr(part, "refused", None) is not None:
                raise part.refused from None
        raise
    return state


def consolidate_dcp(path: str | Path) -> dict:
    """A DCP checkpoint directory as one single-process state dict: ``{"model", "step", "config",
    ...}`` (the optimizer state is left out), verified (:func:`verify_dcp_dir`) and read without
    running code (:func:`dcp_load`). For ``mimkit export`` and for inspecting a sharded run on one
    machine."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    path = Path(path)
    trainer = verify_dcp_dir(path)
    try:
        full = dcp_load({}, path, rebuild=True, no_dist=True)
    except FileRefusedError:
        raise
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it is damaged or incomplete") from e
    if "model" not in full:
        raise CheckpointError(f"checkpoint {path} holds no model state; it is not a mimkit sharded checkpoint")
    out = {k: v for k, v in trainer.items() if k not in ("checksum", DCP_MANIFEST)}
    out["model"] = full["model"]
    return out

