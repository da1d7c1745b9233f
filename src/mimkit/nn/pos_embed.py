"""Fixed 2-D sin-cos position embeddings (MAE's ``util/pos_embed.py``; CAE's layout as an option).

Tokens are in row-major order ``t = i * w + j`` (row ``i`` of ``h``, column ``j`` of ``w``), matching a
stride-``p`` convolution flattened row by row. With ``D`` channels, each half of the table is a 1-D
encoding ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_k = 10000^(-k / (D/4))``,
``k = 0 .. D/4 - 1``. The two halves encode the two grid axes, and the sources disagree on which comes
first:

* **column first** (the default, ``row_first=False``): channels ``[0, D/2)`` encode the column ``j``,
  ``[D/2, D)`` the row ``i``. This is facebookresearch/mae ``get_2d_sincos_pos_embed`` (it builds
  ``meshgrid(w, h)`` and encodes ``grid[0]``, the column, first), used by every mimkit model built from
  scratch, and by MAE / Hugging Face ViTMAE weights.
* **row first** (``row_first=True``): channels ``[0, D/2)`` encode the row ``i``, ``[D/2, D)`` the column
  ``j``. This is Atten4Vis/CAE ``build_2d_sincos_position_embedding`` (``models/modeling_cae_helper.py``
  and ``modeling_finetune.py``: ``meshgrid(grid_w, grid_h)`` with ``ij`` indexing, then
  ``cat(sin(w), cos(w), sin(h), cos(h))``: in row-major token order its first half is the row index),
  saved in official CAE / CAE v2 checkpoints as ``pos_embed`` and ``rd_pos_embed``.

Either layout works when training from scratch (the model learns whatever the table holds); weights
trained with one are silently wrong with the other, so an official CAE table is loaded as stored and
regenerated row first for another grid (:mod:`mimkit.init_from`). On a non-square ``h x w`` grid the
official CAE code enumerates a ``w x h`` grid, which does not line up with row-major tokens; ``row_first``
is the row/column layout above, equal to the official table on square grids (the released ones).

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


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None, cls_token: bool = False,
              row_first: bool = False) -> torch.Tensor:
    """2-D sin-cos table for a ``grid_h x grid_w`` grid (square when ``grid_w`` is omitted).

    ``row_first=False``: MAE's layout (column index in the first half); ``row_first=True``: official
    CAE's (row index first). See the module docstring.

    Returns:
        ``(grid_h * grid_w [+1], dim)`` float32 tensor; row 0 is zeros when ``cls_token``.
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64)
    cols = torch.arange(grid_w, dtype=torch.float64)
    ii, jj = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each, row-major order
    first, second = (ii, jj) if row_first else (jj, ii)
    emb = torch.cat([sincos_1d(dim // 2, first), sincos_1d(dim // 2, second)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()
