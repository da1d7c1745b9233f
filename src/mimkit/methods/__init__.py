"""Methods: one file each, composed from the shared parts. ``METHODS`` maps a config name to
``(options dataclass, builder)``; the builder takes ``(ModelConfig, options)`` and returns an
``nn.Module`` with ``encoder``, ``forward(images, progress) -> StepOutput`` and ``after_step``."""

from mimkit.methods.base import DecoderConfig, MethodOptions, ModelConfig, Progress, StepOutput
from mimkit.methods.emae import EMAEOptions, build_emae
from mimkit.methods.latent_mim import LatentMIMOptions, build_latent_mim
from mimkit.methods.mae import MAE, MAEOptions, build_mae
from mimkit.methods.sbam import SBAMOptions, build_sbam

METHODS: dict[str, tuple[type, object]] = {
    "mae": (MAEOptions, build_mae),
    "emae": (EMAEOptions, build_emae),
    "sbam": (SBAMOptions, build_sbam),
    "latent_mim": (LatentMIMOptions, build_latent_mim),
}

__all__ = [
    "METHODS", "MAE", "MAEOptions", "DecoderConfig", "MethodOptions", "ModelConfig", "Progress", "StepOutput",
]
