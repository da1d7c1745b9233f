"""Typed configuration: dataclasses, YAML files, ``key=value`` overrides, strict key checking.

A run's config has five sections: ``model`` (encoder/decoder shapes), ``method`` (``name`` selects
the method; the other keys are that method's options dataclass), ``data``, ``optim``, ``train`` and
``eval``. Unknown keys raise :class:`ConfigError` with the closest valid key as a suggestion.
YAML files may ``inherit: other.yaml`` (path relative to the file) and override parts of it.
A leading ``~`` / ``~user`` in a path setting (:data:`PATH_KEYS`) is expanded when the config is built.
"""

from mimkit.config.io import (
    PATH_KEYS,
    apply_overrides,
    config_from_dict,
    expand_paths,
    from_dict,
    load_config,
    parse_override,
    read_yaml,
    save_config,
    to_dict,
)
from mimkit.config.schema import (
    AUGMENTS,
    MAX_SEED,
    PRECISIONS,
    RESUME_CHANGES,
    STRATEGIES,
    Config,
    DataConfig,
    EvalConfig,
    OptimConfig,
    TrainConfig,
)
from mimkit.config.validate import validate
from mimkit.errors import ConfigError

__all__ = [
    "AUGMENTS", "MAX_SEED", "PATH_KEYS", "PRECISIONS", "RESUME_CHANGES", "STRATEGIES", "Config", "ConfigError",
    "DataConfig", "EvalConfig", "OptimConfig", "TrainConfig", "apply_overrides", "config_from_dict", "expand_paths",
    "from_dict", "load_config", "parse_override", "read_yaml", "save_config", "to_dict", "validate",
]
