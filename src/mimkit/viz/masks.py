"""Pictures of mask plans: each view's visible part, a salience-based masking's salience and the mask
it chose (PNG files).

Each ``save_*`` function writes one PNG with matplotlib's Agg backend and returns its path::

    save_views(images, plan, "views.png", patch_size=4)                 # rows: images; columns:
        # input | which view sees each patch | view 1 | ... | view K (masked patches greyed out)
    save_salience_masks(images, salience, plan.mask, "salience.png", 4) # rows: images; columns:
        # input | salience (0..1) | masked input (realized ratio in the title)
    views_picture(model, images, path)        # a plan drawn by the method (model.picture_data)
    salience_picture(model, images, path)     # the salience of the method's masking and its mask

Images are the normalized model inputs ``(B, C, H, W)``; each is min-max scaled for display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mimkit.masking import MaskPlan  # noqa: E402
from mimkit.methods import PictureData  # noqa: E402

MASK_GREY = 0.5


def _display(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H, W, 3)`` in [0, 1], min-max per image."""
    x = images.detach().float().cpu()
    lo = x.flatten(1).amin(1)[:, None, None, None]
    hi = x.flatten(1).amax(1)[:, None, None, None]
    x = (x - lo) / (hi - lo).clamp(min=1e-8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3].permute(0, 2, 3, 1)


def _patch_map(values: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """``(B, L)`` per-patch values -> ``(B, H, W)`` pixel map."""
    b = values.shape[0]
    v = values.detach().float().cpu().reshape(b, *grid)
    return v.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)


def _grid_of(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    return images.shape[-2] // patch_size, images.shape[-1] // patch_size


def _masked(display: torch.Tensor, mask_px: torch.Tensor) -> torch.Tensor:
    """Grey out masked pixels: ``display (B, H, W, 3)``, ``mask_px (B, H, W)`` 1 = masked."""
    m = mask_px[..., None]
    return display * (1 - m) + MASK_GREY * m


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_views(
    images: torch.Tensor, plan: MaskPlan, path: str | Path, patch_size: int, max_images: int = 4
) -> Path:
    """The views of each image: input, a map of which view sees each patch (a partition colours
    every patch exactly once; otherwise the number of views that see it), then each view's visible
    part. ``plan`` has ``num_views`` sequences per image (``s = b * V + v``)."""
    b = min(images.shape[0], plan.batch_size, max_images)
    v = plan.num_views
    grid = _grid_of(images, patch_size)
    length = grid[0] * grid[1]
    disp = _display(images[:b])
    mask = plan.mask.detach().float().cpu().view(plan.batch_size, v, length)[:b]
    visible = 1 - mask
    count = visible.sum(1)  # (b, L)
    is_partition = bool((count == 1).all())
    owner = visible.argmax(1).float() if is_partition else count
    fig, axes = plt.subplots(b, v + 2, figsize=(1.6 * (v + 2), 1.6 * b), squeeze=False)
    owner_px = _patch_map(owner, grid, patch_size)
    for i in range(b):
        axes[i, 0].imshow(disp[i].numpy())
        axes[i, 1].imshow(owner_px[i].numpy(), cmap="tab10" if is_partition else "viridis",
                          vmin=0, vmax=9 if is_partition else max(1, v))
        for k in range(v):
            mk = _patch_map(mask[i : i + 1, k], grid, patch_size)
            axes[i, k + 2].imshow(_masked(disp[i : i + 1], mk)[0].numpy())
            if i == 0:
                axes[i, k + 2].set_title(f"view {k + 1}", fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 1].set_title("part of each patch" if is_partition else "views seeing it", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)


def save_salience_masks(
    images: torch.Tensor,
    salience: torch.Tensor,
    mask: torch.Tensor,
    path: str | Path,
    patch_size: int,
    max_images: int = 8,
) -> Path:
    """Per image: the input, the salience ``(B, L)`` (0..1) and the input with the chosen mask
    ``(B, L)`` (1 = masked) greyed out, titled with the realized mask ratio."""
    b = min(images.shape[0], max_images)
    grid = _grid_of(images, patch_size)
    disp = _display(images[:b])
    sal_px = _patch_map(salience[:b], grid, patch_size)
    mask_px = _patch_map(mask[:b], grid, patch_size)
    masked = _masked(disp, mask_px)
    ratios = mask[:b].float().mean(1).tolist()
    fig, axes = plt.subplots(b, 3, figsize=(5.0, 1.7 * b), squeeze=False)
    for i in range(b):
        axes[i, 0].imshow(disp[i].numpy())
        axes[i, 1].imshow(sal_px[i].numpy(), cmap="magma", vmin=0, vmax=1)
        axes[i, 2].imshow(masked[i].numpy())
        axes[i, 2].set_title(f"masked {ratios[i]:.2f}", fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 1].set_title("salience", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)


def draw_views(data: PictureData, encoder, path: str | Path, mean=None, std=None) -> Path:
    """The ``views`` picture of ``data`` (:func:`save_views`; ``mean``/``std`` unused: min-max display)."""
    return save_views(data.images, data.plan, path, encoder.patch_size, len(data.images))


def draw_salience(data: PictureData, encoder, path: str | Path, mean=None, std=None) -> Path:
    """The ``salience`` picture of ``data`` (:func:`save_salience_masks`)."""
    return save_salience_masks(data.images, data.maps["salience"], data.plan.mask, path, encoder.patch_size,
                               len(data.images))


@torch.no_grad()
def views_picture(
    model, images: torch.Tensor, path: str | Path, max_images: int = 4, generator: torch.Generator | None = None
) -> Path:
    """Draw the plan ``model.picture_data("views", ...)`` gives for the first ``max_images`` of the
    normalized ``images (B, C, H, W)`` (one view per image, or K) with :func:`save_views`."""
    return draw_views(model.picture_data("views", images[:max_images], generator), model.encoder, path)


@torch.no_grad()
def salience_picture(
    model, images: torch.Tensor, path: str | Path, max_images: int = 8, generator: torch.Generator | None = None
) -> Path:
    """The salience ``model.picture_data("salience", ...)`` gives and the mask its masking chooses (the
    warm start is ignored without ``progress``), saved with :func:`save_salience_masks`. Only for methods
    that declare ``salience`` pictures."""
    pics = model.capabilities.pictures
    if "salience" not in pics:
        raise ValueError(f"{type(model).__name__} does not use a salience-based masking (no 'salience' pictures); "
                         f"it draws: {', '.join(pics)}")
    return draw_salience(model.picture_data("salience", images[:max_images], generator), model.encoder, path)
