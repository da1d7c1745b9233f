"""Batched, on-device image augmentation (no Python loop over samples).

All random numbers are drawn with ``torch.rand(..., generator=generator, device=images.device)``:
the same generator state gives the same output, and ``generator`` must live on the images' device
(``torch.Generator(device="cuda")`` for CUDA tensors). ``generator=None`` uses the global RNG.

:func:`random_resized_crop_flip` follows torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``
semantics (integer crop boxes, 10 attempts, center-crop fallback), but crops and resizes the whole
batch with one ``F.affine_grid`` + ``F.grid_sample`` call (``align_corners=False``, border
padding). Away from the crop's edges the result equals torchvision's
``resized_crop(..., antialias=False)``; in the outermost output pixels the interpolation taps may
read the real pixels just outside the crop box (torchvision clamps to the box instead). Unlike
torchvision's default tensor resize there is no antialiasing when a crop is shrunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from mimkit.nn.vit import image_hw

__all__ = ["flip_only", "normalize", "random_resized_crop_flip", "rrc_params"]

_ATTEMPTS = 10


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the images are on {device}; create it with "
            f"torch.Generator(device={device.type!r})"
        )


def rrc_params(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``RandomResizedCrop`` boxes for a batch, vectorized.

    Per sample, 10 candidate boxes are drawn at once: area ``~ U(scale) * H * W``, aspect
    ``w / h = exp(U(log ratio))``, ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area /
    aspect))``. The first candidate that fits (``0 < w <= W and 0 < h <= H``) is used, with its top
    left corner uniform over the valid positions. If none fits, the fallback is torchvision's: the
    largest center crop whose aspect ratio is clamped to ``ratio``.

    Args:
        batch: number of boxes ``B``.
        height, width: input size ``H, W``.
        scale: range of the crop area as a fraction of ``H * W``.
        ratio: range of the crop aspect ratio ``w / h``.
        generator: RNG on ``device`` (or ``None`` for the global one).
        device: where the returned tensors live.

    Returns:
        ``top, left, h, w``: four ``(B,)`` int64 tensors (pixels).
    """
    device = torch.device(device)
    _check_generator(generator, device)
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(
            f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got scale={scale}, ratio={ratio}"
        )
    rnd = torch.rand(4, batch, _ATTEMPTS, generator=generator, device=device, dtype=torch.float64)
    area = height * width
    target_area = area * (scale[0] + (scale[1] - scale[0]) * rnd[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * rnd[1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting candidate
    any_ok = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    u_top = rnd[2].gather(1, first).squeeze(1)
    u_left = rnd[3].gather(1, first).squeeze(1)

    # torchvision fallback: center crop with the aspect ratio clamped to `ratio`
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    w = torch.where(any_ok, w, torch.full_like(w, fw)).to(torch.int64)
    h = torch.where(any_ok, h, torch.full_like(h, fh)).to(torch.int64)

    top_rand = torch.minimum(torch.floor(u_top * (height - h + 1)).to(torch.int64), height - h)
    left_rand = torch.minimum(torch.floor(u_left * (width - w + 1)).to(torch.int64), width - w)
    top = torch.where(any_ok, top_rand, (height - h) // 2)
    left = torch.where(any_ok, left_rand, (width - w) // 2)
    return top, left, h, w


def random_resized_crop_flip(
    images: torch.Tensor,
    out_size: int | Sequence[int],
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear",
) -> torch.Tensor:
    """Random resized crop + horizontal flip of a whole batch in one ``grid_sample`` call.

    Args:
        images: ``(B, C, H, W)`` floating tensor (any value range; normalizing before or after
            gives the same result since interpolation weights sum to 1 and borders are replicated).
        out_size: output side ``S`` or ``(S_h, S_w)``.
        scale: crop area range as a fraction of ``H * W`` (see :func:`rrc_params`).
        ratio: crop aspect-ratio range ``w / h``.
        flip_p: probability of a horizontal flip, per sample.
        generator: RNG on ``images.device``; same generator state -> identical output.
        interpolation: ``grid_sample`` mode. ``"bicubic"`` can overshoot the input range slightly.

    Returns:
        ``(B, C, S_h, S_w)`` tensor, same dtype and device as ``images``.

    With ``scale=(1, 1)``, ``ratio=(1, 1)``, ``flip_p=0`` and ``out_size == H == W`` the output
    equals the input up to float rounding (sample points hit pixel centers exactly).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point (got {images.dtype}); see normalize()")
    b, _, height, width = images.shape
    out_h, out_w = image_hw(out_size)
    device = images.device
    top, left, h, w = rrc_params(b, height, width, scale, ratio, generator, device)
    flip = torch.rand(b, generator=generator, device=device) < flip_p
    if b == 0:
        return images.new_empty(0, images.shape[1], out_h, out_w)

    # Output normalized coords u in [-1, 1] map to input pixel-edge coords x = left + (u+1)/2 * w,
    # i.e. to input normalized coords (w/W) * u + (2*left + w)/W - 1 (align_corners=False).
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    wf, hf = w.to(dtype), h.to(dtype)
    sx = wf / width * torch.where(flip, -1.0, 1.0).to(dtype)
    sy = hf / height
    tx = (2 * left.to(dtype) + wf) / width - 1
    ty = (2 * top.to(dtype) + hf) / height - 1
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, images.shape[1], out_h, out_w], align_corners=False)
    out = F.grid_sample(images.to(dtype), grid, mode=interpolation, padding_mode="border", align_corners=False)
    return out.to(images.dtype)


def flip_only(images: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each sample horizontally with probability ``p``.

    Args:
        images: ``(B, C, H, W)`` tensor of any dtype.
        p: flip probability per sample.
        generator: RNG on ``images.device``.

    Returns:
        ``(B, C, H, W)`` tensor, a new tensor (the input is not modified).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    _check_generator(generator, images.device)
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Scale to ``[0, 1]`` and standardize per channel: ``(x / 255 - mean) / std``.

    Args:
        images: ``(B, C, H, W)`` (or ``(C, H, W)``); uint8 values are divided by 255, floating
            values are taken to be in ``[0, 1]`` already.
        mean, std: per-channel statistics, length ``C`` (or 1, broadcast to all channels).
        dtype: output floating dtype.

    Returns:
        Tensor of the same shape, ``dtype``, on the same device.
    """
    channels = images.shape[-3]
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise ValueError(f"mean/std need 1 or {channels} entries, got {len(mean)} and {len(std)}")
    x = images.to(dtype)
    if images.dtype == torch.uint8:
        x = x / 255.0
    m = torch.tensor(mean, dtype=dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=images.device).view(-1, 1, 1)
    return (x - m) / s
