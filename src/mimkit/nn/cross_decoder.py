"""Latent MIM decoders: predict the latent of each target patch from the visible latents.

Both take the encoder output ``latent (B, 1+n, D)`` (cls first, visible tokens in the order of
``vis_ids (B, n)``) and target grid ids ``tgt_ids (B, m)``, and return ``(B, m, out_dim)`` in the
order of ``tgt_ids`` (never re-sorted: the PatchDisc diagonal relies on it).

* :class:`CrossDecoder` — ``xvits.CrossDecoder``. Queries are the target
  positions (+ one decoder cls query), the memory is the embedded visible tokens + positions and is
  never updated across layers; each layer is a :class:`~mimkit.nn.layers.CrossBlock`
  (self-attention over queries, cross-attention to the memory, MLP). With ``visual_cues`` the query of
  target ``t`` is ``m + c_t + p_t`` with ``c_t = sum_v softmax_v(p_t . p_v / sqrt(d)) e_v``: attention
  weights from the fixed position embeddings only, mixing the embedded visible features *before*
  their positions are added (cls excluded). Without cues the query is ``m + p_t`` (the "Cross-attn" arm).
* :class:`SelfAttnLatentDecoder` — the "Self-attn" arm: MAE-style, ``[e_cls, e_v + p_v, m + p_t]``
  through pre-norm self-attention blocks, read out at the target slots.

Position embeddings are the fixed 2-D sin-cos table at the decoder width (cls row zero). The official
code spaces the grid at ``linspace(0, 1, G) * G`` instead of integers; we use the
integer grid shared by every other method.
"""

from __future__ import annotations

import torch
from torch import nn

from mimkit.nn.decoder import DecoderBase
from mimkit.nn.layers import Block, CrossBlock, init_mae_weights


class _LatentDecoderBase(DecoderBase):
    """:class:`~mimkit.nn.decoder.DecoderBase` with the head built first and a zero mask token (official)."""

    def __init__(self, embed_dim: int, out_dim: int, grid_size: tuple[int, int], decoder_dim: int, norm_eps: float):
        super().__init__(embed_dim, grid_size, decoder_dim)
        self._add_head(out_dim, norm_eps)


class CrossDecoder(_LatentDecoderBase):
    """Cross-attention decoder with optional positional visual cues (module docstring).

    Args:
        embed_dim: encoder (projector) output width ``D``.
        out_dim: prediction width (the target width, normally ``D``).
        grid_size: token grid ``(G, G)``.
        decoder_dim, depth, num_heads, mlp_ratio: ViT-B default 512 / 3 / 16 / 4.
        visual_cues: add ``c_t`` to every target query (official default on).
        self_attn: keep the self-attention sub-layer of each block (official: on).
    """

    def __init__(
        self,
        embed_dim: int,
        out_dim: int,
        grid_size: tuple[int, int],
        decoder_dim: int = 512,
        depth: int = 3,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        visual_cues: bool = True,
        self_attn: bool = True,
        norm_eps: float = 1e-6,
    ):
        super().__init__(embed_dim, out_dim, grid_size, decoder_dim, norm_eps)
        self.visual_cues = visual_cues
        self.cls_query = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.blocks = nn.ModuleList(
            CrossBlock(decoder_dim, num_heads, mlp_ratio, self_attn=self_attn, norm_eps=norm_eps) for _ in range(depth)
        )
        init_mae_weights(self)
        nn.init.normal_(self.cls_query, std=0.02)
        # mask_token stays zero (official init)

    def cue_weights(self, vis_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        """Visual-cue attention ``softmax_v(p_t . p_v / sqrt(d))`` in fp32: ``(B, m, n)``, rows sum to 1.

        A function of the grid ids alone (fixed sin-cos table, no learnable projection)."""
        p_t = self.positions(tgt_ids).float()
        p_v = self.positions(vis_ids).float()
        logits = p_t @ p_v.transpose(1, 2) * self.decoder_dim**-0.5
        return logits.softmax(dim=-1)

    def forward(
        self, latent: torch.Tensor, vis_ids: torch.Tensor, tgt_ids: torch.Tensor, return_cues: bool = False
    ):
        """``latent (B, 1+n, D)``, ``vis_ids (B, n)``, ``tgt_ids (B, m)`` -> ``(B, m, out_dim)``
        (and the cue weights ``(B, m, n)`` when ``return_cues``)."""
        e = self.embed(latent)  # (B, 1+n, d)
        b = e.shape[0]
        p_v = self.positions(vis_ids)
        memory = e + torch.cat([self.pos_embed[:, :1].expand(b, 1, -1), p_v], dim=1)  # cls gets the zero row
        q = self.mask_token + self.positions(tgt_ids)  # (B, m, d)
        w = None
        if self.visual_cues:
            w = self.cue_weights(vis_ids, tgt_ids)
            q = q + (w.to(e.dtype) @ e[:, 1:])  # cues mix the embedded visible tokens *without* positions
        x = torch.cat([self.cls_query.expand(b, -1, -1).to(q.dtype), q], dim=1)  # (B, 1+m, d)
        for blk in self.blocks:
            x = blk(x, memory)
        out = self.head(x)[:, 1:]
        return (out, w) if return_cues else out


class SelfAttnLatentDecoder(_LatentDecoderBase):
    """MAE-style decoder on ``[e_cls, e_v + p_v, m + p_t]`` (the ablation's "Self-attn" arm)."""

    def __init__(
        self,
        embed_dim: int,
        out_dim: int,
        grid_size: tuple[int, int],
        decoder_dim: int = 512,
        depth: int = 3,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__(embed_dim, out_dim, grid_size, decoder_dim, norm_eps)
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio, norm_eps=norm_eps) for _ in range(depth))
        init_mae_weights(self)

    def forward(self, latent: torch.Tensor, vis_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        """``latent (B, 1+n, D)``, ``vis_ids (B, n)``, ``tgt_ids (B, m)`` -> ``(B, m, out_dim)``."""
        e = self.embed(latent)
        b, n1, _ = e.shape
        vis = e[:, 1:] + self.positions(vis_ids)
        q = self.mask_token + self.positions(tgt_ids)
        x = torch.cat([e[:, :1], vis, q.to(e.dtype)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)[:, n1:]


DECODERS = ("self_attn", "cross_attn", "cross_attn_cues")


def build_latent_decoder(
    kind: str,
    embed_dim: int,
    out_dim: int,
    grid_size: tuple[int, int],
    decoder_dim: int = 512,
    depth: int = 3,
    num_heads: int = 16,
    mlp_ratio: float = 4.0,
) -> nn.Module:
    """``kind``: ``self_attn`` | ``cross_attn`` (no cues) | ``cross_attn_cues`` (official default)."""
    if kind == "self_attn":
        return SelfAttnLatentDecoder(embed_dim, out_dim, grid_size, decoder_dim, depth, num_heads, mlp_ratio)
    if kind in ("cross_attn", "cross_attn_cues"):
        return CrossDecoder(
            embed_dim, out_dim, grid_size, decoder_dim, depth, num_heads, mlp_ratio, visual_cues=kind == "cross_attn_cues"
        )
    raise ValueError(f"unknown decoder {kind!r}; choose one of: {', '.join(DECODERS)}")
