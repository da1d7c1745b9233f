"""Value ranges and combinations of a config, checked before any work starts: :func:`validate` raises
one :class:`~mimkit.errors.ConfigError` listing every problem with its fix, one section per function."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from mimkit.config.io import PATH_KEYS, to_dict
from mimkit.config.schema import (
    AUGMENTS,
    COMPILE_MODES,
    CUDAGRAPH_COMPILE_MODES,
    MAX_SEED,
    PRECISIONS,
    RESUME_CHANGES,
    STRATEGIES,
    Config,
)
from mimkit.errors import ConfigError
from mimkit.masking import MASKING_KINDS, resolve_num_keep


def _fmt(v: Any) -> str:
    return yaml.safe_dump(to_dict(v), default_flow_style=True).strip().removesuffix("...").strip()


class _Problems:
    """Collects ``key=value rule; fix`` lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def need(self, ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
        if not ok:
            self.lines.append(f"{key}={_fmt(value)} {rule}; {fix}")

    def add(self, line: str) -> None:
        self.lines.append(line)


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _model(cfg: Config, need, check_environment: bool) -> int | None:
    """Encoder/decoder shapes and ``model.init``; returns the token count ``L`` (``None`` when the
    shapes are invalid)."""
    enc, dec = cfg.model.encoder, cfg.model.decoder
    sides = [enc.img_size] if isinstance(enc.img_size, int) else list(enc.img_size)
    need(all(s >= 1 for s in sides), "model.encoder.img_size", enc.img_size, "must be >= 1 (a side, or [H, W])",
         "e.g. 224, [224, 320] (28 for Fashion-MNIST)")
    need(enc.patch_size >= 1, "model.encoder.patch_size", enc.patch_size, "must be >= 1", "e.g. 16 (4 for 28x28 images)")
    if all(s >= 1 for s in sides) and enc.patch_size >= 1:
        need(all(s % enc.patch_size == 0 for s in sides) and enc.patch_size < max(sides), "model.encoder.patch_size",
             enc.patch_size, f"must divide every side of model.encoder.img_size={_fmt(enc.img_size)} and be smaller",
             "pick a common divisor, e.g. 16 for 224 or [224, 320], 4 for 28")
    need(enc.in_chans >= 1, "model.encoder.in_chans", enc.in_chans, "must be >= 1", "3 for RGB, 1 for grey-scale")
    need(enc.depth >= 1, "model.encoder.depth", enc.depth, "must be >= 1 (an encoder with no blocks learns nothing)",
         "e.g. 12 (ViT-B) or 6")
    for name, sec in (("encoder", enc), ("decoder", dec)):
        need(sec.embed_dim >= 1, f"model.{name}.embed_dim", sec.embed_dim, "must be >= 1", "e.g. 768 / 512")
        need(sec.num_heads >= 1, f"model.{name}.num_heads", sec.num_heads, "must be >= 1", "e.g. 12 / 16")
        if sec.embed_dim >= 1 and sec.num_heads >= 1:
            need(sec.embed_dim % sec.num_heads == 0, f"model.{name}.num_heads", sec.num_heads,
                 f"must divide model.{name}.embed_dim={sec.embed_dim}", "pick a divisor of the width")
        need(finite(sec.mlp_ratio) and sec.mlp_ratio > 0, f"model.{name}.mlp_ratio", sec.mlp_ratio, "must be > 0",
             "e.g. 4.0")
    need(dec.depth >= 0, "model.decoder.depth", dec.depth, "must be >= 0", "e.g. 8 (MAE) or 1")
    need(0.0 <= enc.drop_path_rate < 1.0, "model.encoder.drop_path_rate", enc.drop_path_rate, "must be in [0, 1)",
         "0.0 for MAE pretraining")
    need(enc.norm_eps > 0, "model.encoder.norm_eps", enc.norm_eps, "must be > 0", "e.g. 1e-6")
    need(enc.layer_scale is None or enc.layer_scale > 0, "model.encoder.layer_scale", enc.layer_scale,
         "must be > 0 or null", "null turns it off")
    need(cfg.model.init_parts in ("all", "encoder"), "model.init_parts", cfg.model.init_parts,
         "is not one of all, encoder", "all loads every matching tensor, encoder only the encoder")
    if check_environment and cfg.model.init:
        need(Path(os.path.expanduser(cfg.model.init)).exists(), "model.init", cfg.model.init, "does not exist",
             "give the path of an official MAE checkpoint, a timm ViT state dict / safetensors, a mimkit checkpoint "
             "or export, or a Hugging Face ViTMAE directory (null = random init)")
    return (math.prod(s // enc.patch_size for s in (sides * 2)[:2])
              if enc.patch_size >= 1 and all(s >= 1 for s in sides) else None)


def _masking(cfg: Config, need, tokens: int | None) -> None:
    """``method.masking`` of the methods that have one (the rest of a method's options is checked by
    the method's constructor)."""
    masking = getattr(cfg.method, "masking", None)
    if masking is not None and hasattr(masking, "ratio"):
        kind = getattr(masking, "kind", "random")
        need(kind in MASKING_KINDS, "method.masking.kind", kind, f"is not one of {', '.join(MASKING_KINDS)}",
             "e.g. method.masking.kind=random")
        num_keep = getattr(masking, "num_keep", None)
        if num_keep is not None:
            ok = num_keep >= 1 and (tokens is None or num_keep < tokens)
            need(ok, "method.masking.num_keep", num_keep,
                 f"must be in [1, {tokens - 1 if tokens else 'L-1'}] (visible patches of {tokens or 'L'})",
                 "lower it, or set method.masking.num_keep=null to use method.masking.ratio")
        elif kind != "partition":
            ok = finite(masking.ratio) and 0.0 < masking.ratio < 1.0
            if ok and tokens is not None:
                try:
                    keep = resolve_num_keep(tokens, masking.ratio, None)
                    ok = 1 <= keep < tokens
                except Exception:
                    ok = False
            need(ok, "method.masking.ratio", masking.ratio,
                 "must be in (0, 1) and leave at least one patch visible and one hidden (0 hides nothing: loss 0)",
                 "e.g. method.masking.ratio=0.75")
        views = getattr(masking, "num_views", None)
        if views is not None and kind in ("partition", "random_views"):
            need(views >= 2 and (tokens is None or views <= tokens), "method.masking.num_views", views,
                 f"must be in [2, {tokens or 'L'}] for masking kind {kind}", "e.g. method.masking.num_views=4")


def _data(cfg: Config, need, world_size: int) -> None:
    d, enc = cfg.data, cfg.model.encoder
    need(bool(str(d.dataset).strip()), "data.dataset", d.dataset, "is empty", "use fashion_mnist or an image folder path")
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1 (images per process)", "e.g. 64")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0", "0 decodes in the main process")
    need(d.decode in ("cpu", "gpu", "auto"), "data.decode", d.decode, "is not one of cpu, gpu, auto",
         "e.g. data.decode=cpu (PIL workers) or gpu (nvJPEG)")
    need(d.augment in AUGMENTS, "data.augment", d.augment, f"is not one of {', '.join(AUGMENTS)}",
         "e.g. data.augment=rrc_flip")
    lo, hi = d.crop_scale
    need(finite(lo) and finite(hi) and 0.0 < lo <= hi <= 1.0, "data.crop_scale", list(d.crop_scale),
         "must satisfy 0 < min <= max <= 1 (area fractions)", "e.g. data.crop_scale=[0.2,1.0]")
    for key in ("mean", "std"):
        v = getattr(d, key)
        if v is None:
            continue
        need(len(v) in (1, enc.in_chans), f"data.{key}", list(v),
             f"needs 1 or model.encoder.in_chans={enc.in_chans} values", f"give {enc.in_chans} values or null")
        if key == "std":
            need(all(finite(x) and x > 0 for x in v), "data.std", list(v), "must be > 0 (it divides the pixels)",
                 "e.g. [0.229,0.224,0.225] or null for the data set's own")
        else:
            need(all(finite(x) for x in v), "data.mean", list(v), "must be finite numbers", "or null")
    need(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 1 (samples held for "
         "shuffling a shard stream; 1 = shard order only)", "e.g. data.shuffle_buffer=4096")
    need(d.limit is None or d.limit >= 1, "data.limit", d.limit,
         "must be a positive number of images (null = all)", "e.g. data.limit=1000, or data.limit=null")
    accum_ok = cfg.optim.accum_iter >= 1
    if d.limit is not None and d.limit >= 1 and d.batch_size >= 1 and accum_ok:
        per_step = d.batch_size * cfg.optim.accum_iter * world_size
        need(d.limit >= per_step, "data.limit", d.limit,
             f"is fewer images than one optimizer step takes (data.batch_size x optim.accum_iter x {world_size} "
             f"process(es) = {per_step})", f"raise data.limit to at least {per_step} or lower data.batch_size")


def _optim(cfg: Config, need) -> None:
    o = cfg.optim
    accum_ok = o.accum_iter >= 1
    need(finite(o.base_lr) and o.base_lr > 0, "optim.base_lr", o.base_lr, "must be > 0", "e.g. 1.5e-4")
    need(o.lr is None or (finite(o.lr) and o.lr > 0), "optim.lr", o.lr, "must be > 0 or null",
         "null scales optim.base_lr by the batch")
    need(finite(o.min_lr) and o.min_lr >= 0, "optim.min_lr", o.min_lr, "must be >= 0", "e.g. 0.0")
    if o.lr is not None and finite(o.lr) and finite(o.min_lr) and o.min_lr_ratio is None:
        need(o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"is above optim.lr={o.lr}", "lower optim.min_lr")
    need(o.min_lr_ratio is None or (finite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1), "optim.min_lr_ratio",
         o.min_lr_ratio, "must be in [0, 1] or null", "e.g. 0.25")
    need(finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0", "e.g. 0.05")
    need(all(finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "must be in [0, 1)",
         "e.g. [0.9,0.95]")
    need(finite(o.eps) and o.eps > 0, "optim.eps", o.eps, "must be > 0", "e.g. 1e-8")
    need(finite(o.warmup_epochs) and o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0",
         "0 turns warmup off")
    need(accum_ok, "optim.accum_iter", o.accum_iter, "must be >= 1 (micro-batches per optimizer step)", "1 = none")
    need(o.clip_grad is None or (finite(o.clip_grad) and o.clip_grad > 0), "optim.clip_grad", o.clip_grad,
         "must be > 0 or null", "null turns clipping off")


def _train(cfg: Config, need, world_size: int = 1):
    """The loop's settings; returns the parsed ``train.device`` (``None`` for auto) and whether it is valid."""
    t = cfg.train
    need(finite(t.epochs) and t.epochs > 0, "train.epochs", t.epochs, "must be > 0", "e.g. train.epochs=800")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "must be >= 1 or null",
         "null trains for train.epochs")
    need(t.ckpt_every_steps >= 1, "train.ckpt_every_steps", t.ckpt_every_steps, "must be >= 1",
         "use a large value to save rarely, or train.ckpt_every_minutes")
    need(t.ckpt_every_minutes is None or (finite(t.ckpt_every_minutes) and t.ckpt_every_minutes > 0),
         "train.ckpt_every_minutes", t.ckpt_every_minutes, "must be > 0 or null", "e.g. 30, or null for steps only")
    need(t.keep_checkpoints >= -1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= -1",
         "-1 keeps every numbered copy, 0 none")
    need(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, "must be >= 1", "e.g. 20")
    need(t.max_nonfinite >= 0, "train.max_nonfinite", t.max_nonfinite, "must be >= 0", "e.g. 20")
    need(finite(t.max_nonfinite_fraction) and 0 <= t.max_nonfinite_fraction <= 1, "train.max_nonfinite_fraction",
         t.max_nonfinite_fraction, "must be in [0, 1]", "e.g. 0.1")
    need(isinstance(t.seed, int) and not isinstance(t.seed, bool) and 0 <= t.seed <= MAX_SEED, "train.seed", t.seed,
         f"must be an integer in [0, {MAX_SEED}] (numpy's seed range)", "e.g. train.seed=0")
    need(t.num_threads is None or t.num_threads >= 1, "train.num_threads", t.num_threads, "must be >= 1 or null",
         "null keeps torch's default")
    need(t.compile in (True, False, "auto"), "train.compile", t.compile, "is not one of auto, true, false",
         "auto (default) compiles on a GPU for long runs")
    need(t.compile_mode in COMPILE_MODES, "train.compile_mode", t.compile_mode,
         f"is not one of {', '.join(COMPILE_MODES)}", "default, or reduce-overhead for CUDA graphs on a GPU")
    if t.compile_mode in CUDAGRAPH_COMPILE_MODES and t.compile is not False:
        need(cfg.optim.accum_iter == 1, "train.compile_mode", t.compile_mode,
             f"replays CUDA graphs, which mimkit has not tested with optim.accum_iter={cfg.optim.accum_iter} "
             "(micro-batches)", "use train.compile_mode=default, or optim.accum_iter=1")
        need(world_size == 1, "train.compile_mode", t.compile_mode,
             f"replays CUDA graphs, which mimkit has not tested with {world_size} processes (DDP/FSDP collectives in "
             "the backward)", "use train.compile_mode=default for distributed runs")
    need(t.precision in PRECISIONS, "train.precision", t.precision, f"is not one of {', '.join(PRECISIONS)}",
         "e.g. train.precision=auto")
    need(t.resume_changes in RESUME_CHANGES, "train.resume_changes", t.resume_changes,
         f"is not one of {', '.join(RESUME_CHANGES)}", "refuse (default) or allow")
    need(t.resume_older in RESUME_CHANGES, "train.resume_older", t.resume_older,
         f"is not one of {', '.join(RESUME_CHANGES)}", "refuse (default) or allow")
    need(finite(t.dist_timeout_minutes) and t.dist_timeout_minutes > 0, "train.dist_timeout_minutes",
         t.dist_timeout_minutes, "must be > 0", "e.g. 30")
    need(t.strategy in STRATEGIES, "train.strategy", t.strategy, f"is not one of {', '.join(STRATEGIES)}",
         "ddp (default; ViT-B and smaller) or fsdp (sharded parameters, for ViT-L/H/g)")
    need(bool(str(t.out_dir).strip()), "train.out_dir", t.out_dir, "is empty", "give a run directory")
    need(isinstance(t.resume, str) and bool(t.resume.strip()), "train.resume", t.resume, "is empty",
         "use auto, none or a checkpoint path")
    device_ok = True
    try:
        dev = torch.device(t.device) if t.device != "auto" else None
        if dev is not None and dev.type not in ("cpu", "cuda", "mps"):
            device_ok = False
    except (RuntimeError, ValueError):
        device_ok = False
        dev = None
    need(device_ok, "train.device", t.device, "is not a device name", "use auto, cpu, cuda or cuda:<index>")

    return dev, device_ok


def _eval(cfg: Config, need) -> None:
    e, t = cfg.eval, cfg.train
    need(e.knn_k >= 1, "eval.knn_k", e.knn_k, "must be >= 1", "e.g. 20")
    need(finite(e.knn_temperature) and e.knn_temperature > 0, "eval.knn_temperature", e.knn_temperature,
         "must be > 0", "e.g. 0.07")
    need(finite(e.knn_every_epochs) and e.knn_every_epochs >= 0, "eval.knn_every_epochs", e.knn_every_epochs,
         "must be >= 0", "0 evaluates only at the end")
    for key in ("knn_train_limit", "knn_test_limit"):
        v = getattr(e, key)
        need(v is None or v >= 1, f"eval.{key}", v, "must be >= 1 or null", "null uses every image")
    need(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1", "e.g. 512")
    need(not (t.strategy == "fsdp" and e.knn_every_epochs > 0), "eval.knn_every_epochs", e.knn_every_epochs,
         "needs train.strategy=ddp (a sharded model is gathered for evaluation only at the end)",
         "set eval.knn_every_epochs=0 (the kNN at the end still runs) or train.strategy=ddp")


def _machine(cfg: Config, problems: _Problems, dev, device_ok: bool) -> None:
    """What depends on this machine: the device, fp16, ``~user`` paths, ``train.out_dir``'s type."""
    t = cfg.train
    has_cuda = torch.cuda.is_available()
    kind = dev.type if dev is not None else ("cuda" if has_cuda else "cpu")
    if kind == "cuda" and not has_cuda:
        problems.add(f"train.device={t.device} but no CUDA device is visible; use train.device=cpu or auto")
    elif dev is not None and dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        problems.add(f"train.device={t.device} but only {torch.cuda.device_count()} CUDA device(s) are "
                     "visible; use train.device=cuda (torchrun picks one per rank)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        problems.add("train.device=mps but MPS is not available; use train.device=cpu or auto")
    if t.precision == "fp16" and kind != "cuda":
        problems.add(f"train.precision=fp16 needs a CUDA GPU (the run would use {kind}); use "
                     "train.precision=bf16 or fp32")
    for key in PATH_KEYS:  # config_from_dict expanded ~; what is left names no user of this machine
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name, None)
        if isinstance(v, str) and v.startswith("~"):
            user = v[1:].split("/", 1)[0]
            problems.add(f"{key}={v}: no user '{user}' on this machine to expand '~{user}'; write the full "
                            "path (or ~/... for your home folder)")
    out = Path(os.path.expanduser(t.out_dir))
    if out.exists() and not out.is_dir():
        problems.add(f"train.out_dir={t.out_dir} is an existing file, not a directory; choose another "
                     "train.out_dir")
    else:
        parent = next((p for p in [out, *out.parents] if p.exists()), None)
        if parent is not None and not parent.is_dir():
            problems.add(f"train.out_dir={t.out_dir} lies under the file {parent}; choose another "
                            "train.out_dir")


def validate(cfg: Config, *, world_size: int | None = None, check_environment: bool = True) -> None:
    """Check value ranges and combinations of the generic sections (``model``, ``method.masking``
    when the method has one, ``data``, ``optim``, ``train``, ``eval``); raise one
    :class:`ConfigError` listing every problem with its fix. Method-specific options are checked by
    the method's constructor. ``check_environment``: also check what depends on this machine (a
    GPU for ``train.device=cuda`` / ``precision=fp16``, ``train.out_dir`` not being a file).
    ``world_size``: processes of the run (default: ``$WORLD_SIZE`` or 1). Reads and writes nothing
    but ``os.environ``, ``torch.cuda`` and the ``out_dir`` path's type."""

    if world_size is None:
        try:
            world_size = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        except ValueError:
            world_size = 1

    problems = _Problems()
    need = problems.need
    tokens = _model(cfg, need, check_environment)
    _masking(cfg, need, tokens)
    _data(cfg, need, world_size)
    _optim(cfg, need)
    dev, device_ok = _train(cfg, need, world_size)
    _eval(cfg, need)
    if check_environment and device_ok:
        _machine(cfg, problems, dev, device_ok)
    if problems.lines:
        lines = problems.lines
        raise ConfigError("; ".join(lines) if len(lines) > 1 else lines[0])
