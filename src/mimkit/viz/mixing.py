"""MixedAE picture: one mixed input and its unmixed reconstructions (PNG).

Layout (one group of ``G`` images, the first ``G`` of the batch)::

    row 0:  mixed input (what the encoder sees) | which image owns each patch | ...
    row k:  image k | its own patches (the rest grey) | prediction | prediction + own patches

Predictions are the decoder's outputs for image ``k`` decoded from its own tokens of the mixed
sequence (the encoder running TopK attention, as in training); with norm-pix targets each predicted
patch is mapped back with that patch's own mean and std (as :mod:`mimkit.viz.reconstruction` does).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mimkit.nn.patch import patchify, unpatchify  # noqa: E402
from mimkit.viz.reconstruction import _to_display, reconstruct  # noqa: E402


def mixed_images(images: torch.Tensor, source: torch.Tensor, patch_size: int, group_size: int) -> torch.Tensor:
    """The mixed inputs in pixel space: ``images (B, C, H, W)`` normalized, ``source (B, L)`` (the plan's
    owner of each position, equal within a group) -> ``(B/G, C, H, W)``, patch ``l`` of group ``g``
    taken from image ``g*G + source[g*G, l]``."""
    b, c = images.shape[:2]
    g = group_size
    px = patchify(images.float(), patch_size)  # (B, L, P)
    length, p = px.shape[1:]
    px = px.view(b // g, g, length, p)
    src = source[::g]  # (B/G, L)
    mixed = torch.gather(px, 1, src[:, None, :, None].expand(-1, 1, -1, p)).squeeze(1)
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    return unpatchify(mixed, patch_size, c, grid)


@torch.no_grad()
def mixing_picture(model, x: torch.Tensor, path: str | Path, seed: int = 0, mean=(0.5,), std=(0.5,)) -> Path:
    """Draw the first group of ``x`` (normalized ``(B, C, H, W)``, ``B >= G``) mixed by
    ``model.make_plan`` with a generator seeded with ``seed``, and its per-image reconstructions."""
    g = model.group_size
    if x.shape[0] < g:
        raise ValueError(f"the mixing picture needs at least {g} images (one group of method.group_size), got {x.shape[0]}")
    x = x[:g]
    enc = model.encoder
    p = enc.patch_size
    plan = model.make_plan(x, None, torch.Generator(device=x.device).manual_seed(seed))
    grey = (0.5 - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    r = reconstruct(model, x, plan=plan, fill=grey.to(x.device))
    mixed = mixed_images(x, plan.source, p, g)
    owner = plan.source[0].float().cpu().reshape(*enc.grid_size)
    owner = owner.repeat_interleave(p, 0).repeat_interleave(p, 1)

    cols = [("original", "image k"), ("masked", "its own patches"),
            ("pred", "prediction" + ("\n(per-patch denormalized)" if r["norm_pix"] else "")),
            ("pasted", "prediction + own patches")]
    shown = {k: _to_display(r[k], mean, std) for k, _ in cols}
    mixed_d = _to_display(mixed, mean, std)
    one_channel = x.shape[1] == 1
    fig, axes = plt.subplots(g + 1, len(cols), figsize=(2.0 * len(cols), 2.0 * (g + 1) + 0.3), squeeze=False)

    def show(ax, img):
        ax.imshow(img[..., 0] if one_channel else img.numpy(), cmap="gray" if one_channel else None, vmin=0, vmax=1)

    show(axes[0][0], mixed_d[0])
    axes[0][0].set_title(f"mixed input ({g} images)", fontsize=8)
    axes[0][1].imshow(owner.numpy(), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    axes[0][1].set_title("owner of each patch", fontsize=8)
    for k in range(g):
        for j, (key, title) in enumerate(cols):
            ax = axes[k + 1][j]
            show(ax, shown[key][k])
            if k == 0:
                ax.set_title(title, fontsize=8)
        axes[k + 1][0].set_ylabel(f"image {k}", fontsize=8, color=plt.get_cmap("tab10")(k))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[0][2:]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
