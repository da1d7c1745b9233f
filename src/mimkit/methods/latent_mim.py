"""Latent MIM (Wei, Gupta, Morgado, ECCV 2024), after yibingwei-1/LatentMIM ``models_lmim.py``
(methods_a §1). Masked modeling in latent space: an online ViT encodes a few visible patches, a
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

Ablation arms (methods_a §1.3) are options of :class:`LatentMIMOptions`: ``target`` (``naive``: the
online encoder with gradients through both branches; ``separate``: a second encoder + projector
trained jointly by back-prop, initialised as a copy of the online one; ``stopgrad``: the online
encoder under ``no_grad``; ``ema``), ``loss`` (``patchdisc``, ``mse``, ``l1``, ``huber``),
``mask_ratio`` / ``num_vis``, ``patch_gap``, ``reg_weight`` (0 = regularizer off), ``decoder``
(``self_attn``, ``cross_attn``, ``cross_attn_cues``; depth and width from ``model.decoder``) and
``projector.kind`` (``none``, ``mlp``). The chain start of the slide tables is ``loss=mse
mask_ratio=0.75 patch_gap=0 reg_weight=0 decoder=self_attn projector.kind=none``.

Images: the trainer feeds images of the encoder's ``img_size`` (the evaluation size, e.g. 224).
With ``patch_gap > 0`` the method resizes them to ``G*(p+gap)`` (224 -> 280 at ViT-B/16, gap 4;
28 -> 35 for Fashion-MNIST with p=4, gap=1) with ``resize`` interpolation (bicubic, the official
crop interpolation) before the gapped patchify. The official pipeline instead RandomResizedCrops
straight to 280; resizing the augmented 224 crop differs only by a second interpolation of the same
view (slightly softer pixels), and keeps a single data pipeline for every method. Images that already
have size ``G*(p+gap)`` are used as they are. The same encoder evaluates at gap 0 on ``img_size``
images: its conv patch embedding equals the Linear on pre-cut patches used here.

EMA timing: the update runs inside :meth:`LatentMIM.forward`, *before* the target forward, as in the
official code, and at most once per optimizer step: it is skipped when ``progress.step`` equals the
step of the last update, so gradient-accumulation micro-batches (same ``progress.step``) do not
update twice. Not in eval mode or without ``progress``. :meth:`after_step` does nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.losses import average_patch_similarity, latent_regression, patch_disc, similarity_regularizer
from mimkit.masking import MaskPlan
from mimkit.methods.base import MethodOptions, ModelConfig, Progress, StepOutput
from mimkit.nn.cross_decoder import DECODERS, build_latent_decoder
from mimkit.nn.patch import gapped_patchify
from mimkit.nn.projector import MLPProjector
from mimkit.nn.vit import ViTEncoder, gather_tokens
from mimkit.targets import EMATarget, cosine_momentum, cosine_schedule

TARGETS = ("naive", "separate", "stopgrad", "ema")
LOSSES = ("patchdisc", "mse", "l1", "huber")


@dataclass
class ProjectorOptions:
    """``kind``: ``mlp`` (official: 3 bias-free Linears, hidden 4096, LN after each) or ``none``."""

    kind: str = "mlp"
    depth: int = 3
    hidden_dim: int = 4096
    out_norm: bool = True


@dataclass
class LatentMIMOptions(MethodOptions):
    """Latent MIM knobs; defaults = the published ViT-B / IN-1K recipe (methods_a §1.4).

    * ``target``: ``ema`` | ``naive`` | ``separate`` | ``stopgrad``; ``momentum`` -> ``momentum_final``
      along a cosine over training (0.99 -> 1.0).
    * ``loss``: ``patchdisc`` (``tau`` 0.2, x 2 tau) | ``mse`` | ``l1`` | ``huber`` (elementwise,
      ``huber_delta``; the slides give no delta). For the regression losses ``norm_target`` normalizes
      each target token over its channels (LN without affine, the official ``norm_l2``).
    * ``mask_ratio``: visible count ``round(L (1 - ratio))`` (196 tokens, 0.9 -> 20 visible, the official
      ``num_vis=20``); ``num_vis`` sets the count directly and wins over the ratio.
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
    loss: str = "patchdisc"
    tau: float = 0.2
    huber_delta: float = 1.0
    norm_target: bool = True
    mask_ratio: float = 0.9
    num_vis: int | None = None
    patch_gap: int = 4
    resize: str = "bicubic"
    reg_weight: float = 0.1
    reg_gamma: tuple[float, float] = (0.75, 0.25)
    decoder: str = "cross_attn_cues"
    projector: ProjectorOptions = field(default_factory=ProjectorOptions)


def num_visible(num_tokens: int, mask_ratio: float, num_vis: int | None = None) -> int:
    """Visible count: ``num_vis`` if given, else ``round(L (1 - mask_ratio))``, at least 1, below ``L``."""
    n = num_vis if num_vis is not None else max(1, round(num_tokens * (1 - mask_ratio)))
    if not 0 < n < num_tokens:
        raise ValueError(f"visible count must be in [1, {num_tokens - 1}], got {n} (mask_ratio={mask_ratio}, num_vis={num_vis})")
    return n


def build_projector(dim: int, opts: ProjectorOptions) -> nn.Module:
    if opts.kind == "none":
        return nn.Identity()
    if opts.kind == "mlp":
        return MLPProjector(dim, opts.hidden_dim, dim, opts.depth, opts.out_norm)
    raise ValueError(f"unknown projector {opts.kind!r}; choose none or mlp")


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, EMATarget) else module


class LatentMIM(nn.Module):
    """``encoder`` (:class:`ViTEncoder`, the exported backbone), ``projector``, ``decoder``, and for the
    ``ema``/``separate`` arms ``target_encoder`` + ``target_projector`` (for ``ema`` these are
    :class:`EMATarget` wrappers whose parameters do not require gradients)."""

    def __init__(self, model: ModelConfig | None = None, options: LatentMIMOptions | None = None):
        super().__init__()
        model = model or ModelConfig()
        opts = self.options = options or LatentMIMOptions()
        if opts.target not in TARGETS:
            raise ValueError(f"unknown target {opts.target!r}; choose one of: {', '.join(TARGETS)}")
        if opts.loss not in LOSSES:
            raise ValueError(f"unknown loss {opts.loss!r}; choose one of: {', '.join(LOSSES)}")
        if opts.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {opts.decoder!r}; choose one of: {', '.join(DECODERS)}")
        if opts.patch_gap < 0:
            raise ValueError(f"patch_gap must be >= 0, got {opts.patch_gap}")
        self.encoder = ViTEncoder(model.encoder)
        dim = self.encoder.embed_dim
        self.num_vis = num_visible(self.encoder.num_patches, opts.mask_ratio, opts.num_vis)
        self.projector = build_projector(dim, opts.projector)
        d = model.decoder
        self.decoder = build_latent_decoder(
            opts.decoder, dim, dim, self.encoder.grid_size, d.embed_dim, d.depth, d.num_heads, d.mlp_ratio
        )
        self.target_encoder: nn.Module | None = None
        self.target_projector: nn.Module | None = None
        if opts.target == "ema":
            self.target_encoder = EMATarget(self.encoder)
            # an identity projector has no parameters to average (EMATarget needs at least one)
            has_params = any(True for _ in self.projector.parameters())
            self.target_projector = EMATarget(self.projector) if has_params else nn.Identity()
        elif opts.target == "separate":
            self.target_encoder = copy.deepcopy(self.encoder)
            self.target_projector = copy.deepcopy(self.projector)
        self._ema_step: int | None = None  # progress.step of the last EMA update

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def train_size(self) -> int:
        """Image side the gapped patchify needs: ``G * (p + gap)``."""
        return self.encoder.grid_size[0] * (self.encoder.patch_size + self.options.patch_gap)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` at ``img_size`` (or already at :attr:`train_size`) -> ``(B, C, T, T)``, ``T = train_size``."""
        size = self.train_size
        if images.shape[-1] == size and images.shape[-2] == size:
            return images
        if images.shape[-2:] != (self.encoder.cfg.img_size,) * 2:
            raise ValueError(
                f"expected images of {self.encoder.cfg.img_size}x{self.encoder.cfg.img_size} (or {size}x{size}), "
                f"got {tuple(images.shape[-2:])}"
            )
        return F.interpolate(images, size=(size, size), mode=self.options.resize, align_corners=False)

    @staticmethod
    def _encode(encoder: ViTEncoder, projector: nn.Module, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Pixel patches ``(B, k, P)`` at grid ids ``(B, k)`` -> ``(B, 1+k, D)``: embed + positions, cls,
        blocks, final LN, projector (cls included)."""
        return projector(encoder.forward_tokens(encoder.pixel_tokens(patches, ids)))

    def encode_target(self, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Target latents ``(B, k, D)`` of the patches ``(B, k, P)`` (cls dropped), per ``options.target``."""
        t = self.options.target
        if t == "naive":
            z = self._encode(self.encoder, self.projector, patches, ids)
        elif t == "stopgrad":
            with torch.no_grad():
                z = self._encode(self.encoder, self.projector, patches, ids)
        elif t == "separate":
            z = self._encode(self.target_encoder, self.target_projector, patches, ids)
        else:  # ema
            with torch.no_grad():
                z = self._encode(_unwrap(self.target_encoder), _unwrap(self.target_projector), patches, ids)
        return z[:, 1:]

    def momentum(self, progress: Progress) -> float:
        return cosine_momentum(self.options.momentum, progress.fraction, self.options.momentum_final)

    def gamma(self, progress: Progress | None) -> float:
        start, end = self.options.reg_gamma
        return cosine_schedule(start, end, progress.fraction if progress is not None else 0.0)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """``theta_T <- m theta_T + (1 - m) theta`` over encoder and projector (EMA arm only)."""
        if self.options.target == "ema":
            self.target_encoder.update(self.encoder, momentum)
            if isinstance(self.target_projector, EMATarget):
                self.target_projector.update(self.projector, momentum)

    def make_plan(self, batch_size: int, device, generator: torch.Generator | None = None) -> MaskPlan:
        """Uniform random masking: the first ``num_vis`` ids of a random permutation are visible."""
        noise = torch.rand(batch_size, self.encoder.num_patches, device=device, generator=generator)
        return MaskPlan.from_permutation(torch.argsort(noise, dim=1), self.num_vis, scores=noise)

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
        plan: MaskPlan | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """``images (B, C, S, S)`` -> :class:`StepOutput` with ``pred``/``target`` ``(B, m, D)`` in the
        order of ``plan.ids_masked()``. ``generator`` drives the mask and the gap offsets."""
        o = self.options
        images = self.prepare_images(images)
        pix = gapped_patchify(images, self.encoder.patch_size, o.patch_gap, generator)  # (B, L, P)
        if plan is None:
            plan = self.make_plan(pix.shape[0], pix.device, generator)
        vis_ids, tgt_ids = plan.ids_keep, plan.ids_masked()  # both in permutation order (pitfall 1)

        metrics: dict[str, torch.Tensor | float] = {}
        if o.target == "ema":
            m = self.momentum(progress) if progress is not None else o.momentum
            # before the target forward, once per optimizer step (first micro-batch of a group)
            if self.training and progress is not None and progress.step != self._ema_step:
                self.update_target(m)
                self._ema_step = progress.step
            metrics["ema_momentum"] = m

        z_t = self.encode_target(gather_tokens(pix, tgt_ids), tgt_ids)  # (B, m, D)
        z_v = self._encode(self.encoder, self.projector, gather_tokens(pix, vis_ids), vis_ids)  # (B, 1+n, D)
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
        """Nothing: the EMA update happens in :meth:`forward` before the target forward (module doc)."""


def build_latent_mim(model: ModelConfig, options: LatentMIMOptions) -> LatentMIM:
    return LatentMIM(model, options)
