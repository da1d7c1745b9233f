"""What a run measures and reports besides its losses.

Owns: the kNN evaluation during and at the end of a run (:func:`knn`, written to ``knn.json``), the
end-of-run picture (:func:`picture`) and the report of the corrupt files ``data.skip_corrupt``
skipped (:func:`skipped_on_all_ranks`, :func:`report_skipped`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mimkit.config import Config
from mimkit.train.data import TrainData
from mimkit.train.distributed import DistInfo, barrier


def knn(data: TrainData, model: Callable[[], nn.Module], cfg: Config, info: DistInfo, amp_dtype: torch.dtype | None,
        out_dir: Path) -> dict | None:
    """DINO kNN on the frozen encoder of ``model()`` (cls and mean-pooled patches) on the main process,
    written to ``out_dir/knn.json``; ``None`` without labelled train and test images (and on the other
    ranks, which wait for the main one)."""
    d = data
    if d.train_images is None or d.test_images is None or d.train_labels is None:
        return None
    res = None
    if info.is_main:
        from mimkit.eval.features import extract_features
        from mimkit.eval.knn import knn_accuracy

        e = cfg.eval
        tr = d.train_images[: e.knn_train_limit] if e.knn_train_limit else d.train_images
        trl = d.train_labels[: len(tr)]
        te = d.test_images[: e.knn_test_limit] if e.knn_test_limit else d.test_images
        tel = d.test_labels[: len(te)]
        enc = model().encoder
        show = bool(cfg.train.progress_bar)  # a bar on a terminal: 70k images take minutes on a CPU
        kw = dict(pool=["cls", "mean"], batch_size=e.batch_size, mean=d.mean, std=d.std, device=info.device,
                  autocast_dtype=amp_dtype, show_progress=show)
        ftr, fte = extract_features(enc, tr, **kw), extract_features(enc, te, **kw)
        res = {f"top1_{p}": knn_accuracy(ftr[p], trl, fte[p], tel, e.knn_k, e.knn_temperature,
                                         show_progress=show) for p in ftr}
        res.update(k=e.knn_k, temperature=e.knn_temperature, n_train=len(tr), n_test=len(te))
        (out_dir / "knn.json").write_text(json.dumps(res, indent=2))
    barrier(info)
    return res


def picture(data: TrainData, model: nn.Module, out_dir: Path, seed: int) -> str | None:
    """The end-of-run picture of ``model``: a reconstruction for pixel methods, else the method's first
    picture, of the first 8 test (else train) images; ``None`` when there are none."""
    from mimkit.viz import draw_picture

    d = data
    images = d.test_images if d.test_images is not None else d.train_images
    pics = model.capabilities.pictures
    if images is None or not pics:
        return None
    kind = "reconstruction" if "reconstruction" in pics else pics[0]
    name = "reconstruction.png" if kind == "reconstruction" else f"{kind}.png"
    path = draw_picture(kind, model, images[:8], d.mean, d.std, out_dir / name, seed=seed)
    return str(path)


def skipped_on_all_ranks(skipped: list[str], info: DistInfo) -> list[str]:
    """The corrupt files skipped on any rank (collective when distributed), in first-seen order."""
    if not info.enabled:
        return skipped
    import torch.distributed as dist

    per_rank: list = [None] * info.world_size
    dist.all_gather_object(per_rank, skipped)
    return list(dict.fromkeys(f for files in per_rank for f in files))


def report_skipped(files: list[str], is_main: bool) -> None:
    if files and is_main:
        shown = ", ".join(files[:10]) + (f" (+{len(files) - 10} more; all in result.json)" if len(files) > 10 else "")
        print(f"data.skip_corrupt: skipped {len(files)} corrupt file(s): {shown}", file=sys.stderr)
