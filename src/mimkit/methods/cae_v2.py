"""CAE v2 (Zhang et al., TMLR 2023) — not implemented yet (work in progress)."""

from __future__ import annotations

from dataclasses import dataclass

from mimkit.methods.base import Method, MethodOptions, ModelConfig


@dataclass
class CAEv2Options(MethodOptions):
    name: str = "cae_v2"


class CAEv2(Method):
    options_class = CAEv2Options

    def __init__(self, model: ModelConfig | None = None, options: CAEv2Options | None = None):
        super().__init__()
        raise NotImplementedError("cae_v2 is not implemented yet")
