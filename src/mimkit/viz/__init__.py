"""Pictures as PNG files. ``draw_picture(kind, model, images, mean, std, path)`` draws any kind a
method declares in ``model.capabilities.pictures`` (:data:`mimkit.methods.PICTURES`).

The method computes the picture's tensors (``model.picture_data(kind, images, generator)``, a
:class:`~mimkit.methods.PictureData`); this package only draws them. ``DRAWERS`` maps each kind to its
function ``fn(data, encoder, path, mean, std) -> Path`` (``encoder``: the method's encoder, for its
patch grid; ``mean``/``std`` undo the normalization for display). ``MAX_IMAGES``: at most how many of
the given images a kind shows (the method may show fewer)."""

from __future__ import annotations

from pathlib import Path

import torch

from mimkit.eval.features import normalize_images


def _reconstruction(data, encoder, path, mean, std):
    from mimkit.viz.reconstruction import draw_reconstruction

    return draw_reconstruction(data, encoder, path, mean, std)


def _views(data, encoder, path, mean, std):
    from mimkit.viz.masks import draw_views

    return draw_views(data, encoder, path)


def _salience(data, encoder, path, mean, std):
    from mimkit.viz.masks import draw_salience

    return draw_salience(data, encoder, path)


def _mixing(data, encoder, path, mean, std):
    from mimkit.viz.mixing import draw_mixing

    return draw_mixing(data, encoder, path, mean, std)


def _teacher_drops(data, encoder, path, mean, std):
    from mimkit.viz.teacher import draw_teacher_drops

    return draw_teacher_drops(data, encoder, path)


def _regressor(data, encoder, path, mean, std):
    from mimkit.viz.regressor import draw_regressor

    return draw_regressor(data, encoder, path)


DRAWERS = {
    "reconstruction": _reconstruction,
    "views": _views,
    "salience": _salience,
    "mixing": _mixing,  # several images mixed into one sequence, and each one's reconstruction
    "teacher_drops": _teacher_drops,  # teacher tokens kept after each drop stage
    "regressor": _regressor,  # regressor predictions vs their targets
}

MAX_IMAGES = {"views": 4, "teacher_drops": 4, "regressor": 8}


def draw_picture(kind: str, model, images: torch.Tensor, mean, std, path: str | Path, seed: int = 0) -> Path:
    """Draw picture ``kind`` of ``model`` on ``images`` (uint8, normalized with ``mean``/``std``, or
    already-normalized float) into ``path``, the mask drawn from a generator seeded with ``seed``.
    Raises ``ValueError`` naming the kinds the method draws."""
    pics = model.capabilities.pictures
    if kind not in pics:
        raise ValueError(f"{type(model).__name__} does not draw '{kind}' pictures; it draws: {', '.join(pics)}")
    if kind not in DRAWERS:
        raise ValueError(f"no drawer for picture kind '{kind}'")
    device = next(model.parameters()).device
    x = normalize_images(images.to(device), mean, std)[: MAX_IMAGES.get(kind)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            data = model.picture_data(kind, x, torch.Generator(x.device).manual_seed(seed))
            return Path(DRAWERS[kind](data, model.encoder, path, mean, std))
    finally:
        model.train(was)


__all__ = ["DRAWERS", "MAX_IMAGES", "draw_picture"]
