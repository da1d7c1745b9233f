"""Atomic, full-state checkpoints.

A checkpoint is one ``torch.save`` file holding ``model`` (the method's state dict, decoder
included), ``optimizer``, ``scaler``, ``step``, ``rng`` (per rank: python, numpy, torch CPU, CUDA),
``config`` (the resolved config dict) and ``extra`` counters. It is written to a temporary file in
the same directory, flushed to disk and renamed over the old one, so an interruption or a full disk
never leaves a broken or missing latest checkpoint.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

LATEST = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which file and what to do."""


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_save(obj: dict, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"disk full while writing checkpoint {path} ({free / 2**20:.0f} MiB free); the previous "
                "checkpoint is intact. Free space or set train.out_dir to a larger disk, then rerun to resume."
            ) from e
        raise CheckpointError(f"could not write checkpoint {path}: {e}. The previous checkpoint is intact.") from e
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with a clear error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # pickle/zip errors of a truncated or foreign file
        raise CheckpointError(
            f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e}). "
            "Delete it to start over, or point train.resume at another checkpoint."
        ) from e


def find_resume(out_dir: str | Path, resume: str) -> Path | None:
    """``resume``: ``auto`` (the run directory's latest checkpoint if any), ``none``, or a path."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        p = Path(out_dir) / LATEST
        return p if p.is_file() else None
    p = Path(resume)
    if not p.is_file():
        raise CheckpointError(f"train.resume={resume} does not exist; give an existing checkpoint path, 'auto' or 'none'")
    return p


def prune(out_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest ``checkpoint-<step>.pt`` copies (``keep < 0``: all)."""
    if keep < 0:
        return
    olds = sorted(out_dir.glob("checkpoint-*.pt"))
    for p in olds[: max(0, len(olds) - keep)]:
        p.unlink(missing_ok=True)
