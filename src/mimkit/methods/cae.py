"""CAE — Context Autoencoder (Chen et al., "Context Autoencoder for Self-Supervised Representation
Learning", IJCV 2023), after Atten4Vis/CAE ``models/modeling_cae.py``.

Representation learning (encoder ``F``) is separated from the pretext task (decoder ``G``): a latent
contextual regressor ``H`` predicts the masked patches' representations *in the encoder's space*
from the visible ones, an alignment loss pulls those predictions toward the encoder's own
representations of the masked patches, and only then does ``G`` map them to targets.

One step, shapes for B images, L patches, n visible, m = L - n masked, regressor width d::

    plan   = block_mask(B, L)                              exactly m masked per image; ids raster order
    z_v    = proj(F(x[ids_v]))                             (B, 1+n, d)  visible + cls, final LN
    z̄_m    = sg[proj(F(x[ids_m]))][:, 1:]                  (B, m, d)    same weights, masked patches only,
                                                                        no gradient (not an EMA)
    z_m    = H(mask_token, kv=[z_v[:, 1:]; queries])       (B, m, d)    visible latents never updated
    pred   = G(z_m + P_m)                                  (B, m, K|P)  self-attention on masked only
    loss   = target_loss(pred, target[ids_m]) + λ · MSE(z_m, z̄_m)        λ = 2

``proj`` is ``Linear(D→d) + LN`` when the regressor width ``d`` (``model.decoder.embed_dim``) differs
from the encoder's, else the identity (Base: 768 = 768). The cls output of ``F`` is not used by ``H``.

Targets (``target``; the presets say which one reproduces what):

* ``tokenizer`` — the published recipe: ids of a user-supplied tokenizer (DALL-E's dVAE on a 112 px
  view in the paper), cross-entropy over ``tokenizer_vocab`` ids. ``tokenizer`` names a module
  ``"package.module:attr"`` (an ``nn.Module`` instance, a class built without arguments, or a
  function) or a TorchScript file; it receives the images as the method gets them (normalized with
  the data mean/std) and returns ``(B, L)`` or ``(B, h, w)`` long ids on the encoder's grid; it does
  its own resizing and pixel mapping. It is loaded at the first training step (never saved).
* ``codebook`` — the offline stand-in for DALL-E tokens: the id of the nearest
  centroid of a k-means codebook fitted on per-patch normalized training patches
  (:mod:`mimkit.codebook`), cross-entropy over ``codebook_size`` codes.
* ``pixel`` — per-patch normalized pixels with MSE over the masked patches.

Ablations: ``align_weight=0`` (no alignment: the target branch is still run, without gradient, to log
``align_cos``), ``model.decoder.depth=0`` (no decoder: ``Linear(LN(z_m))``, "the regressor output mapped
by a linear head"; the paper's table has no more detail [inferred]).

Faithful details: block-wise masking with an exact count (BEiT generator, min 16 patches, aspect
0.3); regressor blocks with q/k/v LayerNorms, positions on q and k only, post-norm after the attention
residual (:class:`~mimkit.nn.cae.RegressorBlock`); LayerScale 0.1 and drop-path in regressor and
decoder (the encoder's rate); initialisation as the official top-level ``_init_weights``: xavier for
every Linear, trunc-normal(0.02) for cls and mask tokens and the conv patch embedding. Deviations:
encoder blocks use timm-style fused ``qkv`` with a key bias (softmax-invariant, so the function is
the official one); one rendered view (no separate 112 px tokenizer view unless the tokenizer makes it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.errors import ConfigError
from mimkit.masking import BlockOptions, MaskingOptions, MaskPlan, build_mask_generator, resolve_num_keep
from mimkit.methods.base import (
    Capabilities,
    Method,
    MethodOptions,
    ModelConfig,
    PictureData,
    Progress,
    Reconstruction,
    StepOutput,
    draw_plan,
)
from mimkit.nn.cae import LatentRegressor, MaskedDecoder
from mimkit.nn.codebook import FIT_COMMAND, Codebook
from mimkit.nn.layers import init_mae_weights
from mimkit.nn.patch import norm_pix, patchify
from mimkit.nn.vit import ViTEncoder, gather_tokens
from mimkit.targets import LatentTarget
from mimkit.weights import read_codebook
from mimkit.weights.read import load_torchscript

TARGETS = ("pixel", "codebook", "tokenizer")
MASKING_KINDS = ("block", "random")


def cae_masking() -> MaskingOptions:
    """CAE's masking: block-wise, half of the patches (98 of 196), min block 16, aspect 0.3-1/0.3."""
    return MaskingOptions(kind="block", ratio=0.5, block=BlockOptions(min_patches=16, min_aspect=0.3))


@dataclass
class CAEOptions(MethodOptions):
    """CAE knobs (module docstring). Defaults are the published ViT-B recipe except ``target``
    (``pixel`` needs no external file; the published DALL-E target is ``tokenizer``, its offline
    stand-in ``codebook``).

    * ``target``: ``pixel`` | ``codebook`` | ``tokenizer``; ``norm_target``: per-patch normalized pixels (MAE's ``norm_pix_loss``).
    * ``codebook_path`` / ``codebook_size``: a file from ``python -m mimkit.codebook fit`` and its number
      of codes (must match the file).
    * ``tokenizer`` / ``tokenizer_vocab``: the user tokenizer and its vocabulary size.
    * ``align_weight``: λ of the alignment loss (2). ``regressor_depth``: blocks of ``H`` (4); the
      decoder's depth, and the width and heads of both, are ``model.decoder.*`` (4, 768, 12 at Base).
    * ``layer_scale``: LayerScale init of regressor and decoder blocks (0.1; the encoder's is
      ``model.encoder.layer_scale``).
    """

    name: str = "cae"
    target: str = "pixel"
    norm_target: bool = True
    codebook_path: str | None = None
    codebook_size: int = 8192
    tokenizer: str | None = None
    tokenizer_vocab: int = 8192
    align_weight: float = 2.0
    regressor_depth: int = 4
    layer_scale: float | None = 0.1
    masking: MaskingOptions = field(default_factory=cae_masking)


def load_tokenizer(spec: str):
    """``"package.module:attr"`` (module instance, class, or function) or a TorchScript file -> callable."""
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".jit", ".ts") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"tokenizer file {path} not found (method.tokenizer)")
        return load_torchscript(path, "tokenizer file (method.tokenizer)").eval()
    if ":" not in spec:
        raise ConfigError(f"method.tokenizer={spec!r}: give 'package.module:attr' or a TorchScript file")
    mod, attr = spec.split(":", 1)
    obj = getattr(importlib.import_module(mod), attr)
    tok = obj() if isinstance(obj, type) else obj
    return tok.eval() if isinstance(tok, nn.Module) else tok


def cae_init(module: nn.Module, encoder: ViTEncoder, tokens: list[nn.Parameter]) -> None:
    """CAE's initialisation: xavier-uniform for every Linear (zero bias),
    LN 1/0, then trunc-normal(0.02, cut at ±0.02 as the official helper) for the conv patch
    embedding, the cls token and the given mask tokens."""
    init_mae_weights(module)

    def tn(t):
        nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)

    with torch.no_grad():
        tn(encoder.patch_embed.proj.weight)
        nn.init.zeros_(encoder.patch_embed.proj.bias)
        tn(encoder.cls_token)
        for t in tokens:
            tn(t)


def encoder_projection(dim: int, width: int, eps: float = 1e-6) -> nn.Module:
    """``Linear(D→d) + LN`` when the regressor width differs from the encoder's, else identity."""
    return nn.Identity() if dim == width else nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width, eps=eps))


def check_masking(masking: MaskingOptions, length: int, name: str, num_keep: int | None = None) -> None:
    """``masking.kind`` must be block or random, with at least one visible and one masked patch
    (``num_keep``: a visible count that wins over ``masking``'s)."""
    if masking.kind not in MASKING_KINDS:
        raise ValueError(f"{name} takes method.masking.kind block or random, got {masking.kind!r}")
    n = resolve_num_keep(length, masking.ratio, num_keep if num_keep is not None else masking.num_keep)
    if not 1 <= n < length:
        raise ValueError(f"{name} needs visible and masked patches; method.masking keeps {n} of {length}")


@torch.no_grad()
def regressor_picture_data(method: Method, images: torch.Tensor, generator: torch.Generator | None) -> PictureData:
    """The ``regressor`` picture of CAE and CAE v2: a mask from ``method.make_plan`` and the method's
    ``alignment_map`` (cosine of prediction and target per masked patch, NaN at visible ones)."""
    plan = method.make_plan(images, None, generator)
    return PictureData(images, plan, maps={"cos": method.alignment_map(images, plan)},
                       title=f"{type(method).__name__}: regressor prediction vs target at masked patches")


class CAE(Method):
    """``encoder`` F (:class:`ViTEncoder`), ``proj``, ``regressor`` H (:class:`LatentRegressor`, final LN),
    ``decoder`` G (:class:`MaskedDecoder`), ``align_target`` (the stop-gradient arm of
    :class:`~mimkit.targets.LatentTarget` over ``encoder`` + ``proj``) and, for ``target=codebook``,
    ``codebook`` (:class:`~mimkit.nn.codebook.Codebook`, its centroids saved with the model)."""

    options_class = CAEOptions
    # a codebook / tokenizer target needs its file: pixels run the same encoder, regressor and decoder
    offline_overrides = ("method.target=pixel",)

    def __init__(self, model: ModelConfig | None = None, options: CAEOptions | None = None):
        super().__init__()
        model = model or ModelConfig()
        o = self.options = options or CAEOptions()
        if o.target not in TARGETS:
            raise ValueError(f"unknown method.target {o.target!r}; choose one of: {', '.join(TARGETS)}")
        if o.align_weight < 0:
            raise ValueError(f"method.align_weight must be >= 0, got {o.align_weight}")
        self.encoder = enc = ViTEncoder(model.encoder)
        check_masking(o.masking, enc.num_patches, "cae")
        self.masking = build_mask_generator(o.masking)
        d = model.decoder
        patch_dim = enc.patch_size**2 * enc.in_chans
        self.codebook: Codebook | None = None
        self._codebook_ready = True
        if o.target == "pixel":
            out_dim = patch_dim
        elif o.target == "codebook":
            if not o.codebook_path:
                raise ValueError(f"method.target=codebook needs method.codebook_path; fit one with: {FIT_COMMAND}")
            out_dim = o.codebook_size
            self.codebook = Codebook(torch.zeros(o.codebook_size, patch_dim), enc.patch_size)
            self._codebook_ready = self._read_codebook(must_exist=False)
        else:
            if not o.tokenizer:
                raise ValueError("method.target=tokenizer needs method.tokenizer ('package.module:attr' or a file)")
            out_dim = o.tokenizer_vocab
        self._tokenizer: list = []
        self.proj = encoder_projection(enc.embed_dim, d.embed_dim, model.encoder.norm_eps)
        dp = model.encoder.drop_path_rate
        self.regressor = LatentRegressor(d.embed_dim, enc.grid_size, o.regressor_depth, d.num_heads, d.mlp_ratio,
                                         dp, o.layer_scale, final_norm=True)
        self.decoder = MaskedDecoder(d.embed_dim, out_dim, d.depth, d.num_heads, d.mlp_ratio, dp, o.layer_scale)
        cae_init(self, enc, [self.regressor.mask_token])
        online = nn.ModuleDict({"encoder": self.encoder, "proj": self.proj})
        self.align_target = LatentTarget("stopgrad", online)  # same weights, no gradient, not an EMA
        self.register_load_state_dict_post_hook(CAE._after_load)

    # -- external target files ------------------------------------------------------------------
    def _read_codebook(self, must_exist: bool) -> bool:
        """Fill the codebook buffer from ``codebook_path``; a missing file is an error only when
        ``must_exist`` (a model rebuilt from a checkpoint gets its centroids from the state dict)."""
        o = self.options
        path = Path(o.codebook_path)
        if not path.is_file():
            if must_exist:
                raise ConfigError(f"codebook {path} not found; fit it with: {self.fit_command()}")
            return False
        book = read_codebook(path)
        want = tuple(self.codebook.centroids.shape)
        if book.size != o.codebook_size:
            raise ValueError(f"codebook {path} has {book.size} codes; set method.codebook_size={book.size}")
        if tuple(book.centroids.shape) != want or book.patch_size != self.encoder.patch_size:
            raise ValueError(f"codebook {path} holds {book.patch_size}-pixel patches of {book.centroids.shape[1]} values; "
                             f"this encoder needs {self.encoder.patch_size}-pixel patches of {want[1]} values")
        with torch.no_grad():
            self.codebook.centroids.copy_(book.centroids)
        return True

    def preflight(self, fresh: bool) -> None:
        if fresh and self.options.target == "codebook" and not self._codebook_ready:  # a checkpoint would bring it
            self._codebook_ready = self._read_codebook(must_exist=True)

    def fit_command(self) -> str:
        """The command that writes this model's codebook file."""
        enc, o = self.encoder, self.options
        if enc.cfg.img_size == 28 and enc.in_chans == 1:
            data = "--dataset fashion_mnist"
        else:
            data = f"--dataset /path/to/train/images --img-size {max(enc.img_hw)} --in-chans {enc.in_chans}"
        return f"python -m mimkit.codebook fit {data} --patch {enc.patch_size} --k {o.codebook_size} --out {o.codebook_path}"

    @staticmethod
    def _after_load(module, incompatible) -> None:
        if module.codebook is not None and "codebook.centroids" not in incompatible.missing_keys:
            module._codebook_ready = True

    # -- capabilities and masking ---------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        pics = (("reconstruction",) if self.options.target == "pixel" else ()) + ("regressor", "views")
        return Capabilities(pictures=pics, masking_kinds=MASKING_KINDS)

    def make_plan(self, images: torch.Tensor, progress: Progress | None = None,
                  generator: torch.Generator | None = None) -> MaskPlan:
        """Block-wise (or random) mask with the same count in every image; for block masks the visible and
        masked ids are in raster order (CAE's boolean-mask convention)."""
        return draw_plan(self.masking, self.encoder, images, progress, generator)

    # -- pieces ---------------------------------------------------------------------------------
    @staticmethod
    def _encode(branch: nn.Module, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Positioned patch tokens ``(B, L, D)`` at ``ids (B, k)`` -> ``proj(F(.)) (B, 1+k, d)``."""
        return branch["proj"](branch["encoder"].forward_tokens(gather_tokens(tokens, ids)))

    def latents(self, images: torch.Tensor, plan: MaskPlan) -> dict[str, torch.Tensor]:
        """``z_v (B, 1+n, d)``, ``z_m (B, m, d)`` (regressor output), ``z_bar (B, m, d)`` (alignment
        target), ``ids_v (B, n)``, ``ids_m (B, m)``; masked rows in the order of ``ids_m``."""
        if plan.num_views != 1 or plan.keep_valid is not None:
            raise ValueError("cae takes one view per image with the same masked count in every image")
        ids_v, ids_m = plan.ids_keep, plan.ids_masked()
        tokens = self.encoder.patch_tokens(images)  # (B, L, D), positions added
        online = self.align_target.online
        z_v = self._encode(online, tokens, ids_v)
        z_bar = self.align_target(lambda branch: self._encode(branch, tokens, ids_m))[:, 1:]
        z_m = self.regressor(z_v[:, 1:], ids_v, ids_m)
        return {"z_v": z_v, "z_m": z_m, "z_bar": z_bar, "ids_v": ids_v, "ids_m": ids_m}

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` token ids (codebook / tokenizer) or ``(B, L, P)`` pixels, grid order."""
        o = self.options
        if o.target == "pixel":
            px = patchify(images.float(), self.encoder.patch_size)
            return norm_pix(px) if o.norm_target else px
        if o.target == "codebook":
            if not self._codebook_ready:
                self._codebook_ready = self._read_codebook(must_exist=True)
            return self.codebook.tokens(images)
        if not self._tokenizer:
            self._tokenizer.append(load_tokenizer(o.tokenizer))  # a list: not a submodule, never saved
        tok = self._tokenizer[0]
        if isinstance(tok, nn.Module):
            tok.to(images.device)
        with torch.no_grad():
            ids = tok(images)
        ids = ids.reshape(ids.shape[0], -1).long()
        if ids.shape[1] != self.encoder.num_patches:
            raise ValueError(f"the tokenizer returned {ids.shape[1]} ids per image; the encoder has "
                             f"{self.encoder.num_patches} patches (grid {self.encoder.grid_size})")
        return ids

    def target_loss(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``pred (B, m, K|P)``, ``target (B, m)`` ids or ``(B, m, P)`` pixels at the masked ids."""
        if self.options.target == "pixel":
            loss = F.mse_loss(pred.float(), target)  # every image has m masked patches: = masked_mse
            return loss, {"loss_pix": loss.detach()}
        logits = pred.float().flatten(0, 1)
        loss = F.cross_entropy(logits, target.flatten())  # mean over all masked tokens of the batch
        acc = (logits.detach().argmax(1) == target.flatten()).float().mean()
        return loss, {"loss_ce": loss.detach(), "token_acc": acc}

    # -- step -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, progress: Progress | None = None, *, plan: MaskPlan | None = None,
                generator: torch.Generator | None = None) -> StepOutput:
        """``images (B, C, H, W)`` -> :class:`StepOutput` with ``pred (B, m, K|P)`` and ``target``
        ``(B, m)`` / ``(B, m, P)``, both in the order of ``plan.ids_masked()``."""
        if plan is None:
            plan = self.make_plan(images, progress, generator)
        lat = self.latents(images, plan)
        z_m, z_bar, ids_m = lat["z_m"], lat["z_bar"], lat["ids_m"]
        pred = self.decoder(z_m, self.regressor.positions(ids_m))
        full = self.targets(images)
        target = torch.gather(full, 1, ids_m) if full.ndim == 2 else gather_tokens(full, ids_m)
        main, metrics = self.target_loss(pred, target)
        align = F.mse_loss(z_m.float(), z_bar.float())  # mean over all elements
        loss = main + self.options.align_weight * align if self.options.align_weight > 0 else main
        metrics.update(
            loss_align=align.detach(),
            align_cos=F.cosine_similarity(z_m.detach().float(), z_bar.float(), dim=-1).mean(),
            mask_ratio=plan.mask.mean().detach(),
        )
        return StepOutput(loss, metrics, pred=pred, target=target, plan=plan)

    # -- pictures -------------------------------------------------------------------------------
    @torch.no_grad()
    def alignment_map(self, images: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """``(B, L)``: ``cos(z_m, z̄_m)`` at the masked patches (regressor prediction vs the encoder's
        own representation of the masked patch), NaN at visible ones."""
        lat = self.latents(images, plan)
        cos = F.cosine_similarity(lat["z_m"].float(), lat["z_bar"].float(), dim=-1)
        out = torch.full(plan.mask.shape, float("nan"), device=images.device)
        return out.scatter_(1, lat["ids_m"], cos)

    def picture_data(self, kind: str, images: torch.Tensor,
                     generator: torch.Generator | None = None) -> PictureData:
        """``regressor``: :func:`regressor_picture_data`; the rest as the base class."""
        if kind == "regressor":
            return regressor_picture_data(self, images, generator)
        return super().picture_data(kind, images, generator)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, plan: MaskPlan) -> Reconstruction:
        """Decoder pixels at the masked patches, the (normalized) input patches at the visible ones."""
        if self.options.target != "pixel":
            return super().reconstruct(images, plan)
        lat = self.latents(images, plan)
        ids_m = lat["ids_m"]
        pred = self.decoder(lat["z_m"], self.regressor.positions(ids_m)).float()
        full = self.targets(images).clone()
        full.scatter_(1, ids_m[..., None].expand(-1, -1, full.shape[-1]), pred)
        return Reconstruction(full, plan.mask.float(), self.options.norm_target, plan)
