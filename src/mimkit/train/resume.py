"""The resume policy: where a run starts.

Owns: finding the checkpoint to resume from and verifying it (:func:`find_resume_point`: ``train.resume``,
else the run directory's newest; ``.pt`` files for ``train.strategy=ddp``, DCP directories for
``fsdp``), refusing an explicit point older than the run directory's newest unless
``train.resume_older=allow``, refusing settings that change the optimisation unless
``train.resume_changes=allow`` (:func:`config_changes`, the ``RESUME_*`` keys; a world-size change
with the same global batch is allowed), putting the point into the model, optimizer, scaler and RNG
streams (:func:`restore_state`, :func:`load_dcp_state`), seeding a fresh run
(:func:`seed_everything`) and ``model.init`` (:func:`apply_init`).
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mimkit.config import PATH_KEYS, Config, to_dict
from mimkit.errors import ConfigError
from mimkit.train import checkpoint as ckpt
from mimkit.train.distributed import DistInfo, all_ok, unwrap

# Resume safety: config keys whose change alters the optimisation (refused unless
# train.resume_changes=allow); keys under these prefixes except FREE ones, plus the world size.
RESUME_GUARDED_PREFIXES = ("model.", "method.", "data.", "optim.")
RESUME_GUARDED_KEYS = ("train.seed", "train.epochs")
RESUME_FREE_KEYS = ("data.num_workers", "data.eval_dataset", "data.eval_root", "data.root", "data.skip_corrupt")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(old: dict, new: dict, old_world: int | None = None, new_world: int | None = None) -> dict:
    """``{key: (old, new)}`` of the settings that alter the optimisation (see ``RESUME_GUARDED_*``).
    Keys the old config does not have (added by a newer mimkit) are not compared."""
    a, b = _flatten(old), _flatten(new)
    for flat in (a, b):  # a path written with `~` by an older mimkit equals its expansion
        for k in PATH_KEYS:
            if isinstance(flat.get(k), str):
                flat[k] = os.path.expanduser(flat[k])

    def guarded(k: str) -> bool:
        return (k.startswith(RESUME_GUARDED_PREFIXES) or k in RESUME_GUARDED_KEYS) and k not in RESUME_FREE_KEYS

    diff = {}
    for k in sorted(set(a) | set(b)):
        if not guarded(k) or k not in a:
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            diff[k] = (va, vb)
    if old_world is not None and new_world is not None and old_world != new_world:
        diff["world_size"] = (old_world, new_world)
    return diff


def describe_changes(diff: dict) -> str:
    return ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in diff.items())


@dataclass
class ResumePoint:
    """A verified checkpoint to continue from: ``path``, its ``state`` (a DCP directory's: all but the
    model and optimizer shards), ``note`` (why an older checkpoint was taken, for the
    ``resume_fallback`` event) and ``diff`` (changed settings accepted with ``train.resume_changes=allow``)."""

    path: Path
    state: dict
    note: str | None = None
    diff: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def find_resume_point(cfg: Config, out_dir: Path, info: DistInfo, warn: Callable[[str], None]) -> ResumePoint | None:
    """Find, load and verify the checkpoint to resume from; refuse a changed optimisation.

    ``train.strategy=ddp`` resumes ``checkpoint.pt`` files, ``fsdp`` DCP directories (whose
    model/optimizer shards are read by :func:`load_dcp_state` once the model is sharded); a run
    directory holding only the other kind is refused with the setting that reads it. A world size
    change keeps the data position exact when the global batch (``data.batch_size x
    optim.accum_iter x processes``) is unchanged: every loader deals the epoch's order out to the
    ranks in strides, so after ``b`` batches the first ``b x global batch`` samples were seen
    whatever the world size, and the new ranks go on from there (see :func:`restore_state`)."""
    fsdp = cfg.train.strategy == "fsdp"
    resume = cfg.train.resume
    has_dcp = bool(ckpt.dcp_checkpoints(out_dir))
    has_pt = (out_dir / ckpt.LATEST).is_file() or bool(ckpt.numbered_checkpoints(out_dir))
    explicit_dcp = resume not in ("auto", "none", "") and ckpt.is_dcp_checkpoint(resume)
    if resume == "auto" and fsdp and has_pt and not has_dcp:
        raise ConfigError(
            f"{out_dir} holds a train.strategy=ddp checkpoint ({ckpt.LATEST}) but this run uses "
            "train.strategy=fsdp, which resumes sharded (DCP) checkpoints; set train.strategy=ddp to resume it, "
            "or choose a new train.out_dir (or train.resume=none)")
    if (resume == "auto" and not fsdp and has_dcp and not has_pt) or (not fsdp and explicit_dcp):
        raise ConfigError(
            f"{out_dir} holds a train.strategy=fsdp (sharded DCP) checkpoint but this run uses "
            "train.strategy=ddp; set train.strategy=fsdp to resume it (on any number of processes), or choose a "
            "new train.out_dir (or train.resume=none)")
    if fsdp:
        res = ckpt.load_dcp_for_resume(out_dir, resume, warn=warn)
    else:
        res = ckpt.load_for_resume(out_dir, resume, warn=warn)
    if res is None:
        return None
    path, state, note = res
    if resume not in ("auto", "none", ""):
        refuse_going_back(cfg, out_dir, path, int(state["step"]), warn)
    extra = state.get("extra") or {}
    old_world = extra.get("world_size", len(state.get("rng") or []) or None)
    old_cfg = state.get("config") or {}
    diff = config_changes(old_cfg, to_dict(cfg), old_world, info.world_size)
    if "world_size" in diff:
        od, oo = old_cfg.get("data") or {}, old_cfg.get("optim") or {}
        old_global = int(od.get("batch_size", cfg.data.batch_size)) * int(oo.get("accum_iter", 1)) * int(old_world)
        new_global = cfg.data.batch_size * cfg.optim.accum_iter * info.world_size
        if old_global == new_global:  # same optimisation on another number of processes
            for k in ("world_size", "data.batch_size", "optim.accum_iter"):
                diff.pop(k, None)
            warn(f"resuming a run of {old_world} process(es) on {info.world_size} with the same global batch "
                 f"{new_global}: the data position is kept (the samples not yet seen this epoch come next; with "
                 "shard streams the shards are dealt out anew from this step), per-process random streams are "
                 "re-seeded")
    if diff and cfg.train.resume_changes != "allow":
        hint = ""
        if "world_size" in diff:
            hint = (" (a different number of processes resumes exactly when data.batch_size x optim.accum_iter x "
                    "processes stays the same; adjust data.batch_size)")
        raise ConfigError(
            f"checkpoint {path} (step {int(state['step'])}) was written with settings that change the "
            f"optimisation: {describe_changes(diff)}{hint}. Restore them, choose a new train.out_dir (or "
            "train.resume=none), or pass train.resume_changes=allow to continue anyway (recorded in metrics.jsonl)"
        )
    if diff:
        warn(f"resuming with changed settings (train.resume_changes=allow): {describe_changes(diff)}")
    return ResumePoint(path, state, note, diff)


def newest_step_in_run_dir(out_dir: Path, other_than: Path) -> tuple[int, Path] | None:
    """The highest step of the checkpoints in ``out_dir`` (single files, numbered copies, DCP
    directories) other than ``other_than``: what a resume from an older point would overwrite."""
    found: list[tuple[int, Path]] = []
    skip = other_than.resolve()
    found += [(s, p) for s, p in ckpt.numbered_checkpoints(out_dir) if p.resolve() != skip]
    found += [(s, p) for s, p in ckpt.dcp_checkpoints(out_dir) if p.resolve() != skip]
    latest = out_dir / ckpt.LATEST
    if latest.is_file() and latest.resolve() != skip:
        step = ckpt.peek_step(latest)
        if step is not None:
            found.append((step, latest))
    return max(found, key=lambda sp: sp[0]) if found else None


def refuse_going_back(cfg: Config, out_dir: Path, path: Path, step: int, warn: Callable[[str], None]) -> None:
    """An explicit ``train.resume`` older than the run directory's newest checkpoint would train on
    from there and overwrite the newer progress: refused unless ``train.resume_older=allow``."""
    newest = newest_step_in_run_dir(out_dir, path)
    if newest is None or newest[0] <= step:
        return
    if cfg.train.resume_older != "allow":
        raise ConfigError(
            f"train.resume={path} is at step {step}, but {newest[1]} in the run directory is at step {newest[0]}: "
            "resuming would go back and overwrite that progress. Drop train.resume (or use auto) to continue "
            "from the newest checkpoint, choose a new train.out_dir, or pass train.resume_older=allow to go back")
    warn(f"train.resume_older=allow: going back from step {newest[0]} ({newest[1]}) to step {step} "
         f"({path}); the newer checkpoints will be overwritten")


def restore_state(point: ResumePoint, model: nn.Module, optimizer: torch.optim.Optimizer, scaler,
                  info: DistInfo, seed: int, warn: Callable[[str], None]) -> tuple[int, int]:
    """Put ``point`` into the model, optimizer, grad scaler and this rank's RNG streams; returns
    ``(step, nonfinite)``. A DCP point's model and optimizer shards are read later, by
    :func:`load_dcp_state`, once the model is sharded. RNG states of another world size are not
    restored: the streams are re-seeded from ``seed + rank + step``."""
    path, state = point.path, point.state
    if "model" in state:
        try:
            unwrap(model).load_state_dict(state["model"])
        except RuntimeError as e:
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not match this model ({str(e).splitlines()[0]}). It was written by a run "
                "with a different config; use another train.out_dir or train.resume=none"
            ) from e
        optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") or not scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    # else: a run without a grad scaler (fp32/bf16) resumed with fp16: the scaler starts afresh
    step = int(state["step"])
    nonfinite = int(state.get("extra", {}).get("nonfinite", 0))
    rngs = state["rng"]
    if len(rngs) == info.world_size:
        ckpt.set_rng_state(rngs[info.rank])
    else:
        warn(f"checkpoint has RNG states of {len(rngs)} ranks, this run has {info.world_size}; "
             "RNG streams are re-seeded")
        seed_everything(seed + info.rank + step)
    if info.is_main:
        print(f"resumed from {path} at step {step}", file=sys.stderr)
    return step, nonfinite


def load_dcp_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> None:
    """Read a DCP checkpoint into the (sharded or replicated) model and optimizer: DCP re-shards
    what ``M`` processes wrote for this run's ``N``. Rank 0 first checks every file against the
    digests in the checksummed ``trainer.pt`` and the ranks agree before any of them reads; the
    read itself runs no code from the files (:func:`~mimkit.train.checkpoint.dcp_load`)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    err: BaseException | None = None
    if info.is_main:
        try:
            ckpt.verify_dcp_dir(path)
        except (ckpt.CheckpointError, OSError) as e:
            err = e
    if not all_ok(err is None, info):
        if isinstance(err, ckpt.CheckpointError):
            raise err
        raise ckpt.CheckpointError(f"checkpoint {path} could not be verified ({err or 'see rank 0'}); delete it "
                                   "(the previous one is used) or use another train.out_dir")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        ckpt.dcp_load(state, path)
    except ckpt.FileRefusedError:
        raise
    except (Exception, CheckpointException) as e:
        raise ckpt.CheckpointError(
            f"checkpoint {path} could not be read into this model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}); it is damaged or was written by a run with a "
            "different config. Delete it (the previous one is used) or use another train.out_dir") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def apply_init(model: nn.Module, cfg: Config, out_dir: Path, is_main: bool):
    """``model.init``: load the starting weights (:mod:`mimkit.init_from`), print what was loaded,
    adapted and newly initialised, and write it to ``init.json`` in the run directory."""
    from mimkit.init_from import apply_init as load_init

    try:
        report = load_init(model, cfg.model.init, cfg.model.init_parts)
    except (NotImplementedError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model.init={cfg.model.init}: {e}") from e
    if is_main:
        print(report.summary(), file=sys.stderr)
        (out_dir / "init.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def resume_point_exists(cfg: Config) -> bool:
    """Whether ``train.resume`` will load a checkpoint (without reading one): an explicit path, or under
    ``auto`` any ``checkpoint*.pt`` or sharded directory in the run directory. For the method's preflight
    before the run directory is claimed (a fresh run must have what only a checkpoint could supply)."""
    resume = cfg.train.resume
    if resume in ("none", "", None):
        return False
    if resume != "auto":
        return True
    out = Path(cfg.train.out_dir)
    return bool(ckpt.numbered_checkpoints(out)) or (out / ckpt.LATEST).is_file() or bool(ckpt.dcp_checkpoints(out))
