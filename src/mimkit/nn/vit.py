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


def image_hw(img_size) -> tuple[int, int]:
    """``img_size`` as ``(H, W)``: an int is a square side, a pair ``[H, W]`` a rectangle."""
    if isinstance(img_size, int | float):
        return int(img_size), int(img_size)
    h, w = img_size
    return int(h), int(w)


def optional_image_hw(img_size) -> tuple[int, int] | None:
    """:func:`image_hw`, with ``None`` (a size nobody recorded) kept as ``None``."""
    return None if img_size is None else image_hw(img_size)


def grid_of(img_size, patch_size: int) -> tuple[int, int]:
    """The patch grid ``(H / p, W / p)`` of ``img_size`` (int or ``[H, W]``); ValueError when ``p``
    does not divide both sides."""
    h, w = image_hw(img_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"img_size {h}x{w} is not divisible by patch_size {patch_size}")
    return h // patch_size, w // patch_size


@dataclass
class ViTConfig:
    """Encoder shape. Defaults: ViT-B/16 at 224 (MAE's encoder). ``img_size``: a side (square
    images) or ``(H, W)``; the patch grid is ``(H/p, W/p)`` with 2-D sin-cos positions for that grid."""

    img_size: int | tuple[int, int] = 224
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


@dataclass
class BlocksOutput:
    """:meth:`ViTEncoder.run_blocks` result: ``x (B, P + n', D)``, the grid ``ids (B, n')`` of the patch
    tokens that remain (``None`` when not given), and the kept block outputs."""

    x: torch.Tensor
    ids: torch.Tensor | None
    intermediates: list


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

    Besides its shape (``img_hw``, ``grid_size``, ``num_patches``, ``patch_size``, ``in_chans``,
    ``embed_dim``, ``num_heads``) it has the attributes evaluation reads from every encoder, with the
    meaning of :mod:`mimkit.nn.adapters`' wrappers (and timm's ``VisionTransformer``):
    ``num_prefix_tokens = 1`` (the class token before the patch tokens), ``has_class_token = True`` and
    ``pool_norm = None`` (its final LayerNorm is on the tokens, none after pooling).

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
        self.img_hw = image_hw(cfg.img_size)
        self.grid_size = grid_of(cfg.img_size, cfg.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.patch_size = cfg.patch_size
        self.in_chans = cfg.in_chans
        self.num_prefix_tokens = 1
        self.has_class_token = True
        self.pool_norm: nn.Module | None = None
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
        """MAE's initialisation."""
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
                f"image size {h}x{w} does not match the encoder's {self.img_hw[0]}x{self.img_hw[1]}; "
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
        out = self.run_blocks(self.with_cls(tokens), valid=valid, return_blocks=return_blocks)
        x = self.norm(out.x) if norm else out.x
        return (x, out.intermediates) if return_blocks is not None else x

    def with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)`` -> ``(B, 1+n, D)``: the cls token (+ its position) prepended."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls.to(tokens.dtype), tokens], dim=1)

    def run_blocks(
        self,
        x: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        num_prefix: int = 1,
        select=None,
        topk: int | None = None,
        topk_blocks=None,
        attn_callback=None,
        return_blocks=None,
    ) -> BlocksOutput:
        """The encoder blocks on a prepared sequence, with the hooks methods need (no final norm).

        Args:
            x: ``(B, P + n, D)`` with ``P = num_prefix`` prefix tokens (cls: 1; none: 0) then patch tokens.
            valid: ``(B, n)`` bool key-padding mask for the patch tokens (prefix always valid).
            ids: ``(B, n)`` grid ids of the patch tokens, carried through token selection.
            select: token-selection callback ``select(i, x, ids) -> (x, ids) | None`` called after
                block ``i`` (0-based); it may drop or reorder patch tokens (it must keep the ``P``
                prefix tokens first) and returns the new ``x``/``ids``, or ``None`` for no change
                (PCAE's token-dropping teacher). Not combined with ``valid``.
            topk: TopK-before-softmax attention (:class:`~mimkit.nn.layers.Attention`) in the blocks
                listed in ``topk_blocks`` (default: every block); plain SDPA elsewhere and when ``None``.
            attn_callback: ``attn_callback(i, attn (B, H, N, N))`` after each TopK block (or every block
                when ``topk`` is ``None``): the explicit attention, for diagnostics; forces explicit logits.
            return_blocks: indices of blocks whose outputs to keep (un-normalized).
        Returns:
            :class:`BlocksOutput` ``(x, ids, intermediates)``.
        """
        b = x.shape[0]
        attn_mask = None
        if valid is not None:
            if select is not None:
                raise ValueError("token selection and a key-padding mask cannot be combined")
            full = torch.cat([valid.new_ones(b, num_prefix), valid], dim=1)
            attn_mask = full[:, None, None, :]
        depth = len(self.blocks)
        topk_set = set(range(depth)) if topk_blocks is None else {i % depth for i in topk_blocks}
        keep = set() if return_blocks is None else {i % depth for i in return_blocks}
        saved = []
        for i, blk in enumerate(self.blocks):
            k = topk if (topk is not None and i in topk_set) else None
            want_attn = attn_callback is not None and (topk is None or k is not None)
            if want_attn:
                x, attn = blk(x, attn_mask, topk=k, return_attn=True)
                attn_callback(i, attn)
            else:
                x = blk(x, attn_mask, topk=k)
            if i in keep:
                saved.append(x)
            if select is not None:
                res = select(i, x, ids)
                if res is not None:
                    x, ids = res
        return BlocksOutput(x, ids, saved)

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

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ):
        """timm's ``VisionTransformer.forward_intermediates`` on all tokens (no masking).

        ``indices``: an int ``n`` takes the last ``n`` blocks, a list takes those blocks (negative
        counts from the end), ``None`` every block. ``norm`` applies the final LayerNorm to each
        intermediate. ``output_fmt``: ``NCHW`` (patch tokens as ``(B, D, h, w)``) or ``NLC``
        (``(B, L, D)``). ``return_prefix_tokens`` pairs each with its cls token ``(B, 1, D)``.
        Returns ``(final (B, 1+L, D) after the final norm, [intermediates])``, or only the list when
        ``intermediates_only``.
        """
        depth = len(self.blocks)
        if indices is None:
            idx = list(range(depth))
        elif isinstance(indices, int):
            if not 1 <= indices <= depth:
                raise ValueError(f"indices={indices}: take between 1 and {depth} blocks")
            idx = list(range(depth - indices, depth))
        else:
            idx = sorted({i % depth for i in indices})
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        out = self.run_blocks(self.with_cls(self.patch_tokens(images)), return_blocks=idx)
        inter = []
        h, w = self.grid_size
        for t in out.intermediates:
            t = self.norm(t) if norm else t
            prefix, patches = t[:, :1], t[:, 1:]
            if output_fmt == "NCHW":
                patches = patches.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)
            inter.append((patches, prefix) if return_prefix_tokens else patches)
        if intermediates_only:
            return inter
        return self.norm(out.x), inter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x (B, L, D)``, ``ids (B, n)`` -> ``(B, n, D)``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
