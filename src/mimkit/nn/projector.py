"""MLP projector head (Latent MIM's ``proj``).

``depth`` Linear layers without bias; every Linear but the last is followed by ``LN -> GELU``, the
last by an ``LN`` when ``out_norm`` (the official ``out_norm=True``). ViT-B default::

    Linear(768->4096) LN GELU  Linear(4096->4096) LN GELU  Linear(4096->768) LN

Applied token-wise: ``(B, N, in_dim) -> (B, N, out_dim)``.
"""

from __future__ import annotations

import torch
from torch import nn

from mimkit.nn.layers import init_mae_weights


class MLPProjector(nn.Module):
    """``layers`` is an ``nn.Sequential`` of the Linear / LN / GELU modules described above."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 4096,
        out_dim: int | None = None,
        depth: int = 3,
        out_norm: bool = True,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        out_dim = out_dim or in_dim
        dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        mods: list[nn.Module] = []
        for i in range(depth):
            mods.append(nn.Linear(dims[i], dims[i + 1], bias=False))
            if i < depth - 1:
                mods += [nn.LayerNorm(dims[i + 1], eps=norm_eps), nn.GELU()]
            elif out_norm:
                mods.append(nn.LayerNorm(dims[i + 1], eps=norm_eps))
        self.layers = nn.Sequential(*mods)
        init_mae_weights(self)  # xavier-uniform Linear, LN 1/0 (official init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
