"""Typed configuration: dataclasses, YAML files, ``key=value`` overrides, strict key checking.

A run's config has five sections: ``model`` (encoder/decoder shapes), ``method`` (``name`` selects
the method; the other keys are that method's options dataclass), ``data``, ``optim``, ``train`` and
``eval``. Unknown keys raise :class:`ConfigError` with the closest valid key as a suggestion.
YAML files may ``inherit: other.yaml`` (path relative to the file) and override parts of it.
"""

from __future__ import annotations

import dataclasses
import difflib
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
    otherwise a DataLoader with ``num_workers`` processes. ``batch_size`` is per process."""

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
    limit: int | None = None


@dataclass
class OptimConfig:
    """AdamW with MAE's grouping; ``lr = base_lr * effective_batch / 256`` unless ``lr`` is set.
    Warmup and cosine are per iteration over fractional epochs (methods_b §2.5). MAE warms up from 0;
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
    step-numbered copies ``checkpoint-<step>.pt`` (-1 = all; for accuracy-vs-epoch reports). ``precision``: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` (also on
    CPUs with bf16 instructions), ``fp16`` (GPU, with a grad scaler)."""

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
    num_threads: int | None = None
    progress_bar: bool = True
    tensorboard: bool = True


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


def config_from_dict(data: dict) -> Config:
    """Nested dict -> :class:`Config` (strict)."""
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
    return Config(**kw)


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
    path = Path(path)
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
        data = _deep_merge(read_yaml(path.parent / parent), data)
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
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
