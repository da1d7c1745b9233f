"""Any encoder behind one evaluation interface.

Every protocol asks an encoder for ``forward_features(images, norm=True, block=None) -> (B, P + L, D)``
(``P`` prefix tokens — class, distillation, register tokens — then ``L`` patch tokens) and reads a few
attributes: ``num_prefix_tokens``, ``has_class_token``, ``embed_dim``, ``num_heads``, ``img_size``,
``in_chans``, ``patch_size`` and, for encoders whose last normalisation comes *after* pooling (timm's
``fc_norm``, MAE's fine-tuned models), ``pool_norm``. :class:`mimkit.nn.ViTEncoder` has them (one
class token, final LayerNorm on the tokens). :func:`wrap_encoder` adapts the rest:

* :class:`TimmEncoder` — a timm ``VisionTransformer`` of any family (plain, CLIP-style with a pre-norm,
  DINOv2 with register tokens, distilled DeiT, no class token with global average pooling and
  ``fc_norm``), through timm's own ``forward_intermediates`` API, so prefix tokens, layer scale and the
  pre-norm are handled exactly as timm does.
* :class:`ModuleEncoder` — any other ``nn.Module`` returning tokens ``(B, N, D)`` (``num_prefix_tokens``
  of them prefix) or one pooled vector ``(B, D)`` per image (then only ``--pool cls`` applies: the
  vector is treated as the single prefix token).
"""

from __future__ import annotations

import torch
from torch import nn


def _num_heads(blocks) -> int | None:
    attn = getattr(blocks[0], "attn", None) if len(blocks) else None
    return getattr(attn, "num_heads", None)


class TimmEncoder(nn.Module):
    """A timm ``VisionTransformer`` (any family) as an evaluation encoder.

    ``forward_features(norm=True, block=None)`` is timm's ``forward_features`` (all tokens after the
    final norm); other blocks / ``norm=False`` come from ``forward_intermediates(indices=[block],
    norm=norm, output_fmt="NLC", return_prefix_tokens=True)``. ``pool_norm`` is the model's ``fc_norm``
    when it pools before normalising (``global_pool="avg"`` models), else ``None``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer (no forward_intermediates)")
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.has_class_token = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
        self.embed_dim = int(model.embed_dim)
        self.num_heads = _num_heads(model.blocks) or 1
        pe = model.patch_embed
        self.img_size = int(pe.img_size[0]) if getattr(pe, "img_size", None) is not None else 224
        self.patch_size = int(pe.patch_size[0])
        self.in_chans = int(pe.proj.in_channels)
        self.grid_size = tuple(int(g) for g in pe.grid_size)
        fc_norm = getattr(model, "fc_norm", None)
        self.pool_norm = fc_norm if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity) else None
        self.source_config = None

    @property
    def blocks(self):
        return self.model.blocks

    @property
    def pos_embed(self):
        return self.model.pos_embed

    def forward_features(self, images: torch.Tensor, norm: bool = True, block: int | None = None) -> torch.Tensor:
        if block is None and norm:
            return self.model.forward_features(images)
        depth = len(self.model.blocks)
        idx = (depth - 1) if block is None else block % depth
        out = self.model.forward_intermediates(images, indices=[idx], norm=norm, output_fmt="NLC",
                                               return_prefix_tokens=True, intermediates_only=True, stop_early=True)[0]
        if isinstance(out, tuple):
            patches, prefix = out
            return torch.cat([prefix, patches], dim=1)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


class ModuleEncoder(nn.Module):
    """Any ``nn.Module`` as an evaluation encoder (see module doc).

    Args:
        module: called as ``module.forward_features(x)`` when it has that method, else ``module(x)``.
        num_prefix_tokens: how many leading tokens are not patches (1 for a class token, 0 for none).
        img_size / in_chans: the input the module expects (data are resized / converted to it).
        num_heads: for the attentive probe (default: the module's ``num_heads``, else 1).
    """

    def __init__(self, module: nn.Module, num_prefix_tokens: int = 1, img_size: int | None = None,
                 in_chans: int | None = None, num_heads: int | None = None, has_class_token: bool | None = None):
        super().__init__()
        self.module = module
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.has_class_token = self.num_prefix_tokens > 0 if has_class_token is None else has_class_token
        own = getattr(module, "img_size", None)
        own = own[0] if isinstance(own, tuple | list) else own
        self.img_size = int(img_size or own or 224)
        self.in_chans = int(in_chans or getattr(module, "in_chans", 3))
        self.num_heads = int(num_heads or getattr(module, "num_heads", 1))
        self.pool_norm = None
        self.source_config = None
        self._embed_dim = getattr(module, "embed_dim", None)

    @property
    def embed_dim(self) -> int:
        if self._embed_dim is None:
            dev = next(self.module.parameters()).device
            with torch.no_grad():
                self._embed_dim = int(self.forward_features(torch.zeros(1, self.in_chans, self.img_size,
                                                                        self.img_size, device=dev)).shape[-1])
        return int(self._embed_dim)

    def forward_features(self, images: torch.Tensor, norm: bool = True, block: int | None = None) -> torch.Tensor:
        if block is not None or not norm:
            from mimkit.config import ConfigError

            raise ConfigError("--block / --no-norm need an encoder that exposes its blocks (a mimkit or timm ViT); "
                              "this nn.Module only gives its final output")
        fn = getattr(self.module, "forward_features", None) or self.module
        out = fn(images)
        if out.ndim == 2:  # one pooled vector per image: the only "prefix" token
            if self.num_prefix_tokens != 1:
                self.num_prefix_tokens, self.has_class_token = 1, True
            return out[:, None]
        if out.ndim != 3:
            raise ValueError(f"the encoder returned shape {tuple(out.shape)}; expected (B, N, D) tokens or (B, D)")
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


def wrap_encoder(encoder: nn.Module, **kw) -> nn.Module:
    """``encoder`` unchanged when it already speaks the evaluation interface (a mimkit ``ViTEncoder``,
    a wrapper), a :class:`TimmEncoder` for a timm ViT, else a :class:`ModuleEncoder` (``kw`` go to it)."""
    from mimkit.nn.vit import ViTEncoder

    if isinstance(encoder, ViTEncoder | TimmEncoder | ModuleEncoder):
        return encoder
    if hasattr(encoder, "forward_intermediates") and hasattr(encoder, "num_prefix_tokens") and hasattr(encoder,
                                                                                                       "patch_embed"):
        return TimmEncoder(encoder)
    return ModuleEncoder(encoder, **kw)


def encoder_img_size(encoder: nn.Module) -> int:
    """The square input side the encoder expects."""
    if getattr(encoder, "img_size", None) is not None and not hasattr(encoder, "cfg"):
        return int(encoder.img_size)
    return int(encoder.grid_size[0] * encoder.patch_size)


def encoder_in_chans(encoder: nn.Module) -> int:
    if getattr(encoder, "in_chans", None) is not None:
        return int(encoder.in_chans)
    return int(encoder.patch_embed.proj.in_channels)
