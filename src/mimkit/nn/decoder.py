"""MAE's self-attention decoder.

Mask tokens are appended *after* the visible latents, the sequence is un-shuffled to grid order with
``ids_restore``, the cls latent is kept through the decoder and dropped at the output.
"""

from __future__ import annotations

import torch
from torch import nn

from mimkit.nn.layers import Block, init_mae_weights
from mimkit.nn.pos_embed import sincos_2d


class DecoderBase(nn.Module):
    """What every decoder shares: ``embed (D -> d)``, ``mask_token (1, 1, d)``, a fixed sin-cos
    ``pos_embed (1, 1+L, d)`` (cls row zero), and the head ``norm`` + ``pred (d -> out)``.

    Subclasses add their blocks; they call :meth:`_add_head` before or after them, which fixes the
    module order (and so the initialisation order) of the official code each decoder follows."""

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], decoder_dim: int):
        super().__init__()
        self.decoder_dim = decoder_dim
        self.num_patches = grid_size[0] * grid_size[1]
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = sincos_2d(decoder_dim, *grid_size, cls_token=True)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)

    def _add_head(self, out_dim: int, norm_eps: float) -> None:
        self.norm = nn.LayerNorm(self.decoder_dim, eps=norm_eps)
        self.pred = nn.Linear(self.decoder_dim, out_dim)

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Grid ids ``(B, k)`` -> position embeddings ``(B, k, d)``."""
        return self.pos_embed[0, 1:][ids]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.pred(self.norm(x))


class MAEDecoder(DecoderBase):
    """``embed (D -> Dd)``, ``mask_token``, fixed ``pos_embed (1, 1+L, Dd)``, ``blocks``, ``norm``,
    ``pred (Dd -> out_dim)``. Official-checkpoint names map as ``decoder_embed -> embed`` etc.
    (see :mod:`mimkit.interop`)."""

    def __init__(
        self,
        embed_dim: int,
        grid_size: tuple[int, int],
        out_dim: int,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__(embed_dim, grid_size, decoder_dim)
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio, norm_eps=norm_eps) for _ in range(depth))
        self._add_head(out_dim, norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        init_mae_weights(self)

    def forward(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor,
        keep_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict every patch.

        Args:
            latent: ``(S, 1+n, D)`` encoder output (cls first, visible tokens in permutation order).
            ids_restore: ``(S, L)``.
            keep_valid: ``(S, n)`` bool; padded slots (False) are replaced by the mask token.
        Returns:
            ``(S, L, out_dim)`` predictions in grid order (cls dropped).
        """
        x = self.embed(latent)
        s, n1, d = x.shape
        patches = x[:, 1:]
        if keep_valid is not None:
            patches = torch.where(keep_valid[..., None], patches, self.mask_token.to(patches.dtype))
        num_mask = self.num_patches - (n1 - 1)
        x_ = torch.cat([patches, self.mask_token.to(x.dtype).expand(s, num_mask, -1)], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)[:, 1:]
