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
refused unless ``train.resume_changes=allow``; SIGTERM / SIGINT / SIGUSR1 save a checkpoint at the
next step boundary and raise :class:`TrainingInterrupted` (the CLI exits with
:data:`EXIT_INTERRUPTED`); a corrupt file met by a streaming loader saves the state of the last step
boundary, then raises :class:`~mimkit.data.errors.DataError`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mimkit.config import Config, ConfigError, save_config, to_dict, validate
from mimkit.data.errors import DataError
from mimkit.methods import Method, Progress
from mimkit.methods import build_method as _build_method
from mimkit.train import checkpoint as ckpt
from mimkit.train.data import build_train_data
from mimkit.train.distributed import all_ok, all_reduce_mean, all_reduce_sum, barrier, cleanup, init_distributed
from mimkit.train.logging import MetricLogger, make_progress_bar
from mimkit.train.optim import effective_lr, lr_at, param_groups, set_lr

EXIT_INTERRUPTED = 75
"""Exit status of ``mimkit pretrain`` stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint
(``EX_TEMPFAIL``: rerun the same command to resume; a requeue script tests for it)."""

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

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
        self.cfg = cfg
        validate(cfg)  # ranges and combinations: one-line ConfigError before any file or data
        self.info = init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)
        info = self.info
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed + info.rank)
        self.out_dir = Path(cfg.train.out_dir)
        self.device = info.device
        self.lock: ckpt.RunLock | None = None
        self._created_dir = False
        self._signal: int | None = None
        self._old_handlers: dict = {}
        self.resumed_from: Path | None = None
        self.resume_note: str | None = None
        self.resume_diff: dict = {}
        self._last_good: tuple[Path, int] | None = None
        try:  # option errors of the method become one-line config errors, before the data is loaded
            model = build_method(cfg)
            model.check_batch_size(cfg.data.batch_size)
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"method '{cfg.method.name}': {e}") from e
        try:
            self._claim_run_dir(model)
            resume = self._load_resume_state()
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
            fused = o.fused if o.fused is not None else self.device.type == "cuda"
            self.optimizer = torch.optim.AdamW(
                param_groups(self.model, o.weight_decay, no_decay_keywords=tuple(o.no_decay_keywords)), lr=self.peak_lr,
                betas=o.betas, eps=o.eps, fused=fused
            )
            self.step = 0
            self.nonfinite = 0
            if resume is not None:
                self._apply_resume(*resume)
        except BaseException:
            self.close(failed=True)
            raise
        enc = cfg.model.encoder
        self._batch_shape = (cfg.data.batch_size, enc.in_chans, enc.img_size, enc.img_size)
        self._streaming = hasattr(self.data.loader, "skipped")

        train_model: nn.Module = self.model
        if info.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.model.capabilities.find_unused_parameters,
            )
        if cfg.train.compile:
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
        """Find, load and verify the checkpoint to resume from; refuse a changed optimisation."""
        cfg = self.cfg
        res = ckpt.load_for_resume(self.out_dir, cfg.train.resume, warn=self._warn)
        if res is None:
            return None
        path, state, note = res
        self.resume_note = note
        extra = state.get("extra") or {}
        old_world = extra.get("world_size", len(state.get("rng") or []) or None)
        diff = config_changes(state.get("config") or {}, to_dict(cfg), old_world, self.info.world_size)
        if diff and cfg.train.resume_changes != "allow":
            raise ConfigError(
                f"checkpoint {path} (step {int(state['step'])}) was written with settings that change the "
                f"optimisation: {_describe_changes(diff)}. Restore them, choose a new train.out_dir (or "
                "train.resume=none), or pass train.resume_changes=allow to continue anyway (recorded in metrics.jsonl)"
            )
        if diff:
            self._warn(f"resuming with changed settings (train.resume_changes=allow): {_describe_changes(diff)}")
        self.resume_diff = diff
        return path, state

    def _apply_resume(self, path: Path, state: dict) -> None:
        try:
            unwrap(self.model).load_state_dict(state["model"])
        except RuntimeError as e:
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not match this model ({str(e).splitlines()[0]}). It was written by a run "
                "with a different config; use another train.out_dir or train.resume=none"
            ) from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
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

    def close(self, failed: bool = False) -> None:
        """Release the run directory (and remove it when this run created it and failed before
        writing anything)."""
        self._restore_signals()
        close_loader = getattr(getattr(getattr(self, "data", None), "loader", None), "close", None)
        if close_loader is not None:
            with contextlib.suppress(Exception):
                close_loader()  # persistent DataLoader workers end with the run
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if failed and self._created_dir:
            self._created_dir = False
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only when empty

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
        state at the last step boundary when a step is abandoned)."""
        rng = rng if rng is not None else ckpt.rng_state()
        if self.info.enabled:
            import torch.distributed as dist

            rngs: list = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "rng": rngs,
            "config": to_dict(self.cfg),
            "extra": {"nonfinite": self.nonfinite, "world_size": self.info.world_size},
        }

    def save(self, final: bool = False, rng: dict | None = None) -> Path:
        """Write ``checkpoint.pt`` (and a numbered copy with ``train.keep_checkpoints``); collective
        when distributed. Raises :class:`~mimkit.train.checkpoint.CheckpointError` on every rank when
        rank 0 could not write (the previous checkpoint is then intact)."""
        state = self.state_dict(rng)  # collective when distributed: every rank calls it
        latest = self.out_dir / ckpt.LATEST
        err: BaseException | None = None
        if self.info.is_main:
            try:
                ckpt.atomic_save(state, latest)
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

    def _last_good_text(self) -> str:
        if self._last_good is not None and self._last_good[0].is_file():
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
        try:
            return self._train()
        finally:
            self.close()

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
        while self.step < stop:
            prog = self.progress()
            lr = lr_at(prog.epoch, self.peak_lr, cfg.optim.warmup_epochs, cfg.train.epochs, self.min_lr,
                       cfg.optim.warmup_from_min_lr)
            set_lr(self.optimizer, lr)
            boundary_rng = ckpt.rng_state() if self._streaming else None
            loss_sum = torch.zeros((), device=self.device)
            metrics_sum: dict[str, torch.Tensor] = {}
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
                    v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                    metrics_sum[k] = metrics_sum.get(k, 0) + v.to(self.device) / accum
            due = every_s is not None and info.is_main and time.monotonic() - self._last_save_time >= every_s
            flags = torch.cat([torch.isfinite(loss_sum).float().reshape(1),
                               torch.tensor([float(data_error is not None), float(lost is not None),
                                             float(self._signal is not None), float(due)], device=self.device)])
            n_finite, n_data_err, n_lost, n_signal, n_due = all_reduce_sum(flags, info).tolist()
            if n_data_err > 0 or n_lost > 0:  # abandon the step: keep the state of the last step boundary
                self.optimizer.zero_grad(set_to_none=True)
                if bar is not None:
                    bar.close()
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
            if n_finite < info.world_size - 0.5:
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.update() if self.scaler.is_enabled() else None
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
                if cfg.optim.clip_grad is not None or log_now:
                    self.scaler.unscale_(self.optimizer)
                    max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad is not None else float("inf")
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                unwrap(self.model).after_step(self.progress())
                steps_since += 1
                if log_now:
                    loss_val = all_reduce_mean(loss_sum, info).item()
                    now = time.perf_counter()
                    ips = steps_since * imgs_per_step / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    rec = {"epoch": round(self.step / self.steps_per_epoch, 4), "loss": loss_val, "lr": lr,
                           "img_per_s": ips, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                           "nonfinite": self.nonfinite}
                    rec.update({k: float(all_reduce_mean(v, info)) for k, v in metrics_sum.items()})
                    logger.log(self.step, rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if n_signal > 0 and self.step < stop:
                if bar is not None:
                    bar.close()
                path = self.save()
                logger.close()
                sig = self._signal
                name = signal.Signals(sig).name if sig is not None else "a stop signal (on another rank)"
                raise TrainingInterrupted(
                    f"stopped by {name} at step {self.step} of {stop}; {path} holds that step. Rerun the same "
                    "command to resume", name, self.step, path)
            if (self.step % cfg.train.ckpt_every_steps == 0 or n_due > 0) and self.step < stop:
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
            enc = unwrap(self.model).encoder
            kw = dict(pool=["cls", "mean"], batch_size=e.batch_size, mean=d.mean, std=d.std, device=self.device,
                      autocast_dtype=self.amp_dtype)
            ftr, fte = extract_features(enc, tr, **kw), extract_features(enc, te, **kw)
            res = {f"top1_{p}": knn_accuracy(ftr[p], trl, fte[p], tel, e.knn_k, e.knn_temperature) for p in ftr}
            res.update(k=e.knn_k, temperature=e.knn_temperature, n_train=len(tr), n_test=len(te))
            (self.out_dir / "knn.json").write_text(json.dumps(res, indent=2))
        barrier(self.info)
        return res

    def picture(self) -> str | None:
        """The end-of-run picture: a reconstruction for pixel methods, else the method's first picture."""
        from mimkit.viz import draw_picture

        d = self.data
        images = d.test_images if d.test_images is not None else d.train_images
        model = unwrap(self.model)
        pics = model.capabilities.pictures
        if images is None or not pics:
            return None
        kind = "reconstruction" if "reconstruction" in pics else pics[0]
        name = "reconstruction.png" if kind == "reconstruction" else f"{kind}.png"
        path = draw_picture(kind, model, images[:8], d.mean, d.std, self.out_dir / name, seed=self.cfg.train.seed)
        return str(path)


def pretrain(cfg: Config) -> dict:
    """Run (or resume) pretraining for ``cfg``; returns a result dict (``out_dir``, ``step``, ``knn``,
    ``skipped_files`` ...). Raises :class:`TrainingInterrupted` after saving on SIGTERM/SIGINT/SIGUSR1."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
        cleanup(trainer.info)

