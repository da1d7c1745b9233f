"""The mixing picture: one mixed input and each image's reconstruction from its own tokens (PNG).

Layout (one group of ``G`` images, :class:`~mimkit.methods.PictureData` of kind ``mixing``)::

    row 0:  mixed input (what the encoder sees) | which image owns each patch | ...
    row k:  image k | its own patches (the rest grey) | prediction | prediction + own patches

Predictions are the method's reconstructions of image ``k`` decoded from its own tokens of the mixed
sequence; with norm-pix targets each predicted patch is mapped back with that patch's own mean and std
(as :mod:`mimkit.viz.reconstruction` does).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mimkit.methods import PictureData  # noqa: E402
from mimkit.viz.reconstruction import _to_display, grey_fill, reconstruction_images  # noqa: E402


def draw_mixing(data: PictureData, encoder, path: str | Path, mean=(0.5,), std=(0.5,)) -> Path:
    """Draw ``data`` (kind ``mixing``: its ``images`` are one group) into ``path``."""
    x = data.images
    g = x.shape[0]
    p = encoder.patch_size
    r = reconstruction_images(x, data.reconstruction, encoder, grey_fill(mean, std).to(x.device))
    mixed = data.maps["mixed"]
    owner = data.maps["owner"][0].float().cpu().reshape(*encoder.grid_size)
    owner = owner.repeat_interleave(p, 0).repeat_interleave(p, 1)

    cols = [("original", "image k"), ("masked", "its own patches"),
            ("pred", "prediction" + ("\n(per-patch denormalized)" if r["norm_target"] else "")),
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


@torch.no_grad()
def mixing_picture(model, x: torch.Tensor, path: str | Path, seed: int = 0, mean=(0.5,), std=(0.5,)) -> Path:
    """Draw ``model.picture_data("mixing", ...)`` for normalized ``x (B, C, H, W)`` with a generator
    seeded with ``seed``."""
    data = model.picture_data("mixing", x, torch.Generator(device=x.device).manual_seed(seed))
    return draw_mixing(data, model.encoder, path, mean, std)
