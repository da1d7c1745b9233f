"""``mimkit`` command line: ``pretrain``, ``eval <protocol>``, ``report``, ``zoo``, ``visualize``, ``export``, ``data prepare``.

Examples::

    mimkit pretrain configs/mae_fashion_mnist.yaml train.epochs=1 optim.base_lr=1e-3
    torchrun --nproc_per_node 2 -m mimkit.cli pretrain configs/mae_fashion_mnist.yaml
    mimkit eval knn runs/mae_fashion_mnist/checkpoint.pt
    mimkit visualize runs/mae_fashion_mnist/checkpoint.pt --out recon.png
    mimkit export runs/mae_fashion_mnist/checkpoint.pt encoder.safetensors
    mimkit data prepare /data/imagenet/train /data/imagenet-shards --resize 224 --workers 16
    mimkit export runs/mae_fashion_mnist/checkpoint.pt hf_mae/ --format hf
    mimkit compare runs/mae_fashion_mnist            # loss vs the preset's reference curves
    mimkit bench --smoke                             # training speed rows at tiny shapes (CPU, seconds)
    mimkit zoo configs/mae_fashion_mnist.yaml configs/pcae_fashion_mnist.yaml --seeds 0,1,2   # one table
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mimkit.errors import MimkitError


def _pretrain(args: argparse.Namespace) -> int:
    from mimkit.config import load_config
    from mimkit.train import pretrain

    cfg = load_config(args.config, args.overrides)
    result = pretrain(cfg)
    for h in result.get("knn_history", []):
        print(f"epoch {h['epoch']:g}: kNN top-1 cls {h['top1_cls']:.2f} %, mean-pooled {h['top1_mean']:.2f} %")
    knn = result.get("knn")
    if knn:
        print(f"kNN top-1 (k={knn['k']}): cls {knn['top1_cls']:.2f} %, mean-pooled {knn['top1_mean']:.2f} %")
    if result.get("picture"):
        print(f"picture: {result['picture']}")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once, by rank 0
        print(f"run directory: {result['out_dir']}")
    return 0


def _load_method(path: str):
    """A method model from a mimkit checkpoint (a file, a run directory or a sharded directory), an
    MAE from an official MAE pretraining checkpoint or a CAE from an official CAE one; read by :func:`mimkit.weights.read_weights`
    (weights only, a mimkit checksum verified first)."""
    from mimkit.config import config_from_dict
    from mimkit.interop import cae_from_official, mae_from_official
    from mimkit.train.loop import build_method
    from mimkit.weights import read_weights

    w = read_weights(path)
    if w.format in ("mimkit-checkpoint", "mimkit-dcp"):
        cfg = config_from_dict(w.config)
        model = build_method(cfg)
        model.load_state_dict(w.state)
        model.eval()
        if w.input is not None:  # the normalisation the run trained with (recorded since mimkit records it)
            return model, tuple(w.input["mean"]), tuple(w.input["std"])
        return model, tuple(cfg.data.mean or ()), tuple(cfg.data.std or ())
    if w.format == "official-cae":
        return cae_from_official(w.path).eval(), None, None
    return mae_from_official(w.path), None, None


def _visualize(args: argparse.Namespace) -> int:
    from mimkit.data import build_dataset
    from mimkit.viz import draw_picture

    model, mean, std = _load_method(args.checkpoint)
    pics = model.capabilities.pictures
    kind = args.kind or ("reconstruction" if "reconstruction" in pics else pics[0])
    if kind not in pics:
        print(f"mimkit: error: {type(model).__name__} does not draw '{kind}' pictures; use --kind "
              f"{' or --kind '.join(pics)}", file=sys.stderr)
        return 2
    enc = model.encoder
    ds = build_dataset(args.dataset, args.split, in_memory_size=None if args.dataset == "fashion_mnist" else enc.cfg.img_size,
                       mode="L" if enc.in_chans == 1 else "RGB")
    mean, std = mean or ds.mean, std or ds.std
    images = ds.images[args.start : args.start + args.n]
    path = draw_picture(kind, model, images, mean, std, args.out or f"{kind}.png", seed=args.seed)
    print(f"wrote {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mimkit.compare import compare_run, load_reference, plot_comparison

    cmp = compare_run(args.run_dir, args.reference, tolerance=args.tolerance, min_inside=args.min_inside)
    out = Path(args.out) if args.out else Path(args.run_dir) / "compare.png"
    plot_comparison(load_reference(cmp.reference), cmp, out, title=f"{Path(args.run_dir).name} vs {cmp.reference.name}")
    print(cmp.summary())
    print(f"picture: {out}")
    return 0 if cmp.verdict else 1


def _export(args: argparse.Namespace) -> int:
    from mimkit.interop import export_encoder, load_encoder, timm_load_snippet
    from mimkit.nn import ViTEncoder
    from mimkit.weights import read_weights

    w = read_weights(args.checkpoint)  # its input record (normalisation, size) goes into the export
    if getattr(args, "format", "timm") == "hf":
        from mimkit.hf import export_hf

        model, _, _ = _load_method(args.checkpoint)
        path = export_hf(model, args.out, input=w.input)
        print(f"wrote {path} (transformers ViTMAEForPreTraining; load with ViTMAEForPreTraining.from_pretrained)")
        return 0

    enc = load_encoder(w)  # any format mimkit.weights reads, a sharded directory included
    path = export_encoder(enc, args.out, input=w.input)
    if isinstance(enc, ViTEncoder):
        print(f"wrote {path} (timm VisionTransformer keys); load it in timm with:\n{timm_load_snippet(enc.cfg, path)}")
    else:
        print(f"wrote {path} (the timm model's own keys)")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from mimkit.data.shards import prepare_shards

    index = prepare_shards(args.src, args.out, shard_size=args.shard_size, resize=args.resize, mode=args.mode,
                           skip_corrupt=args.skip_corrupt, workers=args.workers, progress=not args.quiet,
                           follow_links=args.follow_links, max_pixels=args.max_pixels)
    kind = f"uint8 {args.resize}x{args.resize} arrays" if args.resize else "the original files"
    print(f"wrote {index['num_samples']} {index['mode']} images ({kind}) in {len(index['shards'])} shard(s) to {args.out}"
          + (f"; skipped {len(index['skipped'])} corrupt file(s) (listed in index.json)" if index["skipped"] else "")
          + f". Train on them with data.dataset={args.out} data.in_memory=false")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line naming the problem and where the options are listed, not the whole
    usage first (every sub-command's parser is of this class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mimkit", description="Masked-image-modeling pretraining of ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a method from a YAML config with key=value overrides")
    p.add_argument("config", help="YAML file, e.g. configs/mae_fashion_mnist.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.base_lr=1e-3 train.epochs=1")
    p.set_defaults(func=_pretrain)

    defaults = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("visualize", help="reconstruction, mask-plan or salience picture from a checkpoint",
                       formatter_class=defaults)
    p.add_argument("checkpoint")
    p.add_argument("--out", default=None, help="PNG file to write (<kind>.png when not given)")
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist or an image folder")
    p.add_argument("--split", default="test", help="split of the data set")
    p.add_argument("--n", type=int, default=8, help="number of images")
    p.add_argument("--start", type=int, default=0, help="index of the first image")
    p.add_argument("--seed", type=int, default=0, help="masking seed")
    from mimkit.methods import PICTURES

    p.add_argument("--kind", default=None, choices=list(PICTURES),
                   help="picture kind (default: reconstruction when the method predicts pixels, else its first "
                        "kind): reconstruction, views (the mask plan; EMAE's K parts), salience (SBAM), mixing "
                        "(MixedAE), teacher_drops (PCAE), regressor (CAE); the method's checkpoint says which it draws")
    p.set_defaults(func=_visualize)

    p = sub.add_parser("export", help="export the encoder to timm-keyed safetensors (or MAE to Hugging Face)")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--format", choices=["timm", "hf"], default="timm",
                   help="timm: encoder safetensors (default); hf: encoder + decoder as a transformers "
                        "ViTMAEForPreTraining directory (MAE, EMAE, SBAM; needs `pip install transformers`)")
    p.set_defaults(func=_export)

    p = sub.add_parser("compare", help="plot a run's loss against the reference curves of its preset")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a pretraining run directory (metrics.jsonl, config.yaml)")
    p.add_argument("reference", metavar="REFERENCE", nargs="?", default=None,
                   help="a reference directory or preset name (default: the reference of the run's method and data "
                        "set under docs/reference)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="slack around the band of the reference seeds, as a fraction of their mean (default 0.05)")
    p.add_argument("--min-inside", type=float, default=0.75,
                   help="fraction of compared steps that must be inside for the verdict INSIDE (default 0.75: a "
                        "reference seed left out is inside the other two seeds' band at 75-92 %% of steps)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/compare.png)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("data", help="prepare data sets for streaming (tar shards)")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="write an image folder as webdataset tar shards (data.dataset=OUT_DIR)",
                            formatter_class=defaults)
    p.add_argument("src", metavar="SRC_FOLDER", help="image folder (class sub-folders optional)")
    p.add_argument("out", metavar="OUT_DIR", help="new or empty directory for the shards")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="store uint8 NxN images (shorter side resized, center crop): training skips JPEG decoding")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--mode", choices=["auto", "RGB", "L"], default="auto",
                   help="colour mode: L (grey-scale), RGB, or auto (L when the folder's images are grey-scale files)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    p.add_argument("--skip-corrupt", action="store_true", help="leave out unreadable images (listed in index.json)")
    p.add_argument("--follow-links", action="store_true",
                   help="follow symbolic links that stay inside SRC_FOLDER (each real file and folder once); by "
                        "default links are skipped and counted in a warning")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images over N pixels, from their header (when not given: $MIMKIT_MAX_PIXELS or 89478485, "
                        "a decompression-bomb guard; 0: no limit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_data_prepare)

    from mimkit import bench

    bench.add_parser(sub)  # mimkit bench [--smoke]: img/s, TFLOP/s, MFU of every method and a peer
    from mimkit import zoo

    zoo.add_parser(sub)  # mimkit zoo CONFIGS --seeds 0,1,2: train x seeds, evaluate, one table

    from mimkit.eval import cli as eval_cli

    eval_cli.register(sub)
    eval_cli.register_report(sub)
    return parser


EXIT_OK = 0
EXIT_ERROR = 2
"""A config, data, checkpoint, run-directory, non-finite-loss or file-system error (one line on stderr)."""
EXIT_INTERRUPTED = 75
"""``pretrain`` stopped by SIGTERM/SIGINT/SIGUSR1/SIGHUP after saving a checkpoint: rerun to resume."""
EXIT_KEYBOARD = 130
"""Interrupted (Ctrl-C) where no checkpoint could be saved: while starting (imports, config, data
loading, before training began), outside ``pretrain``, or by a second Ctrl-C. One line, no traceback."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def _say(text: str) -> None:
    """One line on stderr; a closed terminal or pipe (the run's own SIGHUP) does not turn it into a traceback."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    command = None  # set once a command runs
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # positional items after flags (mimkit zoo A.yaml --seeds 0 key=value): the zoo takes them
            if getattr(args, "trailing_items", None) and not any(e.startswith("-") for e in extra):
                setattr(args, args.trailing_items, getattr(args, args.trailing_items) + extra)
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from mimkit.train.loop import TrainingInterrupted

        try:
            command = args.command
            return int(args.func(args) or 0)
        except TrainingInterrupted as e:
            _say(f"mimkit: {_one_line(e)}")
            return EXIT_INTERRUPTED
        except MimkitError as e:  # every mimkit error type (mimkit.errors) is a one-line message
            _say(f"mimkit: error: {_one_line(e)}")
            return EXIT_ERROR
        except OSError as e:  # the file system: a full disk, a missing or unwritable path
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            _say(f"mimkit: error: {e.strerror or _one_line(e)}{where}; free space or fix the path, then rerun "
                 "(a pretraining run resumes from its last checkpoint)")
            return EXIT_ERROR
        except RuntimeError as e:
            import torch.distributed as dist

            if isinstance(e, getattr(dist, "DistError", ())) or "gloo" in str(e).lower() or "nccl" in str(e).lower():
                _say(f"mimkit: error: a distributed collective failed ({_one_line(e)[:300]}); another rank stopped "
                     "or crashed (see its log) or train.dist_timeout_minutes passed")
                return EXIT_ERROR
            raise
    except KeyboardInterrupt:  # anywhere outside the loop's own handling (which saves and raises TrainingInterrupted)
        _say("mimkit: interrupted" + ("; nothing was saved since the last checkpoint" if command == "pretrain" else ""))
        return EXIT_KEYBOARD


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "Path", "EXIT_OK", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_KEYBOARD"]
