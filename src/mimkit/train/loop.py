"""The method-agnostic pretraining loop.

One optimizer step = ``accum_iter`` micro-batches, each ``loss / accum_iter`` back-propagated; the
lr is set before every step from the fractional epoch (warmup + cosine, MAE). AMP: bf16 autocast on
GPU by default (fp16 with a grad scaler on request), fp32 on CPU unless ``precision=bf16``.
Non-finite losses skip the step (all ranks agree), are counted and recorded in ``metrics.jsonl``;
past ``max_nonfinite`` the run stops with an error and the last good checkpoint is kept, and a run
whose share of skipped steps is above ``max_nonfinite_fraction`` fails at its end. Checkpoints hold
the full state and a resumed run reproduces the uninterrupted run's losses exactly: the data order
and augmentation are functions of (seed, epoch, batch index) and the RNG states are restored.

Faults: the config is validated before anything is written or read; the run directory is locked
(:class:`~mimkit.train.checkpoint.RunLock`); a resume whose config changes the optimisation is
refused unless ``train.resume_changes=allow``; SIGTERM / SIGINT / SIGUSR1 / SIGHUP save a checkpoint at the
next step boundary and raise :class:`TrainingInterrupted` (the CLI exits with
:data:`EXIT_INTERRUPTED`); a corrupt file met by a streaming loader saves the state of the last step
boundary, then raises :class:`~mimkit.data.errors.DataError`.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import math
import os
import random
import signal
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mimkit.config import PATH_KEYS, Config, ConfigError, expand_paths, save_config, to_dict, validate
from mimkit.data.errors import DataError
from mimkit.methods import Method, Progress
from mimkit.methods import build_method as _build_method
from mimkit.nn.vit import image_hw
from mimkit.train import checkpoint as ckpt
from mimkit.train.data import build_train_data
from mimkit.train.distributed import all_ok, all_reduce_mean, all_reduce_sum, barrier, init_distributed
from mimkit.train.logging import MetricLogger, make_progress_bar
from mimkit.train.optim import effective_lr, lr_at, param_groups, set_lr
from mimkit.train.step import AfterStepGuard, HostFlags, NonFiniteTracker, fused_adamw_supported

EXIT_INTERRUPTED = 75
"""Exit status of ``mimkit pretrain`` stopped by SIGTERM/SIGINT/SIGUSR1/SIGHUP after saving a checkpoint
(``EX_TEMPFAIL``: rerun the same command to resume; a requeue script tests for it)."""

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")  # SIGHUP: the terminal was closed (or ssh dropped)

# Resume safety: config keys whose change alters the optimisation (refused unless
# train.resume_changes=allow); keys under these prefixes except FREE ones, plus the world size.
RESUME_GUARDED_PREFIXES = ("model.", "method.", "data.", "optim.")
RESUME_GUARDED_KEYS = ("train.seed", "train.epochs")
RESUME_FREE_KEYS = ("data.num_workers", "data.eval_dataset", "data.eval_root", "data.root", "data.skip_corrupt")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses; the message names the step and what to change."""


class TrainingInterrupted(Exception):
    """A stop signal arrived; a checkpoint was saved at the step boundary (``signal_name``, ``step``,
    ``checkpoint``). Rerunning the same config resumes exactly there."""

    def __init__(self, message: str, signal_name: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


_LIVE_TRAINERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_trainers() -> None:
    """Close every trainer still open when the interpreter exits (a caller that kept one alive, e.g. as
    a module global, and never called :meth:`Trainer.close`): its process groups and their threads end
    here, while Python is whole, not later during interpreter shutdown, where a gloo thread releasing a
    tensor aborts the process (``terminate called without an active exception``)."""
    for trainer in list(_LIVE_TRAINERS):
        with contextlib.suppress(Exception):
            trainer.close()


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


def _describe_changes(diff: dict) -> str:
    return ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in diff.items())


def build_method(cfg: Config) -> Method:
    """The method of ``cfg`` (``cfg.method.name``), built from ``cfg.model`` and ``cfg.method``."""
    return _build_method(cfg.model, cfg.method)


def cpu_has_bf16() -> bool:
    """True when the CPU advertises bf16 instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None`` = fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_bf16():
            print("warning: this CPU has no bf16 instructions; bf16 autocast will be emulated and slow", file=sys.stderr)
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
        return torch.float16
    raise ConfigError(f"unknown train.precision {precision!r}; choose auto, fp32, bf16 or fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Trainer:
    """Holds the model, optimizer and state of one pretraining run (see :func:`pretrain`).

    Construction validates the config (nothing is written on an error), locks ``train.out_dir``,
    checks its free space, loads and verifies the checkpoint to resume from and compares its config,
    then loads the data. :meth:`train` runs the loop and releases the lock (as does :meth:`close`)."""

    def __init__(self, cfg: Config):
        self._closed = False
        self._run_released = False
        self.cfg = expand_paths(cfg)  # a Config built in code: `~` in its paths as from a YAML file
        validate(cfg)  # ranges and combinations: one-line ConfigError before any file or data
        self.lock: ckpt.RunLock | None = None
        self._created_dir = False
        self._old_handlers: dict = {}
        # a process group this trainer starts is this trainer's to end (close); one the caller
        # started before is left to the caller, only the groups made here are destroyed
        self._owns_process_group = not (dist.is_available() and dist.is_initialized())
        self.info = init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)
        self._owns_process_group = self._owns_process_group and self.info.enabled
        self._groups: list = []  # process groups made by this trainer (destroyed by close)
        _LIVE_TRAINERS.add(self)  # closed at interpreter exit if the caller never does
        info = self.info
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed + info.rank)
        self.out_dir = Path(cfg.train.out_dir)
        self.device = info.device
        self._signal: int | None = None
        self.resumed_from: Path | None = None
        self.resume_note: str | None = None
        self.resume_diff: dict = {}
        self._last_good: tuple[Path, int] | None = None
        self._sharded = cfg.train.strategy == "fsdp" and info.enabled  # FSDP2 needs a process group
        self._dcp_resume: Path | None = None  # a DCP checkpoint read once the model is wrapped
        self._ckpt_group = None  # the process group of asynchronous DCP writes (GPU)
        self._pending_save = None  # (future, step, trainer state) of an asynchronous DCP write
        self._full_method: nn.Module | None = None  # rank 0: the gathered model of a sharded run
        try:
            try:  # option errors of the method become one-line config errors, before the data is loaded
                model = build_method(cfg)
                model.check_batch_size(cfg.data.batch_size)
            except ConfigError:
                raise
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"method '{cfg.method.name}': {e}") from e
        except BaseException:
            self.close(failed=True)  # the process group started above ends here, not at interpreter exit
            raise
        try:
            self._claim_run_dir(model)
            resume = self._load_resume_state()
            self.init_report = self._apply_init(model) if resume is None and cfg.model.init else None
            self.data = build_train_data(cfg, info)
            self.model = model.to(self.device)
            self.method = self.model
            self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
            self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

            o = cfg.optim
            self.batches_per_epoch = len(self.data.loader)
            if self.batches_per_epoch < o.accum_iter:
                raise ConfigError(
                    f"an epoch has {self.batches_per_epoch} batches, fewer than optim.accum_iter={o.accum_iter}; "
                    "lower data.batch_size or optim.accum_iter"
                )
            self.steps_per_epoch = self.batches_per_epoch // o.accum_iter
            self.total_steps = max(1, math.ceil(cfg.train.epochs * self.steps_per_epoch))
            self.eff_batch = cfg.data.batch_size * o.accum_iter * info.world_size
            self.peak_lr = effective_lr(o.base_lr, self.eff_batch, o.lr)
            self.min_lr = o.min_lr_ratio * self.peak_lr if o.min_lr_ratio is not None else o.min_lr
            # fused AdamW wherever torch has the kernel (CUDA, CPU): faster, and it skips a non-finite
            # step on the device (found_inf) so the step needs no host sync (mimkit.train.step)
            fused = o.fused if o.fused is not None else fused_adamw_supported(self.device)
            self.optimizer = torch.optim.AdamW(
                param_groups(self.model, o.weight_decay, no_decay_keywords=tuple(o.no_decay_keywords)), lr=self.peak_lr,
                betas=o.betas, eps=o.eps, fused=fused
            )
            self.step = 0
            self.nonfinite = 0
            if resume is not None:
                self._apply_resume(*resume)
            self._print_startup()
        except BaseException:
            self.close(failed=True)
            raise
        enc = cfg.model.encoder
        self._batch_shape = (cfg.data.batch_size, enc.in_chans, *image_hw(enc.img_size))
        self._streaming = hasattr(self.data.loader, "skipped")

        # strategy: DDP (default) replicates the model; FSDP2 shards parameters, gradients and optimizer
        # state over the ranks (mimkit.train.fsdp). Activation checkpointing wraps the blocks for both.
        train_model: nn.Module = self.model
        try:
            if cfg.train.activation_checkpointing:
                from mimkit.train.fsdp import apply_activation_checkpointing

                apply_activation_checkpointing(self.model)
            if self._sharded:
                from mimkit.train.fsdp import ShardedTrainModule, shard_model

                shard_model(self.model, info, self.amp_dtype)
                # fully_shard swapped the parameters for DTensor shards: the optimizer must hold those
                self.optimizer = torch.optim.AdamW(
                    param_groups(self.model, o.weight_decay, no_decay_keywords=tuple(o.no_decay_keywords)),
                    lr=self.peak_lr, betas=o.betas, eps=o.eps, fused=fused)
                train_model = ShardedTrainModule(self.model)
            elif info.enabled:
                train_model = nn.parallel.DistributedDataParallel(
                    self.model,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    find_unused_parameters=self.model.capabilities.find_unused_parameters,
                )
            if self._dcp_resume is not None:
                self._load_dcp(self._dcp_resume)
            if self.cfg.train.strategy == "fsdp" and info.enabled and self.device.type == "cuda":
                self._ckpt_group = self.new_group(backend="gloo")  # async DCP writes talk on their own group
        except BaseException:
            self.close(failed=True)
            raise
        if self.device.type == "cuda":  # fp32 matmuls left outside autocast use TF32 tensor cores
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.train.compile:
            # automatic dynamic shapes: a size seen to change (SBAM's adaptive visible count, up to ~40
            # values at ViT-B/16) is recompiled once as symbolic, not once per value; the batch is fixed
            # (drop_last), so the masking code keeps concrete sizes
            train_model = torch.compile(train_model)
        self.train_model = train_model

    # -- run directory ----------------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        if self.info.is_main:
            print(f"warning: {msg}", file=sys.stderr)

    def _claim_run_dir(self, model: nn.Module) -> None:
        """Rank 0: create and lock ``out_dir``, remove temp files of killed writers, check that a
        checkpoint fits. Every rank learns whether that worked before anything else happens."""
        err: BaseException | None = None
        if self.info.is_main:
            try:
                self._created_dir = not self.out_dir.exists()
                try:
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ckpt.CheckpointError(f"cannot create train.out_dir {self.out_dir}: {e.strerror}; free space "
                                               "or choose another train.out_dir") from e
                self.lock = ckpt.RunLock(self.out_dir).acquire()
                if self.lock.takeover:
                    self._warn(self.lock.takeover)
                n, size = ckpt.remove_stale_temp_files(self.out_dir)
                if n:
                    self._warn(f"removed {n} temporary file(s) ({size / 2**20:.1f} MiB) left by an interrupted run")
                n = ckpt.remove_stale_dcp_dirs(self.out_dir)
                if n:
                    self._warn(f"removed {n} incomplete sharded checkpoint director(y/ies) left by an interrupted run")
                adam_bytes = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
                need = ckpt.estimate_bytes(model.state_dict()) + int(1.02 * adam_bytes)
                ckpt.check_space(self.out_dir, need, "a checkpoint of this model")
            except (ckpt.CheckpointError, OSError) as e:
                err = e
        ok = all_ok(err is None, self.info)
        if err is not None:
            if isinstance(err, OSError):
                raise ckpt.CheckpointError(f"cannot use train.out_dir {self.out_dir}: {err}") from err
            raise err
        if not ok:
            raise ckpt.CheckpointError(f"rank 0 could not claim train.out_dir {self.out_dir}; see its error")

    def _load_resume_state(self) -> tuple[Path, dict] | None:
        """Find, load and verify the checkpoint to resume from; refuse a changed optimisation.

        ``train.strategy=ddp`` resumes ``checkpoint.pt`` files, ``fsdp`` DCP directories (whose
        model/optimizer shards are read in :meth:`_load_dcp` once the model is sharded); a run
        directory holding only the other kind is refused with the setting that reads it. A world size
        change keeps the data position exact when the global batch (``data.batch_size x
        optim.accum_iter x processes``) is unchanged: every loader deals the epoch's order out to the
        ranks in strides, so after ``b`` batches the first ``b x global batch`` samples were seen
        whatever the world size, and the new ranks go on from there (see :meth:`_apply_resume`)."""
        cfg = self.cfg
        fsdp = cfg.train.strategy == "fsdp"
        resume = cfg.train.resume
        has_dcp = bool(ckpt.dcp_checkpoints(self.out_dir))
        has_pt = (self.out_dir / ckpt.LATEST).is_file() or bool(ckpt.numbered_checkpoints(self.out_dir))
        explicit_dcp = resume not in ("auto", "none", "") and ckpt.is_dcp_checkpoint(resume)
        if resume == "auto" and fsdp and has_pt and not has_dcp:
            raise ConfigError(
                f"{self.out_dir} holds a train.strategy=ddp checkpoint ({ckpt.LATEST}) but this run uses "
                "train.strategy=fsdp, which resumes sharded (DCP) checkpoints; set train.strategy=ddp to resume it, "
                "or choose a new train.out_dir (or train.resume=none)")
        if ((resume == "auto" and not fsdp and has_dcp and not has_pt)
                or (not fsdp and explicit_dcp)):
            raise ConfigError(
                f"{self.out_dir} holds a train.strategy=fsdp (sharded DCP) checkpoint but this run uses "
                "train.strategy=ddp; set train.strategy=fsdp to resume it (on any number of processes), or choose a "
                "new train.out_dir (or train.resume=none)")
        if fsdp:
            res = ckpt.load_dcp_for_resume(self.out_dir, resume, warn=self._warn)
        else:
            res = ckpt.load_for_resume(self.out_dir, resume, warn=self._warn)
        if res is None:
            return None
        path, state, note = res
        if resume not in ("auto", "none", ""):
            self._refuse_going_back(path, int(state["step"]))
        self.resume_note = note
        extra = state.get("extra") or {}
        old_world = extra.get("world_size", len(state.get("rng") or []) or None)
        old_cfg = state.get("config") or {}
        diff = config_changes(old_cfg, to_dict(cfg), old_world, self.info.world_size)
        if "world_size" in diff:
            od, oo = old_cfg.get("data") or {}, old_cfg.get("optim") or {}
            old_global = int(od.get("batch_size", cfg.data.batch_size)) * int(oo.get("accum_iter", 1)) * int(old_world)
            new_global = cfg.data.batch_size * cfg.optim.accum_iter * self.info.world_size
            if old_global == new_global:  # same optimisation on another number of processes
                for k in ("world_size", "data.batch_size", "optim.accum_iter"):
                    diff.pop(k, None)
                self._warn(
                    f"resuming a run of {old_world} process(es) on {self.info.world_size} with the same global batch "
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
                f"optimisation: {_describe_changes(diff)}{hint}. Restore them, choose a new train.out_dir (or "
                "train.resume=none), or pass train.resume_changes=allow to continue anyway (recorded in metrics.jsonl)"
            )
        if diff:
            self._warn(f"resuming with changed settings (train.resume_changes=allow): {_describe_changes(diff)}")
        self.resume_diff = diff
        return path, state

    def _newest_step_in_run_dir(self, other_than: Path) -> tuple[int, Path] | None:
        """The highest step of the checkpoints in ``out_dir`` (single files, numbered copies, DCP
        directories) other than ``other_than``: what a resume from an older point would overwrite."""
        found: list[tuple[int, Path]] = []
        skip = other_than.resolve()
        found += [(s, p) for s, p in ckpt.numbered_checkpoints(self.out_dir) if p.resolve() != skip]
        found += [(s, p) for s, p in ckpt.dcp_checkpoints(self.out_dir) if p.resolve() != skip]
        latest = self.out_dir / ckpt.LATEST
        if latest.is_file() and latest.resolve() != skip:
            step = ckpt.peek_step(latest)
            if step is not None:
                found.append((step, latest))
        return max(found, key=lambda sp: sp[0]) if found else None

    def _refuse_going_back(self, path: Path, step: int) -> None:
        """An explicit ``train.resume`` older than the run directory's newest checkpoint would train on
        from there and overwrite the newer progress: refused unless ``train.resume_older=allow``."""
        newest = self._newest_step_in_run_dir(path)
        if newest is None or newest[0] <= step:
            return
        if self.cfg.train.resume_older != "allow":
            raise ConfigError(
                f"train.resume={path} is at step {step}, but {newest[1]} in the run directory is at step {newest[0]}: "
                "resuming would go back and overwrite that progress. Drop train.resume (or use auto) to continue "
                "from the newest checkpoint, choose a new train.out_dir, or pass train.resume_older=allow to go back")
        self._warn(f"train.resume_older=allow: going back from step {newest[0]} ({newest[1]}) to step {step} "
                   f"({path}); the newer checkpoints will be overwritten")

    def _apply_init(self, model: nn.Module):
        """``model.init``: load the starting weights (:mod:`mimkit.init_from`), print what was loaded,
        adapted and newly initialised, and write it to ``init.json`` in the run directory."""
        from mimkit.init_from import apply_init

        try:
            report = apply_init(model, self.cfg.model.init, self.cfg.model.init_parts)
        except (NotImplementedError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"model.init={self.cfg.model.init}: {e}") from e
        if self.info.is_main:
            print(report.summary(), file=sys.stderr)
            (self.out_dir / "init.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        return report

    def _print_startup(self) -> None:
        """One line with what a run does: world size, effective batch, peak lr, steps, where it starts."""
        if not self.info.is_main:
            return
        o, cfg = self.cfg.optim, self.cfg
        lr_rule = "optim.lr" if o.lr is not None else f"optim.base_lr {o.base_lr:g} x {self.eff_batch}/256"
        if self.resumed_from is not None:
            start = f"resumed from {self.resumed_from} at step {self.step}"
        elif cfg.model.init:
            start = f"initialised from {cfg.model.init}"
        else:
            start = "fresh start (random init)"
        print(f"mimkit pretrain {cfg.method.name}: world size {self.info.world_size}, effective batch {self.eff_batch} "
              f"({cfg.data.batch_size}/process x {o.accum_iter} accum x {self.info.world_size}), peak lr "
              f"{self.peak_lr:.3g} ({lr_rule}), {self.total_steps} steps ({self.steps_per_epoch}/epoch), {start}; "
              f"run directory {self.out_dir}", file=sys.stderr)

    def _apply_resume(self, path: Path, state: dict) -> None:
        if "model" in state:
            try:
                unwrap(self.model).load_state_dict(state["model"])
            except RuntimeError as e:
                raise ckpt.CheckpointError(
                    f"checkpoint {path} does not match this model ({str(e).splitlines()[0]}). It was written by a run "
                    "with a different config; use another train.out_dir or train.resume=none"
                ) from e
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # a DCP directory: the shards are read once the model is wrapped (_load_dcp)
            self._dcp_resume = path
        if state.get("scaler") or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        # else: a run without a grad scaler (fp32/bf16) resumed with fp16: the scaler starts afresh
        self.step = int(state["step"])
        self.nonfinite = int(state.get("extra", {}).get("nonfinite", 0))
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            ckpt.set_rng_state(rngs[self.info.rank])
        else:
            self._warn(f"checkpoint has RNG states of {len(rngs)} ranks, this run has {self.info.world_size}; "
                       "RNG streams are re-seeded")
            seed_everything(self.cfg.train.seed + self.info.rank + self.step)
        self.resumed_from = path
        self._last_good = (path, self.step)
        if self.info.is_main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    def _load_dcp(self, path: Path) -> None:
        """Read a DCP checkpoint into the (sharded or replicated) model and optimizer: DCP re-shards
        what ``M`` processes wrote for this run's ``N``. Rank 0 first checks every file against the
        digests in the checksummed ``trainer.pt`` and the ranks agree before any of them reads; the
        read itself runs no code from the files (:func:`~mimkit.train.checkpoint.dcp_load`)."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        err: BaseException | None = None
        if self.info.is_main:
            try:
                ckpt.verify_dcp_dir(path)
            except (ckpt.CheckpointError, OSError) as e:
                err = e
        if not all_ok(err is None, self.info):
            if isinstance(err, ckpt.CheckpointError):
                raise err
            raise ckpt.CheckpointError(f"checkpoint {path} could not be verified ({err or 'see rank 0'}); delete it "
                                       "(the previous one is used) or use another train.out_dir")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
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
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def _require_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"this Trainer was closed, so it cannot {what}; make a new Trainer (it resumes from the "
                               "last checkpoint)")

    def new_group(self, **kwargs):
        """``dist.new_group`` for a group this trainer uses (and :meth:`close` destroys)."""
        group = dist.new_group(**kwargs)
        self._groups.append(group)
        return group

    def _host_flag_group(self):
        """The group host-side flags are agreed on: the default one when it is gloo, else a gloo group
        made once (see :class:`~mimkit.train.step.HostFlags`)."""
        if not self.info.enabled or dist.get_backend() == "gloo":
            return None
        if getattr(self, "_flag_group", None) is None:
            self._flag_group = self.new_group(backend="gloo")
        return self._flag_group

    def release_run_dir(self, failed: bool = False) -> None:
        """End the run's hold on the machine and its directory: restore the signal handlers, end the
        data loader's workers and threads, release the run-directory lock (and remove the directory
        when this run created it and failed before writing anything). :meth:`train` calls it on every
        exit path; the model, optimizer and process group stay usable (e.g. to gather a sharded
        model's full state) until :meth:`close`."""
        if self._run_released:
            return
        self._run_released = True
        self._restore_signals()
        close_loader = getattr(getattr(getattr(self, "data", None), "loader", None), "close", None)
        if close_loader is not None:
            with contextlib.suppress(Exception):
                close_loader()  # persistent DataLoader workers and decode threads end with the run
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if failed and self._created_dir:
            self._created_dir = False
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only when empty

    def close(self, failed: bool = False) -> None:
        """Release the run directory (:meth:`release_run_dir`), then tear the distributed state down in
        order: wait for an asynchronous checkpoint write still in flight, drop every module that holds
        a process group (the DDP wrapper; a sharded model and its optimizer), destroy the groups this
        trainer made, and the default group when this trainer started it. Safe to call twice; called
        by :func:`pretrain`, and at interpreter exit for a trainer nobody closed. After closing a
        distributed run the trainer cannot train again."""
        if self._closed:
            return
        self._closed = True
        _LIVE_TRAINERS.discard(self)
        try:
            self.release_run_dir(failed)
        finally:
            self._teardown_distributed()

    def _teardown_distributed(self) -> None:
        pending, self._pending_save = getattr(self, "_pending_save", None), None
        if pending is not None:  # an error path left an async DCP write running: let its thread finish
            with contextlib.suppress(Exception):
                pending[0].result()
        if not getattr(self, "info", None) or not self.info.enabled:
            return
        # modules and optimizers that reference a process group: released so that destroying the group
        # really ends it (a live reference keeps gloo's threads running until interpreter shutdown)
        if hasattr(self, "train_model"):
            self.train_model = None
        if getattr(self, "_sharded", False):
            self.model = self.method = self.optimizer = None
            self._full_method = None
        self._ckpt_group = self._flag_group = None
        if dist.is_available() and dist.is_initialized():
            if self._owns_process_group:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()  # the default group and every group made on it
            else:
                for group in self._groups:
                    with contextlib.suppress(Exception):
                        dist.destroy_process_group(group)
        self._groups = []
        gc.collect()  # free the released modules' last references to the groups now, not at exit

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    # -- signals ----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once
            return
        self._signal = signum
        if signum == getattr(signal, "SIGHUP", None):
            # the terminal was closed: writing to it now fails (EIO) and would break the step before the
            # save, so output that went to the dead terminal goes to /dev/null (a log file or pipe stays)
            import errno
            import termios

            for fd in (1, 2):
                try:
                    termios.tcgetattr(fd)
                except termios.error as e:
                    if e.args and e.args[0] == errno.EIO:  # a hung-up terminal (a pipe or file: ENOTTY)
                        with contextlib.suppress(OSError):
                            null = os.open(os.devnull, os.O_WRONLY)
                            os.dup2(null, fd)
                            os.close(null)
                except (OSError, ValueError):
                    pass
        if self.info.is_main:
            name = signal.Signals(signum).name
            with contextlib.suppress(OSError):
                os.write(2, f"\nreceived {name}: saving a checkpoint at the end of this step, then stopping "
                            "(Ctrl-C again stops at once without saving)\n".encode())

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            with contextlib.suppress(ValueError, OSError):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, old)
        self._old_handlers = {}

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self, rng: dict | None = None) -> dict:
        """The full state; ``rng``: this rank's RNG state to store instead of the current one (the
        state at the last step boundary when a step is abandoned). Sharded runs: every key but
        ``model`` and ``optimizer`` (those go to the DCP shards, see :meth:`save`)."""
        self._require_open("give its state")
        rng = rng if rng is not None else ckpt.rng_state()
        if self.info.enabled:
            import torch.distributed as dist

            rngs: list = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        state = {
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "rng": rngs,
            "config": to_dict(self.cfg),
            "extra": {"nonfinite": self.nonfinite, "world_size": self.info.world_size,
                      "strategy": self.cfg.train.strategy},
        }
        if self.cfg.train.strategy == "fsdp":
            return state
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(), **state}

    def save(self, final: bool = False, rng: dict | None = None) -> Path:
        """Write ``checkpoint.pt`` (and a numbered copy with ``train.keep_checkpoints``); collective
        when distributed. Raises :class:`~mimkit.train.checkpoint.CheckpointError` on every rank when
        rank 0 could not write (the previous checkpoint is then intact). ``train.strategy=fsdp``
        writes a DCP directory instead (:meth:`_save_dcp`)."""
        self._require_open("save")
        if self._run_released:
            raise RuntimeError("this Trainer has released its run directory (train() ended), so it cannot save; "
                               "make a new Trainer to continue the run")
        if self.cfg.train.strategy == "fsdp":
            return self._save_dcp(final, rng)
        state = self.state_dict(rng)  # collective when distributed: every rank calls it
        latest = self.out_dir / ckpt.LATEST
        err: BaseException | None = None
        if self.info.is_main:
            try:
                ckpt.atomic_save(state, latest)
                ckpt.drop_newer(self.out_dir, self.step)
                keep = self.cfg.train.keep_checkpoints
                if keep:
                    ckpt.atomic_copy(latest, self.out_dir / ckpt.numbered_name(self.step))
                    ckpt.prune(self.out_dir, keep)
            except ckpt.CheckpointError as e:
                err = e
        ok = all_ok(err is None, self.info)
        if err is not None:
            raise err
        if not ok:
            raise ckpt.CheckpointError(f"rank 0 could not write the checkpoint {latest}; see its error")
        self._last_good = (latest, self.step)
        self._last_save_time = time.monotonic()
        return latest

    # -- sharded checkpoints (train.strategy=fsdp) -------------------------------------------------
    def _save_dcp(self, final: bool, rng: dict | None) -> Path:
        """Every rank writes its shards of the model and optimizer with ``torch.distributed.checkpoint``
        into ``dcp/.step-<step>.tmp``; rank 0 then adds ``trainer.pt`` and renames the directory into
        place (:func:`~mimkit.train.checkpoint.finalize_dcp`). Periodic saves on GPU are written
        asynchronously (``dcp.async_save`` on a gloo group: training goes on while the staged copy is
        written; the next save, the final one or :meth:`close` waits for it); a stop signal's, a data
        error's and the final save are synchronous. The final save also writes ``encoder.safetensors``
        (timm keys) gathered from the shards."""
        import warnings

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self._finish_pending_save()
        trainer_state = self.state_dict(rng)  # collective (RNG states)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        shards = {"model": model_sd, "optimizer": optim_sd}
        tmp = ckpt.dcp_tmp_dir(self.out_dir, self.step)
        need = torch.tensor([float(ckpt.estimate_bytes(shards))])
        need = all_reduce_sum(need.to(self.device), self.info)
        err: BaseException | None = None
        if self.info.is_main:
            try:
                if tmp.exists():
                    import shutil

                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                ckpt.check_space(tmp.parent, int(need.item()) + ckpt.estimate_bytes(trainer_state),
                                 "a sharded checkpoint")
            except (ckpt.CheckpointError, OSError) as e:
                err = e
        if not all_ok(err is None, self.info):
            if err is not None:
                raise err if isinstance(err, ckpt.CheckpointError) else ckpt.CheckpointError(str(err))
            raise ckpt.CheckpointError(f"rank 0 could not prepare the checkpoint {tmp}; see its error")
        use_async = (self._ckpt_group is not None and not final and rng is None and self._signal is None)
        try:
            if use_async:
                fut = dcp.async_save(shards, checkpoint_id=str(tmp), process_group=self._ckpt_group)
                self._pending_save = (fut, self.step, trainer_state)
                self._last_save_time = time.monotonic()
                return tmp
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
                dcp.save(shards, checkpoint_id=str(tmp))
        except Exception as e:
            raise ckpt.CheckpointError(
                f"could not write the sharded checkpoint {tmp} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}); the previous checkpoint is intact") from e
        path = self._finalize_dcp(self.step, trainer_state)
        if final:
            self._export_consolidated()
        return path

    def _finalize_dcp(self, step: int, trainer_state: dict) -> Path:
        final_dir = self.out_dir / ckpt.DCP_DIR / ckpt.dcp_step_name(step)
        err: BaseException | None = None
        if self.info.is_main:
            try:
                ckpt.finalize_dcp(self.out_dir, step, trainer_state, self.cfg.train.keep_checkpoints)
            except (ckpt.CheckpointError, OSError) as e:
                err = e
        if not all_ok(err is None, self.info):
            if err is not None:
                raise err if isinstance(err, ckpt.CheckpointError) else ckpt.CheckpointError(str(err))
            raise ckpt.CheckpointError(f"rank 0 could not complete the checkpoint {final_dir}; see its error")
        self._last_good = (final_dir, step)
        self._last_save_time = time.monotonic()
        return final_dir

    def _finish_pending_save(self) -> Path | None:
        """Wait for an asynchronous DCP write and complete it (collective)."""
        if self._pending_save is None:
            return None
        fut, step, trainer_state = self._pending_save
        self._pending_save = None
        try:
            fut.result()
        except Exception as e:
            raise ckpt.CheckpointError(
                f"the asynchronous write of the checkpoint of step {step} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}); the previous checkpoint is intact") from e
        return self._finalize_dcp(step, trainer_state)

    def _export_consolidated(self) -> Path | None:
        """Gather the sharded model (collective) and, on rank 0, keep it for the end-of-run evaluation
        and write ``encoder.safetensors`` with timm keys (``mimkit export``'s format)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        from mimkit.interop import export_encoder

        method = build_method(self.cfg)
        method.load_state_dict(full)
        method.to(self.device).eval()
        self._full_method = method
        return export_encoder(method, self.out_dir / "encoder.safetensors")

    def _eval_method(self) -> nn.Module:
        """The model to evaluate on rank 0: the gathered copy of a sharded run, else the model."""
        if self._sharded:
            if self._full_method is None:
                raise RuntimeError("a sharded run is evaluated only after its final save")
            return self._full_method
        return unwrap(self.model)

    def _last_good_text(self) -> str:
        if self._last_good is not None and self._last_good[0].exists():  # a file, or a DCP directory
            return f"The last good checkpoint is {self._last_good[0]} (step {self._last_good[1]})"
        return (f"No checkpoint was written yet (the first is due at step {self.cfg.train.ckpt_every_steps}; "
                "lower train.ckpt_every_steps to save earlier)")

    # -- loop -------------------------------------------------------------------------------------
    def progress(self) -> Progress:
        return Progress(self.step, self.total_steps, self.step / self.steps_per_epoch, self.cfg.train.epochs)

    def _batches(self):
        """Micro-batches from the current position to the end of training, as (epoch, batch)."""
        loader = self.data.loader
        micro = self.step * self.cfg.optim.accum_iter
        epoch, start = divmod(micro, self.batches_per_epoch)
        usable = self.steps_per_epoch * self.cfg.optim.accum_iter
        while True:
            if start < usable:
                for i, batch in enumerate(loader.iter_from(epoch, start)):
                    if start + i >= usable:
                        break
                    yield batch
            epoch += 1
            start = 0

    def _report_skipped(self, files: list[str]) -> None:
        if files and self.info.is_main:
            shown = ", ".join(files[:10]) + (f" (+{len(files) - 10} more; all in result.json)" if len(files) > 10 else "")
            print(f"data.skip_corrupt: skipped {len(files)} corrupt file(s): {shown}", file=sys.stderr)

    def train(self) -> dict:
        """Run the loop to ``train.epochs`` / ``train.max_steps``; releases the run directory at the end."""
        self._require_open("train")
        if self._run_released:
            raise RuntimeError("this Trainer has finished its run (train() ran or failed, and released the run "
                               "directory); make a new Trainer to train again, which resumes from the last checkpoint")
        try:
            return self._train()
        finally:
            self.release_run_dir()

    def _train(self) -> dict:
        cfg, info = self.cfg, self.info
        stop = self.total_steps if cfg.train.max_steps is None else min(self.total_steps, cfg.train.max_steps)
        if info.is_main:
            save_config(cfg, self.out_dir / "config.yaml")  # the run has started: its resolved config
        logger = MetricLogger(self.out_dir, info.is_main, cfg.train.tensorboard, resume_step=self.step)
        if self.resume_note:
            logger.event(self.step, "resume_fallback", checkpoint=str(self.resumed_from), note=self.resume_note)
        if self.resume_diff:
            logger.event(self.step, "resume_changes", changes={k: list(v) for k, v in self.resume_diff.items()})
        skipped_at_start = self.data.skipped_files()
        self._report_skipped(skipped_at_start)
        bar = make_progress_bar(stop, self.step, info.is_main and cfg.train.progress_bar)
        knn_every = cfg.eval.knn_every_epochs
        next_knn = (math.floor(self.step / self.steps_per_epoch / knn_every) + 1) * knn_every if knn_every else None
        batches = self._batches()
        accum = cfg.optim.accum_iter
        params = [p for p in self.model.parameters() if p.requires_grad]
        imgs_per_step = cfg.data.batch_size * accum * info.world_size
        t_last, steps_since = time.perf_counter(), 0
        history: dict = {"knn": []}
        every_s = cfg.train.ckpt_every_minutes * 60 if cfg.train.ckpt_every_minutes else None
        self._last_save_time = time.monotonic()
        self._signal = None
        self._install_signals()
        self.model.train()
        # Host syncs: none between log steps on the fused-AdamW path (mimkit.train.step). The non-finite
        # flag stays on the device: the fused kernel skips the update when it is set (found_inf) and the
        # flags are read at log steps and before checkpoints. fp16 (grad scaler) or optim.fused=false
        # read the flag every step instead. Host-side flags (signal, data error, checkpoint due) are
        # agreed through a CPU all-reduce when there are several processes (HostFlags).
        sync_free = bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled()
        host_flags = HostFlags(info, self._host_flag_group())
        tracker = NonFiniteTracker(cfg.train.log_every_steps, self.device) if sync_free else None
        guard = AfterStepGuard(unwrap(self.model), self.optimizer) if sync_free else None

        def flush_nonfinite() -> set[int]:
            """Read the window's skipped steps (one host sync), count and record them; stop past the limit."""
            if tracker is None:
                return set()
            bad_steps = tracker.read()
            for bad_step, bad_lr in bad_steps:
                self.nonfinite += 1
                if info.is_main:
                    print(f"warning: non-finite loss or gradients at step {bad_step}; step skipped "
                          f"({self.nonfinite}/{cfg.train.max_nonfinite})", file=sys.stderr)
                if self.nonfinite > cfg.train.max_nonfinite:
                    # a checkpoint still being written asynchronously holds a step before this read: complete
                    # it (every rank stops here, the flags are agreed) so it is the last good one named below
                    with contextlib.suppress(ckpt.CheckpointError):
                        self._finish_pending_save()
                    logger.event(bad_step + 1, "failed", reason="max_nonfinite", nonfinite=self.nonfinite, lr=bad_lr)
                    logger.close()
                    raise NonFiniteLossError(
                        f"{self.nonfinite} non-finite losses (last at step {bad_step}, lr {bad_lr:.3g}), more than "
                        f"train.max_nonfinite={cfg.train.max_nonfinite}; stopping. {self._last_good_text()}. Lower "
                        "the learning rate, use precision=bf16/fp32 instead of fp16, or set optim.clip_grad."
                    )
                logger.event(bad_step + 1, "nonfinite_skip", epoch=round((bad_step + 1) / self.steps_per_epoch, 4),
                             lr=bad_lr, nonfinite=self.nonfinite)
            return {s for s, _ in bad_steps}

        while self.step < stop:
            prog = self.progress()
            lr = lr_at(prog.epoch, self.peak_lr, cfg.optim.warmup_epochs, cfg.train.epochs, self.min_lr,
                       cfg.optim.warmup_from_min_lr)
            set_lr(self.optimizer, lr)
            boundary_rng = ckpt.rng_state() if self._streaming else None
            loss_sum = torch.zeros((), device=self.device)
            metrics_sum: dict[str, torch.Tensor] = {}
            metrics_host: dict[str, float] = {}  # metrics a method returns as Python numbers
            data_error: DataError | None = None
            lost: BaseException | None = None  # the loader broke while a stop signal was pending
            for micro in range(accum):
                if data_error is None and lost is None:
                    try:
                        images, _ = next(batches)
                    except DataError as e:
                        data_error = e
                    except Exception as e:
                        if self._signal is None:
                            raise
                        lost = e  # e.g. a DataLoader worker ended by the same signal
                if data_error is not None or lost is not None:
                    if not info.enabled:
                        break
                    images = torch.zeros(self._batch_shape, device=self.device)  # keeps the ranks in step
                sync = micro == accum - 1 or not info.enabled
                ctx = self.train_model.no_sync() if (not sync and info.enabled) else contextlib.nullcontext()
                with ctx:
                    with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                        enabled=self.amp_dtype is not None):
                        out = self.train_model(images, prog)
                    self.scaler.scale(out.loss / accum).backward()
                loss_sum += out.loss.detach().float() / accum
                for k, v in out.metrics.items():
                    if isinstance(v, torch.Tensor):
                        metrics_sum[k] = metrics_sum.get(k, 0) + v.detach().float() / accum
                    else:
                        metrics_host[k] = metrics_host.get(k, 0.0) + float(v) / accum
            # 1.0 when the loss is not finite on some rank (device value; an async collective on NCCL)
            bad = (~torch.isfinite(loss_sum)).float()  # 0-d, as found_inf must be
            if info.enabled:
                bad = (all_reduce_sum(bad, info) > 0).float()
            due = every_s is not None and info.is_main and time.monotonic() - self._last_save_time >= every_s
            n_data_err, n_lost, n_signal, n_due = host_flags.reduce(
                data_error is not None, lost is not None, self._signal is not None, due)
            if n_data_err > 0 or n_lost > 0:  # abandon the step: keep the state of the last step boundary
                self.optimizer.zero_grad(set_to_none=True)
                if bar is not None:
                    bar.close()
                flush_nonfinite()
                path = self.save(rng=boundary_rng)
                logger.close()
                if n_data_err == 0:
                    name = signal.Signals(self._signal).name if self._signal is not None else "a stop signal"
                    raise TrainingInterrupted(
                        f"stopped by {name} at step {self.step} of {stop} (the data loader ended with it); {path} "
                        "holds that step. Rerun the same command to resume", name, self.step, path)
                where = (f"The run saved its state at step {self.step} in {path}; fix or delete the file (or set "
                         "data.skip_corrupt=true), then rerun the same command to resume")
                if data_error is not None:
                    raise DataError(f"{str(data_error).rstrip('.')} (met at step {self.step}). {where}") from data_error
                raise DataError(f"another rank met a corrupt file at step {self.step} (its log names it). {where}")
            log_now = (self.step + 1) % cfg.train.log_every_steps == 0 or self.step + 1 == stop
            if not sync_free and bad.item() > 0.5:  # the synchronous path: skip on the host
                if self.scaler.is_enabled():
                    # update() needs the inf check of this step: unscale_ records the non-finite gradients,
                    # so the scale backs off as it does for a step GradScaler skips itself
                    self.scaler.unscale_(self.optimizer)
                    self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite += 1
                if info.is_main:
                    print(f"warning: non-finite loss at step {self.step}; step skipped "
                          f"({self.nonfinite}/{cfg.train.max_nonfinite})", file=sys.stderr)
                if self.nonfinite > cfg.train.max_nonfinite:
                    logger.event(self.step + 1, "failed", reason="max_nonfinite", nonfinite=self.nonfinite, lr=lr)
                    logger.close()
                    raise NonFiniteLossError(
                        f"{self.nonfinite} non-finite losses (last at step {self.step}, lr {lr:.3g}), more than "
                        f"train.max_nonfinite={cfg.train.max_nonfinite}; stopping. {self._last_good_text()}. Lower the "
                        "learning rate, use precision=bf16/fp32 instead of fp16, or set optim.clip_grad."
                    )
                # the step counter advances so the data stream and schedule move past the bad batch
                self.step += 1
                logger.event(self.step, "nonfinite_skip", epoch=round(self.step / self.steps_per_epoch, 4), lr=lr,
                             nonfinite=self.nonfinite)
            else:
                grad_norm = None
                if cfg.optim.clip_grad is not None or log_now or sync_free:
                    self.scaler.unscale_(self.optimizer)
                    max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad is not None else float("inf")
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                if sync_free:
                    # a finite loss can still give non-finite gradients (e.g. an overflow in the backward):
                    # the step is skipped the same way (the norm is the same on every rank after the reduce)
                    gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                    bad = torch.maximum(bad, (~torch.isfinite(gn)).float().reshape(bad.shape))
                    self.optimizer.found_inf = bad  # fused AdamW: no update, moments and step count kept
                    try:
                        self.optimizer.step()
                    finally:
                        del self.optimizer.found_inf
                else:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if sync_free:
                    tracker.record(self.step - 1, bad, lr)
                    guard(self.progress(), bad)  # after_step; its tensor changes undone on a skipped step
                else:
                    unwrap(self.model).after_step(self.progress())
                steps_since += 1
                skipped_now = flush_nonfinite() if (log_now or (sync_free and len(tracker) == tracker.capacity)) else ()
                if log_now and self.step - 1 not in skipped_now:
                    # one read of everything logged, after a device-side mean over the ranks
                    keys = list(metrics_sum)
                    vals = all_reduce_mean(torch.stack([loss_sum, *(metrics_sum[k] for k in keys)]), info).tolist()
                    loss_val = vals[0]
                    now = time.perf_counter()
                    ips = steps_since * imgs_per_step / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    rec = {"epoch": round(self.step / self.steps_per_epoch, 4), "loss": loss_val, "lr": lr,
                           "img_per_s": ips, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                           "nonfinite": self.nonfinite}
                    rec.update(dict(zip(keys, vals[1:])))
                    rec.update(metrics_host)
                    logger.log(self.step, rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if n_signal > 0 and self.step < stop:
                if bar is not None:
                    bar.close()
                flush_nonfinite()
                path = self.save()
                logger.close()
                sig = self._signal
                name = signal.Signals(sig).name if sig is not None else "a stop signal (on another rank)"
                raise TrainingInterrupted(
                    f"stopped by {name} at step {self.step} of {stop}; {path} holds that step. Rerun the same "
                    "command to resume", name, self.step, path)
            if (self.step % cfg.train.ckpt_every_steps == 0 or n_due > 0) and self.step < stop:
                flush_nonfinite()
                self.save()
            if next_knn is not None and self.step / self.steps_per_epoch >= next_knn - 1e-9 and self.step < stop:
                res = self.evaluate_knn()
                if res is not None and info.is_main:
                    res["epoch"] = round(self.step / self.steps_per_epoch, 4)
                    history["knn"].append(res)
                    logger.log(self.step, {f"knn_{k}": v for k, v in res.items() if k.startswith("top1")})
                next_knn += knn_every
        if bar is not None:
            bar.close()
        flush_nonfinite()
        path = self.save(final=True)
        self._restore_signals()  # the final state is saved: a signal now ends the process as usual
        if self.step and self.nonfinite / self.step > cfg.train.max_nonfinite_fraction:
            logger.event(self.step, "failed", reason="max_nonfinite_fraction", nonfinite=self.nonfinite,
                         steps=self.step)
            logger.close()
            raise NonFiniteLossError(
                f"{self.nonfinite} of {self.step} steps ({100 * self.nonfinite / self.step:.0f} %) had non-finite "
                f"losses and were skipped, more than train.max_nonfinite_fraction={cfg.train.max_nonfinite_fraction}; "
                f"the run failed and wrote no result.json ({path} holds its final state). Lower the learning rate, "
                "use precision=bf16/fp32 instead of fp16, or set optim.clip_grad"
            )
        logger.close()
        skipped = self.data.skipped_files()
        if info.enabled:
            import torch.distributed as dist

            per_rank: list = [None] * info.world_size
            dist.all_gather_object(per_rank, skipped)
            skipped = list(dict.fromkeys(f for files in per_rank for f in files))
        if skipped != skipped_at_start:
            self._report_skipped(skipped)
        result: dict = {"out_dir": str(self.out_dir), "step": self.step, "epochs": self.step / self.steps_per_epoch,
                        "nonfinite": self.nonfinite, "knn_history": history["knn"]}
        if skipped:
            result["skipped_files"] = {"count": len(skipped), "files": skipped}
        if self.step >= self.total_steps or cfg.train.max_steps is not None:
            if cfg.eval.knn_at_end:
                result["knn"] = self.evaluate_knn()
            if cfg.eval.picture_at_end and info.is_main:
                result["picture"] = self.picture()
        if info.is_main:
            (self.out_dir / "result.json").write_text(json.dumps(result, indent=2))
        return result

    # -- evaluation and pictures ------------------------------------------------------------------
    def evaluate_knn(self) -> dict | None:
        """DINO kNN on the frozen encoder (cls and mean-pooled patches) on the main process."""
        self._require_open("evaluate")
        d = self.data
        if d.train_images is None or d.test_images is None or d.train_labels is None:
            return None
        res = None
        if self.info.is_main:
            from mimkit.eval.features import extract_features
            from mimkit.eval.knn import knn_accuracy

            e = self.cfg.eval
            tr = d.train_images[: e.knn_train_limit] if e.knn_train_limit else d.train_images
            trl = d.train_labels[: len(tr)]
            te = d.test_images[: e.knn_test_limit] if e.knn_test_limit else d.test_images
            tel = d.test_labels[: len(te)]
            enc = self._eval_method().encoder
            show = bool(self.cfg.train.progress_bar)  # a bar on a terminal: 70k images take minutes on a CPU
            kw = dict(pool=["cls", "mean"], batch_size=e.batch_size, mean=d.mean, std=d.std, device=self.device,
                      autocast_dtype=self.amp_dtype, show_progress=show)
            ftr, fte = extract_features(enc, tr, **kw), extract_features(enc, te, **kw)
            res = {f"top1_{p}": knn_accuracy(ftr[p], trl, fte[p], tel, e.knn_k, e.knn_temperature,
                                             show_progress=show) for p in ftr}
            res.update(k=e.knn_k, temperature=e.knn_temperature, n_train=len(tr), n_test=len(te))
            (self.out_dir / "knn.json").write_text(json.dumps(res, indent=2))
        barrier(self.info)
        return res

    def picture(self) -> str | None:
        """The end-of-run picture: a reconstruction for pixel methods, else the method's first picture."""
        from mimkit.viz import draw_picture

        d = self.data
        images = d.test_images if d.test_images is not None else d.train_images
        model = self._eval_method()
        pics = model.capabilities.pictures
        if images is None or not pics:
            return None
        kind = "reconstruction" if "reconstruction" in pics else pics[0]
        name = "reconstruction.png" if kind == "reconstruction" else f"{kind}.png"
        path = draw_picture(kind, model, images[:8], d.mean, d.std, self.out_dir / name, seed=self.cfg.train.seed)
        return str(path)


def pretrain(cfg: Config) -> dict:
    """Run (or resume) pretraining for ``cfg``; returns a result dict (``out_dir``, ``step``, ``knn``,
    ``skipped_files`` ...). Raises :class:`TrainingInterrupted` after saving on SIGTERM/SIGINT/SIGUSR1/SIGHUP."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()

