"""The regressor picture: how well a latent regressor's predictions match their targets.

One row per image: the input | the mask (masked patches greyed out) | a per-patch map of the cosine
between the regressor's prediction and its target at every masked patch (visible patches blank), from
:class:`~mimkit.methods.PictureData` of kind ``regressor`` (``maps["cos"] (B, L)``, NaN at visible
patches, and the picture's ``title``). Which target it is (the encoder's own representation of the
masked patch, a frozen teacher's token) is the method's to say in the title.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mimkit.methods import PictureData
from mimkit.viz.masks import _display, _masked, _patch_map, _save


def draw_regressor(data: PictureData, encoder, path: str | Path, mean=None, std=None) -> Path:
    """Draw ``data`` into ``path`` (``mean``/``std`` unused: images are min-max scaled for display, as the
    mask pictures)."""
    import matplotlib.pyplot as plt

    x, plan = data.images, data.plan
    cos = data.maps["cos"].float().cpu()  # (B, L), NaN at visible
    p = encoder.patch_size
    grid = encoder.grid_size
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
    if data.title:
        fig.suptitle(data.title, fontsize=9)
    return _save(fig, path)
