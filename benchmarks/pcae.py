"""Benchmark (not a test): PCAE vs MAE, vs PCAE without dropping (keep = 1) and vs random drop, at
equal epochs on Fashion-MNIST. Reports, per arm:

* **quality**: the trainer's DINO kNN (k=20, T=0.07; train bank -> test queries; cls token and
  mean-pooled patch tokens after the final LN) and the standard logistic-regression linear probe
  (:func:`mimkit.eval.linear.logistic_probe`: standardized features + logistic regression, C=1) on the
  same pools, on the first ``--limit-train`` train / ``--limit-test`` test images;
* **cost**: teacher FLOPs per image and the forward+backward FLOPs of one training step per image, both
  counted with ``FlopCounterMode`` (:mod:`mimkit.flops`), the teacher's token counts per stage and the
  decoder sequence length (from the step metrics), and the time of one training step (fwd + bwd +
  AdamW + EMA) on a fixed batch after warm-up, measured in this process before the run
  (``--time-steps``; the same batch size and precision as the run);
* **collapse**: "Sim" (:func:`patch_sim`), the mean cosine between an image's patch features;
* **ViT-B/16 cost** (not trained): the counted training-step FLOPs per image of the ViT-B presets
  (MAE, PCAE, PCAE keep = 1) at 224, on the meta device (shapes only), for the published-scale claim.

Arms (presets under configs/): ``mae`` (configs/mae_fashion_mnist.yaml), ``pcae``
(configs/pcae_fashion_mnist.yaml: similarity drop after blocks [0, 2, 4], keep 0.5), ``pcae_keep1``
(``method.keep=1.0``: no drop, a plain EMA latent target on all 37 masked patches) and ``pcae_random``
(``method.drop=random``: the paper's "RD" control, same token counts).

Paper / slide claims to compare with (ViT-B, ImageNet-1K): PCAE 300 ep fine-tunes to
83.6 in 10.1 GPU-days vs MAE 300 ep 82.9 in 15.4; random drop 81.0 vs similarity drop 82.3 at equal
cost (short schedule). Only the cost side is expected to be measurable at this scale.

Usage (the CPU is shared: one training process at a time)::

    python benchmarks/pcae.py --seeds 0 --epochs 1 --limit-train 10000 --limit-test 5000 \
        --override train.precision=bf16
    python benchmarks/pcae.py --smoke          # seconds: checks the script end to end

Results: one JSON line per run in ``<out>/runs.jsonl`` and a markdown table in ``<out>/table.md``
(also printed). A run whose line is already in ``runs.jsonl`` is not repeated.
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
ARMS: dict[str, tuple[str, list[str]]] = {
    "mae": ("configs/mae_fashion_mnist.yaml", []),
    "pcae": ("configs/pcae_fashion_mnist.yaml", []),
    "pcae_keep1": ("configs/pcae_fashion_mnist.yaml", ["method.keep=1.0"]),
    "pcae_random": ("configs/pcae_fashion_mnist.yaml", ["method.drop=random"]),
}


def step_cost(cfg, steps: int, warmup: int = 3) -> dict:
    """Median ms of one training step (fwd + bwd + AdamW + after_step) on a fixed random batch of
    ``cfg.data.batch_size`` images under ``cfg.train.precision``, then counted FLOPs per image."""
    from mimkit.flops import count_flops
    from mimkit.methods import Progress
    from mimkit.train.loop import autocast_dtype, build_method
    from mimkit.train.optim import param_groups

    torch.manual_seed(0)
    model = build_method(cfg)
    model.train()
    enc = cfg.model.encoder
    x = torch.randn(cfg.data.batch_size, enc.in_chans, enc.img_size, enc.img_size)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    dtype = autocast_dtype(cfg.train.precision, torch.device("cpu"))
    times, out = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, Progress(i, 1000))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(Progress(i + 1, 1000))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    met = {k: (float(v) if not isinstance(v, torch.Tensor) else float(v.detach())) for k, v in out.metrics.items()}

    def train_step():  # one image; the teacher's FLOP cache is already filled, so nothing is counted twice
        model(x[:1], Progress(0, 1000)).loss.backward()

    rec = {"step_ms": round(1000 * statistics.median(times), 1),
           "train_flops_per_img": count_flops(train_step, grad=True),
           "teacher_flops_per_img": met.get("teacher_flops", 0.0),
           "teacher_flops_ratio": met.get("teacher_flops_ratio"),
           "decoder_seq_len": met.get("decoder_seq_len", 1 + model.encoder.num_patches),
           "teacher_tokens": [int(met[k]) for k in sorted(met) if k.startswith("teacher_tokens_")]}
    model.zero_grad(set_to_none=True)
    return rec


VIT_B = {"mae": ("configs/mae_vit_base_imagenet.yaml", []), "pcae": ("configs/pcae_vit_base_imagenet.yaml", []),
         "pcae_keep1": ("configs/pcae_vit_base_imagenet.yaml", ["method.keep=1.0"])}


def vit_b_flops() -> str:
    """Counted FLOPs of one training step (fwd + bwd) per image of the ViT-B/16 presets at 224, on the
    meta device (shapes only, no compute): the published-scale side of the efficiency claim."""
    from mimkit.config import load_config
    from mimkit.flops import count_flops
    from mimkit.methods import Progress
    from mimkit.train.loop import build_method

    lines = ["| ViT-B/16 preset | teacher tokens per stage | decoder seq | teacher GFLOPs/img | "
             "train-step GFLOPs/img (fwd+bwd) | vs MAE |", "|---|---|---|---|---|---|"]
    base = None
    for arm, (preset, extra) in VIT_B.items():
        model = build_method(load_config(ROOT / preset, extra)).to("meta")
        model.train()
        x = torch.randn(1, 3, 224, 224, device="meta")
        met = model(x, Progress(0, 10)).metrics  # fills the teacher's FLOP cache before the outer count
        total = count_flops(lambda m=model, x=x: m(x, Progress(0, 10)).loss.backward(), grad=True)
        base = base or total
        tokens = " → ".join(str(met[k]) for k in sorted(met) if k.startswith("teacher_tokens_")) or "—"
        lines.append(f"| {arm} | {tokens} | {met.get('decoder_seq_len', 197)} | "
                     f"{met.get('teacher_flops', 0) / 1e9:.1f} | {total / 1e9:.1f} | {total / base:.2f} |")
    return "\n".join(lines)


def linear_probe(out_dir: Path, limit_train: int | None, limit_test: int | None) -> dict:
    """the standard logistic-regression linear probe on the frozen encoder's cls token and mean-pooled patches (final LN)."""
    from _common import fmnist_linear_probes

    return fmnist_linear_probes(out_dir / "checkpoint.pt", limit_train, limit_test)


@torch.no_grad()
def patch_sim(out_dir: Path, n: int = 1000) -> float:
    """Collapse diagnostic "Sim" (Latent MIM's): mean over the first ``n`` test images of
    ``mean_{i,j} cos`` of the encoder's patch tokens (cls excluded, diagonal included, final LN removed).
    1.0 = every patch of an image has the same feature."""
    from mimkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
    from mimkit.eval.features import normalize_images
    from mimkit.interop import load_encoder
    from mimkit.losses import average_patch_similarity

    enc = load_encoder(out_dir / "checkpoint.pt")
    images, _ = load_fashion_mnist(split="test")
    x = normalize_images(images[:n], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    sims = [average_patch_similarity(enc.forward_features(b, norm=False)[:, 1:]) for b in x.split(250)]
    return round(100 * float(torch.stack(sims).mean()), 2)


def run_one(arm: str, seed: int, args) -> dict:
    from mimkit.config import load_config
    from mimkit.train import pretrain

    preset, extra = ARMS[arm]
    out_dir = args.out / f"{arm}_ep{args.epochs:g}_s{seed}"
    overrides = [f"train.epochs={args.epochs}", f"train.seed={seed}", f"train.out_dir={out_dir}",
                 "train.progress_bar=false", "train.tensorboard=false", "eval.picture_at_end=true", *extra]
    if args.smoke:
        overrides += ["train.max_steps=2", "data.limit=1024", "data.batch_size=32", "eval.knn_train_limit=500",
                      "eval.knn_test_limit=200"]
    if args.limit_train:
        overrides += [f"eval.knn_train_limit={args.limit_train}"]
    if args.limit_test:
        overrides += [f"eval.knn_test_limit={args.limit_test}"]
    overrides += args.override
    cfg = load_config(ROOT / preset, overrides)
    rec = {"arm": arm, "epochs": args.epochs, "seed": seed, "out_dir": str(out_dir),
           "precision": cfg.train.precision, "batch": cfg.data.batch_size}
    rec.update(step_cost(cfg, 2 if args.smoke else args.time_steps))
    t0 = time.perf_counter()
    result = pretrain(cfg)
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["steps"] = result.get("step")
    knn = result.get("knn") or {}
    rec["knn_cls"], rec["knn_mean"] = knn.get("top1_cls"), knn.get("top1_mean")
    if not args.no_linear:
        rec.update(linear_probe(out_dir, 1000 if args.smoke else args.limit_train, 500 if args.smoke else args.limit_test))
    rec["patch_sim"] = patch_sim(out_dir)
    return rec


def table(records: list[dict]) -> str:
    lines = ["| arm | seeds | kNN cls | kNN mean | linear cls | linear mean | teacher tokens per stage | "
             "decoder seq | teacher MFLOPs/img | vs keep=1 | train-step MFLOPs/img (fwd+bwd) | step ms | wall s | Sim % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        rs = [r for r in records if r["arm"] == arm]
        if not rs:
            continue
        r0 = rs[0]
        q = [_fmt([r.get(c) for r in rs]) for c in ("knn_cls", "knn_mean", "linear_cls", "linear_mean")]
        tokens = " → ".join(str(t) for t in r0["teacher_tokens"]) or "— (no teacher)"
        ratio = f"{r0['teacher_flops_ratio']:.2f}" if r0.get("teacher_flops_ratio") is not None else "—"
        lines.append(
            f"| {arm} | {len(rs)} | " + " | ".join(q)
            + f" | {tokens} | {int(r0['decoder_seq_len'])} | {r0['teacher_flops_per_img'] / 1e6:.1f} | {ratio} | "
            + f"{r0['train_flops_per_img'] / 1e6:.1f} | {_fmt([r['step_ms'] for r in rs], 0)} | "
            + f"{_fmt([r['wall_s'] for r in rs], 0)} | {_fmt([r.get('patch_sim') for r in rs], 1)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_pcae")
    p.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides for every run")
    p.add_argument("--limit-train", type=int, default=None, help="evaluate on this many train images (kNN bank, probe)")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on this many test images")
    p.add_argument("--time-steps", type=int, default=10, help="timed training steps per arm (after 3 warm-up)")
    p.add_argument("--no-linear", action="store_true", help="skip the (slow) logistic probe for these runs")
    p.add_argument("--skip-vit-b", action="store_true", help="skip the counted ViT-B/16 FLOP table")
    p.add_argument("--smoke", action="store_true", help="2 steps on 1024 images, small eval: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds = args.seeds[:1]
        args.out = args.out.with_name(args.out.name + "_smoke")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for seed in args.seeds:
        for arm in args.arms:
            if any(r["arm"] == arm and r["seed"] == seed and r["epochs"] == args.epochs for r in records):
                continue
            rec = run_one(arm, seed, args)
            records.append(rec)
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), file=sys.stderr)
    if any("patch_sim" not in r for r in records):  # runs recorded before the diagnostic existed
        for r in records:
            r.setdefault("patch_sim", patch_sim(Path(r["out_dir"])))
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
    md = table([r for r in records if r["epochs"] == args.epochs])
    if not args.skip_vit_b:
        md += "\n\n" + vit_b_flops()
    (args.out / "table.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
