"""Benchmark (not a test): MixedAE's ablation arms against MAE on Fashion-MNIST, the recognition-
accuracy curve, and the cost of TopK attention against plain SDPA attention.

Arms (``configs/mixedae_fashion_mnist.yaml`` with overrides; MAE is ``configs/mae_fashion_mnist.yaml``;
all at the same epochs, batch, lr and schedule):

* ``init``: no training (the encoder at MAE's initialisation): the reference every arm must beat.
* ``mae``: MAE, mask 0.75.
* ``naive``: naive mixing, no homologous parts (``homologous_attention=false contrastive_weight=0``;
  like the preset, no segment embedding).
* ``topk``: mixing + homologous attention, no HomoCon (``contrastive_weight=0``).
* ``mixedae``: everything on (the preset).
* ``con_only``: HomoCon only (``pixel_weight=0``: the deck's "L_HomoCon only" row, which collapses).
* ``mae_eq``: MAE at equal compute with ``mixedae``: ``E x`` (MixedAE's / MAE's FLOPs per training
  image, PyTorch ``FlopCounterMode`` on one batch, forward + backward: matmuls, not TopK/softmax)
  epochs, or ``--equal-compute-epochs``; skipped when that is within 5 % of ``E`` (then the
  equal-epochs MAE run is also the equal-compute one). Wall-clock img/s is reported beside (on a
  shared CPU it is too noisy to define compute).

Measurements of every run (frozen encoder, full 28x28 images, tokens after the final LayerNorm, plain
attention):

* kNN top-1 (k = 20, cosine, T = 0.07) on cls and on mean-pooled patch tokens, first ``--limit-train``
  train images as the bank, first ``--limit-test`` test images (recomputed by the probes, so the
  untrained ``init`` row is measured the same way; the trainer's end-of-run kNN is the same protocol).
* linear: the standard logistic-regression probe (standardized features + scikit-learn LogisticRegression(C=1,
  max_iter=1000)) on cls and mean-pooled tokens, same images.
* attentive: :func:`mimkit.eval.attentive.train_attentive_probe` (CAE's attentive probe) on all tokens,
  same images, with ``--attentive-batch`` / ``--attentive-lr`` / ``--attentive-epochs``.
* the recognition-accuracy curve (``recognition_acc`` in ``metrics.jsonl``) of ``topk`` and ``mixedae``.

Attention cost (``--attention``): forward + backward of one encoder block with plain SDPA, explicit
attention, TopK, and TopK + the recognition callback, fp32 and bf16 autocast, at Fashion-MNIST shapes
(64 mixed sequences of 1 + 52 tokens, width 192, 3 heads) and a scaled-down ViT-B shape (16 sequences
of 197 tokens, width 384, 6 heads). Time = median of ``--reps`` runs; memory = bytes of the tensors
autograd saves for backward (``saved_tensors_hooks``), which is the activation memory the path adds.

Usage (2-core CPU: each 1-epoch run takes minutes)::

    python benchmarks/mixedae.py --epochs 1 --limit-train 10000 --limit-test 5000 --seeds 0 \
        --override train.precision=bf16 --out runs/bench_mixedae
    python benchmarks/mixedae.py --attention-only --reps 10
    python benchmarks/mixedae.py --smoke      # seconds: checks the script end to end

Results: ``<out>/runs.jsonl`` (one line per run), ``<out>/attention.json``, ``<out>/table.md``
(printed too). A run whose ``bench.json`` exists is not repeated (``--reprobe`` reruns only its probes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import fmt_mean_std as _fmt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIXEDAE = ROOT / "configs/mixedae_fashion_mnist.yaml"
MAE = ROOT / "configs/mae_fashion_mnist.yaml"

ARMS: dict[str, tuple[Path, list[str]]] = {
    "init": (MAE, []),  # not trained: the encoder at MAE's initialisation (reference)
    "mae": (MAE, []),
    "naive": (MIXEDAE, ["method.homologous_attention=false", "method.contrastive_weight=0.0"]),
    "topk": (MIXEDAE, ["method.contrastive_weight=0.0"]),
    "mixedae": (MIXEDAE, []),
    "con_only": (MIXEDAE, ["method.pixel_weight=0.0"]),
    "mae_eq": (MAE, []),
}

# the paper's ViT-B / IN-1K claims (authors' slides) and what to expect at small scale
CLAIMS = [
    ("naive mixing < MAE", "[ABS] naive mixing hurts (no number)", ("naive", "mae")),
    ("MixedAE >= MAE", "+0.4 FT at 300 ep (83.1 vs 82.7); 'not worse' at best here", ("mixedae", "mae")),
    ("recon + HomoCon > recon only", "+0.3 FT / +1.4 mIoU (82.7 vs 82.4); unlikely to resolve", ("mixedae", "topk")),
    ("HomoCon only collapses", "7.8 FT / 8.3 mIoU: fails", ("con_only", "mixedae")),
]


def flops_per_image(cfg, batch: int = 64) -> float:
    """Forward + backward FLOPs per image of ``cfg``'s method on one random batch (fp32, CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mimkit.train.loop import build_method

    torch.manual_seed(0)
    model = build_method(cfg).train()
    e = cfg.model.encoder
    x = torch.randn(batch, e.in_chans, e.img_size, e.img_size)
    with FlopCounterMode(display=False) as fc:
        model(x).loss.backward()
    return fc.get_total_flops() / batch


def probes(out_dir: Path, args) -> dict:
    """Linear (logistic) and attentive probes of the encoder in ``out_dir/checkpoint.pt``."""
    from mimkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
    from mimkit.eval.attentive import AttentiveProbeConfig, train_attentive_probe
    from mimkit.eval.features import extract_features
    from mimkit.eval.knn import knn_accuracy
    from mimkit.eval.linear import logistic_probe
    from mimkit.interop import load_encoder

    enc = load_encoder(out_dir / "checkpoint.pt")
    (trx, try_), (tex, tey) = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    trx, try_, tex, tey = trx[: args.limit_train], try_[: args.limit_train], tex[: args.limit_test], tey[: args.limit_test]
    kw = dict(pool=["cls", "mean", "all"], mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    ftr, fte = extract_features(enc, trx, **kw), extract_features(enc, tex, **kw)
    rec = {f"knn_{p}": knn_accuracy(ftr[p], try_, fte[p], tey, 20, 0.07) for p in ("cls", "mean")}
    rec.update({f"linear_{p}": logistic_probe(ftr[p], try_, fte[p], tey)["top1"] for p in ("cls", "mean")})
    cfg = AttentiveProbeConfig(epochs=args.attentive_epochs, batch_size=args.attentive_batch,
                               lr=args.attentive_lr, warmup_epochs=min(10.0, args.attentive_epochs / 9), seed=0)
    t0 = time.perf_counter()
    att = train_attentive_probe(ftr["all"].half(), try_, fte["all"].half(), tey, enc.num_heads, cfg)
    rec["attentive"] = att["top1"]
    rec["attentive_lr"] = att["lr"]
    rec["attentive_s"] = round(time.perf_counter() - t0, 1)
    return rec


def recognition_curve(out_dir: Path) -> list[tuple[int, float, float]]:
    """``(step, recognition_acc, loss_contrastive)`` from ``metrics.jsonl``."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["recognition_acc"], r.get("loss_contrastive")) for r in rows if "recognition_acc" in r]


def run_arm(arm: str, epochs: float, seed: int, args) -> dict:
    from mimkit.config import load_config
    from mimkit.train import pretrain

    path, overrides = ARMS[arm]
    out_dir = args.out / f"{arm}_ep{epochs:g}_s{seed}"
    done = out_dir / "bench.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        if args.reprobe:  # new probe settings on the finished run, without retraining
            rec.update(probes(out_dir, args))
            done.write_text(json.dumps(rec, indent=1))
        return rec
    overrides = overrides + [f"train.epochs={epochs}", f"train.seed={seed}", f"train.out_dir={out_dir}",
                             "train.progress_bar=false", "train.tensorboard=false", "eval.picture_at_end=false",
                             "train.ckpt_every_steps=100000",
                             f"eval.knn_train_limit={args.limit_train}", f"eval.knn_test_limit={args.limit_test}"]
    if args.smoke:
        overrides += ["train.max_steps=2", "model.encoder.depth=1", "model.decoder.depth=1", "data.limit=1024"]
    overrides += args.override
    cfg = load_config(path, overrides)
    t0 = time.perf_counter()
    if arm == "init":  # no training: save the initialised model as a checkpoint the probes can read
        from mimkit.config import to_dict
        from mimkit.train.loop import build_method, seed_everything

        seed_everything(seed)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": build_method(cfg).state_dict(), "config": to_dict(cfg)}, out_dir / "checkpoint.pt")
        result = {"step": 0}
    else:
        result = pretrain(cfg)
    train_s = time.perf_counter() - t0
    knn = result.get("knn") or {}
    log = out_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    rows = [r for r in rows if "img_per_s" in r]
    ips = [r["img_per_s"] for r in rows[1:]] or [r["img_per_s"] for r in rows]
    rec = {"arm": arm, "epochs": epochs, "seed": seed, "overrides": overrides, "steps": result.get("step"),
           "train_s": round(train_s, 1), "img_per_s_median": statistics.median(ips) if ips else None,
           "knn_cls": knn.get("top1_cls"), "knn_mean": knn.get("top1_mean"),
           "final": {k: rows[-1].get(k) if rows else None
                     for k in ("loss", "loss_pixel", "loss_contrastive", "recognition_acc")}}
    rec["gflops_per_image"] = flops_per_image(cfg) / 1e9 if rows else None
    rec.update(probes(out_dir, args))
    rec["curve"] = recognition_curve(out_dir)
    done.write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k not in ("curve", "overrides")}), file=sys.stderr, flush=True)
    return rec


# --------------------------------------------------------------------------------------------------
# attention cost


def _block_step(blk, x0: torch.Tensor, mode: str, k: int, member: torch.Tensor, bf16: bool) -> None:
    """One forward + backward of ``blk`` on a copy of ``x0`` through attention path ``mode``."""
    x = x0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if mode == "sdpa":
            y = blk(x)
        elif mode == "explicit":
            y, _ = blk(x, return_attn=True)
        elif mode == "topk":
            y = blk(x, topk=k)
        else:  # topk + recognition accuracy from the probabilities (what training logs)
            from mimkit.methods.mixedae import recognition_accuracy

            y, a = blk(x, topk=k, return_attn=True)
            recognition_accuracy(a.detach(), member)
    y.float().pow(2).mean().backward()


def attention_bench(reps: int, shapes=None) -> list[dict]:
    """Forward + backward of one :class:`mimkit.nn.layers.Block` per attention path (module docstring)."""
    from mimkit.nn.layers import Block

    shapes = shapes or [("fashion_mnist", 64, 53, 192, 3, 13), ("vit_b_scaled", 16, 197, 384, 6, 50)]
    out = []
    for label, b, n, d, h, k in shapes:
        torch.manual_seed(0)
        blk = Block(d, h).train()
        x0 = torch.randn(b, n, d)
        member = torch.arange(4).repeat_interleave((n - 1 + 3) // 4)[: n - 1]
        for prec in ("fp32", "bf16"):
            for mode in ("sdpa", "explicit", "topk", "topk+recognition"):
                args = (blk, x0, mode, k, member, prec == "bf16")
                saved = []
                with torch.autograd.graph.saved_tensors_hooks(
                        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):  # noqa: B023
                    _block_step(*args)
                for _ in range(2):
                    _block_step(*args)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    _block_step(*args)
                    times.append(time.perf_counter() - t0)
                out.append({"shape": label, "seqs": b, "tokens": n, "width": d, "heads": h, "k": k,
                            "precision": prec, "mode": mode, "ms": 1000 * statistics.median(times),
                            "saved_mib": sum(saved) / 2**20})
                print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def attention_table(rows: list[dict]) -> str:
    lines = ["| shape (seqs x tokens, width/heads, K) | precision | path | fwd+bwd ms | x SDPA | saved for backward MiB |",
             "|---|---|---|---|---|---|"]
    base = {(r["shape"], r["precision"]): r for r in rows if r["mode"] == "sdpa"}
    for r in rows:
        b = base[(r["shape"], r["precision"])]
        shape = f"{r['shape']} ({r['seqs']} x {r['tokens']}, {r['width']}/{r['heads']}, K={r['k']})"
        lines.append(f"| {shape} | {r['precision']} | {r['mode']} | {r['ms']:.1f} | {r['ms'] / b['ms']:.2f} | "
                     f"{r['saved_mib']:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# tables


def table(records: list[dict]) -> str:
    cols = ["knn_cls", "knn_mean", "linear_cls", "linear_mean", "attentive"]  # + final losses, cost
    lines = ["| arm | epochs | seeds | kNN cls | kNN mean | linear cls | linear mean | attentive | final loss_pixel | "
             "final recognition | GFLOP/img | train s | img/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        for ep in sorted({r["epochs"] for r in records if r["arm"] == arm}):
            rs = [r for r in records if r["arm"] == arm and r["epochs"] == ep]
            cells = [_fmt([r[c] for r in rs]) for c in cols]
            fin = [_fmt([r["final"].get(k) for r in rs]) for k in ("loss_pixel", "recognition_acc")]
            cost = [_fmt([r[k] for r in rs], 3 if k == "gflops_per_image" else 0)
                    for k in ("gflops_per_image", "train_s", "img_per_s_median")]
            lines.append(f"| {arm} | {ep:g} | {len(rs)} | " + " | ".join(cells + fin + cost) + " |")
    return "\n".join(lines)


def curve_table(records: list[dict], every: int = 20) -> str:
    arms = [a for a in ("topk", "mixedae") if any(r["arm"] == a and r["curve"] for r in records)]
    if not arms:
        return ""
    by = {a: {s: acc for r in records if r["arm"] == a for s, acc, _ in r["curve"] if r["seed"] == min(
        rr["seed"] for rr in records if rr["arm"] == a)} for a in arms}
    steps = sorted(set().union(*[set(v) for v in by.values()]))
    steps = [s for i, s in enumerate(steps) if s % every == 0 or i == len(steps) - 1]
    lines = ["| step | " + " | ".join(f"{a} recognition" for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(f"{by[a][s]:.3f}" if s in by[a] else "—" for a in arms) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--equal-compute-epochs", type=float, default=None,
                   help="epochs of mae_eq (default: E x the MixedAE / MAE FLOPs-per-image ratio)")
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--limit-test", type=int, default=5000)
    p.add_argument("--attentive-epochs", type=int, default=90)
    p.add_argument("--attentive-batch", type=int, default=1024)
    p.add_argument("--attentive-lr", type=float, default=None, help="absolute lr (default: base 0.0125 x batch / 256)")
    p.add_argument("--reprobe", action="store_true", help="rerun the probes of finished runs (new probe settings)")
    p.add_argument("--attention", action="store_true", help="also time TopK vs SDPA attention")
    p.add_argument("--attention-only", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_mixedae")
    p.add_argument("--smoke", action="store_true", help="2 steps, 1-block model, small eval")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.limit_train, args.limit_test, args.attentive_epochs, args.reps = [0], 512, 256, 2, 1
        args.out = args.out.with_name(args.out.name + "_smoke")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    md = []
    if args.attention or args.attention_only:
        shapes = [("fashion_mnist", 8, 53, 192, 3, 13)] if args.smoke else None
        rows = attention_bench(args.reps, shapes)
        (args.out / "attention.json").write_text(json.dumps(rows, indent=1))
        md.append(attention_table(rows))
    if not args.attention_only:
        records = []
        for seed in args.seeds:
            for arm in args.arms:
                ep = args.epochs
                if arm == "mae_eq":
                    ep = args.equal_compute_epochs
                    if ep is None:
                        mx = [r for r in records if r["arm"] == "mixedae" and r["seed"] == seed]
                        ma = [r for r in records if r["arm"] == "mae" and r["seed"] == seed]
                        if not (mx and ma):
                            print("mae_eq needs the mae and mixedae runs first (or --equal-compute-epochs)", file=sys.stderr)
                            continue
                        ep = round(args.epochs * mx[0]["gflops_per_image"] / ma[0]["gflops_per_image"], 2)
                    if abs(ep - args.epochs) < 0.05 * args.epochs:
                        print(f"mae_eq: equal compute is {ep:g} epochs, within 5 % of the equal-epochs MAE run; "
                              "skipped", file=sys.stderr)
                        continue
                records.append(run_arm(arm, ep, seed, args))
                with open(args.out / "runs.jsonl", "a") as f:
                    f.write(json.dumps(records[-1]) + "\n")
        md += [table(records), curve_table(records)]
    text = "\n\n".join(m for m in md if m)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
