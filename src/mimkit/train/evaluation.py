"""What a run measures and reports besides its losses.

Owns: the kNN evaluation during and at the end of a run (:func:`knn`, written to ``knn.json``), the
end-of-run picture (:func:`picture`) and the report of the corrupt files ``data.skip_corrupt``
skipped (:func:`skipped_on_all_ranks`, :func:`report_skipped`).

One kNN per encoder: the run's kNN is ``mimkit eval knn``'s on the same weights — the same images
(Fashion-MNIST through :func:`mimkit.eval.data.load_split`, a seeded random subset of
``eval.knn_train_limit`` / ``eval.knn_test_limit`` images, seed 0, as ``--limit-train`` /
``--limit-test``), the normalisation the run trains with (what the checkpoint records and
``mimkit eval`` reads back), evaluation's precision (bf16 autocast on CUDA, fp32 on the CPU: ``--amp
auto``, whatever ``train.precision``), the last block's tokens after the final LayerNorm, cls and
mean pooling, DINO's vote over the bank with k = 10, 20, 100, 200 and ``eval.knn_k`` from one pass
(k beyond the bank left out), temperature ``eval.knn_temperature``. ``knn.json`` records all of it
(``protocol``) and the ``mimkit eval knn`` flags that give the same numbers (``eval_command``).
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

_FASHION = ("fashion_mnist", "fashion-mnist", "fashionmnist", "fmnist")


def _knn_images(data: TrainData, cfg: Config, hw: tuple[int, int], in_chans: int) -> dict:
    """The kNN bank and queries: ``{"train": (images, labels, info), "test": ..., "classes", "same_as_eval"}``.

    Fashion-MNIST (train and test split of the built-in set): read as ``mimkit eval`` reads them (the
    whole split, a seeded subset of ``eval.knn_*_limit`` images; the train limit defaults to
    ``data.limit``, so a run on a part of the set measures a bank of that size). Folders: the run's own
    decoded images (``data.dataset``, ``data.eval_dataset``), the same seeded subset rule."""
    from mimkit.eval.data import load_split, subset_indices

    d, e, dc = data, cfg.eval, cfg.data
    fashion = d.dataset is not None and getattr(d.dataset, "name", None) == "fashion_mnist" and (
        dc.eval_dataset is None or str(dc.eval_dataset).lower() in _FASHION)
    if fashion:
        limit = e.knn_train_limit or dc.limit
        tr = load_split("fashion_mnist", "train", hw, in_chans, limit, 0, root=dc.root)
        classes = tr[2]["classes"]
        te = load_split("fashion_mnist", "test", hw, in_chans, e.knn_test_limit, 0, class_names=classes,
                        root=dc.eval_root or dc.root)
        return {"train": tr, "test": te, "classes": classes, "limits": (limit, e.knn_test_limit),
                "same_as_eval": True}
    out: dict = {"limits": (e.knn_train_limit, e.knn_test_limit)}
    for split, images, labels, limit, source in (
            ("train", d.train_images, d.train_labels, e.knn_train_limit, dc.dataset),
            ("test", d.test_images, d.test_labels, e.knn_test_limit, dc.eval_dataset)):
        idx = subset_indices(len(labels), limit, 0)
        if idx is not None:
            images, labels = images[idx], labels[idx]
        out[split] = (images, labels, {"dataset": str(source), "split": split, "n": len(labels),
                                       "resize": "the run's in-memory decode (data.dataset / data.eval_dataset)"})
    classes = list(getattr(d.dataset, "classes", None) or ())
    n_labels = int(max(out["train"][1].max(), out["test"][1].max())) + 1
    out["classes"] = classes if len(classes) >= n_labels else [str(i) for i in range(n_labels)]
    out["same_as_eval"] = False
    return out


def knn(data: TrainData, model: Callable[[], nn.Module], cfg: Config, info: DistInfo, amp_dtype: torch.dtype | None,
        out_dir: Path) -> dict | None:
    """DINO kNN on the frozen encoder of ``model()`` (cls and mean-pooled patches) on the main process,
    written to ``out_dir/knn.json`` (module doc: the protocol, which is ``mimkit eval knn``'s);
    ``None`` without labelled train and test images (and on the other ranks, which wait for the main
    one). ``amp_dtype``: the training precision, recorded as ``train_precision``; the features are
    computed at evaluation's precision."""
    d = data
    if d.train_images is None or d.test_images is None or d.train_labels is None:
        return None
    res = None
    if info.is_main:
        from mimkit.eval.features import default_autocast, extract_features
        from mimkit.eval.knn import DEFAULT_KS, bank_ks, knn_eval
        from mimkit.nn.adapters import encoder_img_hw, encoder_in_chans, wrap_encoder

        e = cfg.eval
        enc = wrap_encoder(model().encoder)
        hw, in_chans = encoder_img_hw(enc), encoder_in_chans(enc)
        sets = _knn_images(d, cfg, hw, in_chans)
        (tr, trl, tr_info), (te, tel, te_info) = sets["train"], sets["test"]
        device = torch.device(info.device)
        autocast = default_autocast(device)  # mimkit eval's --amp auto: bf16 on CUDA, fp32 on the CPU
        show = bool(cfg.train.progress_bar)  # a bar on a terminal: 70k images take minutes on a CPU
        pools = ["cls", "mean"]
        kw = dict(pool=pools, norm=True, block=None, batch_size=e.batch_size, mean=d.mean, std=d.std, device=device,
                  autocast_dtype=autocast, show_progress=show)
        ftr, fte = extract_features(enc, tr, **kw), extract_features(enc, te, **kw)
        k, ks, _ = bank_ks(e.knn_k, DEFAULT_KS, len(trl))
        nc = len(sets["classes"])
        res = {}
        for p in pools:
            scores = knn_eval(ftr[p], trl, fte[p], tel, ks, e.knn_temperature, nc, device=device, show_progress=show)
            res[f"top1_{p}"] = scores[k]["top1"]
        amp = "bf16" if autocast is torch.bfloat16 else "off (fp32)"
        res.update(k=k, temperature=e.knn_temperature, n_train=len(trl), n_test=len(tel))
        res["protocol"] = {
            "pools": pools, "block": None, "final_norm": True, "ks": ks, "num_classes": nc,
            "amp": amp, "device": str(device), "batch_size": e.batch_size,
            "train_precision": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "fp32",
            "mean": [float(v) for v in d.mean], "std": [float(v) for v in d.std],
            "norm_source": "the run's training normalisation (recorded in its checkpoints)",
            "subset": "seeded random subset (seed 0) of each split, as mimkit eval --limit-train / --limit-test",
            "train_data": tr_info, "test_data": te_info,
        }
        res["eval_command"] = _eval_command(sets, e, device, amp) if sets["same_as_eval"] else None
        if not sets["same_as_eval"]:
            res["eval_note"] = ("folder data: the kNN runs on the run's own decoded images; mimkit eval knn decodes "
                                "folders itself (resize + centre crop) and splits a plain folder 80/20, so its "
                                "numbers can differ")
        (out_dir / "knn.json").write_text(json.dumps(res, indent=2))
    barrier(info)
    return res


def _eval_command(sets: dict, e, device: torch.device, amp: str) -> str:
    """The ``mimkit eval knn`` flags that measure the same numbers on the checkpoint of the same step."""
    n_train, n_test = sets["limits"]
    flags = [f"--limit-train {n_train}" if n_train else "", f"--limit-test {n_test}" if n_test else "",
             f"--k {e.knn_k}", f"--temperature {e.knn_temperature:g}", "--pool cls,mean",
             f"--batch-size {e.batch_size}", f"--device {device.type}", f"--amp {'bf16' if amp == 'bf16' else 'off'}"]
    return "mimkit eval knn CHECKPOINT " + " ".join(f for f in flags if f)


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
