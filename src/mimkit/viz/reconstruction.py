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
from mimkit.nn.patch import patch_stats, patchify, unpatchify


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, seed: int = 0, plan=None, fill: torch.Tensor | float = 0.0) -> dict[str, torch.Tensor]:
    """Run a pixel-prediction method (``"reconstruction"`` in its capabilities) on normalized
    ``images (B, C, H, W)`` with a mask drawn by ``model.make_plan`` from a generator seeded with
    ``seed`` (or the given ``plan``).

    Returns normalized-space tensors ``(B, C, H, W)``: ``original``, ``masked`` (masked patches set
    to ``fill``), ``pred`` (prediction in pixel space), ``pasted`` (prediction with the visible patches
    of the original pasted back), and ``mask (B, L)``. Only the first view is used for multi-view
    methods.
    """
    was = model.training
    model.eval()
    try:
        if plan is None:
            g = torch.Generator(device=images.device).manual_seed(seed)
            plan = model.make_plan(images, None, g)
        rec = model.reconstruct(images, plan)
    finally:
        model.train(was)
    p, c = model.encoder.patch_size, model.encoder.in_chans
    pred = rec.pred.float()
    mask = rec.mask.float()
    target_px = patchify(images.float(), p)
    if rec.norm_pix:
        mean, std = patch_stats(target_px)
        pred = pred * std + mean  # each patch back with its own statistics
    m = mask[..., None]
    grid = model.encoder.grid_size
    lo = torch.as_tensor(fill, dtype=torch.float32, device=images.device).reshape(-1)
    lo = lo.repeat(p * p) if lo.numel() == c else lo  # per-channel fill in (p, p, C) patch layout
    return {
        "original": images.float(),
        "masked": unpatchify(target_px * (1 - m) + lo * m, p, c, grid),
        "pred": unpatchify(pred, p, c, grid),
        "pasted": unpatchify(target_px * (1 - m) + pred * m, p, c, grid),
        "mask": mask,
        "norm_pix": rec.norm_pix,
    }


def _to_display(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalized ``(B, C, H, W)`` -> ``(B, H, W, C)`` in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x.cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1)


def save_reconstruction(model, images: torch.Tensor, mean, std, path: str | Path, seed: int = 0) -> Path:
    """Write a PNG grid, one row per image: original | masked | prediction | prediction + visible.

    ``images``: uint8 ``(B, C, H, W)`` or already-normalized float.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    x = normalize_images(images.to(device), mean, std)
    grey_fill = (0.5 - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    r = reconstruct(model, x, seed=seed, fill=grey_fill.to(device))
    norm_pix = r["norm_pix"]
    cols = [
        ("original", "original"),
        ("masked", f"masked ({r['mask'].mean().item():.0%}, grey)"),
        ("pred", "prediction" + ("\n(per-patch denormalized)" if norm_pix else "")),
        ("pasted", "prediction + visible" + ("\n(per-patch denormalized)" if norm_pix else "")),
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
