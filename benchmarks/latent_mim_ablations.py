"""Latent MIM ablations on Fashion-MNIST: the collapse table and the loss table.

Not a test: every arm is a full pretraining run of ``configs/latent_mim_fashion_mnist.yaml`` (3 epochs
by default, the MAE preset's budget) for each seed, then three measurements of the frozen encoder:

* **Sim** — average patch similarity: mean over test images of ``mean_{i,j} cos`` of
  the patch tokens (cls excluded, diagonal included) of full 28x28 images at gap 0, final LN removed
  (the projector is never part of the encoder). 1.0 = complete collapse.
* **NN** — two numbers: the trainer's DINO kNN (train bank -> test, k=20, T=0.07, cls and mean pools,
  final LN applied) from ``result["knn"]``, and Latent MIM's own protocol, leave-one-out 1-NN within
  the test set on mean-pooled patch tokens without the final LN.
* **LP** — linear probe, the standard logistic-regression protocol (:func:`mimkit.eval.linear.logistic_probe`:
  standardized features + logistic regression, C=1) on mean-pooled features (final LN removed).

Arms. Both tables start from the chain start of the slides: MSE loss, mask 0.75,
gap 0, no regularizer, self-attention decoder, no projector.

* ``collapse``: target = naive | separate | stopgrad | ema, plus MAE (``configs/mae_fashion_mnist.yaml``)
  at the same budget. Seed ordering to reproduce: Sim naive (1.00) > stopgrad (0.99) > separate (0.96)
  > ema (0.50); NN ema > stopgrad > separate > naive.
* ``loss``: EMA target, loss = mse | l1 | huber | patchdisc. Seed ordering on NN: PatchDisc > Huber >
  MSE > L1 (the notes expect only PatchDisc > MSE to be resolvable at this scale).

Usage (the CPU is shared: schedule it, ~10 min per run on 2 cores at 3 epochs)::

    python benchmarks/latent_mim_ablations.py --tables collapse loss --seeds 0 1 2 \
        --out runs/bench_latent_mim --markdown runs/bench_latent_mim/table.md
    python benchmarks/latent_mim_ablations.py --quick    # seconds: checks the script end to end

Runs that already have a ``bench.json`` in their folder are not repeated (delete it to redo one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LMIM_CONFIG = ROOT / "configs/latent_mim_fashion_mnist.yaml"
MAE_CONFIG = ROOT / "configs/mae_fashion_mnist.yaml"

# the chain start of the slide tables
CHAIN_START = [
    "method.loss=mse",
    "method.masking.ratio=0.75",
    "method.masking.num_keep=null",
    "method.patch_gap=0",
    "method.reg_weight=0.0",
    "method.decoder=self_attn",
    "method.projector.kind=none",
]

TABLES: dict[str, dict[str, tuple[Path, list[str]]]] = {
    "collapse": {
        "naive": (LMIM_CONFIG, CHAIN_START + ["method.target=naive"]),
        "separate": (LMIM_CONFIG, CHAIN_START + ["method.target=separate"]),
        "stopgrad": (LMIM_CONFIG, CHAIN_START + ["method.target=stopgrad"]),
        "ema": (LMIM_CONFIG, CHAIN_START + ["method.target=ema"]),
        "mae": (MAE_CONFIG, []),
    },
    "loss": {
        "mse": (LMIM_CONFIG, CHAIN_START + ["method.target=ema"]),
        "l1": (LMIM_CONFIG, CHAIN_START + ["method.target=ema", "method.loss=l1"]),
        "huber": (LMIM_CONFIG, CHAIN_START + ["method.target=ema", "method.loss=huber"]),
        "patchdisc": (LMIM_CONFIG, CHAIN_START + ["method.target=ema", "method.loss=patchdisc"]),
    },
    # the published recipe at this scale, for reference (not a slide table)
    "preset": {"latent_mim": (LMIM_CONFIG, []), "mae": (MAE_CONFIG, [])},
}

# the seed's numbers (slides; ViT-B, ImageNet-100 ablations): Sim, NN, LP
SEED_NUMBERS = {
    "collapse": {
        "naive": (1.00, 0.9, 7.9), "separate": (0.96, 3.4, 7.6), "stopgrad": (0.99, 11.3, 26.6),
        "ema": (0.50, 18.8, 39.3), "mae": (0.67, 30.0, 70.4),
    },
    "loss": {"mse": (None, 18.8, 39.3), "l1": (None, 15.2, 36.7), "huber": (None, 24.3, 46.4), "patchdisc": (None, 30.0, 53.4)},
    "preset": {},
}
EXPECTED_ORDER = {
    "collapse": ("nn_loo", ["ema", "stopgrad", "separate", "naive"]),
    "loss": ("nn_loo", ["patchdisc", "huber", "mse", "l1"]),
}


def load_encoder(cfg, out_dir: Path) -> torch.nn.Module:
    """The trained method from ``out_dir/checkpoint.pt`` (the trainer's final save) -> its encoder."""
    from mimkit.train.checkpoint import LATEST, load_checkpoint
    from mimkit.train.loop import build_method

    method = build_method(cfg)
    method.load_state_dict(load_checkpoint(out_dir / LATEST)["model"])
    return method.encoder.eval()


def measure(encoder, data: dict) -> dict:
    from mimkit.eval.diagnostics import patch_similarity
    from mimkit.eval.features import extract_features
    from mimkit.eval.knn import loo_1nn_accuracy
    from mimkit.eval.linear import logistic_probe

    kw = dict(norm=False, mean=data["mean"], std=data["std"], batch_size=512)
    te_tokens = extract_features(encoder, data["test_x"], pool="all", **kw)  # (N, 1+L, D)
    sim = patch_similarity(te_tokens)
    te = te_tokens[:, 1:].mean(1)
    tr = extract_features(encoder, data["train_x"], pool="mean", **kw)
    lp = logistic_probe(tr, data["train_y"], te, data["test_y"])  # the standard logistic-regression probe
    return {
        "sim": sim["sim"],
        "sim_offdiag": sim["sim_offdiag"],
        "nn_loo": loo_1nn_accuracy(te, data["test_y"]),
        "linear_probe": lp["top1"],
    }


def run_arm(table: str, arm: str, seed: int, args, data: dict) -> dict:
    from mimkit.config import load_config
    from mimkit.train import pretrain

    path, overrides = TABLES[table][arm]
    # the same configuration in two tables is trained once: MAE, and the loss table's MSE row, which is
    # the collapse table's EMA row (the slide chain's shared row)
    run_name = {("loss", "mse"): "collapse/ema"}.get((table, arm), "mae" if arm == "mae" else f"{table}/{arm}")
    out_dir = Path(args.out) / run_name / f"seed{seed}"
    done = out_dir / "bench.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "table": table, "arm": arm}
    overrides = overrides + [f"train.seed={seed}", f"train.out_dir={out_dir}", "train.progress_bar=false",
                             "eval.picture_at_end=false", f"train.epochs={args.epochs}"] + args.override
    cfg = load_config(path, overrides)
    t0 = time.time()
    result = pretrain(cfg)
    knn = result.get("knn") or {}
    rec = {"table": table, "arm": arm, "seed": seed, "epochs": args.epochs, "overrides": overrides,
           "knn_cls": knn.get("top1_cls"), "knn_mean": knn.get("top1_mean"), "train_s": time.time() - t0}
    rec.update(measure(load_encoder(cfg, Path(result["out_dir"])), data))
    done.write_text(json.dumps(rec, indent=2))
    print(json.dumps(rec), flush=True)
    return rec


def load_data(limit_train: int | None, limit_test: int | None) -> dict:
    from mimkit.data import load_fashion_mnist

    tr_x, tr_y = load_fashion_mnist(split="train")
    te_x, te_y = load_fashion_mnist(split="test")
    return {"train_x": tr_x[:limit_train], "train_y": tr_y[:limit_train], "test_x": te_x[:limit_test],
            "test_y": te_y[:limit_test], "mean": (0.2860,), "std": (0.3530,)}


def summarize(records: list[dict], tables: list[str]) -> str:
    """Markdown: mean ± std over seeds beside the seed's numbers, and whether the orderings hold."""
    keys = ["sim", "nn_loo", "knn_mean", "knn_cls", "linear_probe"]
    lines = []
    for table in tables:
        lines += [f"### Latent MIM ablation: {table} table (Fashion-MNIST, ViT 192x6, p4)", "",
                  "| arm | seeds | Sim | LOO 1-NN | kNN mean | kNN cls | LP | seed Sim / NN / LP |",
                  "|---|---|---|---|---|---|---|---|"]
        means: dict[str, dict[str, float]] = {}
        for arm in TABLES[table]:
            rs = [r for r in records if r["table"] == table and r["arm"] == arm]
            if not rs:
                continue
            cells = []
            means[arm] = {}
            for k in keys:
                vals = [r[k] for r in rs if r.get(k) is not None]
                if not vals:
                    cells.append("–")
                    continue
                mu = statistics.fmean(vals)
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                means[arm][k] = mu
                cells.append(f"{mu:.3f} ± {sd:.3f}" if k.startswith("sim") else f"{mu:.1f} ± {sd:.1f}")
            seed = SEED_NUMBERS[table].get(arm)
            seed_txt = " / ".join("–" if v is None else str(v) for v in seed) if seed else "–"
            lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + f" | {seed_txt} |")
        if table in EXPECTED_ORDER:
            metric, order = EXPECTED_ORDER[table]
            have = [a for a in order if metric in means.get(a, {})]
            got = sorted(have, key=lambda a: -means[a][metric])
            lines += ["", f"Seed ordering on {metric}: {' > '.join(order)}; measured: {' > '.join(got)} "
                      f"({'holds' if got == have else 'differs'})."]
            if table == "collapse" and "naive" in means and "ema" in means:
                holds = means["naive"]["sim"] > means["ema"]["sim"]
                lines.append(f"Sim naive {means['naive']['sim']:.3f} vs ema {means['ema']['sim']:.3f} "
                             f"({'naive collapses more: holds' if holds else 'differs'}).")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", nargs="+", default=["collapse", "loss"], choices=list(TABLES))
    ap.add_argument("--arms", nargs="*", default=None, help="only these arms (default: all of each table)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--out", default="runs/bench_latent_mim")
    ap.add_argument("--markdown", default=None, help="also write the summary table here")
    ap.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides for every run")
    ap.add_argument("--limit-train", type=int, default=None, help="evaluate on this many train images")
    ap.add_argument("--limit-test", type=int, default=None, help="evaluate on this many test images")
    ap.add_argument("--quick", action="store_true", help="a few steps on a data subset, to check the script")
    args = ap.parse_args(argv)
    limit_train, limit_test = args.limit_train, args.limit_test
    if limit_train:
        args.override = args.override + [f"eval.knn_train_limit={limit_train}"]
    if limit_test:
        args.override = args.override + [f"eval.knn_test_limit={limit_test}"]
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 1.0
        args.out = str(Path(args.out) / "quick")
        args.override = args.override + ["train.max_steps=3", "data.limit=1024", "data.batch_size=64",
                                          "eval.knn_train_limit=1024", "eval.knn_test_limit=256", "train.tensorboard=false"]
        limit_train, limit_test = 1024, 256
    data = load_data(limit_train, limit_test)
    records = []
    for table in args.tables:
        for arm in TABLES[table]:
            if args.arms and arm not in args.arms:
                continue
            for seed in args.seeds:
                records.append(run_arm(table, arm, seed, args, data))
    text = summarize(records, args.tables)
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
