"""The files a run keeps in its directory, the run-directory lock, and finding the resume point.

The checkpoint files themselves are written and read by :mod:`mimkit.weights.checkpoint` (atomic,
checksummed, verified before they are deserialised, weights only); the names it defines are
re-exported here for the trainer's components. This module decides *which* files exist:

* ``checkpoint.pt`` (the latest) and step-numbered byte copies ``checkpoint-<step>.pt``, pruned by
  step number (:func:`prune`); :func:`resume_candidates` / :func:`load_for_resume` fall back to the
  newest good numbered copy when ``checkpoint.pt`` is missing or corrupt; :func:`drop_newer` removes
  the copies of a timeline the run left.
* ``train.strategy=fsdp`` runs write sharded ``torch.distributed.checkpoint`` directories instead
  (``dcp/step-<step>/``): each rank writes its own shards into ``dcp/.step-<step>.tmp`` and rank 0
  adds ``trainer.pt`` (the small rest of the state, checksummed, with the manifest of the shard
  files) and renames the directory into place when every rank has finished
  (:func:`finalize_dcp`), so a directory with a ``trainer.pt`` is complete; the newest complete one
  is resumed, an unreadable one falls back to the previous one (:func:`load_dcp_for_resume`).
* :class:`RunLock` keeps two runs out of one directory: an ``flock`` on ``.mimkit.lock`` (released by
  the kernel when the owner dies) whose content names the owner's PID and host.
* :func:`rng_state` / :func:`set_rng_state`: this process's RNG states as tensors and plain values.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mimkit.errors import CheckpointError, DiskFullError, FileRefusedError, RunLockedError  # noqa: F401 - re-exported
from mimkit.weights.checkpoint import (  # noqa: F401 - re-exported for the trainer's components
    CHECKSUM_ALGO,
    DCP_MANIFEST,
    DCP_METADATA,
    DCP_TRAINER,
    TMP_RE,
    _fsync_dir,
    atomic_copy,
    atomic_save,
    check_space,
    consolidate_dcp,
    dcp_load,
    dcp_manifest,
    estimate_bytes,
    free_bytes,
    is_dcp_checkpoint,
    load_checkpoint,
    load_dcp_trainer_state,
    peek_step,
    state_digest,
    verify_dcp_dir,
    verify_dcp_files,
    with_checksum,
)

_MIB = 2**20
LATEST = "checkpoint.pt"
LOCK_NAME = ".mimkit.lock"
NUMBERED_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


def numbered_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


# --------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain values (a checkpoint needs no numpy globals)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]  # a tensor (this version) or a numpy array (older checkpoints)
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((name, key.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------------
# the numbered copies, resume candidates, pruning


def numbered_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the ``checkpoint-<step>.pt`` files, oldest step first."""
    out = []
    d = Path(out_dir)
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = NUMBERED_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_resume(out_dir: str | Path, resume: str) -> Path | None:
    """The first checkpoint ``resume`` points at (see :func:`resume_candidates`), unverified."""
    cands = resume_candidates(out_dir, resume)
    return cands[0] if cands else None


def resume_candidates(out_dir: str | Path, resume: str) -> list[Path]:
    """``resume``: ``auto`` (``checkpoint.pt``, then the numbered copies newest first), ``none``
    (nothing), or a path (only that file)."""
    if resume in ("none", "", None):
        return []
    if resume == "auto":
        d = Path(out_dir)
        cands = [d / LATEST] if (d / LATEST).is_file() else []
        return cands + [p for _, p in reversed(numbered_checkpoints(d))]
    p = Path(resume)
    if not p.is_file():
        raise CheckpointError(f"train.resume={resume} does not exist; give an existing checkpoint path, 'auto' or 'none'")
    return [p]


def load_for_resume(out_dir: str | Path, resume: str, warn: Callable[[str], None] | None = None
                    ) -> tuple[Path, dict, str | None] | None:
    """Load and verify the checkpoint to resume from: ``(path, state, note)`` or ``None`` (start
    fresh). With ``resume=auto`` a missing or corrupt ``checkpoint.pt`` falls back to the newest good
    numbered copy; ``note`` then says why (and ``warn`` is called with it). Raises
    :class:`CheckpointError` naming the bad file when nothing usable is left."""
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    cands = resume_candidates(out_dir, resume)
    if not cands:
        return None
    errors: list[str] = []
    latest = Path(out_dir) / LATEST
    for p in cands:
        try:
            state = load_checkpoint(p)
            if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
                raise CheckpointError(f"checkpoint {p} is not a mimkit training checkpoint (no model/optimizer/step)")
        except CheckpointError as e:
            errors.append(str(e))
            if resume == "auto" and len(cands) > 1:
                warn(str(e))
            continue
        note = None
        if resume == "auto" and p.name != LATEST:
            why = "is missing" if not latest.is_file() else "is unusable (see above)"
            note = f"{LATEST} {why}; resuming from the newest good numbered copy {p.name} (step {int(state['step'])})"
            warn(note)
        return p, state, note
    if len(errors) == 1:
        raise CheckpointError(errors[0])
    raise CheckpointError(f"{errors[0].rstrip('.')}; the {len(errors) - 1} numbered copies are unusable too. "
                          "Delete them to start over, or point train.resume at a good checkpoint")


def drop_newer(out_dir: Path, step: int) -> list[Path]:
    """Delete the numbered copies of steps above ``step``: the timeline a run left when it resumed from
    an older checkpoint (``train.resume_older=allow``, or past a damaged newest one); ``resume=auto``
    would otherwise go back to them. Returns the deleted files."""
    gone = [p for s, p in numbered_checkpoints(out_dir) if s > step]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def prune(out_dir: Path, keep: int) -> list[Path]:
    """Keep the ``keep`` highest-step ``checkpoint-<step>.pt`` copies (``keep < 0``: all); returns
    the deleted files."""
    if keep < 0:
        return []
    olds = numbered_checkpoints(out_dir)
    gone = [p for _, p in olds[: max(0, len(olds) - keep)]]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def remove_stale_temp_files(out_dir: Path) -> tuple[int, int]:
    """Delete hidden ``.<name>.tmp-<pid>`` files left by killed writers (call with the run lock
    held); returns (count, bytes)."""
    n = size = 0
    if not out_dir.is_dir():
        return 0, 0
    for p in out_dir.iterdir():
        if TMP_RE.match(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                s = p.stat().st_size
                p.unlink()
                n, size = n + 1, size + s
    return n, size


# --------------------------------------------------------------------------------------------------
# run-directory lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive ownership of a run directory (``out_dir/.mimkit.lock``).

    :meth:`acquire` takes an ``flock`` on the lock file (the kernel drops it when the owner dies, so
    a lock left by a killed run is stale by construction) and writes ``{pid, host, started}`` into it.
    A live owner makes it raise :class:`RunLockedError` naming the PID and host; a stale lock is taken
    over and :attr:`takeover` says whose it was. Where ``flock`` is unsupported, a same-host owner is
    checked by PID; one on another host is refused (delete the lock file if that run is dead)."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None
        self.takeover: str | None = None

    @staticmethod
    def _describe(info: dict) -> str:
        started = info.get("started")
        when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
        return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}{when}"

    def _read(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            raw = os.read(fd, 65536).decode(errors="replace").strip()
            return json.loads(raw) if raw else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        import fcntl

        host = socket.gethostname()
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            flock_ok = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.dir} is in use by another run ({self._describe(info)}); wait for it to finish or "
                    "stop it, or choose another train.out_dir"
                ) from None
            except OSError:  # flock not supported (some network file systems): fall back to the PID
                flock_ok = False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file was removed/replaced by its previous owner meanwhile: retry
                os.close(fd)
                continue
            prev = self._read(fd)
            if prev.get("pid") and prev.get("pid") != os.getpid():
                if not flock_ok:
                    alive = prev.get("host") != host or _pid_alive(int(prev["pid"]))
                    if alive:
                        os.close(fd)
                        raise RunLockedError(
                            f"{self.dir} is in use by another run ({self._describe(prev)}); if that run is dead, "
                            f"delete {self.path}; else wait for it, or choose another train.out_dir"
                        )
                self.takeover = f"taking over the stale lock of {self._describe(prev)} on {self.dir} (that run is gone)"
            payload = json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}).encode()
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, payload)
                os.fsync(fd)
            except OSError as e:
                os.close(fd)
                with contextlib.suppress(OSError):
                    if not prev:
                        self.path.unlink()
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    free = free_bytes(self.dir)
                    raise DiskFullError(
                        f"disk full: cannot write to train.out_dir {self.dir} ({free / _MIB:.1f} MiB free); free "
                        "space or choose another train.out_dir"
                    ) from e
                raise CheckpointError(f"cannot write the run lock {self.path}: {e}; check train.out_dir") from e
            self.fd = fd
            return self
        raise RunLockedError(f"could not lock {self.dir}: its lock file keeps changing; is another run starting there?")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------
# sharded checkpoints (train.strategy=fsdp): the dcp/step-<step> directories of a run (reading and
# verifying one: mimkit.weights.checkpoint)

DCP_DIR = "dcp"
DCP_STEP_RE = re.compile(r"^step-(\d+)$")
DCP_TMP_RE = re.compile(r"^\.step-(\d+)\.tmp$")
DCP_OLD_RE = re.compile(r"^\.step-(\d+)\.old-\d+$")


def dcp_step_name(step: int) -> str:
    return f"step-{step:08d}"


def dcp_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, dir)]`` of the complete DCP checkpoints under ``out_dir/dcp``, oldest first."""
    root = Path(out_dir) / DCP_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = DCP_STEP_RE.match(p.name)
        if m and p.is_dir() and (p / DCP_TRAINER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def remove_stale_dcp_dirs(out_dir: Path) -> int:
    """Delete ``dcp/.step-<step>.tmp`` directories of killed writers (call with the run lock held)."""
    root = Path(out_dir) / DCP_DIR
    n = 0
    if root.is_dir():
        for p in root.iterdir():
            if DCP_TMP_RE.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        for p in root.iterdir():  # finalize_dcp stopped between its two renames: put the old copy back
            m = DCP_OLD_RE.match(p.name)
            if m and p.is_dir():
                final = root / dcp_step_name(int(m.group(1)))
                if not final.exists() and is_dcp_checkpoint(p):
                    os.replace(p, final)
                else:
                    shutil.rmtree(p, ignore_errors=True)
                    n += 1
    return n


def dcp_tmp_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / DCP_DIR / f".{dcp_step_name(step)}.tmp"


def finalize_dcp(out_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Rank 0, after every rank's shards are written: add ``trainer.pt`` (with the manifest of the
    shard files), rename the temporary directory into place (replacing an older one of the same step)
    and prune. Returns the final dir."""
    tmp = dcp_tmp_dir(out_dir, step)
    atomic_save({**trainer_state, DCP_MANIFEST: dcp_manifest(tmp)}, tmp / DCP_TRAINER)
    final = Path(out_dir) / DCP_DIR / dcp_step_name(step)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    # directories of higher steps belong to the timeline this run left (it resumed from an older
    # checkpoint, explicitly or past a damaged newest one): `resume=auto` would go back to them, so they
    # go, and the one just written is never pruned. Then keep `keep` older copies (-1: all).
    for s, p in dcp_checkpoints(out_dir):
        if s > step:
            shutil.rmtree(p, ignore_errors=True)
    if keep >= 0:
        older = [p for s, p in dcp_checkpoints(out_dir) if s < step]
        for p in older[: max(0, len(older) - keep)]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_dcp_for_resume(out_dir: str | Path, resume: str, warn: Callable[[str], None] | None = None
                        ) -> tuple[Path, dict, str | None] | None:
    """As :func:`load_for_resume` for DCP directories: ``(dir, trainer_state, note)`` or ``None``.
    ``resume``: ``auto`` (the newest complete directory, falling back to older ones), ``none``, or a
    DCP directory. The model/optimizer shards are read later, once the model is sharded."""
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    if resume in ("none", "", None):
        return None
    if resume != "auto":
        p = Path(resume)
        if not is_dcp_checkpoint(p):
            raise CheckpointError(f"train.resume={resume} is not a sharded (DCP) checkpoint directory of "
                                  "train.strategy=fsdp; give out_dir/dcp/step-<step>, 'auto' or 'none'")
        return p, load_dcp_trainer_state(p), None
    cands = [p for _, p in reversed(dcp_checkpoints(out_dir))]
    if not cands:
        return None
    errors = []
    for i, p in enumerate(cands):
        try:
            state = load_dcp_trainer_state(p)
        except CheckpointError as e:
            errors.append(str(e))
            if len(cands) > 1:
                warn(str(e))
            continue
        note = None
        if i:
            note = f"{cands[0].name} is unusable (see above); resuming from the older {p.name}"
            warn(note)
        return p, state, note
    raise CheckpointError(f"{errors[0].rstrip('.')}; no older sharded checkpoint is usable. Delete "
                          f"{Path(out_dir) / DCP_DIR} to start over, or point train.resume at a good checkpoint")


