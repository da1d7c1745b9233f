"""CAE's regressor picture: how well the latent regressor's predictions match their targets.

One row per image: the input | the mask (masked patches greyed out) | a per-patch map of the cosine
between the regressor's prediction and its target at every masked patch (visible patches blank).
For CAE the target is the alignment target (the encoder's own representation of the masked patch,
computed from the masked patches only); for CAE v2 it is the frozen teacher's token. Methods provide
``alignment_map(images, plan) -> (B, L)`` (NaN at visible patches).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mimkit.viz.masks import _display, _masked, _patch_map, _save


@torch.no_grad()
def regressor_picture(model, x: torch.Tensor, path: str | Path, seed: int = 0, mean=None, std=None,
                      max_images: int = 8) -> Path:
    """Draw the picture for normalized images ``x (B, C, H, W)`` with a mask drawn from ``seed``;
    ``mean``/``std`` are unused (images are min-max scaled for display, as the mask pictures)."""
    import matplotlib.pyplot as plt

    x = x[:max_images]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    plan = model.make_plan(x, None, gen)
    cos = model.alignment_map(x, plan).float().cpu()  # (B, L), NaN at visible
    p = model.encoder.patch_size
    grid = model.encoder.grid_size
    disp = _display(x)
    masked = _masked(disp, _patch_map(plan.mask.float(), grid, p)).numpy()
    cos_px = _patch_map(cos, grid, p).numpy()
    b = x.shape[0]
    fig, axes = plt.subplots(b, 3, figsize=(6.6, 2.2 * b), squeeze=False)
    fig.subplots_adjust(top=1 - 0.7 / (2.2 * b))
    im = None
    for i in range(b):
        axes[i, 0].imshow(disp[i].numpy())
        axes[i, 1].imshow(masked[i])
        im = axes[i, 2].imshow(cos_px[i], cmap="viridis", vmin=-1, vmax=1)
        mean_cos = torch.nanmean(cos[i]).item()
        axes[i, 2].set_title(f"cos {mean_cos:.2f}", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 1].set_title(f"mask ({plan.mask[0].mean().item():.0%})", fontsize=8)
    axes[0, 2].set_title(f"cos(pred, target)\ncos {torch.nanmean(cos[0]).item():.2f}", fontsize=8)
    fig.colorbar(im, ax=axes[:, 2].tolist(), shrink=0.6)
    fig.suptitle(f"{type(model).__name__}: regressor prediction vs target at masked patches", fontsize=9)
    return _save(fig, path)
