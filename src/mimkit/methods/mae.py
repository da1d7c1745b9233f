"""MAE (He et al., CVPR 2022), faithful to facebookresearch/mae ``models_mae.py`` (methods_b §2).

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
from torch import nn

from mimkit.losses import masked_mse
from mimkit.masking import MaskingOptions, MaskPlan, build_mask_generator
from mimkit.methods.base import MethodOptions, ModelConfig, Progress, StepOutput
from mimkit.nn.decoder import MAEDecoder
from mimkit.nn.vit import ViTEncoder, gather_tokens
from mimkit.targets import pixel_targets


@dataclass
class MAEOptions(MethodOptions):
    """MAE knobs. ``norm_pix_loss`` is on in every published MAE run (off in argparse only)."""

    name: str = "mae"
    norm_pix_loss: bool = True
    masking: MaskingOptions = field(default_factory=MaskingOptions)


class MAE(nn.Module):
    """Masked autoencoder: ``encoder`` (ViT on visible tokens) + ``decoder`` (:class:`MAEDecoder`)."""

    def __init__(self, model: ModelConfig | None = None, options: MAEOptions | None = None):
        super().__init__()
        model = model or ModelConfig()
        self.options = options or MAEOptions()
        self.encoder = ViTEncoder(model.encoder)
        enc = self.encoder
        d = model.decoder
        self.decoder = MAEDecoder(
            enc.embed_dim, enc.grid_size, enc.patch_size**2 * enc.in_chans, d.embed_dim, d.depth, d.num_heads, d.mlp_ratio
        )
        self.masking = build_mask_generator(self.options.masking)

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def make_plan(
        self,
        tokens: torch.Tensor,
        progress: Progress | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MaskPlan:
        """Masking for ``tokens (B, L, D)``; ``noise (B, L)`` reproduces a given random masking."""
        b, length, _ = tokens.shape
        return self.masking(
            b, length, tokens.device, generator=generator, noise=noise,
            tokens=tokens, progress=progress, grid=self.encoder.grid_size,
        )

    def predict(self, tokens: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """Encoder on each sequence's visible tokens + decoder -> ``(S, L, P)``."""
        visible = gather_tokens(plan.expand(tokens), plan.ids_keep)
        latent = self.encoder.forward_tokens(visible, plan.keep_valid)
        return self.decoder(latent, plan.ids_restore, plan.keep_valid)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_targets(images, self.patch_size, self.options.norm_pix_loss)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, plan: MaskPlan) -> tuple[torch.Tensor, dict]:
        loss = masked_mse(pred, plan.expand(target), plan.mask)
        return loss, {}

    def forward(
        self,
        images: torch.Tensor,
        progress: Progress | None = None,
        noise: torch.Tensor | None = None,
        plan: MaskPlan | None = None,
    ) -> StepOutput:
        """``images (B, C, H, W)`` -> :class:`StepOutput` with ``pred (S, L, P)``, ``target (B, L, P)``."""
        tokens = self.encoder.patch_tokens(images)
        if plan is None:
            plan = self.make_plan(tokens, progress, noise)
        pred = self.predict(tokens, plan)
        target = self.targets(images)
        loss, metrics = self.loss(pred, target, plan)
        metrics = {"mask_ratio": plan.mask.mean().detach(), **metrics}
        return StepOutput(loss, metrics, pred=pred, target=target, plan=plan)

    def after_step(self, progress: Progress) -> None:
        """MAE has no per-step state (EMA methods override this)."""


def build_mae(model: ModelConfig, options: MAEOptions) -> MAE:
    return MAE(model, options)
