"""Command line for evaluation: ``mimkit eval <protocol> CHECKPOINT ...`` and ``mimkit report``.

The top-level CLI calls :func:`register` and :func:`register_report` with its argparse sub-parsers and
dispatches with ``args.func(args)``. Every command prints a markdown row and, with ``--out DIR``,
writes ``DIR/<protocol>.json`` (numbers + setup) and ``DIR/<protocol>.md`` (a one-row table).

Examples::

    mimkit eval knn runs/mae_fashion_mnist/checkpoint.pt --out eval/
    mimkit eval linear ckpt.pt --pool cls,mean --epochs 50 --optimizer lars
    mimkit eval knn mae_pretrain_vit_base.pth --dataset /data/flowers --limit-train 5000
    mimkit report runs/mae_fashion_mnist/ random.pt --protocols knn,linear,fewshot --out report/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUBCOMMANDS = ("knn", "linear", "attentive", "finetune", "fewshot", "diagnostics")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.replace(",", " ").split())


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and features")
    g.add_argument("--dataset", default="fashion_mnist",
                   help="'fashion_mnist' or an image folder with class sub-folders (PATH/train + PATH/val|test, "
                        "or one folder split 80/20); images are resized to the encoder's input and channels")
    g.add_argument("--test-dataset", default=None, help="evaluate on this folder instead of the dataset's test split")
    g.add_argument("--pool", default=None, help="cls | mean | cls+mean, comma-separated for several "
                                                 "(default: the protocol's own)")
    g.add_argument("--block", type=int, default=None, help="take features after this block (0-based; -1 = last)")
    g.add_argument("--no-norm", action="store_true", help="features without the encoder's final LayerNorm")
    g.add_argument("--limit-train", type=int, default=None, help="seeded random subset of the train split")
    g.add_argument("--limit-test", type=int, default=None, help="seeded random subset of the test split")
    g.add_argument("--mean", type=_floats, default=None, help="normalisation mean, e.g. '0.286' or '0.485,0.456,0.406' "
                                                              "(default: the checkpoint's config)")
    g.add_argument("--std", type=_floats, default=None, help="normalisation std (default: the checkpoint's config)")
    g.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for weight files that do not record them (timm safetensors)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--batch-size", type=int, default=256, help="feature extraction batch size")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--out", default=None, help="directory for <protocol>.json and <protocol>.md")


def _add_protocol_args(p: argparse.ArgumentParser, protocol: str | None) -> None:
    """Protocol-specific flags (``protocol=None``: all of them, for ``report``)."""
    want = (lambda name: True) if protocol is None else (lambda name: name == protocol)
    if want("knn") or want("diagnostics"):
        p.add_argument("--k", type=int, default=20, help="kNN neighbours")
        p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    if protocol is None:
        p.add_argument("--epochs", type=int, default=None, help="epochs for linear / attentive / finetune")
    elif protocol in ("linear", "attentive", "finetune"):
        p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    if protocol in ("linear", "attentive", "finetune"):
        p.add_argument("--train-batch-size", type=int, default=None, help="training batch size")
        p.add_argument("--blr", type=float, default=None, help="base lr (lr = blr x batch / 256)")
        p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
        p.add_argument("--warmup-epochs", type=float, default=None)
    if want("linear"):
        p.add_argument("--linear-preset", default="small",
                       help="linear-probe preset: small (batch 256, LARS lr 6.4) | mae (lr 0.1 x batch/256, batch 1024)")
    if protocol == "linear":
        p.add_argument("--optimizer", choices=("lars", "sgd"), default="lars")
        p.add_argument("--augment", action="store_true",
                       help="RandomResizedCrop + flip through the frozen encoder (slow) instead of cached features")
    if want("finetune"):
        p.add_argument("--preset", "--finetune-preset", dest="preset", default="small",
                       help="fine-tune preset: mae_vit_base | small | quick")
    if protocol == "finetune":
        p.add_argument("--layer-decay", type=float, default=None)
        p.add_argument("--drop-path", type=float, default=None)
        p.add_argument("--smoothing", type=float, default=None)
        p.add_argument("--mixup", type=float, default=None)
        p.add_argument("--cutmix", type=float, default=None)
        p.add_argument("--weight-decay", type=float, default=None)
    if want("fewshot"):
        p.add_argument("--shots", type=int, default=10)
        p.add_argument("--draws", type=int, default=5)
        p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")


def _options(args):
    import torch

    from mimkit.eval.protocols import EvalOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return EvalOptions(dataset=args.dataset, test_dataset=args.test_dataset, pool=args.pool, block=args.block,
                       norm=not args.no_norm, limit_train=args.limit_train, limit_test=args.limit_test,
                       mean=args.mean, std=args.std, device=device, batch_size=args.batch_size, seed=args.seed)


def _overrides(args, mapping: dict[str, str]) -> dict:
    return {field: getattr(args, a) for a, field in mapping.items() if getattr(args, a, None) is not None}


_TRAIN_FLAGS = {"epochs": "epochs", "train_batch_size": "batch_size", "blr": "base_lr", "lr": "lr",
                "warmup_epochs": "warmup_epochs"}


def protocol_kwargs(protocol: str, args) -> dict:
    """Keyword arguments for :data:`mimkit.eval.protocols.PROTOCOLS` ``[protocol]`` from parsed flags."""
    from dataclasses import replace

    if protocol in ("knn", "diagnostics"):
        return {"k": args.k, "temperature": args.temperature}
    if protocol == "fewshot":
        return {"shots": args.shots, "draws": args.draws, "C": args.C}
    if protocol == "linear":
        from mimkit.eval.linear import LINEAR_PRESETS

        optimizer = getattr(args, "optimizer", None) or "lars"
        cfg = replace(LINEAR_PRESETS[getattr(args, "linear_preset", None) or "small"], seed=args.seed,
                      optimizer=optimizer)
        if optimizer == "sgd" and args.lr is None:
            cfg = replace(cfg, lr=None, base_lr=0.1)
        if args.blr is not None and args.lr is None:
            cfg = replace(cfg, lr=None)
        cfg = replace(cfg, **_overrides(args, _TRAIN_FLAGS))
        if cfg.epochs <= cfg.warmup_epochs and getattr(args, "warmup_epochs", None) is None:
            cfg = replace(cfg, warmup_epochs=cfg.epochs / 9)  # keep MAE's 10/90 warm-up share
        return {"cfg": cfg, "augment": bool(getattr(args, "augment", False))}
    if protocol == "attentive":
        from mimkit.eval.attentive import AttentiveProbeConfig

        cfg = AttentiveProbeConfig(seed=args.seed, **_overrides(args, _TRAIN_FLAGS))
        if cfg.epochs <= cfg.warmup_epochs and getattr(args, "warmup_epochs", None) is None:
            cfg = replace(cfg, warmup_epochs=cfg.epochs / 9)
        return {"cfg": cfg}
    if protocol == "finetune":
        from mimkit.eval.finetune import finetune_preset

        flags = {**_TRAIN_FLAGS, "layer_decay": "layer_decay", "drop_path": "drop_path", "smoothing": "label_smoothing",
                 "mixup": "mixup", "cutmix": "cutmix", "weight_decay": "weight_decay"}
        cfg = finetune_preset(args.preset, seed=args.seed, **_overrides(args, flags))
        if cfg.epochs <= cfg.warmup_epochs and getattr(args, "warmup_epochs", None) is None:
            cfg = replace(cfg, warmup_epochs=cfg.epochs / 10)
        return {"cfg": cfg}
    raise ValueError(protocol)


def run_protocol_command(args) -> int:
    """``mimkit eval <protocol> CHECKPOINT``."""
    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.eval.protocols import PROTOCOLS, EvalContext, options_dict
    from mimkit.eval.report import markdown_table, write_json

    opts = _options(args)
    ckpt = load_checkpoint_encoder(args.checkpoint, device=opts.device, **_load_kw(args))
    ctx = EvalContext(ckpt, opts)
    res = PROTOCOLS[args.protocol](ctx, **protocol_kwargs(args.protocol, args))
    name = Path(args.checkpoint).name
    table = markdown_table([{"name": name, "epoch": ckpt.epoch, "metrics": res["metrics"]}])
    out = {**res, "setup": ctx.describe(), "options": options_dict(opts)}
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / f"{args.protocol}.json", out)
        (d / f"{args.protocol}.md").write_text(table)
    sys.stdout.write(table)
    return 0


def _load_kw(args) -> dict:
    return {"num_heads": args.num_heads} if getattr(args, "num_heads", None) else {}


def run_report_command(args) -> int:
    """``mimkit report CKPT [CKPT ...] --protocols ...``."""
    from mimkit.eval.report import run_report

    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    opts = _options(args)
    kwargs = {p: protocol_kwargs(p, _ReportArgs(args, p)) for p in protocols if p in SUBCOMMANDS}
    from mimkit.eval.data import load_checkpoint_encoder

    def load(path, device):
        return load_checkpoint_encoder(path, device=device, **_load_kw(args))

    report = run_report(args.checkpoints, protocols, opts, out_dir=args.out, protocol_kwargs=kwargs, load=load,
                        log=lambda m: print(m, file=sys.stderr))
    sys.stdout.write(report["table"])
    if report.get("plot"):
        print(f"plot: {report['plot']}", file=sys.stderr)
    return 0


class _ReportArgs:
    """The report's flags seen as one protocol's flags (missing ones read as None)."""

    def __init__(self, args, protocol: str):
        self._args, self._protocol = args, protocol

    def __getattr__(self, name):
        return getattr(self._args, name, None)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` with one sub-command per protocol."""
    p = subparsers.add_parser("eval", help="evaluate a checkpoint with one protocol",
                              description="Evaluate a pretrained encoder (mimkit, timm or official MAE checkpoint).")
    sub = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    helps = {
        "knn": "train-bank weighted kNN (k=20, T=0.07) and leave-one-out 1-NN on the test set",
        "linear": "linear probe: BatchNorm(affine=False) + Linear, LARS/SGD (MAE)",
        "attentive": "CAE's attentive probe (query cross-attention, no residual/MLP)",
        "finetune": "full fine-tuning with layer decay, drop path, label smoothing, mixup/cutmix",
        "fewshot": "k-shot logistic regression, mean ± std over random draws",
        "diagnostics": "patch similarity Sim, effective rank, per-class kNN accuracy",
    }
    for name in SUBCOMMANDS:
        sp = sub.add_parser(name, help=helps[name], description=helps[name])
        sp.add_argument("checkpoint", metavar="CHECKPOINT")
        _add_data_args(sp)
        _add_protocol_args(sp, name)
        sp.set_defaults(func=run_protocol_command, protocol=name)
    return p


def register_report(subparsers) -> argparse.ArgumentParser:
    """Add ``report``."""
    p = subparsers.add_parser("report", help="several protocols on several checkpoints -> one table",
                              description="Run protocols on checkpoints (files or run directories) and write "
                                          "report.md, report.json and accuracy_vs_epoch.png.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    p.add_argument("--protocols", default="knn,linear", help=f"comma-separated from {', '.join(SUBCOMMANDS)}")
    _add_data_args(p)
    _add_protocol_args(p, None)
    p.set_defaults(func=run_report_command)
    return p


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m mimkit.eval.cli``) for use before the top-level CLI exists."""
    parser = argparse.ArgumentParser(prog="mimkit")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    register_report(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
