"""Fixed 2-D sin-cos position embeddings, as in MAE's ``util/pos_embed.py``.

Layout: with ``D`` channels, the first ``D/2`` channels encode the *column* index
and the last ``D/2`` the *row* index (MAE builds the grid with ``meshgrid(w, h)``). Each half is
``[sin(pos * omega), cos(pos * omega)]`` concatenated, ``omega_k = 10000^(-k / (D/4))``. Tokens are
in row-major order ``t = i * w + j``, matching a stride-``p`` convolution flattened row by row.
An all-zero row is prepended for the cls token when ``cls_token=True``.
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos encoding.

    Args:
        dim: output channels (even).
        pos: positions, any shape ``(M,)`` (flattened).
    Returns:
        ``(M, dim)`` float64 tensor ``[sin(pos*omega), cos(pos*omega)]``.
    """
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None, cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos table.

    Returns:
        ``(grid_h * grid_w [+1], dim)`` float32 tensor; row 0 is zeros when ``cls_token``.
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64)
    cols = torch.arange(grid_w, dtype=torch.float64)
    ii, jj = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each, row-major order
    emb = torch.cat([sincos_1d(dim // 2, jj), sincos_1d(dim // 2, ii)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()
