"""A k-means codebook over per-patch normalized pixel patches: the module CAE's codebook target holds.

:class:`Codebook` keeps the centroids as a buffer (saved with the model) and maps patches to the id of
the nearest centroid. Fitting one (k-means on a data set's patches) is :mod:`mimkit.codebook`; reading
a file written by :meth:`Codebook.save` is :func:`mimkit.weights.read_codebook` (weights only).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mimkit.nn.patch import norm_pix, patchify

FIT_COMMAND = "python -m mimkit.codebook fit --dataset fashion_mnist --patch 4 --k 512 --out runs/codebook_fmnist.pt"


def patch_vectors(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Normalized images ``(B, C, H, W)`` -> per-patch normalized patches ``(B, L, p*p*C)`` (fp32)."""
    return norm_pix(patchify(images.float(), patch_size))


class Codebook(nn.Module):
    """Centroids ``(K, P)`` (a buffer, saved with the model that holds it) and the patch size.

    ``assign(patches (..., P)) -> (...)`` long: the id of the nearest centroid (squared Euclidean).
    ``tokens(images (B, C, H, W)) -> (B, L)``: :func:`patch_vectors` then :meth:`assign`."""

    def __init__(self, centroids: torch.Tensor, patch_size: int):
        super().__init__()
        self.register_buffer("centroids", centroids.float().clone())
        self.patch_size = patch_size

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    @torch.no_grad()
    def assign(self, patches: torch.Tensor) -> torch.Tensor:
        flat = patches.reshape(-1, patches.shape[-1]).float()
        c = self.centroids
        d = (c * c).sum(1)[None] - 2 * flat @ c.T  # |x|^2 is the same for every centroid
        return d.argmin(1).reshape(patches.shape[:-1])

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.assign(patch_vectors(images, self.patch_size))

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        p = self.patch_size
        in_chans = self.centroids.shape[1] // (p * p)
        torch.save({"centroids": self.centroids.cpu(), "patch_size": p, "in_chans": in_chans,
                    "meta": meta or {}}, path)
        return path
