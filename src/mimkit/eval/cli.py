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
import math
import sys
from pathlib import Path

from mimkit.errors import ConfigError


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only to help texts that do not already say what the default is."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


SUBCOMMANDS = ("knn", "linear", "attentive", "finetune", "fewshot", "diagnostics", "segmentation", "pictures")
REPORT_PROTOCOLS = SUBCOMMANDS[:-2]
POOL_CHOICES = ("cls", "mean", "cls+mean")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers, e.g. '0.485,0.456,0.406'") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers, e.g. '10,20,100,200'") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. '10,20,100,200'")
    return vals


MAX_SEED = 2**32 - 1  # numpy's seed range (as train.seed)


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed, e.g. 0") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{v}: a seed must be in [0, {MAX_SEED}] (numpy's seed range), e.g. 0")
    return v


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integer seeds, e.g. '0,1,2'") from None
    if not vals:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. '0,1,2'")
    bad = [v for v in vals if not 0 <= v <= MAX_SEED]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]}: a seed must be in [0, {MAX_SEED}] (numpy's seed range), "
                                         "e.g. '0,1,2'")
    return vals


PATH_ARGS = ("checkpoint", "checkpoints", "dataset", "test_dataset", "out", "cache_dir")


def expand_paths(args) -> None:
    """``~`` / ``~user`` at the start of path flags (``--out=~/eval`` is not expanded by the shell)."""
    import os

    for name in PATH_ARGS:
        v = getattr(args, name, None)
        if isinstance(v, str) and v.startswith("~"):
            setattr(args, name, os.path.expanduser(v))
        elif isinstance(v, list):
            setattr(args, name, [os.path.expanduser(x) if isinstance(x, str) else x for x in v])


def _img_size(text: str) -> int | tuple[int, int]:
    """``224`` or ``224,160`` / ``224x160`` (H, W)."""
    try:
        vals = tuple(int(v) for v in text.lower().replace("x", ",").replace(",", " ").split())
    except ValueError:
        vals = ()
    if len(vals) not in (1, 2) or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an image size; give a side or H,W, e.g. 224 or 224,160")
    return vals[0] if len(vals) == 1 or vals[0] == vals[1] else vals


def _pool_list(text: str) -> str:
    pools = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in pools if p not in POOL_CHOICES]
    if bad or not pools:
        raise argparse.ArgumentTypeError(f"unknown pooling {', '.join(bad) or repr(text)}; choose from "
                                         f"{', '.join(POOL_CHOICES)} (comma-separated for several)")
    return ",".join(pools)


def protocol_list(text: str) -> str:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in REPORT_PROTOCOLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown protocol {', '.join(bad) or repr(text)}; choose from "
                                         f"{', '.join(REPORT_PROTOCOLS)} (comma-separated)")
    return ",".join(names)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v}: must be at least 1")
    return v


def _val_split(text: str) -> float:
    """A count of images (an integer >= 1) or a fraction in (0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count of training images (e.g. 10000) or a fraction "
                                         "(e.g. 0.1)") from None
    if not (0 < v < 1 or (v >= 1 and math.isfinite(v) and v == int(v))):
        raise argparse.ArgumentTypeError(f"{text!r}: give a count of training images >= 1 (a whole number) or a "
                                         "fraction in (0, 1)")
    return int(v) if v >= 1 else v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{v:g}: must be a number above 0")
    return v


def _crop(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{v}: the crop ratio must be in (0, 1] (MAE: 0.875 = 224/256)")
    return v


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and features")
    g.add_argument("--dataset", default="fashion_mnist",
                   help="'fashion_mnist' or an image folder with class sub-folders (PATH/train + PATH/val|test, "
                        "or one folder split 80/20); images are resized to the encoder's input and channels")
    g.add_argument("--test-dataset", default=None,
                   help="evaluate on this folder instead of the dataset's test split (its class folders are "
                        "mapped by name onto the training split's classes)")
    g.add_argument("--pool", type=_pool_list, default=None,
                   help="cls | mean | cls+mean, comma-separated for several (default: the protocol's own; "
                        "fine-tune: mean or cls; not for the attentive probe)")
    g.add_argument("--block", type=int, default=None, help="take features after this block (0-based; -1 = last)")
    g.add_argument("--no-norm", action="store_true", help="features without the encoder's final LayerNorm")
    g.add_argument("--limit-train", type=_positive_int, default=None,
                   help="seeded random subset of the train split (only these files are decoded)")
    g.add_argument("--limit-test", type=_positive_int, default=None, help="seeded random subset of the test split")
    g.add_argument("--val-split", type=_val_split, default=None,
                   help="report validation accuracy instead of test: hold this many training images (or this "
                        "fraction, e.g. 0.1) out of the train split, seeded and stratified by class, and evaluate "
                        "on them; the test split is never read (for choosing settings)")
    g.add_argument("--crop-pct", type=_crop, default=0.875,
                   help="folder images: resize the shorter side to size/crop-pct, centre-crop size (MAE, Latent MIM)")
    g.add_argument("--mean", type=_floats, default=None, help="normalisation mean, e.g. '0.286' or '0.485,0.456,0.406' "
                                                              "(default: the one the weights were trained with, "
                                                              "as the file records it)")
    g.add_argument("--std", type=_floats, default=None, help="normalisation std (default: the one the weights were "
                                                             "trained with, as the file records it)")
    g.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for weight files that do not record them (timm safetensors) (default: "
                        "those of --timm-model at the same width, else of the published size: 192/384/768/1024 wide)")
    g.add_argument("--timm-model", default=None,
                   help="the timm architecture of a timm state dict, e.g. vit_small_patch14_reg4_dinov2; needed for "
                        "CLIP-layout weights (norm_pre: QuickGELU or GELU is not in the keys); its pretrained_cfg "
                        "gives the normalisation (default: recognised from the weights' keys)")
    g.add_argument("--img-size", type=_img_size, default=None,
                   help="the input the weights were trained at, a side or H,W: fixes the patch grid of timm state "
                        "dicts (needed when the position table fits two grids, e.g. register tokens) "
                        "(default: recorded in the checkpoint, else the one square grid that fits)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                   help="autocast for the encoder and heads: auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--batch-size", type=_positive_int, default=256, help="feature extraction batch size")
    g.add_argument("--token-cache", choices=("auto", "memory", "disk"), default="auto",
                   help="all-token features (attentive probe, Sim): auto = RAM up to --max-cache-gb, else a "
                        "memory-mapped file")
    g.add_argument("--max-cache-gb", type=float, default=4.0, help="largest all-token cache kept in RAM")
    g.add_argument("--cache-dir", default=None, help="folder for memory-mapped token caches (default: the temp dir)")
    g.add_argument("--seed", type=_seed, default=0, help="seed of subsets, splits and probe initialisation")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--out", default=None, help="directory for <protocol>.json and <protocol>.md")


def add_protocol_args(p: argparse.ArgumentParser, protocol: str | None) -> None:
    """Protocol-specific flags (``protocol=None``: all of them, for ``report``)."""
    want = (lambda name: True) if protocol is None else (lambda name: name == protocol)
    if want("knn") or want("diagnostics"):
        p.add_argument("--k", type=_positive_int, default=20, help="kNN neighbours of the headline number (DINO)")
        p.add_argument("--temperature", type=_positive_float, default=0.07, help="kNN vote temperature (DINO)")
    if want("knn"):
        p.add_argument("--ks", type=_ints, default=(10, 20, 100, 200),
                       help="every k reported from the same pass (DINO's 10,20,100,200)")
        p.add_argument("--loo-with-norm", action="store_true",
                       help="leave-one-out 1-NN on features after the final LayerNorm (default: without, as "
                            "Latent MIM)")
    if protocol == "segmentation":
        p.add_argument("--num-classes", type=_positive_int, default=None,
                       help="classes after reduce_zero_label (default: the largest mask id + 1; 11 when generated)")
        p.add_argument("--canvas-layout", choices=("native", "overlap", "scatter"), default="native",
                       help="generated canvases (--dataset fashion_mnist): native = one garment per 28 px canvas "
                            "(the benchmark), overlap = two overlaid, scatter = three on 56 px halved (a plumbing "
                            "check only: a random encoder scores the same; docs/evaluation.md)")
        p.add_argument("--canvas-objects", type=_positive_int, default=None,
                       help="garments per generated canvas (default: the layout's own: 1, 2 or 3)")
    if protocol == "pictures":
        p.add_argument("--n-show", type=_positive_int, default=8, help="images in the PCA / attention pictures")
        p.add_argument("--tsne-n", type=_positive_int, default=1000, help="test images in the t-SNE")
    if protocol is None:
        p.add_argument("--epochs", type=_positive_int, default=None, help="epochs for linear / attentive / finetune")
    elif protocol in ("linear", "attentive", "finetune", "segmentation"):
        p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: the recipe's)")
    if protocol in ("linear", "attentive", "finetune", "segmentation"):
        p.add_argument("--train-batch-size", type=_positive_int, default=None,
                       help="training batch size (default: the preset's)")
        p.add_argument("--blr", type=_positive_float, default=None, help="base lr, lr = blr x batch / 256 (default: the preset's)")
        p.add_argument("--lr", type=_positive_float, default=None, help="absolute lr, overrides --blr (default: the preset's)")
        p.add_argument("--warmup-epochs", type=float, default=None, help="warm-up epochs (default: the preset's)")
    from mimkit.eval.attentive import ATTENTIVE_PRESETS
    from mimkit.eval.finetune import FINETUNE_PRESETS
    from mimkit.eval.linear import LINEAR_PRESETS

    if want("linear"):
        p.add_argument("--linear-preset", choices=tuple(LINEAR_PRESETS), default="small",
                       help="small: batch 256, LARS lr 6.4; mae: lr 0.1 x batch/256, batch 1024")
    if want("attentive"):
        p.add_argument("--attentive-preset", choices=tuple(ATTENTIVE_PRESETS), default="small",
                       help="small: batch min(256, N/8), lr 0.1 x batch/256; cae: CAE's lr 0.4 at batch 8192")
    if protocol == "linear":
        p.add_argument("--optimizer", choices=("lars", "sgd"), default="lars", help="probe optimiser")
        p.add_argument("--augment", action="store_true",
                       help="RandomResizedCrop + flip through the frozen encoder, batch by batch (slow) instead of "
                            "cached features")
    if want("finetune"):
        p.add_argument("--preset", "--finetune-preset", dest="preset", choices=tuple(FINETUNE_PRESETS), default="small",
                       help="fine-tune preset (mae_vit_base = MAE's ImageNet recipe with RandAugment and erasing)")
    if protocol == "finetune":
        p.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (default: the preset's)")
        p.add_argument("--drop-path", type=float, default=None, help="stochastic depth (default: the preset's)")
        p.add_argument("--smoothing", type=float, default=None, help="label smoothing (default: the preset's)")
        p.add_argument("--mixup", type=float, default=None, help="mixup alpha, timm Mixup (default: the preset's)")
        p.add_argument("--cutmix", type=float, default=None, help="cutmix alpha, timm Mixup (default: the preset's)")
        p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the preset's)")
        p.add_argument("--rand-augment", default=None,
                       help="timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (default: the preset's)")
        p.add_argument("--reprob", type=float, default=None, help="timm random-erasing probability (default: the preset's)")
    if want("fewshot"):
        p.add_argument("--shots", type=_positive_int, default=10, help="training images per class and draw")
        p.add_argument("--draws", type=_positive_int, default=5, help="random support sets (mean ± std)")
        p.add_argument("--C", type=_positive_float, default=1.0, help="inverse L2 strength of the logistic regression")


def options(args):
    import torch

    from mimkit.eval.protocols import EvalOptions, check_split_options

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:

        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ConfigError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu "
                              "(or auto)") from None
    opts = EvalOptions(dataset=args.dataset, test_dataset=args.test_dataset, pool=args.pool, block=args.block,
                       norm=not args.no_norm, limit_train=args.limit_train, limit_test=args.limit_test,
                       val_split=getattr(args, "val_split", None),
                       mean=args.mean, std=args.std, device=device, batch_size=args.batch_size, seed=args.seed,
                       crop_pct=args.crop_pct, amp=args.amp, token_cache=args.token_cache,
                       max_cache_gb=args.max_cache_gb, cache_dir=args.cache_dir, progress=not args.no_progress)
    check_split_options(opts)  # before any checkpoint is read
    return opts


def _overrides(args, mapping: dict[str, str]) -> dict:
    return {field: getattr(args, a) for a, field in mapping.items() if getattr(args, a, None) is not None}


_TRAIN_FLAGS = {"epochs": "epochs", "train_batch_size": "batch_size", "blr": "base_lr", "lr": "lr",
                "warmup_epochs": "warmup_epochs"}


def protocol_kwargs(protocol: str, args) -> dict:
    """Keyword arguments for :data:`mimkit.eval.protocols.PROTOCOLS` ``[protocol]`` from parsed flags."""
    from dataclasses import replace

    if protocol == "knn":
        return {"k": args.k, "temperature": args.temperature, "ks": args.ks or (10, 20, 100, 200),
                "loo_norm": bool(args.loo_with_norm)}
    if protocol == "diagnostics":
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
        from mimkit.eval.attentive import ATTENTIVE_PRESETS

        cfg = replace(ATTENTIVE_PRESETS[getattr(args, "attentive_preset", None) or "small"], seed=args.seed)
        if args.blr is not None and args.lr is None:
            cfg = replace(cfg, lr=None)
        cfg = replace(cfg, **_overrides(args, _TRAIN_FLAGS))
        if cfg.epochs <= cfg.warmup_epochs and getattr(args, "warmup_epochs", None) is None:
            cfg = replace(cfg, warmup_epochs=cfg.epochs / 9)
        return {"cfg": cfg}
    if protocol == "segmentation":
        from mimkit.eval.segmentation import SegProbeConfig

        flags = {k: v for k, v in _TRAIN_FLAGS.items() if k != "blr"}
        cfg = replace(SegProbeConfig(seed=args.seed), **_overrides(args, flags))
        if cfg.epochs <= cfg.warmup_epochs and getattr(args, "warmup_epochs", None) is None:
            cfg = replace(cfg, warmup_epochs=cfg.epochs / 20)
        return {"cfg": cfg, "num_classes": args.num_classes, "canvas_layout": args.canvas_layout,
                "canvas_objects": args.canvas_objects}
    if protocol == "pictures":
        return {"out_dir": args.out or "pictures", "n_show": args.n_show, "tsne_n": args.tsne_n}
    if protocol == "finetune":
        from mimkit.eval.finetune import finetune_preset

        flags = {**_TRAIN_FLAGS, "layer_decay": "layer_decay", "drop_path": "drop_path", "smoothing": "label_smoothing",
                 "mixup": "mixup", "cutmix": "cutmix", "weight_decay": "weight_decay", "rand_augment": "rand_augment",
                 "reprob": "reprob"}
        cfg = finetune_preset(args.preset, seed=args.seed, **_overrides(args, flags))
        if cfg.epochs <= cfg.warmup_epochs and getattr(args, "warmup_epochs", None) is None:
            cfg = replace(cfg, warmup_epochs=cfg.epochs / 10)
        return {"cfg": cfg}
    raise ValueError(protocol)


def run_protocol_command(args) -> int:
    """``mimkit eval <protocol> CHECKPOINT``."""
    from mimkit.eval.data import load_checkpoint_encoder, norm_line
    from mimkit.eval.protocols import PROTOCOLS, EvalContext, options_dict
    from mimkit.eval.report import markdown_table, write_json

    expand_paths(args)
    opts = options(args)
    kwargs = protocol_kwargs(args.protocol, args)
    ckpt = load_checkpoint_encoder(args.checkpoint, device=opts.device, **_load_kw(args))
    ctx = EvalContext(ckpt, opts)
    print(norm_line(ctx.mean, ctx.std, ctx.norm_source), file=sys.stderr)
    check_pools(ctx, args.protocol)
    if args.protocol != "segmentation":
        ctx.check_classes()
    res = PROTOCOLS[args.protocol](ctx, **kwargs)
    name = Path(args.checkpoint).name
    table = markdown_table([{"name": name, "epoch": ckpt.epoch, "metrics": res["metrics"]}])
    out = {**res, "setup": ctx.describe(data=args.protocol != "segmentation"), "options": options_dict(opts)}
    if args.protocol == "pictures":
        print("pictures: " + ", ".join(res["files"].values()), file=sys.stderr)
        return 0
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        tag = ".val" if opts.val_split is not None else ""  # validation numbers never overwrite test ones
        write_json(d / f"{args.protocol}{tag}.json", out)
        (d / f"{args.protocol}{tag}.md").write_text(("validation split (held out of train; the test split was not "
                                                     "read)\n\n" if tag else "") + table)
    sys.stdout.write(table)
    return 0


def _load_kw(args) -> dict:
    kw = {"num_heads": args.num_heads} if getattr(args, "num_heads", None) else {}
    if getattr(args, "timm_model", None):
        kw["timm_model"] = args.timm_model
    if getattr(args, "img_size", None):
        kw["img_size"] = args.img_size
    return kw


def check_pools(ctx, protocol: str) -> None:
    """``--pool`` against the protocol and the loaded encoder, before any work: a ConfigError naming the fix."""
    from mimkit.eval.features import check_pool

    pools = [p for p in (ctx.opts.pool or "").split(",") if p]
    if protocol == "attentive" and pools:
        raise ConfigError(f"--pool {ctx.opts.pool} does not apply to the attentive probe: it attends over all "
                          "tokens (drop --pool)")
    if protocol == "finetune" and (len(pools) > 1 or (pools and pools[0] not in ("mean", "cls"))):
        raise ConfigError(f"--pool {ctx.opts.pool}: fine-tuning takes one of mean (MAE's global pool) or cls")
    if protocol == "segmentation" and (pools or ctx.opts.block is not None or not ctx.opts.norm):
        raise ConfigError("--pool / --block / --no-norm do not apply to the segmentation probe: it reads the last "
                          "block's patch tokens after the final norm (DINOv2's linear protocol); drop them")
    if protocol == "finetune" and (ctx.opts.block is not None or not ctx.opts.norm):
        raise ConfigError("--block / --no-norm do not apply to fine-tuning: it trains the whole encoder with MAE's "
                          "head (global pool + fc_norm); drop them")
    for p in pools:
        try:
            check_pool(p, ctx.encoder.has_class_token)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def run_report_command(args) -> int:
    """``mimkit report CKPT [CKPT ...] --protocols ...``."""
    from mimkit.eval.report import run_report

    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    expand_paths(args)
    opts = options(args)
    kwargs = {p: protocol_kwargs(p, ReportArgs(args, p)) for p in protocols if p in SUBCOMMANDS}
    from mimkit.eval.data import load_checkpoint_encoder, norm_line

    def load(path, device):
        return load_checkpoint_encoder(path, device=device, **_load_kw(args))

    def check(ctx):
        print(f"{ctx.ckpt.path}: {norm_line(ctx.mean, ctx.std, ctx.norm_source)}", file=sys.stderr)
        ctx.check_classes()
        for p in protocols:
            if p in ("knn", "linear", "fewshot", "diagnostics"):
                check_pools(ctx, p)

    report = run_report(args.checkpoints, protocols, opts, out_dir=args.out, protocol_kwargs=kwargs, load=load,
                        log=lambda m: print(m, file=sys.stderr), check=check, seeds=args.seeds)
    sys.stdout.write(report["table"])
    for line in report.get("notes", []):
        print(line, file=sys.stderr)
    return 0


class ReportArgs:
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
    fmt = _DefaultsHelpFormatter
    helps = {
        "knn": "DINO's weighted kNN (k=10/20/100/200, T=0.07, top-1/top-5) and Latent MIM's leave-one-out 1-NN",
        "linear": "linear probe: BatchNorm(affine=False) + Linear, LARS/SGD (MAE)",
        "attentive": "CAE's attentive probe (query cross-attention, no residual/MLP)",
        "finetune": "full fine-tuning with layer decay, drop path, label smoothing, mixup/cutmix",
        "fewshot": "k-shot logistic regression, mean ± std over random draws",
        "diagnostics": "patch similarity Sim, effective rank, per-class kNN accuracy",
        "pictures": "PCA of patch tokens as RGB, class-token attention maps, t-SNE of features (PNG files in --out)",
        "segmentation": "DINOv2's linear segmentation probe (BN + 1x1 conv on frozen patch tokens), mIoU; --dataset "
                        "is an ADE20K-layout folder or fashion_mnist (generated canvases)",
    }
    for name in SUBCOMMANDS:
        sp = sub.add_parser(name, help=helps[name], description=helps[name], formatter_class=fmt)
        sp.add_argument("checkpoint", metavar="CHECKPOINT")
        add_data_args(sp)
        add_protocol_args(sp, name)
        sp.set_defaults(func=run_protocol_command, protocol=name)
    return p


def register_report(subparsers) -> argparse.ArgumentParser:
    """Add ``report``."""
    p = subparsers.add_parser("report", help="several protocols on several checkpoints -> one table",
                              description="Run protocols on checkpoints (files or run directories) and write "
                                          "report.md, report.json and training_curves.png (a run directory with "
                                          "periodic checkpoints gives the curves).",
                              formatter_class=_DefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    p.add_argument("--protocols", type=protocol_list, default="knn,linear",
                   help=f"comma-separated from {', '.join(REPORT_PROTOCOLS)}")
    p.add_argument("--seeds", type=_seed_list, default=None,
                   help="repeat the trained probes (linear, attentive, finetune) with these seeds: mean ± std")
    add_data_args(p)
    p.set_defaults(out="report")
    add_protocol_args(p, None)
    p.set_defaults(func=run_report_command)
    return p
