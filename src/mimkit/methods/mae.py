"""MAE (He et al., CVPR 2022), faithful to facebookresearch/mae ``models_mae.py``.

One step, shapes for B images, L patches, n visible, P = p*p*C::

    tokens  = encoder.patch_tokens(images)                 (B, L, D)   positions added before masking
    plan    = masking(B, L)                                ids_keep (B, n), ids_restore (B, L), mask (B, L)
    latent  = encoder.forward_tokens(gather(tokens, ids))  (B, 1+n, D) cls prepended, final norm
    pred    = decoder(latent, ids_restore)                 (B, L, P)   mask tokens after visible, unshuffle
    target  = norm_pix(patchify(images))                   (B, L, P)
    loss    = sum(mask * mse_per_patch) / sum(mask)        over all masked patches of the batch

Subclasses change the masking (SBAM), the number of views (EMAE) or the loss, and reuse the rest.

``target: ema`` (not in MAE; a composition the shared parts allow, e.g. EMAE's views with a latent
target): the decoder predicts, at every masked position, the patch token of an EMA copy of the encoder
run on the whole image (after its final LayerNorm; with ``norm_target`` also standardised per token),
``(B, L, D)``; the copy starts equal to the encoder and moves once per optimizer step with Latent MIM's
cosine momentum schedule (``momentum`` -> ``momentum_final``, :class:`~mimkit.targets.LatentTarget`).
Loss and masking are MAE's (or the subclass's). It is the plain "EMA target + MSE" arm of Latent MIM's
ablation without its projector, gap or PatchDisc; no reconstruction picture (no pixels are predicted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mimkit.losses import masked_mse
from mimkit.masking import MASKING_KINDS, MaskingOptions, MaskPlan, build_mask_generator
from mimkit.methods.base import (
    Capabilities,
    Method,
    MethodOptions,
    ModelConfig,
    Progress,
    Reconstruction,
    StepOutput,
    TargetCopy,
    draw_plan,
)
from mimkit.nn.decoder import MAEDecoder
from mimkit.nn.vit import ViTEncoder, gather_tokens
from mimkit.targets import LatentTarget, MomentumSchedule, PixelTarget

MAE_TARGETS = ("pixel", "ema")


@dataclass
class MAEOptions(MethodOptions):
    """MAE knobs. ``norm_target`` (per-patch normalized pixel targets: the official code's ``norm_pix_loss``) is on in every published MAE run (off in argparse only).

    ``target``: ``pixel`` (MAE) or ``ema`` (the patch tokens of an EMA copy of the encoder, module
    docstring; ``momentum`` -> ``momentum_final`` is its cosine schedule, Latent MIM's defaults)."""

    name: str = "mae"
    norm_target: bool = True
    masking: MaskingOptions = field(default_factory=MaskingOptions)
    target: str = "pixel"
    momentum: float = 0.99
    momentum_final: float = 1.0


class MAE(Method):
    """Masked autoencoder: ``encoder`` (ViT on visible tokens) + ``decoder`` (:class:`MAEDecoder`)."""

    options_class = MAEOptions

    def __init__(self, model: ModelConfig | None = None, options: MAEOptions | None = None):
        super().__init__()
        model = model or ModelConfig()
        self.options = options or self.options_class()
        o = self.options
        if o.target not in MAE_TARGETS:
            raise ValueError(f"method.target must be one of {', '.join(MAE_TARGETS)}, got {o.target!r}")
        self.encoder = ViTEncoder(model.encoder)
        enc = self.encoder
        d = model.decoder
        out_dim = enc.patch_size**2 * enc.in_chans if o.target == "pixel" else enc.embed_dim
        self.decoder = MAEDecoder(enc.embed_dim, enc.grid_size, out_dim, d.embed_dim, d.depth, d.num_heads, d.mlp_ratio)
        self.masking = build_mask_generator(o.masking)
        if o.target == "pixel":
            self.target = PixelTarget(enc.patch_size, o.norm_target)
        else:  # a copy of the initialised encoder (no random draw: the rest initialises as with pixels)
            self.target = LatentTarget("ema", enc, MomentumSchedule(o.momentum, o.momentum_final))

    @property
    def capabilities(self) -> Capabilities:
        pics = (("reconstruction",) if self.options.target == "pixel" else ()) + ("views",) + (
            ("salience",) if self.options.masking.kind == "sbam" else ())
        return Capabilities(pictures=pics, masking_kinds=MASKING_KINDS)

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def make_plan(
        self,
        images: torch.Tensor,
        progress: Progress | None = None,
        generator: torch.Generator | None = None,
        *,
        tokens: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> MaskPlan:
        """Masking for ``images (B, C, H, W)`` (or their layer-0 ``tokens (B, L, D)``); ``noise``
        reproduces a given random masking (shape ``masking.noise_shape(B, L)``)."""
        return draw_plan(self.masking, self.encoder, images, progress, generator, tokens=tokens, noise=noise)

    def predict(self, tokens: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """Encoder on each sequence's visible tokens + decoder -> ``(S, L, P)``."""
        visible = gather_tokens(plan.expand(tokens), plan.ids_keep)
        latent = self.encoder.forward_tokens(visible, plan.keep_valid)
        return self.decoder(latent, plan.ids_restore, plan.keep_valid)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, L, P)`` normalized pixels, or ``(B, L, D)`` EMA patch tokens (``target: ema``)."""
        if self.options.target == "pixel":
            return self.target(images)
        enc = self.encoder
        feats = self.target(lambda branch: branch.forward_features(images))[:, enc.num_prefix_tokens:].float()
        if self.options.norm_target:
            feats = torch.nn.functional.layer_norm(feats, feats.shape[-1:], eps=1e-6)
        return feats

    def after_step(self, progress: Progress) -> None:
        """The EMA target's update (``target: ema``), once per optimizer step."""
        if self.options.target == "ema":
            self.target.update(progress)

    def target_copies(self) -> tuple[TargetCopy, ...]:
        """The EMA copy of the encoder (``target: ema``)."""
        if self.options.target != "ema":
            return ()
        return (TargetCopy("target.branch", self.target.branch, self.target.online),)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, plan: MaskPlan) -> tuple[torch.Tensor, dict]:
        loss = masked_mse(pred, plan.expand(target), plan.mask)
        return loss, {}

    def forward(
        self,
        images: torch.Tensor,
        progress: Progress | None = None,
        *,
        plan: MaskPlan | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """``images (B, C, H, W)`` -> :class:`StepOutput` with ``pred (S, L, P)``, ``target (B, L, P)``."""
        tokens = self.encoder.patch_tokens(images)
        if plan is None:
            plan = self.make_plan(images, progress, generator, tokens=tokens, noise=noise)
        pred = self.predict(tokens, plan)
        target = self.targets(images)
        loss, metrics = self.loss(pred, target, plan)
        metrics = {"mask_ratio": plan.mask.mean().detach(), **metrics}
        return StepOutput(loss, metrics, pred=pred, target=target, plan=plan)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, plan: MaskPlan) -> Reconstruction:
        out = self(images, plan=plan)
        v = plan.num_views
        return Reconstruction(out.pred[::v].float(), plan.mask[::v].float(), self.options.norm_target, plan)
