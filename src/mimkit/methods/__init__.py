"""Methods: one file each, composed from the shared parts. ``METHODS`` maps a config name to
``(options dataclass, builder)``; the builder takes ``(ModelConfig, options)`` and returns an
``nn.Module`` with ``encoder``, ``forward(images, progress) -> StepOutput`` and ``after_step``."""

from mimkit.methods.base import DecoderConfig, MethodOptions, ModelConfig, Progress, StepOutput
from mimkit.methods.mae import MAE, MAEOptions, build_mae

METHODS: dict[str, tuple[type, object]] = {
    "mae": (MAEOptions, build_mae),
}

__all__ = [
    "METHODS", "MAE", "MAEOptions", "DecoderConfig", "MethodOptions", "ModelConfig", "Progress", "StepOutput",
]
