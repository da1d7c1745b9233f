"""Transformer layers with timm's parameter names (``qkv``, ``proj``, ``fc1``, ``fc2``, ``ls1.gamma``).

Attention runs through :func:`sdpa`: ``F.scaled_dot_product_attention`` on GPU and for long sequences,
an explicit matmul-softmax-matmul for the short sequences of CPU training where it is measurably
faster (the rule is in :func:`sdpa`). Callers that need the attention weights (pictures, diagnostics)
or a TopK-before-softmax attention (MixedAE's homologous attention) get explicit fp32 logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EXPLICIT_MAX_TOKENS = 64
"""On CPU, sequences up to this many tokens (queries and keys) take the explicit path (:func:`sdpa`)."""


def explicit_attention(q, k, v, attn_mask=None, dropout_p: float = 0.0):
    """``softmax(q k^T / sqrt(d)) v`` as three ops: logits in the input dtype, the softmax in fp32, the
    probabilities cast back to the input dtype (Hugging Face's eager attention does the same).
    ``attn_mask``: boolean (True = attend) or additive, broadcastable to ``(B, H, N, M)``."""
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    attn = logits.softmax(-1, dtype=torch.float32).to(v.dtype)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def sdpa(q, k, v, attn_mask=None, dropout_p: float = 0.0):
    """Attention through the path that is fastest for the device, dtype and length at hand.

    The rule, measured with ``benchmarks/attention_paths.py`` (BENCHMARKS.md, "Attention paths"; 2-core
    CPU, torch 2.14): on CPU, sequences of at most :data:`EXPLICIT_MAX_TOKENS` tokens run
    :func:`explicit_attention` -- at the Fashion-MNIST encoder (13 tokens) and decoder (50) and a
    masked ViT-B/16 encoder (50) it is 1.5-1.9x faster than ``F.scaled_dot_product_attention`` in fp32
    and 1.9-2.8x faster than SDPA's math kernel (7-9x than its flash kernel) in bf16 forward +
    backward (not profiled further; a per-(batch, head) overhead of SDPA's CPU kernels that short
    sequences do not amortise would explain it). Longer sequences on CPU (197 tokens: SDPA's flash
    kernel 1.6-1.8x faster in fp32; in bf16 the two are within 10 %) and every
    sequence on GPU (fused flash / memory-efficient kernels) use ``F.scaled_dot_product_attention``
    with PyTorch's kernel choice. Both paths compute the same function: fp32 results differ by
    rounding (~1e-7); under bf16 the explicit path rounds the logits and probabilities to bf16 as
    Hugging Face's eager attention does (max error vs float64 ~1.6e-2 against SDPA's ~7e-3)."""
    if q.device.type == "cpu" and max(q.shape[-2], k.shape[-2]) <= EXPLICIT_MAX_TOKENS:
        return explicit_attention(q, k, v, attn_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (scale ``head_dim ** -0.5``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, return_attn: bool = False, topk: int | None = None
    ):
        """``x (B, N, D)``; ``attn_mask`` boolean, broadcastable to ``(B, H, N, N)`` (True = attend).

        ``topk``: keep only each query's ``topk`` largest logits (per head) before the softmax, the rest
        set to ``-inf`` (MixedAE's homologous attention, ``softmax(TopK(q k^T / sqrt(d)))``; ties at the
        threshold may keep a few more). Explicit logits in fp32; ``topk >= N`` equals plain attention.
        Dropped entries have probability exactly 0.

        Returns ``(B, N, D)``, or ``(out, attn (B, H, N, N))`` when ``return_attn``.
        """
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if return_attn or (topk is not None and topk < n):
            logits = (q.float() @ k.float().transpose(-2, -1)) * self.head_dim**-0.5
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            if topk is not None and topk < n:
                thr = logits.topk(topk, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < thr, float("-inf"))
            attn = logits.softmax(-1)
            if self.training and self.attn_drop > 0:
                attn = F.dropout(attn, self.attn_drop)
            out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, d)
            out = self.proj_drop(self.proj(out))
            return (out, attn) if return_attn else out
        out = sdpa(q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: ``q`` from queries, fused ``kv`` from a memory."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, kv_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(kv_dim or dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, Nq, D)``, ``memory (B, Nk, Dk)`` -> ``(B, Nq, D)``."""
        b, nq, d = x.shape
        nk = memory.shape[1]
        q = self.q(x).reshape(b, nq, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(memory).reshape(b, nk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = sdpa(q, kv[0], kv[1], attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (CAE/CAE v2 use init 0.1 at Base)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at rate 0 or in eval)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Block(nn.Module):
    """Pre-norm ViT block: ``x += Attn(LN(x)); x += MLP(LN(x))`` (LN eps 1e-6)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, topk: int | None = None, return_attn: bool = False
    ):
        """``x (B, N, D)`` -> ``(B, N, D)`` (and the attention ``(B, H, N, N)`` when ``return_attn``);
        ``attn_mask`` and ``topk`` as in :class:`Attention`."""
        if return_attn:
            a, attn = self.attn(self.norm1(x), attn_mask, return_attn=True, topk=topk)
        else:
            a, attn = self.attn(self.norm1(x), attn_mask, topk=topk), None
        x = x + self.drop_path1(self.ls1(a))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attn else x


class CrossBlock(nn.Module):
    """Decoder block on queries with a fixed memory (Latent MIM's ``CrossBlock``):

    ``Q += SelfAttn(LN1(Q)); Q += CrossAttn(LN2q(Q), LN2kv(M)); Q += MLP(LN3(Q))``.
    Set ``self_attn=False`` for a cross-attention-only block.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, self_attn: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps) if self_attn else None
        self.attn = Attention(dim, num_heads) if self_attn else None
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_kv = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.attn is not None:
            q = q + self.attn(self.norm1(q))
        q = q + self.cross_attn(self.norm_q(q), self.norm_kv(memory), memory_mask)
        return q + self.mlp(self.norm2(q))


def init_mae_weights(module: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier-uniform Linear (fused qkv as one matrix), zero bias, LN 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
