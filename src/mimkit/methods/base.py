"""What every method shares: the step output, training progress, options and model shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mimkit.nn.vit import ViTConfig


@dataclass
class Progress:
    """Where training is: ``step`` (optimizer steps done), ``total_steps``, fractional ``epoch``
    and ``total_epochs``. ``fraction = step / total_steps`` drives schedules inside methods."""

    step: int = 0
    total_steps: int = 1
    epoch: float = 0.0
    total_epochs: float = 1.0

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))


@dataclass
class StepOutput:
    """``loss``: scalar to back-propagate. ``metrics``: detached scalars (tensors or floats) to log.
    ``pred``/``target``/``plan``: optional extras for pictures and tests."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    pred: torch.Tensor | None = None
    target: torch.Tensor | None = None
    plan: object | None = None


@dataclass
class DecoderConfig:
    """MAE-style decoder shape. Defaults: MAE's 8 x 512, 16 heads."""

    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class ModelConfig:
    """Encoder + decoder shapes shared by all methods."""

    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class MethodOptions:
    """Base of every method's options; ``name`` selects the builder in :data:`mimkit.methods.METHODS`."""

    name: str = "mae"
