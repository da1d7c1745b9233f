"""Any encoder behind one evaluation interface.

Every protocol asks an encoder for ``forward_features(images, norm=True, block=None) -> (B, P + L, D)``
(``P`` prefix tokens — class, distillation, register tokens — then ``L`` patch tokens) and reads a few
attributes: ``num_prefix_tokens``, ``has_class_token``, ``embed_dim``, ``num_heads``, ``img_size``
(a side, or ``(H, W)`` for a rectangle; ``img_hw`` is always the pair), ``in_chans``, ``patch_size``
and, for encoders whose last normalisation comes *after* pooling (timm's ``fc_norm``, MAE's fine-tuned
models), ``pool_norm`` (``None`` otherwise); ``grid_size`` and ``patch_size`` are ``None`` when the
encoder does not say. The wrappers also carry ``input_norm``: ``(mean, std, source)`` when the
weights' input normalisation is known (set by :func:`mimkit.weights.load_encoder` from a named timm
model's ``pretrained_cfg``), else ``None``. :class:`mimkit.nn.ViTEncoder` has them (one class token, final LayerNorm on the
tokens: ``num_prefix_tokens = 1``, ``has_class_token = True``, ``pool_norm = None``).
:func:`wrap_encoder` adapts the rest, and evaluation reads these attributes without defaults:

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

from mimkit.errors import ConfigError
from mimkit.nn.vit import optional_image_hw


def _side_or_pair(hw: tuple[int, int]) -> int | tuple[int, int]:
    """A square as its side (as before), a rectangle as ``(H, W)``."""
    return hw[0] if hw[0] == hw[1] else hw


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
        self.img_hw = optional_image_hw(getattr(pe, "img_size", None)) or (224, 224)
        self.img_size = _side_or_pair(self.img_hw)
        self.patch_size = int(pe.patch_size[0])
        self.in_chans = int(pe.proj.in_channels)
        self.grid_size = tuple(int(g) for g in pe.grid_size)
        fc_norm = getattr(model, "fc_norm", None)
        self.pool_norm = fc_norm if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity) else None
        self.source_config = None
        self.input_norm = None  # (mean, std, source) when the weights' normalisation is known (load_encoder)

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
        img_size / in_chans: the input the module expects, a side or ``(H, W)`` (data are resized /
            converted to it).
        num_heads: for the attentive probe (default: the module's ``num_heads``, else 1).
    """

    def __init__(self, module: nn.Module, num_prefix_tokens: int = 1, img_size: int | tuple[int, int] | None = None,
                 in_chans: int | None = None, num_heads: int | None = None, has_class_token: bool | None = None):
        super().__init__()
        self.module = module
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.has_class_token = self.num_prefix_tokens > 0 if has_class_token is None else has_class_token
        self.img_hw = optional_image_hw(img_size) or optional_image_hw(getattr(module, "img_hw", None) or getattr(module, "img_size", None)) \
            or (224, 224)
        self.img_size = _side_or_pair(self.img_hw)
        self.in_chans = int(in_chans or getattr(module, "in_chans", 3))
        self.num_heads = int(num_heads or getattr(module, "num_heads", 1))
        self.pool_norm = None
        self.grid_size: tuple[int, int] | None = None  # a module's token grid is not known: from the images
        self.patch_size: int | None = None
        self.source_config = None
        self.input_norm = None  # (mean, std, source) when known; evaluation's default otherwise
        self._embed_dim = getattr(module, "embed_dim", None)

    @property
    def embed_dim(self) -> int:
        if self._embed_dim is None:
            dev = next(self.module.parameters()).device
            with torch.no_grad():
                self._embed_dim = int(self.forward_features(torch.zeros(1, self.in_chans, *self.img_hw,
                                                                        device=dev)).shape[-1])
        return int(self._embed_dim)

    def forward_features(self, images: torch.Tensor, norm: bool = True, block: int | None = None) -> torch.Tensor:
        if block is not None or not norm:

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


def encoder_img_hw(encoder: nn.Module) -> tuple[int, int]:
    """The input ``(H, W)`` the encoder expects: its ``img_hw`` (a mimkit ``ViTEncoder``: its patch grid
    times the patch size; a wrapper: the input it was built or told for)."""
    return optional_image_hw(encoder.img_hw)


def encoder_img_size(encoder: nn.Module) -> int | tuple[int, int]:
    """The input size the encoder expects: its side when square (as before), else ``(H, W)``."""
    return _side_or_pair(encoder_img_hw(encoder))


def token_grid(encoder: nn.Module, num_patches: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(gh, gw)`` patch grid of ``num_patches`` tokens of ``image_hw`` images: the encoder's
    ``grid_size`` when it fits, else the factorisation of ``num_patches`` with the images' aspect (a
    square grid for square images). ValueError when no grid fits."""
    grid = getattr(encoder, "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) == num_patches:
        return int(grid[0]), int(grid[1])
    h, w = int(image_hw[0]), int(image_hw[1])
    for gh in range(1, num_patches + 1):
        gw = num_patches // gh
        if gh * gw == num_patches and gh * w == gw * h:
            return gh, gw
    raise ValueError(f"{num_patches} patch tokens do not form a grid with the {h}x{w} images' aspect; "
                     "give the encoder a grid_size attribute (gh, gw)")


def check_input_size(encoder: nn.Module, image_hw: tuple[int, int], in_chans: int) -> None:
    """A one-line :class:`~mimkit.config.ConfigError` when ``encoder`` cannot take ``image_hw`` images:
    checked against its patch grid when it has one (mimkit, timm), else by encoding one blank image."""

    h, w = image_hw
    grid, p = encoder.grid_size, encoder.patch_size
    if grid is not None and p:
        gh, gw = int(grid[0]), int(grid[1])
        if h % int(p) or w % int(p) or (h // int(p), w // int(p)) != (gh, gw):
            raise ConfigError(f"evaluation images of {h}x{w} do not fit the encoder's {gh * p}x{gw * p} input "
                              f"({gh}x{gw} patches of {p} px); evaluate at the encoder's size (img_size)")
        return
    if not isinstance(encoder, ModuleEncoder):
        return
    fn = getattr(encoder.module, "forward_features", None) or encoder.module
    try:
        dev = next(encoder.module.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    try:
        with torch.no_grad():
            fn(torch.zeros(1, in_chans, h, w, device=dev))
    except (RuntimeError, ValueError, AssertionError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"the encoder does not take {in_chans}x{h}x{w} images ({first}); pass the input it "
                          "expects as img_size=(H, W) (and in_chans)") from None


def encoder_in_chans(encoder: nn.Module) -> int:
    """The channel count the encoder takes (``in_chans``)."""
    return int(encoder.in_chans)
