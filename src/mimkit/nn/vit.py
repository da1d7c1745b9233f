"""ViT encoder that runs on any subset of tokens, with timm ``VisionTransformer`` parameter names.

Names: ``cls_token (1,1,D)``, ``pos_embed (1,1+L,D)`` (fixed 2-D sin-cos, not trained),
``patch_embed.proj`` (Conv2d, kernel = stride = p), ``blocks.{i}.*``, ``norm``. A state dict of this
module loads into ``timm.create_model("vit_...", num_classes=0, global_pool="token")`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mimkit.nn.layers import Block, init_mae_weights
from mimkit.nn.pos_embed import sincos_2d


@dataclass
class ViTConfig:
    """Encoder shape. Defaults: ViT-B/16 at 224 (MAE's encoder)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    layer_scale: float | None = None
    norm_eps: float = 1e-6


class PatchEmbed(nn.Module):
    """``Conv2d(C, D, p, stride=p)``: ``(B, C, H, W)`` -> ``(B, L, D)`` row-major."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def embed_pixels(self, patches: torch.Tensor) -> torch.Tensor:
        """The same map on pre-cut patches ``(B, N, p*p*C)`` in :func:`mimkit.nn.patch.patchify`'s
        ``(p, p, C)`` layout -> ``(B, N, D)``. Used for gapped patches (Latent MIM)."""
        w = self.proj.weight.permute(0, 2, 3, 1).reshape(self.proj.out_channels, -1)
        return nn.functional.linear(patches, w, self.proj.bias)


class ViTEncoder(nn.Module):
    """ViT encoder with a cls token and fixed sin-cos positions.

    Typical use::

        tokens = enc.patch_tokens(images)            # (B, L, D), positions added
        visible = gather_tokens(tokens, plan.ids_keep)   # (B, n, D)
        latent = enc.forward_tokens(visible, valid)  # (B, 1+n, D), after the final norm
    """

    def __init__(self, cfg: ViTConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or ViTConfig()
        if overrides:
            cfg = ViTConfig(**{**cfg.__dict__, **overrides})
        self.cfg = cfg
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not divisible by patch_size {cfg.patch_size}")
        self.grid_size = (cfg.img_size // cfg.patch_size,) * 2
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.patch_size = cfg.patch_size
        self.in_chans = cfg.in_chans
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        pos = sincos_2d(cfg.embed_dim, *self.grid_size, cls_token=True)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i], cfg.layer_scale, cfg.norm_eps)
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE's initialisation (methods_b §2.4)."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the (D, C*p*p) view
        nn.init.normal_(self.cls_token, std=0.02)
        init_mae_weights(self.blocks)
        init_mae_weights(self.norm)

    # -- token construction -------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if (h // self.patch_size, w // self.patch_size) != self.grid_size or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {h}x{w} does not match the encoder's {self.cfg.img_size}x{self.cfg.img_size}; "
                "resize the images or build the encoder with a matching img_size"
            )

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, L, D)`` patch embeddings with position embeddings added."""
        self._check_images(images)
        return self.patch_embed(images) + self.pos_embed[:, 1:]

    def pixel_tokens(self, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Pre-cut patches ``(B, n, p*p*C)`` at grid ids ``(B, n)`` -> ``(B, n, D)`` with positions."""
        pos = self.pos_embed[0, 1:][ids]
        return self.patch_embed.embed_pixels(patches) + pos

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        valid: torch.Tensor | None = None,
        norm: bool = True,
        return_blocks: list[int] | None = None,
    ):
        """Prepend cls, run the blocks (and final norm).

        Args:
            tokens: ``(B, n, D)`` positioned patch tokens (any subset, any order).
            valid: ``(B, n)`` bool, False for padding slots (key-padding mask); cls is always valid.
            norm: apply the final LayerNorm.
            return_blocks: also return the outputs of these blocks (0-based), un-normalized.
        Returns:
            ``(B, 1+n, D)``, or ``(out, [block outputs])`` when ``return_blocks`` is given.
        """
        b = tokens.shape[0]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        attn_mask = None
        if valid is not None:
            full = torch.cat([valid.new_ones(b, 1), valid], dim=1)
            attn_mask = full[:, None, None, :]
        saved = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn_mask)
            if return_blocks is not None and i in return_blocks:
                saved.append(x)
        if norm:
            x = self.norm(x)
        return (x, saved) if return_blocks is not None else x

    def forward_masked(self, images: torch.Tensor, ids_keep: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Encode only the tokens ``ids_keep (B, n)`` -> ``(B, 1+n, D)``."""
        return self.forward_tokens(gather_tokens(self.patch_tokens(images), ids_keep), valid)

    def forward_features(self, images: torch.Tensor, norm: bool = True, block: int | None = None) -> torch.Tensor:
        """All tokens, no masking -> ``(B, 1+L, D)``. ``block`` returns an intermediate block's output
        (0-based; negative counts from the end), with the final norm applied when ``norm``."""
        tokens = self.patch_tokens(images)
        if block is None:
            return self.forward_tokens(tokens, norm=norm)
        idx = block % len(self.blocks)
        _, saved = self.forward_tokens(tokens, norm=False, return_blocks=[idx])
        return self.norm(saved[0]) if norm else saved[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x (B, L, D)``, ``ids (B, n)`` -> ``(B, n, D)``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
