"""CAE's parts (Chen et al., IJCV 2023; Atten4Vis/CAE ``models/modeling_cae_helper.py``): the latent
contextual regressor, the decoder that sees masked positions only, and CAE v2's head.

Shapes: ``B`` images, ``n`` visible and ``m`` masked patches, regressor/decoder width ``d``.

* :class:`RegressorBlock` — one cross-attention block of the regressor. Queries are the masked stream
  ``X_m (B, m, d)``; keys/values are ``[Z_v ; X_m] (B, n+m, d)``; positions are added to q and k
  (before their LayerNorms), never to v; the block is *post-norm* after the attention residual::

      A   = CrossAttn(q = LN_q(X_m + P_m), k = LN_k([Z_v; X_m] + [P_v; P_m]), v = LN_v([Z_v; X_m]))
      X_m = LN_2(X_m + γ1 · A)
      X_m = X_m + γ2 · MLP(X_m)

  ``Z_v`` is only read: the regressor never updates the visible latents.
* :class:`LatentRegressor` — a shared learnable mask token as the initial queries, fixed sin-cos
  positions of width ``d`` (cls row zero), ``depth`` blocks, and a final LN (CAE; CAE v2 has none).
* :class:`MaskedDecoder` — CAE's decoder ``G``: ``Z_m + P_m`` -> pre-norm self-attention blocks over
  the masked tokens only -> LN -> Linear. ``depth = 0`` is "no decoder": LN + Linear on ``Z_m``
  (the ablation row without decoder; CAE v2's ``Decoder(depth=0)``).
* :class:`CAEv2Head` — CAE v2's head: one LN shared by the cls, visible and predicted masked tokens,
  a Linear to the teacher width, L2 normalisation.

Attention goes through SDPA. Keys carry no bias (a key bias adds the same ``q·b`` to every logit of a
query, so it never changes the attention; the official code fixes it at zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.nn.layers import Block, DropPath, LayerScale, Mlp, sdpa
from mimkit.nn.pos_embed import sincos_2d


class RegressorAttention(nn.Module):
    """Multi-head cross-attention with separate ``q`` (bias), ``k`` (no bias), ``v`` (bias) maps and an
    output projection: ``q (B, Nq, d)``, ``k``/``v (B, Nk, d)`` -> ``(B, Nq, d)``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"regressor width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, nq, d = q.shape
        h = self.num_heads

        def heads(t):  # (B, N, d) -> (B, h, N, d/h)
            return t.reshape(b, t.shape[1], h, d // h).transpose(1, 2)

        out = sdpa(heads(self.q(q)), heads(self.k(k)), heads(self.v(v)))
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class RegressorBlock(nn.Module):
    """CAE's ``RegressorBlock`` (module docstring): cross-attention with q/k/v LayerNorms, positions on
    q and k only, post-norm ``LN_2`` after the attention residual, then a residual MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale: float | None = 0.1, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_k = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_v = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = RegressorAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x_m: torch.Tensor, z_v: torch.Tensor, pos_m: torch.Tensor, pos_v: torch.Tensor) -> torch.Tensor:
        """``x_m (B, m, d)`` queries, ``z_v (B, n, d)`` visible latents (read only), positions
        ``pos_m (B, m, d)``, ``pos_v (B, n, d)`` -> updated queries ``(B, m, d)``."""
        kv = torch.cat([z_v, x_m], dim=1)
        pos_k = torch.cat([pos_v, pos_m], dim=1)
        a = self.cross_attn(self.norm_q(x_m + pos_m), self.norm_k(kv + pos_k), self.norm_v(kv))
        x = self.norm2(x_m + self.drop_path(self.ls1(a)))
        return x + self.drop_path(self.ls2(self.mlp(x)))


class LatentRegressor(nn.Module):
    """Mask token + fixed positions + :class:`RegressorBlock` s (+ final LN when ``final_norm``).

    ``forward(z_v (B, n, d), ids_v (B, n), ids_m (B, m)) -> (B, m, d)``: predicted latents of the
    patches at ``ids_m``, in the order of ``ids_m``."""

    def __init__(self, dim: int, grid_size: tuple[int, int], depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, layer_scale: float | None = 0.1, final_norm: bool = True,
                 norm_eps: float = 1e-6):
        super().__init__()
        if depth < 1:
            raise ValueError(f"the regressor needs at least one block, got depth {depth}")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, *grid_size, cls_token=True)[None], requires_grad=False)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            RegressorBlock(dim, num_heads, mlp_ratio, dpr[i], layer_scale, norm_eps) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if final_norm else nn.Identity()

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Grid ids ``(B, k)`` -> ``(B, k, d)``."""
        return self.pos_embed[0, 1:][ids]

    def forward(self, z_v: torch.Tensor, ids_v: torch.Tensor, ids_m: torch.Tensor) -> torch.Tensor:
        pos_v, pos_m = self.positions(ids_v).to(z_v.dtype), self.positions(ids_m).to(z_v.dtype)
        x = self.mask_token.to(z_v.dtype).expand(ids_m.shape[0], ids_m.shape[1], -1)
        for blk in self.blocks:
            x = blk(x, z_v, pos_m, pos_v)
        return self.norm(x)


class MaskedDecoder(nn.Module):
    """CAE's decoder on the masked tokens only (module docstring); ``forward(z_m (B, m, d),
    pos_m (B, m, d)) -> (B, m, out_dim)``. ``depth = 0``: ``Linear(LN(z_m))``, no positions."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, layer_scale: float | None = 0.1, norm_eps: float = 1e-6):
        super().__init__()
        dpr = torch.linspace(0, drop_path_rate, max(depth, 1)).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, True, dpr[i], layer_scale, norm_eps) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, z_m: torch.Tensor, pos_m: torch.Tensor) -> torch.Tensor:
        x = z_m
        if len(self.blocks):
            x = x + pos_m.to(x.dtype)  # the decoder re-adds the masked positions
            for blk in self.blocks:
                x = blk(x)
        return self.head(self.norm(x))


class CAEv2Head(nn.Module):
    """CAE v2's head: ``l2n(Linear(LN(t)))`` with one LN shared by every token group:
    ``(B, N, d) -> (B, N, out_dim)`` unit vectors (fp32)."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.norm(x)).float(), dim=-1)
