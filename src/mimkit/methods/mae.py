"""MAE (He et al., CVPR 2022), faithful to facebookresearch/mae ``models_mae.py``.

One step, shapes for B images, L patches, n visible, P = p*p*C::

    tokens  = encoder.patch_tokens(images)                 (B, L, D)   positions added before masking
    plan    = masking(B, L)                                ids_keep (B, n), ids_restore (B, L), mask (B, L)
    latent  = encoder.forward_tokens(gather(tokens, ids))  (B, 1+n, D) cls prepended, final norm
    pred    = decoder(latent, ids_restore)                 (B, L, P)   mask tokens after visible, unshuffle
    target  = norm_pix(patchify(images))                   (B, L, P)
    loss    = sum(mask * mse_per_patch) / sum(mask)        over all masked patches of the batch

Subclasses change the masking (SBAM), the number of views (EMAE) or the loss, and reuse the rest.
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
    draw_plan,
)
from mimkit.nn.decoder import MAEDecoder
from mimkit.nn.vit import ViTEncoder, gather_tokens
from mimkit.targets import PixelTarget


@dataclass
class MAEOptions(MethodOptions):
    """MAE knobs. ``norm_target`` (per-patch normalized pixel targets: the official code's ``norm_pix_loss``) is on in every published MAE run (off in argparse only)."""

    name: str = "mae"
    norm_target: bool = True
    masking: MaskingOptions = field(default_factory=MaskingOptions)


class MAE(Method):
    """Masked autoencoder: ``encoder`` (ViT on visible tokens) + ``decoder`` (:class:`MAEDecoder`)."""

    options_class = MAEOptions

    def __init__(self, model: ModelConfig | None = None, options: MAEOptions | None = None):
        super().__init__()
        model = model or ModelConfig()
        self.options = options or self.options_class()
        self.encoder = ViTEncoder(model.encoder)
        enc = self.encoder
        d = model.decoder
        self.decoder = MAEDecoder(
            enc.embed_dim, enc.grid_size, enc.patch_size**2 * enc.in_chans, d.embed_dim, d.depth, d.num_heads, d.mlp_ratio
        )
        self.masking = build_mask_generator(self.options.masking)
        self.target = PixelTarget(enc.patch_size, self.options.norm_target)

    @property
    def capabilities(self) -> Capabilities:
        pics = ("reconstruction", "views") + (("salience",) if self.options.masking.kind == "sbam" else ())
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
        return self.target(images)

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
