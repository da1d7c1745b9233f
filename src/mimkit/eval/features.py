"""One deterministic feature API: no masking, eval mode, batched, no gradients.

``pool``: ``cls`` (the class token), ``mean`` (mean of the patch tokens; class, distillation and
register tokens excluded), ``all`` (every token, ``(N, P+L, D)``) or ``cls+mean`` (concatenated).
``norm``: apply the encoder's final LayerNorm (for encoders that normalise *after* pooling — timm's
``fc_norm`` — that norm is applied to the pooled vector, as timm's ``forward_head`` does). ``block``:
take an intermediate block's output instead of the last one.

Encoders are anything :mod:`mimkit.nn.adapters` describes (mimkit, timm, any ``nn.Module``).
On a GPU, extraction runs under bf16 autocast by default (``autocast_dtype="auto"``); features come
back as float32.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

POOLS = ("cls", "mean", "all", "cls+mean")


def check_pool(pool: str, has_class_token: bool = True) -> str:
    """``pool`` if it is a known pooling the encoder supports, else a :class:`ValueError` naming the fix."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    if not has_class_token and pool in ("cls", "cls+mean"):
        raise ValueError(f"pool {pool!r} needs a class token and this encoder has none; use --pool mean")
    return pool


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int = 1, pool_norm=None) -> torch.Tensor:
    """``(B, P+L, D)`` -> ``(B, D)`` (cls / mean), ``(B, 2D)`` (cls+mean) or unchanged (all).

    ``num_prefix_tokens`` ``P``: leading non-patch tokens (class first). ``pool_norm``: a norm applied to
    each pooled vector (timm's ``fc_norm``)."""
    check_pool(pool)
    if pool == "all":
        return tokens
    post = pool_norm if pool_norm is not None else (lambda t: t)
    cls = lambda: post(tokens[:, 0])  # noqa: E731
    mean = lambda: post(tokens[:, num_prefix_tokens:].mean(1))  # noqa: E731
    if pool == "cls":
        return cls()
    if pool == "mean":
        return mean()
    return torch.cat([cls(), mean()], dim=-1)


def encoder_pooling(encoder: nn.Module, norm: bool = True) -> dict:
    """``pool_tokens`` keyword arguments for ``encoder`` (prefix count; ``fc_norm`` when ``norm``)."""
    return {"num_prefix_tokens": encoder.num_prefix_tokens, "pool_norm": encoder.pool_norm if norm else None}


def default_autocast(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA (evaluation at scale), none on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else None


def progress(iterable, total: int | None = None, desc: str = "", enabled: bool | None = True, unit: str = "it"):
    """A tqdm bar on a terminal (``enabled=None``: tqdm decides; ``False``: plain iteration)."""
    if enabled is False:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=None if enabled is None else not enabled)


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float normalized; float input is returned unchanged."""
    if images.dtype != torch.uint8:
        return images.float()
    x = images.float().div_(255.0)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    data: torch.Tensor | Iterable,
    pool: str | list[str] = "cls",
    norm: bool = True,
    block: int | None = None,
    batch_size: int = 512,
    mean=(0.5,),
    std=(0.5,),
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | str | None = "auto",
    show_progress: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Features of every image, in order.

    Args:
        encoder: a module with ``forward_features(images, norm=, block=) -> (B, 1+L, D)``
            (:class:`mimkit.nn.ViTEncoder`, or a timm ViT wrapped by :mod:`mimkit.interop`).
        data: a uint8/float image tensor ``(N, C, H, W)`` (uint8 is normalized with ``mean``/``std``),
            or an iterable of ``images`` or ``(images, labels)`` batches already normalized.
        pool: one pooling or a list of them (then a dict ``{pool: features}`` is returned, from one pass).
        autocast_dtype: ``"auto"`` (bf16 on CUDA, none on CPU), a dtype, or ``None`` (full precision).
        show_progress: a tqdm bar (shown on a terminal only).
        out_dtype: dtype of the returned features (float16 halves an all-token cache).
    Returns:
        ``(N, D)`` float32 on CPU (``(N, 1+L, D)`` for ``all``), or a dict of them.
    """
    pools = [pool] if isinstance(pool, str) else list(dict.fromkeys(pool))
    for p in pools:
        check_pool(p, encoder.has_class_token)  # validate names early
    was_training = encoder.training
    encoder.eval()
    if device is None:
        device = next(encoder.parameters()).device
    device = torch.device(device)
    if autocast_dtype == "auto":
        autocast_dtype = default_autocast(device)
    pooling = encoder_pooling(encoder, norm)
    total = None
    if isinstance(data, torch.Tensor):
        batches = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
        total = -(-len(data) // batch_size)
    else:
        batches = (b[0] if isinstance(b, tuple | list) else b for b in data)
    out: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
    try:
        for images in progress(batches, total, "features", enabled=None if show_progress else False, unit="batch"):
            images = normalize_images(images.to(device, non_blocking=True), mean, std)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                tokens = encoder.forward_features(images, norm=norm, block=block)
                pooled = {p: pool_tokens(tokens, p, **pooling) for p in pools}
            for p in pools:
                out[p].append(pooled[p].to(out_dtype).cpu())
    finally:
        encoder.train(was_training)
    result = {p: torch.cat(v) if v else torch.empty(0, dtype=out_dtype) for p, v in out.items()}
    return result[pools[0]] if isinstance(pool, str) else result
