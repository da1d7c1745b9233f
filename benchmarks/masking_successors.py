"""Benchmark (not a test): MAE vs EMAE (K = 4) vs SBAM on Fashion-MNIST, at equal epochs and at equal
compute, with seeds; reports kNN and linear-probe top-1 (cls token and mean-pooled patches).

Arms (presets under configs/, so every arm is what a user gets from its Fashion-MNIST preset):

* equal epochs, E epochs each: ``mae``, ``emae`` (K = 4 views per image, ~4x the compute of MAE per
  epoch), ``sbam`` (~MAE's compute).
* equal compute: ``mae`` and ``sbam`` for K x E epochs, matching EMAE's E epochs (EMAE runs the
  encoder and decoder on K sequences per image). Measured wall-clock is
  reported beside, so the FLOP match can be checked against time.

The seed papers' claims to compare against: EMAE K=4 beats MAE at equal
epochs by a lot (+6.9 LP at 300 ep ViT-B); equal-compute outcome unknown; SBAM beats MAE by a small
margin (+0.7 FT, likely within noise here).

Usage (the lead schedules it; several minutes per run on 2 CPU cores)::

    python benchmarks/masking_successors.py --seeds 0 1 2 --epochs 3
    python benchmarks/masking_successors.py --smoke          # seconds: checks the script end to end

Results: one JSON line per run in ``<out>/runs.jsonl`` and a markdown table (mean ± sd over seeds)
in ``<out>/table.md``, also printed. Runs resume (``train.resume=auto``): a finished run is only
re-evaluated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import fmt_mean_std as _fmt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"mae": "configs/mae_fashion_mnist.yaml", "emae": "configs/emae_fashion_mnist.yaml",
           "sbam": "configs/sbam_fashion_mnist.yaml"}
K = 4


def arms(epochs: float) -> list[tuple[str, str, float]]:
    """``(arm label, method, epochs)``."""
    return [
        ("equal-epochs", "mae", epochs),
        ("equal-epochs", "emae", epochs),
        ("equal-epochs", "sbam", epochs),
        ("equal-compute", "mae", K * epochs),
        ("equal-compute", "sbam", K * epochs),
        # EMAE at E epochs is the equal-compute reference: the same run as its equal-epochs row
    ]


def linear_probe(out_dir: Path, seed: int, limit_train: int | None, limit_test: int | None) -> dict:
    """the standard logistic-regression linear probe (standardized features + logistic regression) on the frozen encoder's
    cls token and mean-pooled patches, after the final LayerNorm."""
    from _common import fmnist_linear_probes

    return fmnist_linear_probes(out_dir / "checkpoint.pt", limit_train, limit_test)


def run_one(method: str, epochs: float, seed: int, out_root: Path, args) -> dict:
    from mimkit.config import load_config
    from mimkit.train import pretrain

    out_dir = out_root / f"{method}_ep{epochs:g}_s{seed}"
    overrides = [f"train.epochs={epochs}", f"train.seed={seed}", f"train.out_dir={out_dir}",
                 "train.progress_bar=false", "train.tensorboard=false", "eval.picture_at_end=true"]
    if args.smoke:
        overrides += ["train.max_steps=2", "model.encoder.depth=1", "model.decoder.depth=1",
                      "eval.knn_train_limit=500", "eval.knn_test_limit=200", "data.limit=1024"]
    if args.limit_train:
        overrides += [f"eval.knn_train_limit={args.limit_train}"]
    if args.limit_test:
        overrides += [f"eval.knn_test_limit={args.limit_test}"]
    overrides += args.override
    cfg = load_config(ROOT / PRESETS[method], overrides)
    t0 = time.perf_counter()
    result = pretrain(cfg)
    wall = time.perf_counter() - t0
    knn = result.get("knn") or {}
    rec = {"method": method, "epochs": epochs, "seed": seed, "out_dir": result["out_dir"],
           "wall_s": round(wall, 1), "steps": result.get("step"),
           "sequences_per_image": K if method == "emae" else 1,
           "knn_cls": knn.get("top1_cls"), "knn_mean": knn.get("top1_mean")}
    lin = linear_probe(Path(result["out_dir"]), seed,
                       1000 if args.smoke else args.limit_train, 500 if args.smoke else args.limit_test)
    rec["linear_cls"] = lin.get("linear_cls")
    rec["linear_mean"] = lin.get("linear_mean")
    return rec


def table(records: list[dict], epochs: float) -> str:
    cols = ["knn_cls", "knn_mean", "linear_cls", "linear_mean"]
    lines = ["| comparison | method | epochs | seeds | kNN cls | kNN mean | linear cls | linear mean | wall s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, method, ep in arms(epochs) + [("equal-compute", "emae", epochs)]:
        rs = [r for r in records if r["method"] == method and r["epochs"] == ep]
        if not rs:
            continue
        cells = [_fmt([r[c] for r in rs]) for c in cols]
        wall = statistics.mean(r["wall_s"] for r in rs)
        lines.append(f"| {label} | {method} | {ep:g} | {len(rs)} | " + " | ".join(cells) + f" | {wall:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=3.0, help="E: epochs of the equal-epochs arms")
    p.add_argument("--methods", nargs="+", default=["mae", "emae", "sbam"], choices=sorted(PRESETS))
    p.add_argument("--skip-equal-compute", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_masking_successors")
    p.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides for every run")
    p.add_argument("--limit-train", type=int, default=None, help="evaluate on this many train images (kNN bank, probe)")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on this many test images")
    p.add_argument("--smoke", action="store_true", help="2 steps, 1-block model, small eval: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds = args.seeds[:1]
        args.out = args.out.with_name(args.out.name + "_smoke")
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in args.seeds:
        for label, method, ep in arms(args.epochs):
            if method not in args.methods or (args.skip_equal_compute and label == "equal-compute"):
                continue
            if any(r["method"] == method and r["epochs"] == ep and r["seed"] == seed for r in records):
                continue
            rec = run_one(method, ep, seed, args.out, args)
            records.append(rec)
            with open(args.out / "runs.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), file=sys.stderr)
    md = table(records, args.epochs)
    (args.out / "table.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
