"""``mimkit`` command line: ``pretrain``, ``eval <protocol>``, ``report``, ``visualize``, ``export``.

Examples::

    mimkit pretrain configs/mae_fashion_mnist.yaml train.epochs=1 optim.base_lr=1e-3
    torchrun --nproc_per_node 2 -m mimkit.cli pretrain configs/mae_fashion_mnist.yaml
    mimkit eval knn runs/mae_fashion_mnist/checkpoint.pt
    mimkit visualize runs/mae_fashion_mnist/checkpoint.pt --out recon.png
    mimkit export runs/mae_fashion_mnist/checkpoint.pt encoder.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    print(f"run directory: {result['out_dir']}")
    return 0


def _load_method(path: str):
    """A method model from a mimkit checkpoint, or an MAE from an official MAE checkpoint."""
    from mimkit.config import config_from_dict
    from mimkit.interop import mae_from_official
    from mimkit.train.checkpoint import load_checkpoint
    from mimkit.train.loop import build_method

    state = load_checkpoint(path)
    if isinstance(state, dict) and "config" in state and "model" in state:
        cfg = config_from_dict(state["config"])
        model = build_method(cfg)
        model.load_state_dict(state["model"])
        model.eval()
        return model, tuple(cfg.data.mean or ()), tuple(cfg.data.std or ())
    return mae_from_official(path), None, None


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


def _export(args: argparse.Namespace) -> int:
    from mimkit.interop import export_encoder, load_encoder

    enc = load_encoder(args.checkpoint)
    path = export_encoder(enc, args.out)
    print(f"wrote {path} (timm VisionTransformer keys; load with mimkit.interop.timm_model_for + load_state_dict)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimkit", description="Masked-image-modeling pretraining of ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a method from a YAML config with key=value overrides")
    p.add_argument("config", help="YAML file, e.g. configs/mae_fashion_mnist.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.base_lr=1e-3 train.epochs=1")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("visualize", help="reconstruction, mask-plan or salience picture from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--out", default=None, help="PNG file to write (default: <kind>.png)")
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist or an image folder")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=8, help="number of images")
    p.add_argument("--start", type=int, default=0, help="index of the first image")
    p.add_argument("--seed", type=int, default=0, help="masking seed")
    from mimkit.methods import PICTURES

    p.add_argument("--kind", default=None, choices=list(PICTURES),
                   help="picture kind (default: reconstruction when the method predicts pixels, else its first "
                        "kind): reconstruction, views (the mask plan; EMAE's K parts), salience (SBAM), mixing "
                        "(MixedAE), teacher_drops (PCAE), regressor (CAE); the method's checkpoint says which it draws")
    p.set_defaults(func=_visualize)

    p = sub.add_parser("export", help="export the encoder to timm-keyed safetensors")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.set_defaults(func=_export)

    from mimkit.eval import cli as eval_cli

    eval_cli.register(sub)
    eval_cli.register_report(sub)
    return parser


EXIT_OK = 0
EXIT_ERROR = 2
"""A config, data, checkpoint, run-directory, non-finite-loss or file-system error (one line on stderr)."""
EXIT_INTERRUPTED = 75
"""``pretrain`` stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint: rerun to resume."""
EXIT_KEYBOARD = 130
"""Interrupted where no checkpoint could be saved (before training started, or a second Ctrl-C)."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mimkit.config import ConfigError
    from mimkit.data.errors import DataError
    from mimkit.interop import InteropError
    from mimkit.train.checkpoint import CheckpointError
    from mimkit.train.loop import NonFiniteLossError, TrainingInterrupted

    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as e:
        print(f"mimkit: {_one_line(e)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, DataError, CheckpointError, InteropError, NonFiniteLossError) as e:
        print(f"mimkit: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("mimkit: interrupted; nothing was saved since the last checkpoint", file=sys.stderr)
        return EXIT_KEYBOARD
    except OSError as e:  # the file system: a full disk, a missing or unwritable path
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"mimkit: error: {e.strerror or _one_line(e)}{where}; free space or fix the path, then rerun "
              "(a pretraining run resumes from its last checkpoint)", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as e:
        import torch.distributed as dist

        if isinstance(e, getattr(dist, "DistError", ())) or "gloo" in str(e).lower() or "nccl" in str(e).lower():
            print(f"mimkit: error: a distributed collective failed ({_one_line(e)[:300]}); another rank stopped or "
                  "crashed (see its log) or train.dist_timeout_minutes passed", file=sys.stderr)
            return EXIT_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "Path", "EXIT_OK", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_KEYBOARD"]
