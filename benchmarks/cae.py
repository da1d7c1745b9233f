"""Benchmark (not a test): CAE's decoder/alignment ablation and CAE v2's supervision-position table on
Fashion-MNIST, with kNN / linear / attentive probes.

Arms (presets under configs/, so every arm is what a user gets from its Fashion-MNIST preset):

* CAE (``configs/cae_fashion_mnist.yaml``, pixel target = per-patch normalized pixels, MSE):
  ``cae`` (decoder + alignment, λ = 2), ``cae_no_align`` (λ = 0), ``cae_no_decoder`` (decoder depth 0:
  ``Linear(LN(z_m))`` on the regressor output, alignment kept), ``cae_no_decoder_no_align`` (both off:
  the paper's first ablation row). Paper (ViT-B, 300 ep, ATT): no decoder + no align 71.2, decoder only
  72.7, decoder + align 73.8.
* CAE v2 (``configs/cae_v2_fashion_mnist.yaml``, Tiny-width encoder: 8 of 49 patches masked) with a frozen
  teacher made by mimkit itself (``--teacher``; default ``runs/cae_v2_teacher/checkpoint.pt``, see below):
  ``cae_v2`` (cls + visible + masked), ``cae_v2_visible`` (visible only), ``cae_v2_masked`` (masked only).
  Paper (Tiny, LIN): Y_m only 64.9, Y_v only 68.8, both 69.3.
* ``teacher``: the teacher itself, probed the same way (no training), for reference.

Measurements of each frozen encoder (final LN applied; eval mode; first ``--limit-train`` train and
``--limit-test`` test images of Fashion-MNIST, no augmentation):

* kNN — the trainer's DINO kNN (train bank -> test, k = 20, T = 0.07, cosine), cls token and mean-pooled
  patch tokens;
* linear — the standard logistic-regression probe (:func:`mimkit.eval.linear.logistic_probe`: standardized features +
  logistic regression, C = 1), cls and mean pools (as ``benchmarks/masking_successors.py``);
* attentive — CAE's attentive probe (:func:`mimkit.eval.attentive.train_attentive_probe`) on all output
  tokens (float16 cache), the library defaults (batch min(256, N/8), lr 0.4 x batch/256, SGD nesterov,
  10 % warm-up, cosine) for ``--attentive-epochs`` epochs.

Also logged: CAE's ``align_cos`` (cosine between the regressor output and the alignment target, mean of
the last 5 logged steps; the paper's argument: without alignment the regressor drifts out of the
encoder's space) and CAE v2's per-group teacher cosines.

The teacher (once, before the CAE v2 arms; the documented command of configs/cae_v2_fashion_mnist.yaml,
shortened to the budget)::

    mimkit pretrain configs/mae_fashion_mnist.yaml train.out_dir=runs/cae_v2_teacher train.epochs=1 \\
        data.limit=20000 optim.warmup_epochs=0.2 train.num_threads=1 train.precision=bf16

Usage (the CPU is shared: schedule it)::

    python benchmarks/cae.py --seeds 0 --epochs 1 --train-limit 10000 --limit-train 10000 --limit-test 5000 \\
        --override train.precision=bf16
    python benchmarks/cae.py --smoke        # seconds: checks the script end to end (random teacher)

Results: one JSON line per run in ``<out>/runs.jsonl``, a markdown table in ``<out>/table.md`` (also
printed). Runs with a ``bench.json`` in their folder are not repeated.
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
CAE = ROOT / "configs/cae_fashion_mnist.yaml"
CAE_V2 = ROOT / "configs/cae_v2_fashion_mnist.yaml"
ARMS: dict[str, tuple[Path, list[str]]] = {
    "cae": (CAE, []),
    "cae_no_align": (CAE, ["method.align_weight=0"]),
    "cae_no_decoder": (CAE, ["model.decoder.depth=0"]),
    "cae_no_decoder_no_align": (CAE, ["model.decoder.depth=0", "method.align_weight=0"]),
    "cae_v2": (CAE_V2, []),
    "cae_v2_visible": (CAE_V2, ["method.supervise=[visible]"]),
    "cae_v2_masked": (CAE_V2, ["method.supervise=[masked]"]),
}
# the papers' numbers for the same rows (ViT-B 300 ep ATT for CAE; ViT-Tiny LIN for CAE v2)
PAPER = {"cae": "ATT 73.8", "cae_no_align": "ATT 72.7", "cae_no_decoder": "—",
         "cae_no_decoder_no_align": "ATT 71.2", "cae_v2": "LIN 69.3", "cae_v2_visible": "LIN 68.8",
         "cae_v2_masked": "LIN 64.9", "teacher": "—"}


def probes(checkpoint: Path, args) -> dict:
    """Linear (logistic) and attentive probes of the encoder in ``checkpoint``."""
    from mimkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
    from mimkit.eval.attentive import AttentiveProbeConfig, train_attentive_probe
    from mimkit.eval.features import extract_features
    from mimkit.eval.knn import knn_accuracy
    from mimkit.eval.linear import logistic_probe
    from mimkit.interop import load_encoder

    enc = load_encoder(checkpoint)
    (trx, try_), (tex, tey) = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    trx, try_, tex, tey = trx[: args.limit_train], try_[: args.limit_train], tex[: args.limit_test], tey[: args.limit_test]
    kw = dict(pool=["cls", "mean", "all"], mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    ftr, fte = extract_features(enc, trx, **kw), extract_features(enc, tex, **kw)
    rec = {f"knn_{p}": knn_accuracy(ftr[p], try_, fte[p], tey, 20, 0.07) for p in ("cls", "mean")}
    rec.update({f"linear_{p}": logistic_probe(ftr[p], try_, fte[p], tey)["top1"] for p in ("cls", "mean")})
    e = args.attentive_epochs
    cfg = AttentiveProbeConfig(epochs=e, warmup_epochs=e / 9, seed=0)
    t0 = time.perf_counter()
    att = train_attentive_probe(ftr["all"].half(), try_, fte["all"].half(), tey, enc.num_heads, cfg)
    rec.update(attentive=att["top1"], attentive_lr=att["lr"], attentive_batch=att["batch_size"],
               attentive_steps=att["steps"], attentive_s=round(time.perf_counter() - t0, 1))
    return rec


def tail_metrics(out_dir: Path, keys: tuple[str, ...], n: int = 5) -> dict:
    """Mean of the last ``n`` logged values of ``keys`` in ``metrics.jsonl``."""
    path = out_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r][-n:]
        out[k] = statistics.mean(vals) if vals else None
    return out


def run_arm(arm: str, seed: int, args) -> dict:
    from mimkit.config import load_config
    from mimkit.train import pretrain

    path, overrides = ARMS[arm]
    out_dir = args.out / f"{arm}_ep{args.epochs:g}_s{seed}"
    done = out_dir / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = overrides + [
        f"train.epochs={args.epochs}", f"train.seed={seed}", f"train.out_dir={out_dir}", "train.progress_bar=false",
        "train.tensorboard=false", "eval.knn_at_end=false", "eval.picture_at_end=false",
        f"optim.warmup_epochs={args.warmup}", f"train.num_threads={args.threads}",
    ]
    if args.train_limit:
        overrides.append(f"data.limit={args.train_limit}")
    if path == CAE_V2:
        from mimkit.methods import CAEv2

        overrides += (list(CAEv2.offline_overrides) if args.smoke else [f"method.teacher_path={args.teacher}"])
    if args.smoke:
        overrides += ["train.max_steps=2", "model.encoder.depth=1", "data.limit=512"]
    overrides += args.override
    cfg = load_config(path, overrides)
    t0 = time.perf_counter()
    result = pretrain(cfg)
    rec = {"arm": arm, "seed": seed, "epochs": args.epochs, "steps": result.get("step"), "out_dir": str(out_dir),
           "wall_s": round(time.perf_counter() - t0, 1), "overrides": overrides}
    rec.update(tail_metrics(out_dir, ("loss", "align_cos", "loss_align", "cos_cls", "cos_visible", "cos_masked")))
    rec.update(probes(out_dir / "checkpoint.pt", args))
    done.write_text(json.dumps(rec, indent=1))
    return rec


def table(records: list[dict]) -> str:
    cols = ["knn_cls", "knn_mean", "linear_cls", "linear_mean", "attentive", "align_cos", "cos_visible", "cos_masked"]
    lines = ["| arm | seeds | kNN cls | kNN mean | linear cls | linear mean | attentive | align cos | "
             "teacher cos vis | teacher cos masked | paper | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in [*ARMS, "teacher"]:
        rs = [r for r in records if r["arm"] == arm]
        if not rs:
            continue
        cells = [_fmt([r.get(c) for r in rs]) for c in cols]
        wall = statistics.mean(r.get("wall_s", 0.0) for r in rs)
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + f" | {PAPER[arm]} | {wall:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=0.2, help="warm-up epochs (the presets' 1 would be the whole run)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--teacher", type=Path, default=ROOT / "runs/cae_v2_teacher/checkpoint.pt")
    p.add_argument("--train-limit", type=int, default=None, help="pretrain on this many training images (data.limit)")
    p.add_argument("--limit-train", type=int, default=10000, help="probe/kNN train images")
    p.add_argument("--limit-test", type=int, default=5000, help="probe/kNN test images")
    p.add_argument("--attentive-epochs", type=int, default=90)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on a loaded CPU)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_cae")
    p.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides for every run")
    p.add_argument("--smoke", action="store_true", help="2 steps, 1-block encoder, random teacher, small eval")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.limit_train, args.limit_test, args.attentive_epochs = args.seeds[:1], 500, 200, 2
        args.out = args.out.with_name(args.out.name + "_smoke")
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in args.seeds:
        for arm in args.arms:
            rec = run_arm(arm, seed, args)
            records.append(rec)
            with open(args.out / "runs.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), file=sys.stderr)
    if not args.smoke and any(a.startswith("cae_v2") for a in args.arms) and args.teacher.is_file():
        rec = {"arm": "teacher", "seed": 0, "checkpoint": str(args.teacher), **probes(args.teacher, args)}
        records.append(rec)
        with open(args.out / "runs.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    md = table(records)
    (args.out / "table.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
