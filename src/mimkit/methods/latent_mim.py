"""Latent MIM (Wei, Gupta, Morgado, ECCV 2024), after yibingwei-1/LatentMIM ``models_lmim.py``. Masked modeling in latent space: an online ViT encodes a few visible patches, a
decoder predicts the latents of the masked patches, a target encoder that sees *only the masked
patches* produces the targets.

One step, shapes for B images, grid L = G*G, n visible, m = L - n targets, P = p*p*C::

    images  (B, C, S, S)  -> resized to G*(p+gap) when gap > 0                  (see "Images" below)
    pix     = gapped_patchify(images, p, gap)             (B, L, P)   random per-cell offsets
    vis, tgt = perm[:, :n], perm[:, n:]                   (B, n), (B, m)  uniform random, permutation order
    [EMA update of target encoder + projector, momentum m(f) = 1 - (1 - 0.99)(1 + cos(pi f))/2]
    z_T     = proj_T(enc_T(pix[tgt], tgt))[:, 1:]         (B, m, D)   no grad, sees targets only
    z_V     = proj(enc(pix[vis], vis))                    (B, 1+n, D) cls first
    pred    = decoder(z_V, vis, tgt)                      (B, m, D)   same order as tgt
    loss    = PatchDisc(pred, z_T) + lambda * [(s(pred) - gamma)^2 + (s(z_V[:, 1:]) - gamma)^2]

Ablation arms are options of :class:`LatentMIMOptions`: ``target`` (``naive``: the
online encoder with gradients through both branches; ``separate``: a second encoder + projector
trained jointly by back-prop, initialised as a copy of the online one; ``stopgrad``: the online
encoder under ``no_grad``; ``ema``), ``loss`` (``patchdisc``, ``mse``, ``l1``, ``huber``),
``masking`` (``ratio`` / ``num_keep``, or another kind such as ``sbam``), ``patch_gap``, ``reg_weight`` (0 = regularizer off), ``decoder``
(``self_attn``, ``cross_attn``, ``cross_attn_cues``; depth and width from ``model.decoder``) and
``projector.kind`` (``none``, ``mlp``). The chain start of the slide tables is ``loss=mse
masking.ratio=0.75 masking.num_keep=null patch_gap=0 reg_weight=0 decoder=self_attn projector.kind=none``.
The official options ``mask_target=False`` (the target encoder sees all patches, in permuted order,
and its last ``m`` outputs are the targets) and ``target_depth`` (a shallower target encoder: the
first ``target_depth`` blocks of the copy, then its final LN and projector) are options too.

Images: the trainer feeds images of the encoder's ``img_size`` (the evaluation size, e.g. 224).
With ``patch_gap > 0`` the method resizes them to ``G*(p+gap)`` (224 -> 280 at ViT-B/16, gap 4;
28 -> 35 for Fashion-MNIST with p=4, gap=1) with ``resize`` interpolation (bicubic, the official
crop interpolation) before the gapped patchify. The official pipeline instead RandomResizedCrops
straight to 280; resizing the augmented 224 crop differs only by a second interpolation of the same
view (slightly softer pixels), and keeps a single data pipeline for every method. Images that already
have size ``G*(p+gap)`` are used as they are. The same encoder evaluates at gap 0 on ``img_size``
images: its conv patch embedding equals the Linear on pre-cut patches used here.

Masking goes through the shared generators (``method.masking``, :mod:`mimkit.masking`): uniform
random by default with the visible count of :func:`mimkit.masking.resolve_num_keep` (the presets set
``num_keep`` to the official ``num_vis``: 20 of 196, 5 of 49), ``block``, or ``sbam`` (salience of the
layer-0 tokens of the gapped patches the encoder sees; ``sbam.amr_mode=sample`` is refused because
PatchDisc needs the same target count in every image).

EMA timing: the target branch (:class:`mimkit.targets.LatentTarget`) is updated in
:meth:`LatentMIM.after_step`, once per optimizer step, with the momentum at the progress after the
step. The official code updates before the next step's target forward with the same momentum and the
same online weights, so the numbers are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.losses import average_patch_similarity, latent_regression, patch_disc, similarity_regularizer
from mimkit.masking import MaskingOptions, MaskPlan, build_mask_generator, resolve_num_keep
from mimkit.methods.base import (
    Capabilities,
    Method,
    MethodOptions,
    ModelConfig,
    Progress,
    StepOutput,
    TargetCopy,
    draw_plan,
)
from mimkit.nn.cross_decoder import DECODERS, build_latent_decoder
from mimkit.nn.patch import gapped_patchify
from mimkit.nn.projector import MLPProjector
from mimkit.nn.vit import ViTEncoder, gather_tokens
from mimkit.targets import LATENT_TARGETS, LatentTarget, MomentumSchedule, cosine_schedule

TARGETS = LATENT_TARGETS
LOSSES = ("patchdisc", "mse", "l1", "huber")
MASKING_KINDS = ("random", "block", "sbam")


@dataclass
class ProjectorOptions:
    """``kind``: ``mlp`` (official: 3 bias-free Linears, hidden 4096, LN after each) or ``none``."""

    kind: str = "mlp"
    depth: int = 3
    hidden_dim: int = 4096
    out_norm: bool = True


@dataclass
class LatentMIMOptions(MethodOptions):
    """Latent MIM knobs; defaults = the published ViT-B / IN-1K recipe.

    * ``target``: ``ema`` | ``naive`` | ``separate`` | ``stopgrad``; ``momentum`` -> ``momentum_final``
      along a cosine over training (0.99 -> 1.0). ``target_depth``: blocks of the target encoder
      (``None`` = all, the official ``target_depth: 12``). ``mask_target``: the target encoder sees only
      the masked patches (official default) or, when false, all patches.
    * ``loss``: ``patchdisc`` (``tau`` 0.2, x 2 tau) | ``mse`` | ``l1`` | ``huber`` (elementwise,
      ``huber_delta``; the slides give no delta). For the regression losses ``norm_target`` normalizes
      each target token over its channels (LN without affine, the official ``norm_l2``).
    * ``masking``: the shared masking options; ratio 0.9 with ``num_keep`` = the official ``num_vis``
      (20 at 196 tokens; ``None`` uses MAE's floor rule, 19 at 196).
    * ``patch_gap``: pixels between patch cells (4 at p=16); offsets drawn in ``[0, gap-1]``.
      ``resize``: interpolation used to bring images to ``G*(p+gap)`` (module docstring).
    * ``reg_weight``: lambda of the similarity regularizer (0.1 in the README command; 0 = off);
      ``reg_gamma``: its target gamma, cosine from the first to the second value.
    * ``decoder``: ``cross_attn_cues`` | ``cross_attn`` | ``self_attn``.
    """

    name: str = "latent_mim"
    target: str = "ema"
    momentum: float = 0.99
    momentum_final: float = 1.0
    target_depth: int | None = None
    mask_target: bool = True
    loss: str = "patchdisc"
    tau: float = 0.2
    huber_delta: float = 1.0
    norm_target: bool = True
    masking: MaskingOptions = field(default_factory=lambda: MaskingOptions(kind="random", ratio=0.9, num_keep=20))
    patch_gap: int = 4
    resize: str = "bicubic"
    reg_weight: float = 0.1
    reg_gamma: tuple[float, float] = (0.75, 0.25)
    decoder: str = "cross_attn_cues"
    projector: ProjectorOptions = field(default_factory=ProjectorOptions)


def build_projector(dim: int, opts: ProjectorOptions) -> nn.Module:
    if opts.kind == "none":
        return nn.Identity()
    if opts.kind == "mlp":
        return MLPProjector(dim, opts.hidden_dim, dim, opts.depth, opts.out_norm)
    raise ValueError(f"unknown projector {opts.kind!r}; choose none or mlp")


def _check_choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


class LatentMIM(Method):
    """``encoder`` (:class:`ViTEncoder`, the exported backbone), ``projector``, ``decoder``, and
    ``target`` (:class:`~mimkit.targets.LatentTarget` over the encoder + projector; for ``ema`` and
    ``separate`` it holds the copy)."""

    options_class = LatentMIMOptions
    # the projector's 4096-wide hidden layer dwarfs a tiny encoder
    smoke_overrides = ("method.projector.hidden_dim=64",)

    def __init__(self, model: ModelConfig | None = None, options: LatentMIMOptions | None = None):
        super().__init__()
        model = model or ModelConfig()
        opts = self.options = options or LatentMIMOptions()
        _check_choice("target", opts.target, TARGETS)
        _check_choice("loss", opts.loss, LOSSES)
        _check_choice("decoder", opts.decoder, DECODERS)
        _check_choice("masking kind for latent_mim", opts.masking.kind, MASKING_KINDS)
        if opts.masking.kind == "sbam" and opts.masking.sbam.amr_mode == "sample":
            raise ValueError("latent_mim needs the same number of targets in every image (PatchDisc); "
                             "use method.masking.sbam.amr_mode=batch or off")
        if opts.patch_gap < 0:
            raise ValueError(f"patch_gap must be >= 0, got {opts.patch_gap}")
        self.encoder = ViTEncoder(model.encoder)
        dim = self.encoder.embed_dim
        depth = len(self.encoder.blocks)
        if opts.target_depth is not None and not 1 <= opts.target_depth <= depth:
            raise ValueError(f"target_depth must be in [1, {depth}], got {opts.target_depth}")
        if opts.target_depth is not None and opts.target in ("naive", "stopgrad"):
            raise ValueError("target_depth needs a separate target encoder (target=ema or separate)")
        self.masking = build_mask_generator(opts.masking)
        if opts.masking.kind == "random":
            n = resolve_num_keep(self.encoder.num_patches, opts.masking.ratio, opts.masking.num_keep)
            if n >= self.encoder.num_patches:
                raise ValueError(f"latent_mim needs at least one target; method.masking keeps all {n} tokens")
        self.projector = build_projector(dim, opts.projector)
        d = model.decoder
        self.decoder = build_latent_decoder(
            opts.decoder, dim, dim, self.encoder.grid_size, d.embed_dim, d.depth, d.num_heads, d.mlp_ratio
        )
        online = nn.ModuleDict({"encoder": self.encoder, "projector": self.projector})
        self.target = LatentTarget(opts.target, online, MomentumSchedule(opts.momentum, opts.momentum_final))
        if opts.target_depth is not None:
            branch = self.target.branch["encoder"]
            branch.blocks = branch.blocks[: opts.target_depth]

    @property
    def capabilities(self) -> Capabilities:
        pics = ("views",) + (("salience",) if self.options.masking.kind == "sbam" else ())
        return Capabilities(pictures=pics, find_unused_parameters=False, masking_kinds=MASKING_KINDS)

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def train_hw(self) -> tuple[int, int]:
        """Image ``(H, W)`` the gapped patchify needs: ``(G_h * (p + gap), G_w * (p + gap))``."""
        cell = self.encoder.patch_size + self.options.patch_gap
        return self.encoder.grid_size[0] * cell, self.encoder.grid_size[1] * cell

    @property
    def train_size(self) -> int | tuple[int, int]:
        """Image side the gapped patchify needs, ``G * (p + gap)`` (``(H, W)`` for a non-square grid)."""
        h, w = self.train_hw
        return h if h == w else (h, w)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` at ``img_size`` (or already at :attr:`train_hw`) -> ``(B, C, T_h, T_w)`` at :attr:`train_hw`."""
        size = self.train_hw
        if tuple(images.shape[-2:]) == size:
            return images
        hw = self.encoder.img_hw
        if tuple(images.shape[-2:]) != hw:
            raise ValueError(
                f"expected images of {hw[0]}x{hw[1]} (or {size[0]}x{size[1]}), got {tuple(images.shape[-2:])}"
            )
        return F.interpolate(images, size=size, mode=self.options.resize, align_corners=False)

    @staticmethod
    def _encode(branch: nn.Module, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Pixel patches ``(B, k, P)`` at grid ids ``(B, k)`` through ``branch`` (encoder + projector) ->
        ``(B, 1+k, D)``: embed + positions, cls, blocks, final LN, projector (cls included)."""
        enc = branch["encoder"]
        return branch["projector"](enc.forward_tokens(enc.pixel_tokens(patches, ids)))

    def encode_target(self, pix: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """Target latents ``(B, m, D)`` of the target ids (cls dropped), per ``options.target`` and
        ``mask_target``; rows in the order of ``plan.target_ids()``."""
        tgt_ids = plan.target_ids()
        ids = tgt_ids if self.options.mask_target else torch.cat([plan.ids_keep, tgt_ids], dim=1)
        z = self.target(lambda branch: self._encode(branch, gather_tokens(pix, ids), ids))
        return z[:, -tgt_ids.shape[1]:]

    def gamma(self, progress: Progress | None) -> float:
        start, end = self.options.reg_gamma
        return cosine_schedule(start, end, progress.fraction if progress is not None else 0.0)

    def make_plan(self, images: torch.Tensor, progress: Progress | None = None,
                  generator: torch.Generator | None = None, *, tokens: torch.Tensor | None = None) -> MaskPlan:
        """Masking for ``images``; salience-based kinds score the layer-0 tokens of the gapped patches
        (drawn with ``generator`` when ``tokens`` is not given)."""
        if tokens is None and self.masking.needs_tokens:
            pix = gapped_patchify(self.prepare_images(images), self.encoder.patch_size, self.options.patch_gap, generator)
            tokens = self._layer0(pix)
        if tokens is not None:
            return draw_plan(self.masking, self.encoder, None, progress, generator, tokens=tokens)
        return draw_plan(self.masking, self.encoder, images, progress, generator)

    def _layer0(self, pix: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(pix.shape[1], device=pix.device).expand(pix.shape[0], -1)
        return self.encoder.pixel_tokens(pix, ids)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.loss == "patchdisc":
            return patch_disc(pred, target, o.tau)
        if o.norm_target:
            target = F.layer_norm(target.float(), target.shape[-1:], eps=1e-6)
        return latent_regression(pred, target, o.loss, o.huber_delta)

    # -- step -----------------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        progress: Progress | None = None,
        *,
        plan: MaskPlan | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """``images (B, C, S, S)`` -> :class:`StepOutput` with ``pred``/``target`` ``(B, m, D)`` in the
        order of ``plan.target_ids()``. ``generator`` drives the mask and the gap offsets."""
        o = self.options
        images = self.prepare_images(images)
        pix = gapped_patchify(images, self.encoder.patch_size, o.patch_gap, generator)  # (B, L, P)
        if plan is None:
            tokens = self._layer0(pix) if self.masking.needs_tokens else None
            plan = self.make_plan(images, progress, generator, tokens=tokens)
        if plan.num_views != 1 or plan.keep_valid is not None:
            raise ValueError("latent_mim takes one view per image with equal visible counts")
        vis_ids, tgt_ids = plan.ids_keep, plan.target_ids()  # both in permutation order

        metrics: dict[str, torch.Tensor | float] = {}
        if o.target == "ema":
            metrics["ema_momentum"] = self.target.momentum(progress)

        z_t = self.encode_target(pix, plan)  # (B, m, D)
        z_v = self._encode(self.target.online, gather_tokens(pix, vis_ids), vis_ids)  # (B, 1+n, D)
        pred = self.decoder(z_v, vis_ids, tgt_ids)  # (B, m, D)

        main = self.loss(pred, z_t)
        gamma = self.gamma(progress)
        loss = main
        if o.reg_weight > 0:
            reg = similarity_regularizer(pred, z_v[:, 1:], gamma)
            loss = loss + o.reg_weight * reg
            metrics["loss_reg"] = reg.detach()
        metrics.update(
            {
                f"loss_{o.loss}": main.detach(),
                "gamma": gamma,
                "sim_pred": average_patch_similarity(pred.detach()),
                "sim_vis": average_patch_similarity(z_v[:, 1:].detach()),
                "sim_trg": average_patch_similarity(z_t.detach()),
            }
        )
        return StepOutput(loss, metrics, pred=pred, target=z_t, plan=plan)

    def after_step(self, progress: Progress) -> None:
        """EMA update of the target branch (``target=ema``), once per optimizer step (module doc)."""
        self.target.update(progress)

    def target_copies(self) -> tuple[TargetCopy, ...]:
        """The target encoder + projector of ``target=ema`` / ``separate`` (``target.branch``), a copy of
        the online ones (its first ``target_depth`` blocks); none for ``naive`` / ``stopgrad``."""
        if self.target.branch is None:
            return ()
        return (TargetCopy("target.branch", self.target.branch, self.target.online),)
