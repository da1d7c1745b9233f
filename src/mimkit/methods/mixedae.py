"""MixedAE (Chen et al., CVPR 2023) — not implemented yet (work in progress)."""

from __future__ import annotations

from dataclasses import dataclass

from mimkit.methods.base import Method, MethodOptions, ModelConfig


@dataclass
class MixedAEOptions(MethodOptions):
    name: str = "mixedae"


class MixedAE(Method):
    options_class = MixedAEOptions

    def __init__(self, model: ModelConfig | None = None, options: MixedAEOptions | None = None):
        super().__init__()
        raise NotImplementedError("mixedae is not implemented yet")
