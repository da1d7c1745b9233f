"""Throughput of every evaluation protocol, plus a small linear segmentation probe result.

Runs each protocol once on a small Fashion-MNIST subset (or the generated canvases for segmentation)
and prints one markdown line per protocol: images (or image-epochs) per second and the accuracy it
reached. Speeds depend on the machine; say which one when quoting them.

    python benchmarks/eval_throughput.py [CHECKPOINT] --train 2000 --test 1000 --device cpu

Without a checkpoint a randomly initialised encoder of ``configs/mae_fashion_mnist.yaml``'s shape
(ViT 192 wide, 6 blocks, patch 4, 28 px) is used.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default=None, help="mimkit / timm / MAE weights (default: random init)")
    ap.add_argument("--train", type=int, default=2000, help="train images")
    ap.add_argument("--test", type=int, default=1000, help="test images")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of the trained probes")
    ap.add_argument("--seg-epochs", type=int, default=10, help="epochs of the segmentation probe")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma-separated protocols to skip")
    args = ap.parse_args(argv)

    import torch

    from mimkit.eval.attentive import AttentiveProbeConfig
    from mimkit.eval.data import LoadedCheckpoint, load_checkpoint_encoder
    from mimkit.eval.finetune import finetune_preset
    from mimkit.eval.linear import LINEAR_PRESETS
    from mimkit.eval.protocols import PROTOCOLS, EvalContext, EvalOptions
    from mimkit.eval.segmentation import SegProbeConfig
    from mimkit.nn import ViTConfig, ViTEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        ckpt = load_checkpoint_encoder(args.checkpoint, device=args.device)
        name = args.checkpoint
    else:
        torch.manual_seed(0)
        enc = ViTEncoder(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3))
        ckpt = LoadedCheckpoint(encoder=enc.eval(), path="random init", config={"data": {"mean": [0.286],
                                                                                         "std": [0.353]}})
        name = "random-init ViT 192/6"
    opts = EvalOptions(limit_train=args.train, limit_test=args.test, device=args.device, progress=False)
    ctx = EvalContext(ckpt, opts)
    ctx.data("train"), ctx.data("test")
    n_tr, n_te, e = args.train, args.test, args.epochs
    skip = set(filter(None, args.skip.split(",")))
    print(f"encoder: {name}; {n_tr} train / {n_te} test Fashion-MNIST images; device {args.device}; "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)

    rows = []

    def timed(label, fn, work, unit, metric):
        if label.split()[0] in skip:
            return
        t = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t
        val = res["metrics"].get(metric) if metric else None
        rows.append((label, work / dt, unit, dt, metric, val))
        shown = "" if val is None else f"{val:.3g}"
        print(f"| {label} | {work / dt:,.0f} {unit}/s | {dt:.1f} s | {metric or ''} {shown} |", flush=True)

    print("| protocol | throughput | wall | result |\n|---|---|---|---|")
    timed("features (cls+mean, 1 pass)", lambda: {"metrics": {}, "_": [ctx.features(s, "cls") for s in
                                                                         ("train", "test")]},
          n_tr + n_te, "img", None)
    timed("knn (k=10/20/100/200, top-1/5, + LOO)", lambda: PROTOCOLS["knn"](ctx), n_te, "query", "knn20_cls")
    lin = replace(LINEAR_PRESETS["small"], epochs=e, warmup_epochs=max(e / 9, 0.5))
    timed(f"linear ({e} ep, cached)", lambda: PROTOCOLS["linear"](ctx, lin), n_tr * e * 2, "img-epoch", "linear_cls")
    timed(f"linear ({max(e // 5, 1)} ep, augmented, streamed)",
          lambda: PROTOCOLS["linear"](replace_pool(ctx, "cls"), replace(lin, epochs=max(e // 5, 1),
                                                                        warmup_epochs=0.2), augment=True),
          n_tr * max(e // 5, 1), "img-epoch", "linear_cls")
    timed("tokens (all-token cache, fp16)", lambda: {"metrics": {}, "_": [ctx.tokens(s) for s in ("train", "test")]},
          n_tr + n_te, "img", None)
    att = AttentiveProbeConfig(epochs=e, warmup_epochs=max(e / 9, 0.5))
    timed(f"attentive ({e} ep)", lambda: PROTOCOLS["attentive"](replace_pool(ctx, None), att), n_tr * e, "img-epoch",
          "attentive_all")
    timed("fewshot (10 shots x 5 draws)", lambda: PROTOCOLS["fewshot"](ctx), n_te, "test img", "fewshot10_mean")
    timed("diagnostics (Sim, erank)", lambda: PROTOCOLS["diagnostics"](ctx), n_te, "img", "sim")
    ft = finetune_preset("quick", epochs=1, warmup_epochs=0.2)
    timed("finetune (1 ep, quick preset)", lambda: PROTOCOLS["finetune"](replace_pool(ctx, None), ft), n_tr,
          "img", "finetune_mean")
    seg = SegProbeConfig(epochs=args.seg_epochs, warmup_epochs=1)
    seg_ctx = EvalContext(ckpt, replace(opts, limit_train=1000, limit_test=250))
    timed(f"segmentation (generated canvases 1000/250, {args.seg_epochs} ep)",
          lambda: PROTOCOLS["segmentation"](seg_ctx, seg), 1250, "img", "miou_patches")
    return 0


def replace_pool(ctx, pool):
    ctx.opts = type(ctx.opts)(**{**ctx.opts.__dict__, "pool": pool})
    return ctx


if __name__ == "__main__":
    raise SystemExit(main())
