"""PCAE (Li et al., ICLR 2023) — not implemented yet (work in progress)."""

from __future__ import annotations

from dataclasses import dataclass

from mimkit.methods.base import Method, MethodOptions, ModelConfig


@dataclass
class PCAEOptions(MethodOptions):
    name: str = "pcae"


class PCAE(Method):
    options_class = PCAEOptions

    def __init__(self, model: ModelConfig | None = None, options: PCAEOptions | None = None):
        super().__init__()
        raise NotImplementedError("pcae is not implemented yet")
