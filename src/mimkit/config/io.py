"""Config files and overrides: dict <-> dataclasses (strict keys, renamed keys refused with the new
name), YAML files with ``inherit:``, ``section.key=value`` overrides, atomic saving."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mimkit.config.schema import Config
from mimkit.errors import ConfigError
from mimkit.methods import METHODS, MethodOptions

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


RENAMED = {
    "mask_ratio": "ratio",  # the mask ratio: method.masking.ratio (the logged metric mask_ratio is the realised one)
    "n_keep": "num_keep",  # the visible count: method.masking.num_keep
    "count": "num_keep",
    "norm_pix_loss": "norm_target",  # per-patch / per-token target normalisation, every method (MAE's norm_pix_loss)
    "norm_pix": "norm_target",
}
"""Old or other tools' names of a concept -> mimkit's one name for it. Such a key is refused with the
new name, where the section has it (a config of an older mimkit, or a key copied from the official
code, fails in one line instead of being silently ignored or guessed)."""


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with a suggestion (a renamed key
    with its new name, :data:`RENAMED`)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            new = RENAMED.get(key)
            if new in fields:
                new_path = f"{where}.{new}" if where else new
                raise ConfigError(f"config key '{path}' is called '{new_path}' in mimkit (one name per concept across "
                                  f"methods); write {new_path}={value!r}")
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


