"""Reconstruction pictures: original | masked | prediction | prediction + visible patches.

With a per-patch normalized target (norm-pix) the network predicts each patch's *normalized*
pixels, so its raw output is not an image. We map every predicted patch back with that patch's own
mean and std from the original image (the same statistics the target used) and say so in the
column title. Without norm-pix the prediction is shown as is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mimkit.eval.features import normalize_images
from mimkit.methods import PictureData, Reconstruction
from mimkit.nn.patch import patch_stats, patchify, unpatchify


def reconstruction_images(images: torch.Tensor, rec: Reconstruction, encoder,
                          fill: torch.Tensor | float = 0.0) -> dict[str, torch.Tensor]:
    """The panels of a :class:`~mimkit.methods.Reconstruction` of normalized ``images (B, C, H, W)`` on
    ``encoder``'s patch grid, as normalized-space tensors ``(B, C, H, W)``: ``original``, ``masked``
    (masked patches set to ``fill``, a value or one per channel), ``pred`` (prediction in pixel space),
    ``pasted`` (prediction with the visible patches of the original pasted back); and ``mask (B, L)``,
    ``norm_target``."""
    p, c = encoder.patch_size, encoder.in_chans
    pred = rec.pred.float()
    mask = rec.mask.float()
    target_px = patchify(images.float(), p)
    if rec.norm_target:
        mean, std = patch_stats(target_px)
        pred = pred * std + mean  # each patch back with its own statistics
    m = mask[..., None]
    grid = encoder.grid_size
    lo = torch.as_tensor(fill, dtype=torch.float32, device=images.device).reshape(-1)
    lo = lo.repeat(p * p) if lo.numel() == c else lo  # per-channel fill in (p, p, C) patch layout
    return {
        "original": images.float(),
        "masked": unpatchify(target_px * (1 - m) + lo * m, p, c, grid),
        "pred": unpatchify(pred, p, c, grid),
        "pasted": unpatchify(target_px * (1 - m) + pred * m, p, c, grid),
        "mask": mask,
        "norm_target": rec.norm_target,
    }


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, seed: int = 0, plan=None, fill: torch.Tensor | float = 0.0) -> dict[str, torch.Tensor]:
    """Run a pixel-prediction method (``"reconstruction"`` in its capabilities) on normalized
    ``images (B, C, H, W)`` with a mask drawn by the method from a generator seeded with ``seed`` (or the
    given ``plan``) and return :func:`reconstruction_images`. Only the first view is used for multi-view
    methods.
    """
    was = model.training
    model.eval()
    try:
        if plan is None:
            g = torch.Generator(device=images.device).manual_seed(seed)
            rec = model.picture_data("reconstruction", images, g).reconstruction
        else:
            rec = model.reconstruct(images, plan)
    finally:
        model.train(was)
    return reconstruction_images(images, rec, model.encoder, fill)


def grey_fill(mean, std) -> torch.Tensor:
    """Mid-grey (0.5 in [0, 1] pixels) in the normalized space of ``mean``/``std``, one value per channel."""
    return (0.5 - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)


def _to_display(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalized ``(B, C, H, W)`` -> ``(B, H, W, C)`` in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x.cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1)


def draw_reconstruction(data: PictureData, encoder, path: str | Path, mean, std) -> Path:
    """Write a PNG grid of ``data.reconstruction``, one row per image: original | masked | prediction |
    prediction + visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = data.images
    r = reconstruction_images(x, data.reconstruction, encoder, grey_fill(mean, std).to(x.device))
    norm_target = r["norm_target"]
    cols = [
        ("original", "original"),
        ("masked", f"masked ({r['mask'].mean().item():.0%}, grey)"),
        ("pred", "prediction" + ("\n(per-patch denormalized)" if norm_target else "")),
        ("pasted", "prediction + visible" + ("\n(per-patch denormalized)" if norm_target else "")),
    ]
    shown = {k: _to_display(r[k], mean, std) for k, _ in cols}
    b = x.shape[0]
    fig, axes = plt.subplots(b, len(cols), figsize=(2.2 * len(cols), 2.2 * b + 0.4), squeeze=False)
    grey = x.shape[1] == 1
    for i in range(b):
        for j, (key, title) in enumerate(cols):
            ax = axes[i][j]
            img = shown[key][i]
            ax.imshow(img[..., 0].numpy() if grey else img.numpy(), cmap="gray" if grey else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_reconstruction(model, images: torch.Tensor, mean, std, path: str | Path, seed: int = 0) -> Path:
    """Write a PNG grid, one row per image: original | masked | prediction | prediction + visible.

    ``images``: uint8 ``(B, C, H, W)`` or already-normalized float.
    """
    device = next(model.parameters()).device
    x = normalize_images(images.to(device), mean, std)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            data = model.picture_data("reconstruction", x, torch.Generator(device=device).manual_seed(seed))
    finally:
        model.train(was)
    return draw_reconstruction(data, model.encoder, path, mean, std)
