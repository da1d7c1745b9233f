"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this directory
is on ``sys.path``): the mean ± std cells of their tables and the Fashion-MNIST logistic-regression probe."""

from __future__ import annotations

import statistics
from pathlib import Path


def fmt_mean_std(values, digits: int = 2) -> str:
    """``"m ± s"`` over the seeds' values (``None`` skipped), the value alone for one seed, ``—`` for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def fmnist_linear_probes(checkpoint: Path, limit_train: int | None, limit_test: int | None) -> dict:
    """The standard logistic-regression linear probe (standardized features + scikit-learn
    LogisticRegression) on the frozen encoder's cls token and mean-pooled patches after the final
    LayerNorm, on the first ``limit_train`` / ``limit_test`` Fashion-MNIST images:
    ``{"linear_cls": %, "linear_mean": %}``."""
    from mimkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
    from mimkit.eval.features import extract_features
    from mimkit.eval.linear import logistic_probe
    from mimkit.interop import load_encoder

    enc = load_encoder(checkpoint)
    (trx, try_), (tex, tey) = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    trx, try_, tex, tey = trx[:limit_train], try_[:limit_train], tex[:limit_test], tey[:limit_test]
    kw = dict(pool=["cls", "mean"], mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    ftr, fte = extract_features(enc, trx, **kw), extract_features(enc, tex, **kw)
    return {f"linear_{p}": logistic_probe(ftr[p], try_, fte[p], tey)["top1"] for p in ("cls", "mean")}


def write_rows(path: str | None, meta: dict, rows: list[dict]) -> None:
    """``{"meta": ..., "rows": ...}`` as JSON at ``path`` (nothing when ``path`` is None)."""
    import json

    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
