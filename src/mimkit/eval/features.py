"""One deterministic feature API: no masking, eval mode, batched, no gradients.

``pool``: ``cls`` (the cls token), ``mean`` (mean of patch tokens, cls excluded), ``all`` (every
token, ``(N, 1+L, D)``) or ``cls+mean`` (concatenated). ``norm``: apply the encoder's final
LayerNorm. ``block``: take an intermediate block's output instead of the last one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

POOLS = ("cls", "mean", "all", "cls+mean")


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """``(B, 1+L, D)`` -> ``(B, D)`` (cls / mean), ``(B, 2D)`` (cls+mean) or unchanged (all)."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(1)
    if pool == "cls+mean":
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    if pool == "all":
        return tokens
    raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")


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
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Features of every image, in order.

    Args:
        encoder: a module with ``forward_features(images, norm=, block=) -> (B, 1+L, D)``
            (:class:`mimkit.nn.ViTEncoder`, or a timm ViT wrapped by :mod:`mimkit.interop`).
        data: a uint8/float image tensor ``(N, C, H, W)`` (uint8 is normalized with ``mean``/``std``),
            or an iterable of ``images`` or ``(images, labels)`` batches already normalized.
        pool: one pooling or a list of them (then a dict ``{pool: features}`` is returned, from one pass).
    Returns:
        ``(N, D)`` float32 on CPU (``(N, 1+L, D)`` for ``all``), or a dict of them.
    """
    pools = [pool] if isinstance(pool, str) else list(pool)
    for p in pools:
        pool_tokens(torch.zeros(1, 2, 1), p)  # validate names early
    was_training = encoder.training
    encoder.eval()
    if device is None:
        device = next(encoder.parameters()).device
    device = torch.device(device)
    if isinstance(data, torch.Tensor):
        batches = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    else:
        batches = (b[0] if isinstance(b, tuple | list) else b for b in data)
    out: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
    try:
        for images in batches:
            images = normalize_images(images.to(device, non_blocking=True), mean, std)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                tokens = encoder.forward_features(images, norm=norm, block=block)
            for p in pools:
                out[p].append(pool_tokens(tokens, p).float().cpu())
    finally:
        encoder.train(was_training)
    result = {p: torch.cat(v) if v else torch.empty(0) for p, v in out.items()}
    return result[pools[0]] if isinstance(pool, str) else result
