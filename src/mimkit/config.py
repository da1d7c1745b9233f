"""Typed configuration: dataclasses, YAML files, ``key=value`` overrides, strict key checking.

A run's config has five sections: ``model`` (encoder/decoder shapes), ``method`` (``name`` selects
the method; the other keys are that method's options dataclass), ``data``, ``optim``, ``train`` and
``eval``. Unknown keys raise :class:`ConfigError` with the closest valid key as a suggestion.
YAML files may ``inherit: other.yaml`` (path relative to the file) and override parts of it.
A leading ``~`` / ``~user`` in a path setting (:data:`PATH_KEYS`) is expanded when the config is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mimkit.methods import METHODS, MethodOptions, ModelConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and how to fix it."""


@dataclass
class DataConfig:
    """Training data. ``dataset``: ``fashion_mnist`` or a path to an image folder (class sub-folders
    optional). ``in_memory``: keep the whole uint8 set on the device and augment there (batched);
    otherwise a DataLoader with ``num_workers`` processes. ``batch_size`` is per process. A directory
    written by ``mimkit data prepare`` (tar shards) is streamed (``in_memory: false``) through a
    shuffle buffer of ``shuffle_buffer`` samples, resuming mid-epoch at the exact sample.
    ``follow_links``: symbolic links in image folders are skipped (and counted) unless true; when
    followed, only links that stay inside the folder are, each real folder once (no loops)."""

    dataset: str = "fashion_mnist"
    root: str | None = None
    eval_dataset: str | None = None
    eval_root: str | None = None
    batch_size: int = 64
    augment: str = "rrc_flip"
    crop_scale: tuple[float, float] = (0.2, 1.0)
    in_memory: bool = True
    num_workers: int = 8
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    skip_corrupt: bool = False
    follow_links: bool = False
    limit: int | None = None
    shuffle_buffer: int = 4096
    decode: str = "cpu"  # image folders streamed: cpu (PIL workers), gpu (nvJPEG, mimkit.data.gpu), auto


@dataclass
class OptimConfig:
    """AdamW with MAE's grouping; ``lr = base_lr * effective_batch / 256`` unless ``lr`` is set.
    Warmup and cosine are per iteration over fractional epochs. MAE warms up from 0;
    ``warmup_from_min_lr`` starts the warmup at ``min_lr`` instead (Latent MIM's code).
    ``min_lr_ratio``: the floor as a fraction of the peak lr (Latent MIM's ``min_lr_frac`` 0.25, so it
    follows the batch-scaled lr); wins over ``min_lr``.
    ``no_decay_keywords``: parameter-name substrings exempt from weight decay besides 1-D params and
    biases (Latent MIM: ``[bias, norm, embed]``)."""

    base_lr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    min_lr_ratio: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_epochs: float = 40.0
    warmup_from_min_lr: bool = False
    no_decay_keywords: tuple[str, ...] = ()
    accum_iter: int = 1
    clip_grad: float | None = None
    fused: bool | None = None


@dataclass
class TrainConfig:
    """Loop settings. ``keep_checkpoints``: besides the latest ``checkpoint.pt``, keep this many
    step-numbered copies ``checkpoint-<step>.pt`` (-1 = all; for accuracy-vs-epoch reports; a corrupt
    latest checkpoint falls back to the newest good copy). ``precision``: ``auto`` (bf16 on GPU, fp32
    on CPU), ``fp32``, ``bf16`` (also on CPUs with bf16 instructions), ``fp16`` (GPU, with a grad
    scaler). ``ckpt_every_minutes``: also save when this much wall time passed since the last save
    (``null`` = steps only). ``resume_changes``: ``refuse`` (default) stops a resume whose config
    changes the optimisation (lr, schedule, batch, world size, masking, seed, data); ``allow``
    resumes and records the changes in ``metrics.jsonl``. ``resume_older``: ``refuse`` (default) stops an
    explicit ``train.resume=<checkpoint>`` whose step is older than a checkpoint already in ``out_dir``
    (training on from it would overwrite the newer progress); ``allow`` goes back to it. ``max_nonfinite``: skipped (non-finite)
    steps after which the run stops; ``max_nonfinite_fraction``: a run whose share of skipped steps
    is above this fails at its end. ``dist_timeout_minutes``: how long a rank waits for the others
    in a collective before failing (torchrun). ``strategy``: ``ddp`` (default: replicated model,
    single-file ``checkpoint.pt``) or ``fsdp`` (FSDP2: parameters, gradients and optimizer state
    sharded over the processes; DCP checkpoint directories ``dcp/step-<step>`` that resume on any
    number of processes, plus ``encoder.safetensors`` at the end). ``activation_checkpointing``:
    recompute each transformer block's activations in the backward pass (any method, either
    strategy; same numbers, less memory, about one more forward pass)."""

    epochs: float = 800.0
    max_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    out_dir: str = "runs/mae"
    ckpt_every_steps: int = 1000
    keep_checkpoints: int = 0
    log_every_steps: int = 20
    resume: str = "auto"
    max_nonfinite: int = 20
    max_nonfinite_fraction: float = 0.1
    num_threads: int | None = None
    progress_bar: bool = True
    tensorboard: bool = True
    ckpt_every_minutes: float | None = None
    resume_changes: str = "refuse"
    resume_older: str = "refuse"
    dist_timeout_minutes: float = 30.0
    strategy: str = "ddp"
    activation_checkpointing: bool = False


@dataclass
class EvalConfig:
    """Evaluation during/after pretraining: kNN every ``knn_every_epochs`` (0 = only at the end)."""

    knn_at_end: bool = True
    knn_every_epochs: float = 0.0
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train_limit: int | None = None
    knn_test_limit: int | None = None
    picture_at_end: bool = True
    batch_size: int = 512


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodOptions = field(default_factory=lambda: METHODS["mae"].options_class())
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (tuples become lists, for YAML)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) > 1:  # say every form the field takes (e.g. a side or [H, W]), not only the first
            forms = [e[len(where) + 2:] if e.startswith(f"{where}: ") else e for e in errors]
            raise ConfigError(f"{where}: {'; or '.join(forms)}")
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'.{_suggest(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _method_from_dict(data: dict) -> MethodOptions:
    name = data.get("name", "mae")
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'.{_suggest(name, list(METHODS))}")
    return from_dict(METHODS[name].options_class, data, "method")


PATH_KEYS = ("model.init", "data.dataset", "data.root", "data.eval_dataset", "data.eval_root", "train.out_dir",
             "train.resume", "method.teacher_path", "method.codebook_path", "method.tokenizer")
"""Every setting that names a file or folder (``method.*`` ones where the method has them): a leading
``~`` or ``~user`` in them is expanded when a config is built (:func:`expand_paths`), so
``train.out_dir=~/runs/x`` from a YAML file or a quoted override is the home folder, never a folder
named ``~``. Keywords (``fashion_mnist``, ``auto``, ``none``, ``package.module:attr``) are left as they are."""


def expand_paths(cfg: Config) -> Config:
    """Expand ``~`` / ``~user`` at the start of every :data:`PATH_KEYS` setting of ``cfg``, in place
    (returns ``cfg``). An unknown ``~user`` is left as written (:func:`validate` reports it)."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        obj = getattr(cfg, section)
        value = getattr(obj, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(obj, name, os.path.expanduser(value))
    return cfg


def config_from_dict(data: dict) -> Config:
    """Nested dict -> :class:`Config` (strict), with ``~`` expanded in the path settings (:data:`PATH_KEYS`)."""
    sections = {f.name for f in dataclasses.fields(Config)}
    for key in data:
        if key not in sections:
            raise ConfigError(f"unknown config section '{key}'.{_suggest(key, list(sections))}")
    hints = typing.get_type_hints(Config)
    kw = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"section '{key}' must be a mapping, got {value!r}")
        kw[key] = _method_from_dict(value) if key == "method" else from_dict(hints[key], value, key)
    return expand_paths(Config(**kw))


# --------------------------------------------------------------------------------------------------
# files and overrides


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            # switching method resets the method's options to the new method's defaults
            if k == "method" and "name" in v and v["name"] != out[k].get("name"):
                out[k] = dict(v)
            else:
                out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a config YAML (following ``inherit:``) into a nested dict."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Use a file under configs/ or give a full path.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level")
    parent = data.pop("inherit", None)
    if parent:
        data = _deep_merge(read_yaml(path.parent / os.path.expanduser(str(parent))), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (``["a","b","c"]``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. optim.base_lr=1e-3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-3 as a string; numbers are coerced by type later
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        update: dict = {}
        cur = update
        for k in keys[:-1]:
            cur[k] = {}
            cur = cur[k]
        cur[keys[-1]] = value
        data = _deep_merge(data, update)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, validated into a :class:`Config`."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temp file + rename: never a partial file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# value ranges and combinations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUGMENTS = ("rrc_flip", "flip", "none")
RESUME_CHANGES = ("refuse", "allow")
STRATEGIES = ("ddp", "fsdp")
MAX_SEED = 2**32 - 1
"""Largest ``train.seed``: ``numpy.random.seed`` takes ``[0, 2**32)`` (the loop seeds numpy with
``(seed + rank [+ step]) % 2**32``, torch and ``random`` with the sum itself)."""


def _fmt(v: Any) -> str:
    return yaml.safe_dump(to_dict(v), default_flow_style=True).strip().removesuffix("...").strip()


def validate(cfg: Config, *, world_size: int | None = None, check_environment: bool = True) -> None:
    """Check value ranges and combinations of the generic sections (``model``, ``method.masking``
    when the method has one, ``data``, ``optim``, ``train``, ``eval``); raise one
    :class:`ConfigError` listing every problem with its fix. Method-specific options are checked by
    the method's constructor. ``check_environment``: also check what depends on this machine (a
    GPU for ``train.device=cuda`` / ``precision=fp16``, ``train.out_dir`` not being a file).
    ``world_size``: processes of the run (default: ``$WORLD_SIZE`` or 1). Reads and writes nothing
    but ``os.environ``, ``torch.cuda`` and the ``out_dir`` path's type."""
    import math

    problems: list[str] = []

    def need(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
        if not ok:
            problems.append(f"{key}={_fmt(value)} {rule}; {fix}")

    def finite(x: Any) -> bool:
        return isinstance(x, int | float) and math.isfinite(x)

    if world_size is None:
        try:
            world_size = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        except ValueError:
            world_size = 1

    # model shapes
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
    tokens = (math.prod(s // enc.patch_size for s in (sides * 2)[:2])
              if enc.patch_size >= 1 and all(s >= 1 for s in sides) else None)

    # masking (methods that have method.masking); method-specific options are the method's to check
    masking = getattr(cfg.method, "masking", None)
    if masking is not None and hasattr(masking, "ratio"):
        from mimkit.masking import MASKING_KINDS

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
                from mimkit.masking import num_keep as _num_keep

                try:
                    keep = _num_keep(tokens, masking.ratio, None)
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

    # data
    d = cfg.data
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

    # optimisation
    o = cfg.optim
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

    # loop
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
        import torch

        dev = torch.device(t.device) if t.device != "auto" else None
        if dev is not None and dev.type not in ("cpu", "cuda", "mps"):
            device_ok = False
    except (RuntimeError, ValueError):
        device_ok = False
        dev = None
    need(device_ok, "train.device", t.device, "is not a device name", "use auto, cpu, cuda or cuda:<index>")

    # evaluation
    e = cfg.eval
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

    # this machine
    if check_environment and device_ok:
        import torch

        has_cuda = torch.cuda.is_available()
        kind = dev.type if dev is not None else ("cuda" if has_cuda else "cpu")
        if kind == "cuda" and not has_cuda:
            problems.append(f"train.device={t.device} but no CUDA device is visible; use train.device=cpu or auto")
        elif dev is not None and dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            problems.append(f"train.device={t.device} but only {torch.cuda.device_count()} CUDA device(s) are "
                            "visible; use train.device=cuda (torchrun picks one per rank)")
        if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            problems.append("train.device=mps but MPS is not available; use train.device=cpu or auto")
        if t.precision == "fp16" and kind != "cuda":
            problems.append(f"train.precision=fp16 needs a CUDA GPU (the run would use {kind}); use "
                            "train.precision=bf16 or fp32")
        for key in PATH_KEYS:  # config_from_dict expanded ~; what is left names no user of this machine
            section, name = key.split(".")
            v = getattr(getattr(cfg, section), name, None)
            if isinstance(v, str) and v.startswith("~"):
                user = v[1:].split("/", 1)[0]
                problems.append(f"{key}={v}: no user '{user}' on this machine to expand '~{user}'; write the full "
                                "path (or ~/... for your home folder)")
        out = Path(os.path.expanduser(t.out_dir))
        if out.exists() and not out.is_dir():
            problems.append(f"train.out_dir={t.out_dir} is an existing file, not a directory; choose another "
                            "train.out_dir")
        else:
            parent = next((p for p in [out, *out.parents] if p.exists()), None)
            if parent is not None and not parent.is_dir():
                problems.append(f"train.out_dir={t.out_dir} lies under the file {parent}; choose another "
                                "train.out_dir")
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) > 1 else problems[0])
