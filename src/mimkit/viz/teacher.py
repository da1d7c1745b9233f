"""The teacher-drops picture (PNG): which masked patches a token-dropping teacher keeps at each stage.

Rows: images. Columns: the input | what the student sees (masked patches greyed) | one column per
stage of :class:`~mimkit.methods.PictureData` of kind ``teacher_drops`` (the teacher's input, then
after each drop stage; titled by the method). Kept patches are shown in full with a red tint; dropped
ones dimmed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mimkit.methods import PictureData  # noqa: E402
from mimkit.viz.masks import _display, _masked, _patch_map, _save  # noqa: E402

DIM = 0.25  # brightness kept by dropped patches


def _highlight(disp: torch.Tensor, kept_px: torch.Tensor) -> torch.Tensor:
    """``disp (H, W, 3)`` with pixels where ``kept_px (H, W)`` is 0 dimmed and kept ones tinted red."""
    k = kept_px[..., None]
    red = torch.tensor([1.0, 0.15, 0.15])
    kept = 0.65 * disp + 0.35 * red
    return kept * k + DIM * disp * (1 - k)


def draw_teacher_drops(data: PictureData, encoder, path: str | Path, mean=None, std=None) -> Path:
    """Draw ``data`` into ``path`` (``mean``/``std`` unused: images are min-max scaled for display)."""
    images, plan = data.images, data.plan
    b = images.shape[0]
    p, grid, length = encoder.patch_size, encoder.grid_size, encoder.num_patches
    disp = _display(images)
    mask_px = _patch_map(plan.mask[:b], grid, p)
    stages = data.stages
    fig, axes = plt.subplots(b, 2 + len(stages), figsize=(1.6 * (2 + len(stages)), 1.7 * b), squeeze=False)
    titles = ["input", "student sees"] + [t for t, _ in stages]
    for j, (_, ids) in enumerate(stages):
        kept = torch.zeros(b, length, device=ids.device).scatter_(1, ids[:b], 1.0)
        kept_px = _patch_map(kept, grid, p)
        for i in range(b):
            axes[i, 2 + j].imshow(_highlight(disp[i], kept_px[i]).clamp(0, 1).numpy())
    for i in range(b):
        axes[i, 0].imshow(disp[i].numpy())
        axes[i, 1].imshow(_masked(disp[i : i + 1], mask_px[i : i + 1])[0].numpy())
    for j, t in enumerate(titles):
        axes[0, j].set_title(t, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)
