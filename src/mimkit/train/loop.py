"""The method-agnostic pretraining loop.

One optimizer step = ``accum_iter`` micro-batches, each ``loss / accum_iter`` back-propagated and followed
by the method's ``after_micro_batch`` hook, then the optimizer step and ``after_step``; the
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
boundary, then raises :class:`~mimkit.errors.DataError`.

:class:`Trainer` is the loop; it composes the components that own the rest: the run directory and
checkpoints (:class:`~mimkit.train.checkpointer.Checkpointer`), the resume policy
(:mod:`mimkit.train.resume`), stop signals (:mod:`mimkit.train.signals`), precision
(:mod:`mimkit.train.precision`), process groups (:class:`~mimkit.train.distributed.ProcessGroups`)
and the end-of-run evaluation (:mod:`mimkit.train.evaluation`).

Why this file is long: the step itself is split into short methods (one per phase: abandon,
skip on the host, optimizer step, log, non-finite flush, stop on a signal), and the names of the
components are re-exported here for the public API; everything else lives in the components.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mimkit.config import Config, expand_paths, save_config, validate
from mimkit.config.schema import CUDAGRAPH_COMPILE_MODES
from mimkit.errors import ConfigError, DataError, NonFiniteLossError
from mimkit.methods import Method, Progress
from mimkit.methods import build_method as _build_method
from mimkit.nn.vit import image_hw
from mimkit.train import checkpoint as ckpt
from mimkit.train import evaluation
from mimkit.train.checkpointer import Checkpointer
from mimkit.train.data import TrainData, build_train_data
from mimkit.train.distributed import ProcessGroups, all_reduce_mean, all_reduce_sum, close_at_exit, unwrap
from mimkit.train.fsdp import wrap_for_training
from mimkit.train.logging import MetricLogger, StepLog, make_progress_bar
from mimkit.train.optim import StepPlan, lr_at, param_groups, set_lr
from mimkit.train.precision import Precision, autocast_dtype, compile_kwargs, cpu_has_bf16, resolve_compile
from mimkit.train.resume import (
    RESUME_FREE_KEYS,
    RESUME_GUARDED_KEYS,
    RESUME_GUARDED_PREFIXES,
    ResumePoint,
    apply_init,
    config_changes,
    find_resume_point,
    load_dcp_state,
    restore_state,
    resume_point_exists,
    seed_everything,
)
from mimkit.train.signals import EXIT_INTERRUPTED, STOP_SIGNALS, StopSignals, TrainingInterrupted
from mimkit.train.step import (
    Accumulator,
    AfterStepGuard,
    HostFlags,
    NonFiniteSteps,
    NonFiniteTracker,
    StepBatches,
    fused_adamw_supported,
)

__all__ = [  # names of the components re-exported here stay importable from mimkit.train.loop
    "EXIT_INTERRUPTED", "RESUME_FREE_KEYS", "RESUME_GUARDED_KEYS", "RESUME_GUARDED_PREFIXES", "STOP_SIGNALS",
    "NonFiniteLossError", "Trainer", "TrainingInterrupted", "autocast_dtype", "build_method", "config_changes",
    "cpu_has_bf16", "pretrain", "seed_everything", "unwrap",
]


def build_method(cfg: Config) -> Method:
    """The method of ``cfg`` (``cfg.method.name``), built from ``cfg.model`` and ``cfg.method``."""
    return _build_method(cfg.model, cfg.method)


@dataclass
class _Run:
    """What one call of :meth:`Trainer.train` carries from step to step."""

    stop: int  # the step the call ends at (train.max_steps or the total)
    log: StepLog
    accumulate: Accumulator
    params: list
    sync_free: bool  # non-finite steps skipped on the device, flags read at log steps (mimkit.train.step)
    flags: HostFlags
    guard: AfterStepGuard | None
    skipped_at_start: list
    every_s: float | None  # train.ckpt_every_minutes in seconds
    next_knn: float | None  # the epoch of the next kNN evaluation
    knn_history: list = field(default_factory=list)


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
        # a process group this trainer starts is this trainer's to end (close); one the caller
        # started before is left to the caller, only the groups made here are destroyed
        self.groups = ProcessGroups(cfg.train.device, cfg.train.dist_timeout_minutes)
        self.info = info = self.groups.info
        close_at_exit(self)  # closed at interpreter exit if the caller never does
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed + info.rank)
        self.out_dir = Path(cfg.train.out_dir)
        self.device = info.device
        self.signals = StopSignals(announce=info.is_main)
        self.checkpointer = Checkpointer(self.cfg, info, rebuild=lambda: build_method(self.cfg))
        self.sharded = cfg.train.strategy == "fsdp" and info.enabled  # FSDP2 needs a process group
        self.resumed_from: Path | None = None
        self._dcp_resume: Path | None = None  # a DCP checkpoint read once the model is wrapped
        self.data: TrainData | None = None
        self.train_model: nn.Module | None = None
        try:
            try:  # option errors of the method become one-line config errors, before the data is loaded
                model = build_method(cfg)
                model.check_batch_size(cfg.data.batch_size)
                # before the run directory is touched: what a fresh run needs (CAE v2's teacher file...)
                model.preflight(fresh=not cfg.model.init and not resume_point_exists(self.cfg))
            except ConfigError:
                raise
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"method '{cfg.method.name}': {e}") from e
        except BaseException:
            self.close(failed=True)  # the process group started above ends here, not at interpreter exit
            raise
        try:
            self.checkpointer.claim(model)
            point = find_resume_point(self.cfg, self.out_dir, info, self.checkpointer.warn)
            self.resume_note, self.resume_diff = (point.note, point.diff) if point is not None else (None, {})
            self.init_report = (apply_init(model, self.cfg, self.out_dir, info.is_main)
                                if point is None and cfg.model.init else None)
            self.data = build_train_data(cfg, info)
            model.set_input_normalisation(self.data.mean, self.data.std)
            self.model = model.to(self.device)
            self.method = self.model
            self.precision = Precision(cfg.train.precision, self.device)
            self.plan = StepPlan.of(self.cfg, len(self.data.loader), info.world_size)
            (self.batches_per_epoch, self.steps_per_epoch, self.total_steps, self.eff_batch, self.peak_lr,
             self.min_lr) = dataclasses.astuple(self.plan)
            # fused AdamW wherever torch has the kernel (CUDA, CPU): faster, and it skips a non-finite
            # step on the device (found_inf) so the step needs no host sync (mimkit.train.step)
            fused = cfg.optim.fused if cfg.optim.fused is not None else fused_adamw_supported(self.device)
            self.optimizer = self._make_optimizer(fused)
            self.step = 0
            self.skips = NonFiniteSteps(cfg.train.max_nonfinite, cfg.train.max_nonfinite_fraction,
                                        self.steps_per_epoch, info.is_main)
            if point is not None:
                self._resume_from(point)
            self._print_startup()
        except BaseException:
            self.close(failed=True)
            raise
        enc = cfg.model.encoder
        self._batch_shape = (cfg.data.batch_size, enc.in_chans, *image_hw(enc.img_size))
        try:
            train_model = self._wrap_model(fused)
        except BaseException:
            self.close(failed=True)
            raise
        if self.device.type == "cuda":  # fp32 matmuls left outside autocast use TF32 tensor cores
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.compiled, why = resolve_compile(cfg.train.compile, self.device, self.total_steps - self.step)
        self._compile_timed = not self.compiled
        mode = cfg.train.compile_mode
        # CUDA-graph modes: each step is marked as a new iteration, so a replay may reuse the memory of the
        # previous step's outputs (consumed by then: the loss is copied into the step's sum, the gradients
        # are applied and dropped by zero_grad before the next forward); on a CPU torch runs no graphs
        self.cudagraph_steps = self.compiled and mode in CUDAGRAPH_COMPILE_MODES
        if self.compiled and self.info.is_main:
            print(f"torch.compile: on ({why}{'' if mode == 'default' else f', mode {mode}'}); the first step "
                  "compiles the model (a minute or more)", file=sys.stderr)
        if self.compiled:
            # automatic dynamic shapes: a size seen to change (SBAM's adaptive visible count, up to ~40
            # values at ViT-B/16) is recompiled once as symbolic, not once per value; the batch is fixed
            # (drop_last), so the masking code keeps concrete sizes
            train_model = torch.compile(train_model, **compile_kwargs(mode))
        self.train_model = train_model

    # -- construction steps -----------------------------------------------------------------------
    def _make_optimizer(self, fused: bool) -> torch.optim.AdamW:
        o = self.cfg.optim
        groups = param_groups(self.model, o.weight_decay, no_decay_keywords=tuple(o.no_decay_keywords))
        return torch.optim.AdamW(groups, lr=self.peak_lr, betas=o.betas, eps=o.eps, fused=fused)

    def _resume_from(self, point: ResumePoint) -> None:
        self.step, self.skips.count = restore_state(point, self.model, self.optimizer, self.scaler, self.info,
                                                  self.cfg.train.seed, self.checkpointer.warn)
        if "model" not in point.state:  # a DCP directory: the shards are read once the model is wrapped
            self._dcp_resume = point.path
        self.resumed_from = point.path
        self.checkpointer.last_good = (point.path, self.step)

    def _wrap_model(self, fused: bool) -> nn.Module:
        """The module the loop calls (:func:`~mimkit.train.fsdp.wrap_for_training`); reads a DCP resume
        point into the wrapped model; the group of asynchronous DCP writes (sharded GPU runs)."""
        cfg, info = self.cfg, self.info
        train_model = wrap_for_training(self.model, info, sharded=self.sharded, amp_dtype=self.amp_dtype,
                                        activation_checkpointing=cfg.train.activation_checkpointing)
        if self.sharded:  # fully_shard swapped the parameters for DTensor shards: the optimizer must hold those
            self.optimizer = self._make_optimizer(fused)
        if self._dcp_resume is not None:
            load_dcp_state(self._dcp_resume, self.model, self.optimizer, info)
        if cfg.train.strategy == "fsdp" and info.enabled and self.device.type == "cuda":
            self.checkpointer.async_group = self.new_group(backend="gloo")  # async DCP writes: their own group
        return train_model

    def _print_startup(self) -> None:
        """One line with what a run does: world size, effective batch, peak lr, steps, where it starts."""
        if self.info.is_main:
            init = self.cfg.model.init
            start = (f"resumed from {self.resumed_from} at step {self.step}" if self.resumed_from is not None
                     else f"initialised from {init}" if init else "fresh start (random init)")
            print(self.plan.summary(self.cfg, self.info.world_size, start), file=sys.stderr)

    # -- lifetime ---------------------------------------------------------------------------------
    def _require_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"this Trainer was closed, so it cannot {what}; make a new Trainer (it resumes from the "
                               "last checkpoint)")

    def new_group(self, **kwargs):
        """``dist.new_group`` for a group this trainer uses (and :meth:`close` destroys)."""
        return self.groups.new(**kwargs)

    def release_run_dir(self, failed: bool = False) -> None:
        """End the run's hold on the machine and its directory: restore the signal handlers, end the
        data loader's workers and threads, release the run-directory lock (and remove the directory
        when this run created it and failed before writing anything). :meth:`train` calls it on every
        exit path; the model, optimizer and process group stay usable (e.g. to gather a sharded
        model's full state) until :meth:`close`."""
        if self._run_released:
            return
        self._run_released = True
        self.signals.restore()
        if self.data is not None:
            with contextlib.suppress(Exception):
                self.data.loader.close()  # persistent DataLoader workers and decode threads end with the run
        self.checkpointer.release(failed)

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
        close_at_exit(self, False)
        try:
            self.release_run_dir(failed)
        finally:
            self._teardown_distributed()

    def _teardown_distributed(self) -> None:
        self.checkpointer.wait_pending()  # an error path left an async DCP write running: let its thread finish
        if not self.info.enabled:
            return
        # modules and optimizers that reference a process group: released so that destroying the group
        # really ends it (a live reference keeps gloo's threads running until interpreter shutdown)
        self.train_model = None
        if self.sharded:
            self.model = self.method = self.optimizer = None
            self.checkpointer.full_method = None
        self.checkpointer.async_group = None
        self.groups.destroy()
        gc.collect()  # free the released modules' last references to the groups now, not at exit

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    # -- state ------------------------------------------------------------------------------------
    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.precision.dtype

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.precision.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler) -> None:
        self.precision.scaler = scaler

    @property
    def nonfinite(self) -> int:
        """Steps skipped so far for a non-finite loss or gradients."""
        return self.skips.count

    def state_dict(self, rng: dict | None = None) -> dict:
        """The full state (:meth:`Checkpointer.state_dict <mimkit.train.checkpointer.Checkpointer.state_dict>`;
        collective when distributed); ``rng``: this rank's RNG state to store instead of the current one
        (the state at the last step boundary when a step is abandoned)."""
        self._require_open("give its state")
        return self.checkpointer.state_dict(self.step, self.steps_per_epoch, self.nonfinite, self.scaler, self.model,
                                            self.optimizer, rng)

    def save(self, final: bool = False, rng: dict | None = None) -> Path:
        """Write the checkpoint of this step (:meth:`Checkpointer.save
        <mimkit.train.checkpointer.Checkpointer.save>`: ``checkpoint.pt``, or a DCP directory for
        ``train.strategy=fsdp``); collective when distributed. ``rng``: as for :meth:`state_dict`."""
        self._require_open("save")
        if self._run_released:
            raise RuntimeError("this Trainer has released its run directory (train() ended), so it cannot save; "
                               "make a new Trainer to continue the run")
        return self.checkpointer.save(self.step, lambda: self.state_dict(rng), self.model, self.optimizer,
                                      final=final, may_defer=rng is None and self.signals.received is None)

    # -- loop -------------------------------------------------------------------------------------
    def progress(self) -> Progress:
        return Progress(self.step, self.total_steps, self.step / self.steps_per_epoch, self.cfg.train.epochs,
                        micro_batches=self.cfg.optim.accum_iter)

    def train(self) -> dict:
        """Run the loop to ``train.epochs`` / ``train.max_steps``; releases the run directory at the end."""
        self._require_open("train")
        if self._run_released:
            raise RuntimeError("this Trainer has finished its run (train() ran or failed, and released the run "
                               "directory); make a new Trainer to train again, which resumes from the last checkpoint")
        try:
            run = self._start_run()
            while self.step < run.stop:
                self._train_step(run)
            return self._finish_run(run)
        finally:
            self.release_run_dir()

    def _start_run(self) -> _Run:
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
        evaluation.report_skipped(skipped_at_start, info.is_main)
        bar = make_progress_bar(stop, self.step, info.is_main and cfg.train.progress_bar)
        knn_every = cfg.eval.knn_every_epochs
        next_knn = (math.floor(self.step / self.steps_per_epoch / knn_every) + 1) * knn_every if knn_every else None
        accum = cfg.optim.accum_iter
        batches = self.data.batches(self.step * accum, self.steps_per_epoch * accum)
        accumulate = Accumulator(batches, accum, info, self._batch_shape, self.precision,
                                 lambda: self.signals.received is not None, unwrap(self.model).after_micro_batch)
        params = [p for p in self.model.parameters() if p.requires_grad]
        every_s = cfg.train.ckpt_every_minutes * 60 if cfg.train.ckpt_every_minutes else None
        log = StepLog(logger, bar, self.eff_batch)
        self.checkpointer.last_save_time = time.monotonic()
        self.signals.install()
        self.model.train()
        # Host syncs: none between log steps on the fused-AdamW path (mimkit.train.step). The non-finite
        # flag stays on the device: the fused kernel skips the update when it is set (found_inf) and the
        # flags are read at log steps and before checkpoints. fp16 (grad scaler) or optim.fused=false
        # read the flag every step instead. Host-side flags (signal, data error, checkpoint due) are
        # agreed through a CPU all-reduce when there are several processes (HostFlags).
        sync_free = self.precision.skips_on_device(self.optimizer)
        flags = HostFlags(info, self.groups.host_flag_group())
        self.skips.tracker = NonFiniteTracker(cfg.train.log_every_steps, self.device) if sync_free else None
        # the guard also keeps the step-boundary state of a method that changes itself between micro-batches
        # (after_micro_batch: PCAE's teacher) for a skipped or abandoned step, on either path
        guard = AfterStepGuard(unwrap(self.model), self.optimizer) if sync_free or accum > 1 else None
        return _Run(stop, log, accumulate, params, sync_free, flags, guard, skipped_at_start, every_s, next_knn)

    def _train_step(self, run: _Run) -> None:
        """One optimizer step (or a skipped one), then what is due at its boundary."""
        cfg, info = self.cfg, self.info
        prog = self.progress()
        lr = lr_at(prog.epoch, self.peak_lr, cfg.optim.warmup_epochs, cfg.train.epochs, self.min_lr,
                   cfg.optim.warmup_from_min_lr)
        set_lr(self.optimizer, lr)
        boundary_rng = ckpt.rng_state() if self.data.loader.streaming else None
        if run.guard is not None:
            run.guard.begin()  # copies what after_micro_batch will change (nothing for most methods)
        first_compiled = not self._compile_timed
        t0 = time.perf_counter() if first_compiled else 0.0
        if self.cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        micro = run.accumulate(self.train_model, prog)
        if first_compiled:  # once per run: the compilation's cost, shown (one host sync)
            self._compile_timed = True
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if info.is_main:
                print(f"torch.compile: the first step took {time.perf_counter() - t0:.0f} s (compilation included)",
                      file=sys.stderr)
        # 1.0 when the loss is not finite on some rank (device value; an async collective on NCCL)
        bad = (~torch.isfinite(micro.loss)).float()  # 0-d, as found_inf must be
        if info.enabled:
            bad = (all_reduce_sum(bad, info) > 0).float()
        due = (run.every_s is not None and info.is_main and self.checkpointer.seconds_since_save() >= run.every_s)
        n_data_err, n_lost, n_signal, n_due = run.flags.reduce(
            micro.data_error is not None, micro.lost is not None, self.signals.received is not None, due)
        if n_data_err > 0 or n_lost > 0:
            self._abandon_step(run, micro, n_data_err, boundary_rng)
        log_now = (self.step + 1) % cfg.train.log_every_steps == 0 or self.step + 1 == run.stop
        if not run.sync_free and bad.item() > 0.5:  # the synchronous path: skip on the host
            self._skip_on_host(run, lr)
        else:
            self._optimizer_step(run, micro, bad, lr, log_now)
        run.log.tick()
        if n_signal > 0 and self.step < run.stop:
            self._stop_on_signal(run)
        if (self.step % cfg.train.ckpt_every_steps == 0 or n_due > 0) and self.step < run.stop:
            self._flush_nonfinite(run)
            self.save()
        if run.next_knn is not None and self.step / self.steps_per_epoch >= run.next_knn - 1e-9 \
                and self.step < run.stop:
            res = self.evaluate_knn()
            if res is not None and info.is_main:
                res["epoch"] = round(self.step / self.steps_per_epoch, 4)
                run.knn_history.append(res)
                run.log.logger.log(self.step, {f"knn_{k}": v for k, v in res.items() if k.startswith("top1")})
            run.next_knn += cfg.eval.knn_every_epochs

    def _abandon_step(self, run: _Run, micro: StepBatches, n_data_err: int, boundary_rng: dict | None) -> None:
        """A rank met a corrupt file, or its loader broke under a stop signal: save the state of the last
        step boundary and raise (:class:`DataError` or :class:`TrainingInterrupted`)."""
        self.optimizer.zero_grad(set_to_none=True)
        if run.guard is not None:
            run.guard.restore()  # the micro-batches' changes to the method (PCAE's teacher): the boundary state
        run.log.close_bar()
        self._flush_nonfinite(run)
        path = self.save(rng=boundary_rng)
        run.log.logger.close()
        if n_data_err == 0:
            raise TrainingInterrupted.at_step(self.signals.name or "a stop signal", self.step, run.stop, path,
                                              " (the data loader ended with it)")
        where = (f"The run saved its state at step {self.step} in {path}; fix or delete the file (or set "
                 "data.skip_corrupt=true), then rerun the same command to resume")
        if micro.data_error is not None:
            raise DataError(f"{str(micro.data_error).rstrip('.')} (met at step {self.step}). {where}") \
                from micro.data_error
        raise DataError(f"another rank met a corrupt file at step {self.step} (its log names it). {where}")

    def _skip_on_host(self, run: _Run, lr: float) -> None:
        """The synchronous path's non-finite step: no update, counted and recorded; past the limit, stop."""
        if self.scaler.is_enabled():
            # update() needs the inf check of this step: unscale_ records the non-finite gradients,
            # so the scale backs off as it does for a step GradScaler skips itself
            self.scaler.unscale_(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if run.guard is not None:
            run.guard.restore()  # undo the micro-batches' changes to the method (PCAE's teacher)
        self.skips.skip(self.step, lr, run.log.logger, self.checkpointer.last_good_text)
        self.step += 1  # the step counter advances so the data stream and schedule move past the bad batch

    def _optimizer_step(self, run: _Run, micro: StepBatches, bad: torch.Tensor, lr: float, log_now: bool) -> None:
        """Clip, step (skipped on the device when ``bad`` on the sync-free path), ``after_step``, log."""
        clip = self.cfg.optim.clip_grad
        grad_norm = None
        if clip is not None or log_now or run.sync_free:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(run.params, clip if clip is not None else float("inf"))
        if run.sync_free:
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
        if run.sync_free:
            self.skips.tracker.record(self.step - 1, bad, lr)
            run.guard(self.progress(), bad)  # after_step; its tensor changes undone on a skipped step
        else:
            unwrap(self.model).after_step(self.progress())
        run.log.steps_since += 1
        full = run.sync_free and len(self.skips.tracker) == self.skips.tracker.capacity
        skipped_now = self._flush_nonfinite(run) if (log_now or full) else ()
        if log_now and self.step - 1 not in skipped_now:
            self._log_step(run, micro, lr, grad_norm)

    def _log_step(self, run: _Run, micro: StepBatches, lr: float, grad_norm) -> None:
        # one read of everything logged, after a device-side mean over the ranks
        keys = list(micro.metrics)
        vals = all_reduce_mean(torch.stack([micro.loss, *(micro.metrics[k] for k in keys)]), self.info).tolist()
        run.log.record(self.step, round(self.step / self.steps_per_epoch, 4), vals[0], lr,
                       float(grad_norm) if grad_norm is not None else None, self.nonfinite,
                       {**dict(zip(keys, vals[1:])), **micro.host_metrics})

    def _flush_nonfinite(self, run: _Run) -> set[int]:
        """Read the window's skipped steps (one host sync), count and record them; stop past the limit."""

        def complete_pending_save() -> None:
            # a checkpoint still being written asynchronously holds a step before this read: complete it
            # (every rank stops here, the flags are agreed) so it is the last good one named
            with contextlib.suppress(ckpt.CheckpointError):
                self.checkpointer.finish_pending()

        return self.skips.flush(run.log.logger, self.checkpointer.last_good_text, complete_pending_save)

    def _stop_on_signal(self, run: _Run) -> None:
        run.log.close_bar()
        self._flush_nonfinite(run)
        path = self.save()
        run.log.logger.close()
        raise TrainingInterrupted.at_step(self.signals.name or "a stop signal (on another rank)", self.step, run.stop,
                                          path)

    def _finish_run(self, run: _Run) -> dict:
        """The final save, the checks of the whole run, the end-of-run evaluation and ``result.json``."""
        cfg, info = self.cfg, self.info
        run.log.close_bar()
        self._flush_nonfinite(run)
        path = self.save(final=True)
        self.signals.restore()  # the final state is saved: a signal now ends the process as usual
        self.skips.check_share(self.step, run.log.logger, path)
        run.log.logger.close()
        skipped = evaluation.skipped_on_all_ranks(self.data.skipped_files(), info)
        if skipped != run.skipped_at_start:
            evaluation.report_skipped(skipped, info.is_main)
        result: dict = {"out_dir": str(self.out_dir), "step": self.step, "epochs": self.step / self.steps_per_epoch,
                        "nonfinite": self.nonfinite, "knn_history": run.knn_history}
        if skipped:
            result["skipped_files"] = {"count": len(skipped), "files": skipped}
        if self.device.type == "cuda":  # this process's peak (this attempt's, when the run resumed)
            result["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        if self.step >= self.total_steps or cfg.train.max_steps is not None:
            if cfg.eval.knn_at_end:
                result["knn"] = self.evaluate_knn()
            if cfg.eval.picture_at_end and info.is_main:
                result["picture"] = self.picture()
        if info.is_main:
            (self.out_dir / "result.json").write_text(json.dumps(result, indent=2))
        return result

    # -- evaluation and pictures ------------------------------------------------------------------
    def _eval_method(self) -> nn.Module:
        """The model to evaluate on rank 0: the gathered copy of a sharded run, else the model."""
        if self.sharded:
            if self.checkpointer.full_method is None:
                raise RuntimeError("a sharded run is evaluated only after its final save")
            return self.checkpointer.full_method
        return unwrap(self.model)

    def evaluate_knn(self) -> dict | None:
        """DINO kNN on the frozen encoder (cls and mean-pooled patches) on the main process
        (:func:`mimkit.train.evaluation.knn`; ``knn.json`` in the run directory)."""
        self._require_open("evaluate")
        return evaluation.knn(self.data, self._eval_method, self.cfg, self.info, self.amp_dtype, self.out_dir)

    def picture(self) -> str | None:
        """The end-of-run picture: a reconstruction for pixel methods, else the method's first picture."""
        return evaluation.picture(self.data, self._eval_method(), self.out_dir, self.cfg.train.seed)


def pretrain(cfg: Config) -> dict:
    """Run (or resume) pretraining for ``cfg``; returns a result dict (``out_dir``, ``step``, ``knn``,
    ``skipped_files`` ...). Raises :class:`TrainingInterrupted` after saving on SIGTERM/SIGINT/SIGUSR1/SIGHUP."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
