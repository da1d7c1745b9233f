"""Pictures of what a frozen encoder sees, for any encoder :mod:`mimkit.nn.adapters` accepts.

* :func:`pca_rgb` — the first three principal components of the patch tokens (fitted jointly on all
  shown images, as in DINOv2's feature visualisations) mapped to RGB per patch.
* :func:`cls_attention` — the last block's attention of the class token to every patch, averaged
  over heads (DINO's attention maps), from the block's own ``qkv`` projection.
* :func:`tsne_points` — a 2-D t-SNE (scikit-learn) of pooled image features.
* :func:`save_token_pictures` — the three as ``pca.png``, ``attention.png`` and ``tsne.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def pca_rgb(patch_tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``(N, L, D)`` patch tokens of a ``grid`` ``(gh, gw)`` (default: square) -> ``(N, gh, gw, 3)`` in
    ``[0, 1]``: the top-3 principal components of all ``N·L`` tokens, each min-max scaled."""
    n, L, d = patch_tokens.shape
    if grid is None:
        h = int(round(L**0.5))
        if h * h != L:
            raise ValueError(f"{L} patch tokens do not form a square grid; pass grid=(gh, gw)")
        grid = (h, h)
    if grid[0] * grid[1] != L:
        raise ValueError(f"{L} patch tokens do not form a {grid[0]}x{grid[1]} grid")
    x = patch_tokens.reshape(-1, d).double()
    x = x - x.mean(0, keepdim=True)
    k = min(3, d, x.shape[0])
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    proj = x @ v[:k].T
    if k < 3:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - k)], 1)
    lo, hi = proj.min(0).values, proj.max(0).values
    rgb = (proj - lo) / (hi - lo).clamp_min(1e-12)
    return rgb.reshape(n, grid[0], grid[1], 3).float()


@torch.no_grad()
def cls_attention(encoder, images: torch.Tensor) -> torch.Tensor:
    """Normalised images ``(N, C, H, W)`` -> ``(N, gh, gw)`` (the encoder's patch grid): the last block's
    class-token attention to the patches, mean over heads. Needs a class token and an attention module
    with ``qkv`` and ``num_heads`` (mimkit and timm ViTs)."""
    if not encoder.has_class_token:
        raise ValueError("attention maps of the class token need an encoder with a class token")
    attn = encoder.blocks[-1].attn
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    try:
        encoder.forward_features(images)
    finally:
        handle.remove()
    x = seen["x"]
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q = getattr(attn, "q_norm", torch.nn.Identity())(q)
    k = getattr(attn, "k_norm", torch.nn.Identity())(k)
    a = ((q[:, :, :1].float() @ k.float().transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)  # (B, H, 1, N)
    prefix = encoder.num_prefix_tokens
    patches = a[:, :, 0, prefix:].mean(1)
    from mimkit.nn.adapters import token_grid

    return patches.reshape(b, *token_grid(encoder, patches.shape[1], tuple(images.shape[-2:])))


def tsne_points(feats: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """``(N, D)`` -> ``(N, 2)`` t-SNE embedding (scikit-learn, PCA init)."""
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, max(1.0, (len(feats) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats.double().numpy())


def save_token_pictures(encoder, images: torch.Tensor, labels: torch.Tensor, mean, std, out_dir: str | Path,
                        class_names: list[str] | None = None, n_show: int = 8, seed: int = 0,
                        tsne_feats: torch.Tensor | None = None) -> dict[str, Path]:
    """Write ``pca.png`` (image | PCA of patch tokens), ``attention.png`` (image | class-token attention,
    when the encoder has a class token) and ``tsne.png`` (pooled features coloured by class) under
    ``out_dir``; ``images`` uint8 ``(N, C, H, W)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mimkit.eval.features import extract_features, normalize_images

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc = encoder.eval()
    dev = next(enc.parameters()).device
    show = images[:n_show]
    x = normalize_images(show.to(dev), mean, std)
    prefix = enc.num_prefix_tokens
    with torch.no_grad():
        tokens = enc.forward_features(x)[:, prefix:].float().cpu()
    disp = show.float().div(255).permute(0, 2, 3, 1).numpy()
    disp = disp[..., 0] if disp.shape[-1] == 1 else disp
    written = {}

    def grid(maps, name, title, cmap=None):
        fig, axes = plt.subplots(2, len(show), figsize=(1.6 * len(show), 3.8), squeeze=False)
        for i in range(len(show)):
            axes[0][i].imshow(disp[i], cmap="gray" if disp.ndim == 3 else None)
            axes[1][i].imshow(maps[i], cmap=cmap, interpolation="nearest")
            for ax in (axes[0][i], axes[1][i]):
                ax.axis("off")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written[name.split(".")[0]] = out / name

    from mimkit.nn.adapters import token_grid

    grid(pca_rgb(tokens, token_grid(enc, tokens.shape[1], tuple(show.shape[-2:]))).numpy(), "pca.png",
         "patch tokens: first three principal components as RGB (fitted on all shown images)")
    if enc.has_class_token and hasattr(enc.blocks[-1], "attn"):
        grid(cls_attention(enc, x).cpu().numpy(), "attention.png",
             "last block: class-token attention to each patch (mean over heads; bright = high)", cmap="inferno")
    feats = tsne_feats if tsne_feats is not None else extract_features(
        enc, images, pool="cls" if enc.has_class_token else "mean", mean=mean, std=std)
    pts = tsne_points(feats, seed)
    fig, ax = plt.subplots(figsize=(6, 5))
    lab = labels.numpy()
    for c in np.unique(lab):
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        ax.scatter(pts[lab == c, 0], pts[lab == c, 1], s=6, label=name)
    ax.legend(fontsize=7, markerscale=2)
    ax.set_title("t-SNE of image features")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "tsne.png", dpi=110)
    plt.close(fig)
    written["tsne"] = out / "tsne.png"
    return written
