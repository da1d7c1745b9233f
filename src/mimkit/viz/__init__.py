"""Pictures as PNG files. ``draw_picture(kind, model, images, mean, std, path)`` draws any kind a
method declares in ``model.capabilities.pictures`` (:data:`mimkit.methods.PICTURES`); ``DRAWERS``
maps each kind to its function ``fn(model, x, path, seed, mean, std) -> Path`` on normalized images
``x`` (``mean``/``std`` undo the normalization for display)."""

from __future__ import annotations

from pathlib import Path

import torch

from mimkit.eval.features import normalize_images


def _reconstruction(model, x, path, seed, mean, std):
    from mimkit.viz.reconstruction import save_reconstruction

    return save_reconstruction(model, x, mean, std, path, seed=seed)


def _views(model, x, path, seed, mean, std):
    from mimkit.viz.masks import views_picture

    return views_picture(model, x, path, max_images=min(len(x), 4), generator=torch.Generator(x.device).manual_seed(seed))


def _salience(model, x, path, seed, mean, std):
    from mimkit.viz.masks import sbam_picture

    return sbam_picture(model, x, path, max_images=len(x), generator=torch.Generator(x.device).manual_seed(seed))


def _mixing(model, x, path, seed, mean, std):
    from mimkit.viz.mixing import mixing_picture

    return mixing_picture(model, x, path, seed=seed, mean=mean, std=std)


def _teacher_drops(model, x, path, seed, mean, std):
    from mimkit.viz.teacher import teacher_drops_picture

    return teacher_drops_picture(model, x, path, seed=seed, mean=mean, std=std)


def _regressor(model, x, path, seed, mean, std):
    from mimkit.viz.regressor import regressor_picture

    return regressor_picture(model, x, path, seed=seed, mean=mean, std=std)


DRAWERS = {
    "reconstruction": _reconstruction,
    "views": _views,
    "salience": _salience,
    "mixing": _mixing,  # MixedAE: mixed input and unmixed reconstructions
    "teacher_drops": _teacher_drops,  # PCAE: teacher tokens kept after each drop stage
    "regressor": _regressor,  # CAE: regressor predictions vs the alignment target
}


def draw_picture(kind: str, model, images: torch.Tensor, mean, std, path: str | Path, seed: int = 0) -> Path:
    """Draw picture ``kind`` of ``model`` on ``images`` (uint8, normalized with ``mean``/``std``, or
    already-normalized float) into ``path``. Raises ``ValueError`` naming the kinds the method draws."""
    pics = model.capabilities.pictures
    if kind not in pics:
        raise ValueError(f"{type(model).__name__} does not draw '{kind}' pictures; it draws: {', '.join(pics)}")
    if kind not in DRAWERS:
        raise ValueError(f"no drawer for picture kind '{kind}'")
    device = next(model.parameters()).device
    x = normalize_images(images.to(device), mean, std)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return Path(DRAWERS[kind](model, x, path, seed, mean, std))
    finally:
        model.train(was)


__all__ = ["DRAWERS", "draw_picture"]
