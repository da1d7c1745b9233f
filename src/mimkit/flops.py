"""FLOPs of a module call, counted with :class:`torch.utils.flop_counter.FlopCounterMode` (not estimated).

Convention (PyTorch's): one multiply-add = 2 FLOPs; matrix products, convolutions and attention
(``q k^T`` and ``attn v``) are counted, element-wise ops (LayerNorm, GELU, softmax, adds) are not.
PyTorch registers no formula for the CPU flash-attention kernel, so :func:`count_flops` adds one
(the same formula as its GPU kernels); without it attention on CPU would count 0.

    n = count_flops(lambda: encoder(images))          # int, FLOPs of the whole call (batch included)
    cache = FlopCache(); cache(key, fn)               # counted once per key, then looked up (no compute)
    vit_block_flops(n, dim, hidden)                   # the analytic count of one ViT block, per image
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return out


def count_flops(fn: Callable[[], object], grad: bool = False) -> int:
    """FLOPs of ``fn()`` (run once, under ``no_grad`` unless ``grad``), counted by ``FlopCounterMode``."""
    with torch.set_grad_enabled(grad), FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as fc:
        fn()
    return int(fc.get_total_flops())


class FlopCache:
    """Counts once per key and caches: ``cache(key, fn)`` runs :func:`count_flops(fn)` the first time a
    ``key`` (e.g. a token-count signature) is seen and returns the stored number afterwards, so a
    per-step metric costs a dict lookup. Counting runs outside ``torch.compile`` graphs. When an outer
    :func:`count_flops` wraps a call that fills the cache, the outer counter also sees the counting run:
    call once first (fill the cache), then count."""

    def __init__(self):
        self._store: dict[Hashable, int] = {}

    def get(self, key: Hashable) -> int | None:
        """The stored count of ``key`` or ``None``: a plain lookup that ``torch.compile`` traces (a call of
        the cache itself is a graph break), so a compiled forward that looks its count up first breaks
        only until the count is stored."""
        return self._store.get(key)

    @torch.compiler.disable
    def __call__(self, key: Hashable, fn: Callable[[], object]) -> int:
        if key not in self._store:
            self._store[key] = count_flops(fn)
        return self._store[key]

    def __len__(self) -> int:
        return len(self._store)


def vit_block_flops(n: int, dim: int, hidden: int) -> int:
    """Forward FLOPs of one pre-norm ViT block on ``n`` tokens of width ``dim`` (MLP ``hidden``), per image:
    ``2 n D (3D + D + 2 hidden)`` for qkv, proj, fc1, fc2 plus ``4 n^2 D`` for the two attention products
    (``24 n D^2 + 4 n^2 D`` at ``hidden = 4D``). Equals :func:`count_flops` of a block (tested)."""
    return 2 * n * dim * (4 * dim + 2 * hidden) + 4 * n * n * dim
