"""The method-agnostic pretraining loop.

One optimizer step = ``accum_iter`` micro-batches, each ``loss / accum_iter`` back-propagated; the
lr is set before every step from the fractional epoch (warmup + cosine, MAE). AMP: bf16 autocast on
GPU by default (fp16 with a grad scaler on request), fp32 on CPU unless ``precision=bf16``.
Non-finite losses skip the step (all ranks agree) and are counted; past ``max_nonfinite`` the run
stops with an error and the last good checkpoint is kept. Checkpoints hold the full state and a
resumed run reproduces the uninterrupted run's losses exactly: the data order and augmentation are
functions of (seed, epoch, batch index) and the RNG states are restored.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mimkit.config import Config, ConfigError, save_config, to_dict
from mimkit.methods import Method, Progress
from mimkit.methods import build_method as _build_method
from mimkit.train import checkpoint as ckpt
from mimkit.train.data import build_train_data
from mimkit.train.distributed import all_reduce_mean, barrier, cleanup, init_distributed
from mimkit.train.logging import MetricLogger, make_progress_bar
from mimkit.train.optim import effective_lr, lr_at, param_groups, set_lr


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses; the message names the step and what to change."""


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
            raise ValueError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
        return torch.float16
    raise ValueError(f"unknown train.precision {precision!r}; choose auto, fp32, bf16 or fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Trainer:
    """Holds the model, optimizer and state of one pretraining run (see :func:`pretrain`)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.info = init_distributed(cfg.train.device)
        info = self.info
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed + info.rank)
        self.out_dir = Path(cfg.train.out_dir)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        self.device = info.device
        try:  # option errors of the method become one-line config errors, before the data is loaded
            model = build_method(cfg)
            model.check_batch_size(cfg.data.batch_size)
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"method '{cfg.method.name}': {e}") from e
        self.data = build_train_data(cfg, info)
        self.model = model.to(self.device)
        self.method = self.model
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        o = cfg.optim
        self.batches_per_epoch = len(self.data.loader)
        if self.batches_per_epoch < o.accum_iter:
            raise ValueError(
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
            param_groups(self.model, o.weight_decay, no_decay_keywords=tuple(o.no_decay_keywords)), lr=self.peak_lr, betas=o.betas, eps=o.eps, fused=fused
        )
        self.step = 0
        self.nonfinite = 0
        self.resumed_from: Path | None = None
        self._maybe_resume()

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

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = ckpt.rng_state()
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

    def save(self, final: bool = False) -> None:
        state = self.state_dict()  # collective when distributed: every rank calls it
        if self.info.is_main:
            ckpt.atomic_save(state, self.out_dir / ckpt.LATEST)
            keep = self.cfg.train.keep_checkpoints
            if keep:
                ckpt.atomic_save(state, self.out_dir / f"checkpoint-{self.step:08d}.pt")
                ckpt.prune(self.out_dir, keep)
        barrier(self.info)

    def _maybe_resume(self) -> None:
        path = ckpt.find_resume(self.out_dir, self.cfg.train.resume)
        if path is None:
            return
        state = ckpt.load_checkpoint(path, map_location="cpu")
        try:
            unwrap(self.model).load_state_dict(state["model"])
        except RuntimeError as e:
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not match this model ({e}). It was written by a run with a "
                "different config; use another train.out_dir or train.resume=none"
            ) from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nonfinite = int(state.get("extra", {}).get("nonfinite", 0))
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            ckpt.set_rng_state(rngs[self.info.rank])
        else:
            print(f"warning: checkpoint has RNG states of {len(rngs)} ranks, this run has "
                  f"{self.info.world_size}; RNG streams are re-seeded", file=sys.stderr)
            seed_everything(self.cfg.train.seed + self.info.rank + self.step)
        self.resumed_from = path
        if self.info.is_main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)

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

    def train(self) -> dict:
        cfg, info = self.cfg, self.info
        stop = self.total_steps if cfg.train.max_steps is None else min(self.total_steps, cfg.train.max_steps)
        logger = MetricLogger(self.out_dir, info.is_main, cfg.train.tensorboard, resume_step=self.step)
        bar = make_progress_bar(stop, self.step, info.is_main and cfg.train.progress_bar)
        knn_every = cfg.eval.knn_every_epochs
        next_knn = (math.floor(self.step / self.steps_per_epoch / knn_every) + 1) * knn_every if knn_every else None
        batches = self._batches()
        accum = cfg.optim.accum_iter
        params = [p for p in self.model.parameters() if p.requires_grad]
        imgs_per_step = cfg.data.batch_size * accum * info.world_size
        t_last, steps_since = time.perf_counter(), 0
        history: dict = {"knn": []}
        self.model.train()
        while self.step < stop:
            prog = self.progress()
            lr = lr_at(prog.epoch, self.peak_lr, cfg.optim.warmup_epochs, cfg.train.epochs, self.min_lr,
                       cfg.optim.warmup_from_min_lr)
            set_lr(self.optimizer, lr)
            loss_sum = torch.zeros((), device=self.device)
            metrics_sum: dict[str, torch.Tensor] = {}
            for micro in range(accum):
                images, _ = next(batches)
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
            finite = torch.isfinite(loss_sum).float()
            finite = all_reduce_mean(finite, info)
            log_now = (self.step + 1) % cfg.train.log_every_steps == 0 or self.step + 1 == stop
            if finite.item() < 1.0:
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.update() if self.scaler.is_enabled() else None
                self.nonfinite += 1
                if info.is_main:
                    print(f"warning: non-finite loss at step {self.step}; step skipped "
                          f"({self.nonfinite}/{cfg.train.max_nonfinite})", file=sys.stderr)
                if self.nonfinite > cfg.train.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.nonfinite} non-finite losses (last at step {self.step}, lr {lr:.3g}); "
                        f"stopping. The last good checkpoint is {self.out_dir / ckpt.LATEST}. Lower the "
                        "learning rate, use precision=bf16/fp32 instead of fp16, or set optim.clip_grad."
                    )
                # the step counter advances so the data stream and schedule move past the bad batch
                self.step += 1
                continue
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
            if self.step % cfg.train.ckpt_every_steps == 0 and self.step < stop:
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
        self.save(final=True)
        logger.close()
        result: dict = {"out_dir": str(self.out_dir), "step": self.step, "epochs": self.step / self.steps_per_epoch,
                        "nonfinite": self.nonfinite, "knn_history": history["knn"]}
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
    """Run (or resume) pretraining for ``cfg``; returns a result dict (``out_dir``, ``step``, ``knn`` ...)."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        cleanup(trainer.info)

