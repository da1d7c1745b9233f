"""torchrun support: process group (gloo on CPU, nccl on GPU), rank helpers, device choice, and the
process groups one trainer owns (:class:`ProcessGroups`, torn down in order by its ``close``).

Every collective waits at most ``timeout_minutes`` (``train.dist_timeout_minutes``) for the other
ranks, so a rank that stopped or crashed makes the others fail instead of blocking for gloo's
default 30 minutes."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device_name: str = "auto", timeout_minutes: float | None = None) -> DistInfo:
    """Initialise from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); single
    process otherwise. ``timeout_minutes``: the collectives' timeout (torch's default when None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kw = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        dist.init_process_group(backend=backend, **kw)
    return DistInfo(rank, world, local, device)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
        t /= info.world_size
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself when not distributed)."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_ok(ok: bool, info: DistInfo, device: torch.device | None = None) -> bool:
    """True when ``ok`` holds on every rank (one all-reduce; no communication single-process)."""
    if not info.enabled:
        return ok
    t = torch.tensor([0.0 if ok else 1.0], device=device or info.device)
    dist.all_reduce(t)
    return t.item() == 0.0


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The method inside ``torch.compile`` and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ProcessGroups:
    """The process groups of one run: started from torchrun's environment (:func:`init_distributed`),
    the groups the run makes itself (:meth:`new`; :attr:`made`) and the gloo group host-side flags are
    agreed on (:meth:`host_flag_group`). :meth:`destroy` ends the default group when this run started
    it (and with it every group made on it), else only the groups made here: one the caller started
    before is left to the caller."""

    def __init__(self, device_name: str = "auto", timeout_minutes: float | None = None):
        owns = not (dist.is_available() and dist.is_initialized())
        self.info = init_distributed(device_name, timeout_minutes)
        self.owns_default = owns and self.info.enabled
        self.made: list = []
        self._flag_group = None

    def new(self, **kwargs):
        """``dist.new_group`` for a group this run uses (and :meth:`destroy` ends)."""
        group = dist.new_group(**kwargs)
        self.made.append(group)
        return group

    def host_flag_group(self):
        """The group host-side flags are agreed on: the default one when it is gloo, else a gloo group
        made once (see :class:`~mimkit.train.step.HostFlags`)."""
        if not self.info.enabled or dist.get_backend() == "gloo":
            return None
        if self._flag_group is None:
            self._flag_group = self.new(backend="gloo")
        return self._flag_group

    def destroy(self) -> None:
        """End the default group (when this run started it) or the groups made here; errors ignored."""
        self._flag_group = None
        if dist.is_available() and dist.is_initialized():
            if self.owns_default:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()  # the default group and every group made on it
            else:
                for group in self.made:
                    with contextlib.suppress(Exception):
                        dist.destroy_process_group(group)
        self.made = []


_OPEN: weakref.WeakSet = weakref.WeakSet()


def close_at_exit(owner, register: bool = True) -> None:
    """Have ``owner.close()`` called at interpreter exit (``register=False``: no longer, it was closed)."""
    if register:
        _OPEN.add(owner)
    else:
        _OPEN.discard(owner)


@atexit.register
def _close_open_owners() -> None:
    """Close every trainer still open when the interpreter exits (a caller that kept one alive, e.g. as
    a module global, and never called its ``close``): its process groups and their threads end here,
    while Python is whole, not later during interpreter shutdown, where a gloo thread releasing a
    tensor aborts the process (``terminate called without an active exception``)."""
    for owner in list(_OPEN):
        with contextlib.suppress(Exception):
            owner.close()
