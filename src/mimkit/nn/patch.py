"""Patchify / unpatchify in MAE's layout and the per-patch normalized pixel target.

Patch vectors are ``(p, p, C)`` flattened with the channel as the fastest index, patches in
row-major grid order. Predictions of every pixel-target method use
this same layout.
"""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p*p*C)`` with ``L = (H/p)*(W/p)``."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, p, p, c
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``(B, L, p*p*C)`` -> ``(B, C, H, W)``; the grid defaults to square."""
    b, n, _ = patches.shape
    p = patch_size
    if grid is None:
        gh = gw = int(round(n**0.5))
        if gh * gw != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(h, w)")
    else:
        gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # b, c, gh, p, gw, p
    return x.reshape(b, channels, gh * p, gw * p)


def patch_stats(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and ``sqrt(unbiased var + eps)`` over all values of a patch.

    Returns ``(mean, std)`` each ``(B, L, 1)``; MAE's ``norm_pix_loss`` statistics.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as in the official code
    return mean, (var + eps).sqrt()


def norm_pix(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalized target ``(t - mean) / sqrt(var_unbiased + eps)``; shape preserved."""
    mean, std = patch_stats(patches, eps)
    return (patches - mean) / std


def gapped_patchify(
    images: torch.Tensor,
    patch_size: int,
    gap: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latent MIM's patchify with random gaps.

    The image ``(B, C, G*(p+gap), G*(p+gap))`` is cut into cells of ``p + gap`` pixels; from every
    (image, cell) a ``p x p`` patch starting at independent integer row/column offsets in
    ``[0, gap-1]`` is taken. ``gap=0`` is exactly :func:`patchify`.

    Returns ``(B, L, p*p*C)`` in :func:`patchify`'s layout.
    """
    if gap == 0:
        return patchify(images, patch_size)
    b, c, h, w = images.shape
    cell = patch_size + gap
    if h % cell or w % cell:
        raise ValueError(f"image {h}x{w} is not a whole number of {cell}-pixel cells (patch {patch_size} + gap {gap})")
    gh, gw = h // cell, w // cell
    dev = images.device
    off_r = torch.randint(0, gap, (b, gh, gw), generator=generator, device=dev)
    off_c = torch.randint(0, gap, (b, gh, gw), generator=generator, device=dev)
    ar = torch.arange(patch_size, device=dev)
    # absolute pixel rows/cols for every (image, cell, within-patch index)
    rows = (torch.arange(gh, device=dev) * cell)[None, :, None, None] + off_r[..., None] + ar  # b,gh,gw,p
    cols = (torch.arange(gw, device=dev) * cell)[None, None, :, None] + off_c[..., None] + ar  # b,gh,gw,p
    flat = rows[..., :, None] * w + cols[..., None, :]  # b,gh,gw,p,p
    idx = flat.reshape(b, 1, -1).expand(b, c, -1)
    px = images.reshape(b, c, h * w).gather(2, idx)  # b,c,gh*gw*p*p
    px = px.reshape(b, c, gh * gw, patch_size, patch_size).permute(0, 2, 3, 4, 1)
    return px.reshape(b, gh * gw, patch_size * patch_size * c)
