"""CAE (Chen et al., IJCV 2023) — not implemented yet (work in progress)."""

from __future__ import annotations

from dataclasses import dataclass

from mimkit.methods.base import Method, MethodOptions, ModelConfig


@dataclass
class CAEOptions(MethodOptions):
    name: str = "cae"


class CAE(Method):
    options_class = CAEOptions

    def __init__(self, model: ModelConfig | None = None, options: CAEOptions | None = None):
        super().__init__()
        raise NotImplementedError("cae is not implemented yet")
