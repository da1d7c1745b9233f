"""PCAE's progressive teacher as a picture (PNG): which masked patches survive each drop stage.

Rows: images. Columns: the input | what the student sees (masked patches greyed) | the teacher's input
(the masked patches; visible ones greyed) | after drop stage 1 | ... | after the last stage (the
retained patches, the decoder's queries). Kept patches are shown in full with a red frame colour;
dropped ones dimmed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mimkit.viz.masks import _display, _masked, _patch_map, _save  # noqa: E402

DIM = 0.25  # brightness kept by dropped patches


class _StageRecorder:
    """Wraps a :class:`~mimkit.targets.TokenDropper`; records the grid ids kept after each drop stage."""

    def __init__(self, dropper):
        self.dropper = dropper
        self.stage_ids: list[torch.Tensor] = []

    def __call__(self, i, x, ids):
        res = self.dropper(i, x, ids)
        if i in self.dropper.after_blocks:
            self.stage_ids.append(ids if res is None else res[1])
        return res


def _highlight(disp: torch.Tensor, kept_px: torch.Tensor) -> torch.Tensor:
    """``disp (H, W, 3)`` with pixels where ``kept_px (H, W)`` is 0 dimmed and kept ones tinted red."""
    k = kept_px[..., None]
    red = torch.tensor([1.0, 0.15, 0.15])
    kept = 0.65 * disp + 0.35 * red
    return kept * k + DIM * disp * (1 - k)


@torch.no_grad()
def teacher_drops_picture(model, x: torch.Tensor, path: str | Path, seed: int = 0, mean=None, std=None,
                          max_images: int = 4) -> Path:
    """Draw ``model``'s (a :class:`~mimkit.methods.PCAE`) masking and its teacher's kept tokens after each
    stage for the normalized images ``x (B, C, H, W)`` (``mean``/``std`` unused: images are min-max
    scaled for display). ``seed`` fixes the mask (and the random drop)."""
    images = x[:max_images]
    b = images.shape[0]
    g = torch.Generator(images.device).manual_seed(seed)
    plan = model.make_plan(images, None, g)
    rec: dict = {}

    def select(dropper):
        rec["r"] = _StageRecorder(dropper)
        return rec["r"]

    masked_ids = plan.ids_masked()
    model.encode_teacher(images, masked_ids, g, select=select)
    stages = [masked_ids] + rec["r"].stage_ids
    enc = model.encoder
    p, grid, length = enc.patch_size, enc.grid_size, enc.num_patches
    disp = _display(images)
    mask_px = _patch_map(plan.mask[:b], grid, p)
    fig, axes = plt.subplots(b, 2 + len(stages), figsize=(1.6 * (2 + len(stages)), 1.7 * b), squeeze=False)
    titles = ["input", "student sees"] + [f"teacher in ({stages[0].shape[1]})"] + [
        f"after block {blk} ({s.shape[1]})" for blk, s in zip(sorted(model.after_blocks), stages[1:])
    ]
    for j, ids in enumerate(stages):
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
