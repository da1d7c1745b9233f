"""Does the linear segmentation probe separate pretrained encoders from random ones? (canvas layouts)

For each checkpoint and for randomly initialised encoders of the same shape (MAE initialisation,
``torch.manual_seed(r)``), runs :func:`mimkit.eval.segmentation.segmentation_linear_probe` (DINOv2's
linear protocol: last block after the final norm, BatchNorm + 1x1 conv, mIoU over 11 classes) on
generated Fashion-MNIST canvases of each layout (:data:`~mimkit.eval.segmentation.CANVAS_LAYOUTS`),
with data and probe seeds ``--seeds`` (train canvases from the train split with seed s, test canvases
from the test split with seed s + 1, as ``mimkit eval segmentation``). Prints one markdown row per
encoder and layout (mean ± std over seeds), then the pretrained − random gap per layout.

    python benchmarks/segmentation_canvases.py RUN_DIR [RUN_DIR ...] --layouts native,overlap,scatter \\
        --random-seeds 0,1,2 --seeds 0,1,2 --train 1000 --test 250 --epochs 20 --threads 1
"""

from __future__ import annotations

import argparse
import statistics


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="pretrained runs / weight files (the first one's shape and "
                                                    "normalisation are used for the random encoders)")
    ap.add_argument("--layouts", default="native,overlap,scatter")
    ap.add_argument("--random-seeds", type=_ints, default=[0, 1, 2])
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="canvas + probe seeds")
    ap.add_argument("--train", type=int, default=1000, help="train canvases")
    ap.add_argument("--test", type=int, default=250, help="test canvases")
    ap.add_argument("--epochs", type=int, default=20, help="probe epochs (SegProbeConfig's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.eval.protocols import EvalContext, EvalOptions
    from mimkit.eval.segmentation import SegProbeConfig, canvas_probe_set, patch_grid, probe_grids
    from mimkit.nn import ViTEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    encoders = {}
    first = None
    for path in args.checkpoints:
        ckpt = load_checkpoint_encoder(path, device=args.device)
        ctx = EvalContext(ckpt, EvalOptions(device=args.device, progress=False))
        first = first or ctx
        encoders[str(path)] = ckpt.encoder.eval()
    for r in args.random_seeds:
        torch.manual_seed(r)
        encoders[f"random init (seed {r})"] = ViTEncoder(first.encoder.cfg).to(args.device).eval()
    mean, std, hw, c = first.mean, first.std, first.img_hw, first.in_chans
    print(f"normalisation mean {mean} std {std}; input {hw}; {args.train} / {args.test} canvases; "
          f"{args.epochs} probe epochs; seeds {args.seeds}")
    cfg = SegProbeConfig(epochs=args.epochs)
    rows: dict[tuple[str, str], list[float]] = {}
    for layout in args.layouts.split(","):
        for s in args.seeds:
            xtr, mtr = canvas_probe_set(args.train, "train", s, hw, c, layout)
            xte, mte = canvas_probe_set(args.test, "test", s + 1, hw, c, layout)
            for name, enc in encoders.items():
                gtr = patch_grid(enc, xtr, mean, std, device=args.device)
                gte = patch_grid(enc, xte, mean, std, device=args.device)
                res = probe_grids(gtr, mtr, gte, mte, 11, SegProbeConfig(**{**cfg.__dict__, "seed": s}), args.device)
                rows.setdefault((layout, name), []).append(res["miou"])
                print(f"  {layout} seed {s} {name}: mIoU {res['miou']:.2f} pixel acc {res['pixel_acc']:.2f}",
                      flush=True)

    def ms(v):
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    print("\n| layout | encoder | mIoU per seed | mean ± std |\n|---|---|---|---|")
    for (layout, name), v in rows.items():
        print(f"| {layout} | {name} | {' / '.join(f'{x:.1f}' for x in v)} | {ms(v)} |")
    print("\n| layout | pretrained − random (mean over seeds and random inits) | min pretrained − max random |\n|---|---|---|")
    for layout in args.layouts.split(","):
        pre = [x for (lay, n), v in rows.items() if lay == layout and not n.startswith("random") for x in v]
        rnd = [x for (lay, n), v in rows.items() if lay == layout and n.startswith("random") for x in v]
        if pre and rnd:
            print(f"| {layout} | {statistics.mean(pre) - statistics.mean(rnd):+.1f} | {min(pre) - max(rnd):+.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
