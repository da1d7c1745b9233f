"""The method contract: what the trainer, CLI, evaluation and pictures rely on, and nothing else.

A method is an ``nn.Module`` subclass of :class:`Method`::

    model = METHODS[name](ModelConfig, options)           # options: the class's ``options_class``
    plan  = model.make_plan(images, progress, generator)  # MaskPlan for images (B, C, H, W)
    out   = model(images, progress, plan=None, generator=None)   # StepOutput(loss, metrics, ...)
    model.after_step(progress)                            # once per optimizer step (EMA, schedules)
    model.check_batch_size(n)                             # ValueError naming the fix, before any data
    model.encoder                                         # the ViT that is evaluated and exported
    model.capabilities                                    # Capabilities(pictures, find_unused_parameters)
    model.reconstruct(images, plan)                       # Reconstruction, when "reconstruction" in pictures

``progress`` is :class:`Progress` (``None`` outside training: no schedules, warm starts off).
Methods with extra knobs on ``forward`` (MAE's ``noise=`` to reproduce the official masking) take
them as keyword-only arguments beside these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

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
    """Encoder + decoder shapes shared by all methods.

    ``init``: start pretraining from these weights (:mod:`mimkit.init_from`): an official MAE
    pretraining checkpoint, a timm ViT state dict / safetensors file, a mimkit checkpoint or export, or
    a Hugging Face ``ViTMAEForPreTraining`` directory; ``null`` = random initialisation. ``init_parts``:
    ``all`` (every matching tensor: encoder, decoder, ...) or ``encoder`` (the rest starts fresh)."""

    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    init: str | None = None
    init_parts: str = "all"


@dataclass
class MethodOptions:
    """Base of every method's options; ``name`` selects the builder in :data:`mimkit.methods.METHODS`."""

    name: str = "mae"


PICTURES = ("reconstruction", "views", "salience", "mixing", "teacher_drops", "regressor")
"""Picture kinds a method may declare (drawn by :mod:`mimkit.viz`): ``reconstruction`` (pixel
predictions, :meth:`Method.reconstruct`), ``views`` (the mask plan: each view's visible part),
``salience`` (SBAM's salience and the mask it chose), ``mixing`` (MixedAE's mixed input and unmixed
reconstructions), ``teacher_drops`` (PCAE's retained teacher tokens per stage), ``regressor`` (CAE's
predicted vs aligned latents)."""


@dataclass(frozen=True)
class Capabilities:
    """What a method declares instead of being probed with ``hasattr``.

    ``pictures``: the picture kinds of :data:`PICTURES` it can draw. ``find_unused_parameters``:
    DDP must look for parameters without gradients (a branch that is skipped in some steps).
    ``masking_kinds``: the ``method.masking.kind`` values it accepts (it refuses the others when built)."""

    pictures: tuple[str, ...] = ("views",)
    find_unused_parameters: bool = False
    masking_kinds: tuple[str, ...] = ("random",)

    def __post_init__(self):
        unknown = [p for p in self.pictures if p not in PICTURES]
        if unknown:
            raise ValueError(f"unknown picture kinds {unknown}; known: {', '.join(PICTURES)}")


@dataclass
class Reconstruction:
    """Pixel predictions for pictures, first view of each image: ``pred (B, L, P)`` in grid order and
    in target space (per-patch normalized when ``norm_pix``), ``mask (B, L)`` 1 = predicted (hidden
    from the encoder), ``plan`` the plan used."""

    pred: torch.Tensor
    mask: torch.Tensor
    norm_pix: bool
    plan: object | None = None


class Method(nn.Module):
    """Base class of every method (module docstring). Subclasses set ``options_class`` and implement
    :meth:`make_plan` and :meth:`forward`; the rest has defaults."""

    options_class: ClassVar[type] = MethodOptions
    encoder: nn.Module

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def make_plan(self, images: torch.Tensor, progress: Progress | None = None,
                  generator: torch.Generator | None = None) -> object:
        """The masking for ``images (B, C, H, W)`` (a :class:`~mimkit.masking.MaskPlan`)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, progress: Progress | None = None, *, plan=None,
                generator: torch.Generator | None = None) -> StepOutput:
        raise NotImplementedError

    def after_step(self, progress: Progress) -> None:
        """Called by the trainer once per optimizer step, after it (EMA updates, schedules)."""

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ``ValueError`` (naming the fix) when the method cannot train on batches of ``batch_size``
        images per process (e.g. MixedAE needs a multiple of its group size). The trainer calls it
        before loading any data."""

    def reconstruct(self, images: torch.Tensor, plan) -> Reconstruction:
        """Pixel predictions for a reconstruction picture (methods declaring ``reconstruction``)."""
        raise NotImplementedError(f"{type(self).__name__} does not predict pixels; it draws "
                                  f"{', '.join(self.capabilities.pictures)}")


def draw_plan(masking, encoder, images: torch.Tensor | None = None, progress: Progress | None = None,
              generator: torch.Generator | None = None, *, tokens: torch.Tensor | None = None,
              noise: torch.Tensor | None = None):
    """Call a :class:`~mimkit.masking.MaskGenerator` for ``encoder``'s token grid.

    Give ``images (B, C, H, W)`` or the layer-0 ``tokens (B, L, D)`` (used as they are when the
    generator needs tokens: SBAM's salience; computed from ``images`` otherwise)."""
    if tokens is None:
        if images is None:
            raise ValueError("draw_plan needs images or tokens")
        b, length = images.shape[0], encoder.num_patches
        if masking.needs_tokens:
            tokens = encoder.patch_tokens(images)
        device = images.device
    else:
        b, length, device = tokens.shape[0], tokens.shape[1], tokens.device
    return masking(b, length, device, generator=generator, noise=noise,
                   tokens=tokens if masking.needs_tokens else None, progress=progress, grid=encoder.grid_size)
