"""The method contract: what the trainer, CLI, evaluation and pictures rely on, and nothing else.

A method is an ``nn.Module`` subclass of :class:`Method`::

    model = METHODS[name](ModelConfig, options)           # options: the class's ``options_class``
    plan  = model.make_plan(images, progress, generator)  # MaskPlan for images (B, C, H, W)
    out   = model(images, progress, plan=None, generator=None)   # StepOutput(loss, metrics, ...)
    model.after_micro_batch(progress)                     # after each micro-batch's backward (accumulation)
    model.after_step(progress)                            # once per optimizer step (EMA, schedules)
    model.check_batch_size(n)                             # ValueError naming the fix, before any data
    model.encoder                                         # the ViT that is evaluated and exported
    model.capabilities                                    # Capabilities(pictures, find_unused_parameters)
    model.reconstruct(images, plan)                       # Reconstruction, when "reconstruction" in pictures
    model.picture_data(kind, images, generator)           # PictureData: the tensors of a declared picture
    model.target_copies()                                 # TargetCopy per branch that starts as a copy
    cls.offline_overrides, cls.smoke_overrides            # config overrides: no files / tiny shapes

``progress`` is :class:`Progress` (``None`` outside training: no schedules, warm starts off).

Order of the hooks in one optimizer step of ``k = progress.micro_batches`` micro-batches (the trainer's
``optim.accum_iter``; :class:`~mimkit.train.step.Accumulator`): for ``j = 0 .. k-1``: ``forward`` ->
``backward`` -> ``after_micro_batch(progress with micro_batch=j)``; then the optimizer step, then
``after_step(progress)`` with ``progress.step`` counting that step. So micro-batch ``j + 1``'s forward
sees what ``after_micro_batch`` did after micro-batch ``j`` (PCAE's per-iteration EMA teacher). A loop
without accumulation (``k = 1``) may call ``after_step`` alone: a method must give the ``k = 1``
behaviour from ``after_step`` when ``after_micro_batch`` was not called.

Methods with extra knobs on ``forward`` (MAE's ``noise=`` to reproduce the official masking) take
them as keyword-only arguments beside these.

Everything outside ``methods/`` (the trainer, pictures, weight import, the bench, the tests that run
every method) uses these names only: a method's own attributes (its group size, its teacher, its
masking generator) stay inside its file. Pictures: a method computes the data (:meth:`picture_data`),
:mod:`mimkit.viz` draws it. Weight import (:mod:`mimkit.init_from`) re-initialises the copies listed by
:meth:`target_copies` from the loaded online weights. The bench and the tests build every method
offline from its presets with :meth:`Method.preset_overrides`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mimkit.masking import MaskPlan
from mimkit.nn.vit import ViTConfig


@dataclass
class Progress:
    """Where training is: ``step`` (optimizer steps done), ``total_steps``, fractional ``epoch``
    and ``total_epochs``. ``fraction = step / total_steps`` drives schedules inside methods.

    ``micro_batches``: micro-batches per optimizer step (gradient accumulation, the trainer's
    ``optim.accum_iter``; 1 without); ``micro_batch``: the index ``0 .. micro_batches - 1`` of the
    micro-batch just back-propagated, set in the progress given to :meth:`Method.after_micro_batch`
    (0 elsewhere)."""

    step: int = 0
    total_steps: int = 1
    epoch: float = 0.0
    total_epochs: float = 1.0
    micro_batch: int = 0
    micro_batches: int = 1

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
    plan: MaskPlan | None = None


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
"""Picture kinds a method may declare (drawn by :mod:`mimkit.viz` from :meth:`Method.picture_data`):
``reconstruction`` (pixel predictions, :meth:`Method.reconstruct`), ``views`` (the mask plan: each view's
visible part), ``salience`` (a salience-based masking's salience and the mask it chose), ``mixing``
(several images mixed into one sequence and each one's reconstruction), ``teacher_drops`` (the teacher
tokens retained after each drop stage), ``regressor`` (latent-regressor predictions vs their targets).
What each kind's :class:`PictureData` holds is listed there."""


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
    in target space (per-patch normalized when ``norm_target``), ``mask (B, L)`` 1 = predicted (hidden
    from the encoder), ``plan`` the plan used."""

    pred: torch.Tensor
    mask: torch.Tensor
    norm_target: bool
    plan: MaskPlan | None = None


@dataclass
class PictureData:
    """The tensors of one picture, from :meth:`Method.picture_data`; :mod:`mimkit.viz` draws them and
    reads nothing else of the method (only ``model.encoder``'s patch geometry).

    ``images (B, C, H, W)``: the normalized inputs the picture shows (the method may show fewer than it
    was given); ``plan``: the mask plan drawn for them. Per kind of :data:`PICTURES`:

    * ``reconstruction``: ``reconstruction`` (:meth:`Method.reconstruct` on ``images`` and ``plan``).
    * ``views``: the plan alone (each view's visible part).
    * ``salience``: ``maps["salience"] (B, L)`` in [0, 1]; the chosen mask is ``plan.mask``.
    * ``mixing``: ``images`` one group of ``G`` images mixed into one sequence, ``reconstruction`` each
      image decoded from its own tokens, ``maps["mixed"] (1, C, H, W)`` the mixed input in pixel space and
      ``maps["owner"] (G, L)`` the image (0..G-1) that owns each position.
    * ``teacher_drops``: ``stages``: ``(title, ids (B, k))`` per stage, the grid ids of the tokens the
      teacher holds (its input, then after each drop stage).
    * ``regressor``: ``maps["cos"] (B, L)`` the cosine between prediction and target at the masked
      patches (NaN at visible ones) and a ``title``.
    """

    images: torch.Tensor
    plan: MaskPlan
    reconstruction: Reconstruction | None = None
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    stages: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    title: str | None = None


@dataclass(frozen=True)
class TargetCopy:
    """A target branch that starts as a copy of online modules (an EMA teacher; Latent MIM's ``separate``
    target encoder): ``prefix`` is its state-dict prefix in the method (``"target.branch"``), ``branch``
    the copy and ``online`` the modules it copies. A frozen teacher (its own weights) and a stop-gradient
    arm (the online weights themselves) are not copies."""

    prefix: str
    branch: nn.Module
    online: nn.Module

    @torch.no_grad()
    def sync(self) -> None:
        """Set the copy to the online modules' current weights (a copy that holds fewer blocks, e.g. a
        shallower target encoder, takes the ones it has)."""
        own = self.branch.state_dict()
        online = self.online.state_dict()
        self.branch.load_state_dict({k: online[k] for k in own})


class Method(nn.Module):
    """Base class of every method (module docstring). Subclasses set ``options_class`` and implement
    :meth:`make_plan` and :meth:`forward`; the rest has defaults.

    ``offline_overrides``: config overrides (``key=value``) that let the method's presets train with no
    file that only a prepared machine has (a tokenizer, a teacher checkpoint): stand-ins that exercise
    the same code. ``smoke_overrides``: on top of those, what shrinks the method's own parts (projector
    widths, a teacher's shape) when ``model.*`` is shrunk to a tiny ViT (smoke runs, tests). Both are
    declared by the method; :meth:`preset_overrides` joins them."""

    options_class: ClassVar[type] = MethodOptions
    offline_overrides: ClassVar[tuple[str, ...]] = ()
    smoke_overrides: ClassVar[tuple[str, ...]] = ()
    encoder: nn.Module

    @classmethod
    def preset_overrides(cls, smoke: bool = False) -> list[str]:
        """``offline_overrides`` (plus ``smoke_overrides`` when ``smoke``): apply after the preset and a
        tiny ``model.*`` shape, before the caller's own overrides."""
        return [*cls.offline_overrides, *(cls.smoke_overrides if smoke else ())]

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def make_plan(self, images: torch.Tensor, progress: Progress | None = None,
                  generator: torch.Generator | None = None) -> MaskPlan:
        """The masking for ``images (B, C, H, W)``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, progress: Progress | None = None, *, plan: MaskPlan | None = None,
                generator: torch.Generator | None = None) -> StepOutput:
        raise NotImplementedError

    def after_micro_batch(self, progress: Progress) -> None:
        """Called by the trainer after each micro-batch's backward pass, before the next micro-batch's
        forward (and, after the last one, before the optimizer step and :meth:`after_step`).
        ``progress``: the step's progress (``step`` = optimizer steps done before this one) with
        ``micro_batch`` = the index of the micro-batch just done and ``micro_batches`` = k. For state that
        must change between micro-batches (PCAE's EMA teacher, updated after every iteration as in its
        official loop). Default: nothing. The trainer undoes what it changed in the method's tensors
        outside the optimizer when the step is skipped (non-finite) or abandoned
        (:class:`~mimkit.train.step.AfterStepGuard`)."""

    def after_step(self, progress: Progress) -> None:
        """Called by the trainer once per optimizer step, after it (EMA updates, schedules); ``progress.step``
        counts that step."""

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ``ValueError`` (naming the fix) when the method cannot train on batches of ``batch_size``
        images per process (e.g. MixedAE needs a multiple of its group size). The trainer calls it
        before loading any data."""

    def preflight(self, fresh: bool) -> None:
        """Raise ``ValueError`` (naming the fix) when a run cannot start. The trainer calls it before it
        writes anything into the run directory; ``fresh``: no checkpoint or ``model.init`` file will be
        loaded, so what only a checkpoint could supply (CAE v2's teacher, CAE's codebook) must exist now."""

    def set_input_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """The training data's per-channel normalisation, given by the trainer once the data is built;
        for methods that work in pixel space (CAE v2's colour jitter). Default: not needed."""

    def reconstruct(self, images: torch.Tensor, plan: MaskPlan) -> Reconstruction:
        """Pixel predictions for a reconstruction picture (methods declaring ``reconstruction``)."""
        raise NotImplementedError(f"{type(self).__name__} does not predict pixels; it draws "
                                  f"{', '.join(self.capabilities.pictures)}")

    def picture_data(self, kind: str, images: torch.Tensor,
                     generator: torch.Generator | None = None) -> PictureData:
        """The data of picture ``kind`` (one of ``capabilities.pictures``) for normalized ``images
        (B, C, H, W)``, the mask drawn with ``generator`` (:class:`PictureData` says what each kind holds).
        Call in eval mode under ``no_grad``. The base class gives ``views``, ``reconstruction`` and
        ``salience`` from :meth:`make_plan` and :meth:`reconstruct`; a method declaring another kind
        overrides this for it."""
        pics = self.capabilities.pictures
        if kind not in pics:
            raise ValueError(f"{type(self).__name__} does not draw '{kind}' pictures; it draws: {', '.join(pics)}")
        plan = self.make_plan(images, None, generator)
        if kind == "views":
            return PictureData(images, plan)
        if kind == "reconstruction":
            return PictureData(images, plan, reconstruction=self.reconstruct(images, plan))
        if kind == "salience":
            return PictureData(images, plan, maps={"salience": plan.scores})
        raise NotImplementedError(f"{type(self).__name__} declares '{kind}' pictures but gives no data for them")

    def target_copies(self) -> tuple[TargetCopy, ...]:
        """The target branches that start as copies of online modules (EMA teachers), which
        :mod:`mimkit.init_from` re-initialises from the loaded online weights when the file does not hold
        them. Default: none (a frozen teacher and a stop-gradient arm are not copies)."""
        return ()


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
