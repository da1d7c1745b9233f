"""Methods: one file each, composed from the shared parts, each a :class:`~mimkit.methods.base.Method`.

``METHODS`` maps a config name (``method.name``) to the method class; ``cls.options_class`` is its
options dataclass and ``cls(model_config, options)`` builds it. A plain dict: add a line to register.
"""

from mimkit.methods.base import (
    PICTURES,
    Capabilities,
    DecoderConfig,
    Method,
    MethodOptions,
    ModelConfig,
    PictureData,
    Progress,
    Reconstruction,
    StepOutput,
    TargetCopy,
)
from mimkit.methods.cae import CAE, CAEOptions
from mimkit.methods.cae_v2 import CAEv2, CAEv2Options
from mimkit.methods.emae import EMAE, EMAEOptions
from mimkit.methods.latent_mim import LatentMIM, LatentMIMOptions
from mimkit.methods.mae import MAE, MAEOptions
from mimkit.methods.mixedae import MixedAE, MixedAEOptions
from mimkit.methods.pcae import PCAE, PCAEOptions
from mimkit.methods.sbam import SBAM, SBAMOptions

METHODS: dict[str, type[Method]] = {
    "mae": MAE,
    "emae": EMAE,
    "sbam": SBAM,
    "latent_mim": LatentMIM,
    "mixedae": MixedAE,
    "cae": CAE,
    "cae_v2": CAEv2,
    "pcae": PCAE,
}


def build_method(model: ModelConfig, options: MethodOptions) -> Method:
    """The method named ``options.name``, built from ``model`` shapes and its ``options``."""
    if options.name not in METHODS:
        raise ValueError(f"unknown method {options.name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[options.name](model, options)


__all__ = [
    "METHODS", "PICTURES", "Capabilities", "Method", "Reconstruction", "build_method", "MAE", "MAEOptions", "EMAE",
    "EMAEOptions", "SBAM", "SBAMOptions", "LatentMIM", "LatentMIMOptions", "MixedAE", "MixedAEOptions", "CAE",
    "CAEOptions", "CAEv2", "CAEv2Options", "PCAE", "PCAEOptions", "DecoderConfig", "MethodOptions",
    "ModelConfig", "PictureData", "Progress", "StepOutput", "TargetCopy",
]
