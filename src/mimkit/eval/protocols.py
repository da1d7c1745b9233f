"""Protocol runners shared by ``mimkit eval <protocol>`` and ``mimkit report``.

An :class:`EvalContext` holds one loaded encoder (any encoder :mod:`mimkit.nn.adapters` can wrap), its
normalisation and the evaluation data, and caches extracted features so several protocols on one
checkpoint encode each image once. Each ``run_*`` returns ``{"protocol", "metrics": {column: number},
...details}``; ``metrics`` are the columns of the markdown tables.

Every column names the features it was measured on: ``<metric>_<pool>`` with ``-b<i>`` when the
features come from block ``i`` and ``-noLN`` when the encoder's final LayerNorm is left out, e.g.
``knn20_cls``, ``linear_mean-b6``, ``loo1nn_cls-noLN`` (Latent MIM's 1-NN is measured without the
final LayerNorm by default).

Memory: pooled features are small and kept in RAM. All-token features (attentive probe, Sim) are
cached as float16 in RAM when they fit in ``max_cache_gb``, else in a memory-mapped file under
``cache_dir`` (a temporary folder, removed with the context); consumers read them a batch at a time.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mimkit.errors import ConfigError, DataError
from mimkit.eval.data import LoadedCheckpoint, load_split, resolve_norm
from mimkit.eval.features import check_pool, extract_features, progress
from mimkit.nn.adapters import check_input_size, encoder_img_hw, encoder_in_chans, wrap_encoder


@dataclass
class EvalOptions:
    """Options common to every protocol (the shared CLI flags)."""

    dataset: str = "fashion_mnist"
    test_dataset: str | None = None
    pool: str | None = None  # comma-separated; None = the protocol's default
    block: int | None = None
    norm: bool = True
    limit_train: int | None = None
    limit_test: int | None = None
    val_split: float | None = None  # hold this many (or this fraction) of train out as the "test" split
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device: str = "cpu"
    batch_size: int = 256  # feature extraction batch
    seed: int = 0
    crop_pct: float = 0.875  # MAE's eval resize (size / crop_pct) + centre crop, folder images
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    class_names: list[str] | None = None  # the class -> index map; None = the training split's classes
    token_cache: str = "auto"  # auto | memory | disk (all-token features)
    max_cache_gb: float = 4.0  # auto: larger all-token caches go to a memory-mapped file
    cache_dir: str | None = None
    progress: bool = True  # tqdm bars (shown on a terminal only)


def check_split_options(opts: EvalOptions) -> None:
    """``val_split`` and ``test_dataset`` both name what the numbers are measured on: one of them."""
    if opts.val_split is not None and opts.test_dataset:
        raise ConfigError(f"--val-split {opts.val_split:g} with --test-dataset {opts.test_dataset}: the validation "
                          "split replaces the test split; give one of them")


def feature_tag(pool: str, norm: bool = True, block: int | None = None) -> str:
    """``cls``, ``mean-b6``, ``cls-noLN``: the pooling, layer and normalisation of a feature."""
    return pool + (f"-b{block}" if block is not None else "") + ("" if norm else "-noLN")


def _amp_dtype(opts: EvalOptions):
    if opts.amp == "off":
        return None
    if opts.amp == "bf16":
        return torch.bfloat16
    return "auto"


class EvalContext:
    """Encoder + data + cached features for one checkpoint (or in-memory encoder)."""

    def __init__(self, ckpt: LoadedCheckpoint | torch.nn.Module, opts: EvalOptions | None = None):
        if isinstance(ckpt, torch.nn.Module):
            ckpt = LoadedCheckpoint(encoder=ckpt, path=type(ckpt).__name__)
        self.ckpt = ckpt
        self.opts = opts = opts or EvalOptions()
        self.encoder = wrap_encoder(ckpt.encoder).to(opts.device).eval()
        self.in_chans = encoder_in_chans(self.encoder)
        self.img_hw = encoder_img_hw(self.encoder)  # (H, W)
        h, w = self.img_hw
        self.img_size = h if h == w else [h, w]  # a side for a square input (as before), else [H, W]
        check_input_size(self.encoder, self.img_hw, self.in_chans)
        self.mean, self.std, self.norm_source = resolve_norm(ckpt.config, self.in_chans, opts.mean, opts.std,
                                                             recorded=ckpt.input, file_format=ckpt.format,
                                                             encoder=self.encoder)
        self._check_options()
        self.autocast = _amp_dtype(opts)
        self._data: dict[str, tuple] = {}
        self._feats: dict[tuple, torch.Tensor] = {}
        self._cache_dir: Path | None = None
        self._mapped: set[tuple] = set()

    def _check_options(self) -> None:
        """``--block`` inside the encoder and one normalisation value per input channel (or one for all)."""

        blocks = getattr(self.encoder, "blocks", None)
        block = self.opts.block
        if block is not None and blocks is not None and not -len(blocks) <= block < len(blocks):
            raise ConfigError(f"--block {block}: the encoder has {len(blocks)} blocks; pass 0..{len(blocks) - 1} "
                              f"(or -1..-{len(blocks)} from the end)")
        check_split_options(self.opts)
        c = self.in_chans
        for flag, values, given in (("--mean", self.mean, self.opts.mean), ("--std", self.std, self.opts.std)):
            if len(values) not in (1, c):
                flag = flag if given is not None else f"{flag[2:]} from the {self.norm_source}"
                raise ConfigError(f"{flag} {','.join(f'{v:g}' for v in values)}: {len(values)} values; the encoder "
                                  f"takes {c} input channel{'s' if c != 1 else ''}, give 1 or {c} values")

    # -- data -------------------------------------------------------------------------------------
    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """uint8 images, labels and info of ``train`` or ``test``; test labels use the training split's
        class -> index map (or ``opts.class_names``)."""
        if split not in self._data:
            o = self.opts
            classes = o.class_names
            if split == "test" and classes is None:
                from mimkit.eval.data import split_classes

                classes = self.data("train")[2]["classes"] if "train" in self._data else split_classes(o.dataset)
            kw = dict(class_names=classes, crop_pct=o.crop_pct, show_progress=o.progress)
            if split == "test" and o.test_dataset:
                self._data[split] = load_split(o.test_dataset, "test", self.img_hw, self.in_chans, o.limit_test,
                                               o.seed, split_folder=False, **kw)
            else:
                limit = o.limit_train if split == "train" else o.limit_test
                self._data[split] = load_split(o.dataset, split, self.img_hw, self.in_chans, limit, o.seed,
                                               val_split=o.val_split, **kw)
        return self._data[split]

    def labels(self, split: str) -> torch.Tensor:
        return self.data(split)[1]

    def num_classes(self) -> int:
        return len(self.data("train")[2]["classes"]) or int(self.labels("train").max()) + 1

    def check_classes(self) -> None:
        """Before any decoding or encoding: every class folder of the test split (or ``--test-dataset``)
        must be in the evaluation's class map, else a :class:`~mimkit.errors.DataError`."""
        from mimkit.eval.data import remap_classes, split_classes

        o = self.opts
        if o.val_split is not None:  # the validation part is cut from the training split: its own classes
            return
        test_spec = o.test_dataset or o.dataset
        remap_classes(split_classes(test_spec, "test"), self.class_names(), test_spec)

    def check_train_classes(self, protocol: str) -> None:
        """A classification protocol needs at least 2 classes in the training split: with one, every
        prediction is right (kNN and linear would report 100 %) and few-shot cannot fit. Checked from the
        class folders before any decoding, then on the loaded labels (``--limit-train`` may drop classes);
        a :class:`~mimkit.errors.DataError` naming the folder, the count and the fix."""

        o = self.opts
        loaded = "train" in self._data
        if loaded:
            labels = self.labels("train")
            present = sorted(set(labels[labels >= 0].tolist()))
            names = self.data("train")[2].get("classes") or []
            found = [names[i] if i < len(names) else str(i) for i in present]
        else:
            found = self.class_names()
        if len(found) >= 2:
            return
        where = self._train_folder()
        shown = f" ({', '.join(repr(c) for c in found)})" if found else ""
        if loaded and o.limit_train and len(self.class_names()) >= 2:
            fix = f"raise --limit-train {o.limit_train} (its random subset kept fewer classes than the folder has)"
        else:
            fix = ("pass a folder with one sub-folder of images per class, 2 or more (PATH/<class>/... or "
                   "PATH/train/<class>/...)")
        raise DataError(f"{where}: the training split has {len(found)} class{'es' if len(found) != 1 else ''}"
                        f"{shown}; {protocol} accuracy needs at least 2 (with one class every prediction is right "
                        f"and would read 100 %): {fix}")

    def _train_folder(self) -> str:
        """The folder the training split is read from (``--dataset``, or its ``train/`` sub-folder)."""
        spec = self.opts.dataset
        if spec in ("fashion_mnist", "fashion-mnist", "fmnist"):
            return "fashion_mnist"
        sub = Path(spec).expanduser() / "train"
        return str(sub) if sub.is_dir() else str(spec)

    def class_names(self) -> list[str]:
        """The evaluation's class -> index map (``opts.class_names`` or the training split's classes)."""
        from mimkit.eval.data import split_classes

        return list(self.opts.class_names or split_classes(self.opts.dataset))

    # -- features ---------------------------------------------------------------------------------
    def _extract_kw(self, norm: bool, block: int | None) -> dict:
        return dict(norm=norm, block=block, batch_size=self.opts.batch_size, mean=self.mean, std=self.std,
                    device=self.opts.device, autocast_dtype=self.autocast)

    def features(self, split: str, pool: str, norm: bool | None = None, block: int | None = -999,
                 dtype: torch.dtype = torch.float32, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Cached pooled features of ``split`` (``block=-999`` = the context's ``--block``; ``norm=None``
        = its ``--no-norm``). ``pool="all"`` gives the all-token cache (:meth:`tokens`). ``indices``:
        features of those images only (not cached; few-shot extracts only what it draws)."""
        norm = self.opts.norm if norm is None else norm
        block = self.opts.block if block == -999 else block
        if pool == "all":
            return self.tokens(split, norm, block)
        check_pool(pool, self.encoder.has_class_token)
        images = self.data(split)[0]
        if indices is not None:
            return extract_features(self.encoder, images[indices], pool=pool, **self._extract_kw(norm, block)).to(dtype)
        key = (split, pool, norm, block, dtype)
        if key not in self._feats:
            pools = [pool] + [p for p in ("cls", "mean") if p != pool and (
                p == "mean" or self.encoder.has_class_token)]
            feats = extract_features(self.encoder, images, pool=pools, show_progress=self.opts.progress,
                                     **self._extract_kw(norm, block))
            for p, f in feats.items():
                self._feats[(split, p, norm, block, dtype)] = f.to(dtype)
        return self._feats[key]

    def tokens(self, split: str, norm: bool | None = None, block: int | None = -999) -> torch.Tensor:
        """All tokens ``(N, P+L, D)`` as float16, in RAM or memory-mapped (module doc)."""
        norm = self.opts.norm if norm is None else norm
        block = self.opts.block if block == -999 else block
        key = (split, "all", norm, block)
        if key in self._feats:
            return self._feats[key]
        images = self.data(split)[0]
        bs = self.opts.batch_size
        kw = self._extract_kw(norm, block)
        first = extract_features(self.encoder, images[:bs], pool="all", out_dtype=torch.float16, **kw)
        shape = (len(images), *first.shape[1:])
        nbytes = int(np.prod(shape)) * 2
        mode = self.opts.token_cache
        if mode not in ("auto", "memory", "disk"):
            raise ValueError(f"token_cache {mode!r}: choose auto, memory or disk")
        if mode == "disk" or (mode == "auto" and nbytes > self.opts.max_cache_gb * 2**30):
            out = torch.from_numpy(np.memmap(self._cache_file(f"{split}-{len(self._feats)}.f16"), dtype=np.float16,
                                             mode="w+", shape=shape))
            self._mapped.add(key)
        else:
            out = torch.empty(shape, dtype=torch.float16)
        out[: len(first)] = first
        starts = range(bs, len(images), bs)
        for i in progress(starts, len(starts), f"tokens ({split})", enabled=None if self.opts.progress else False,
                          unit="batch"):
            out[i : i + bs] = extract_features(self.encoder, images[i : i + bs], pool="all", out_dtype=torch.float16,
                                               **kw)
        self._feats[key] = out
        return out

    def tokens_in_memory(self, split: str, norm: bool | None = None, block: int | None = -999) -> bool:
        """Whether the :meth:`tokens` cache of ``split`` is held in RAM (``False``: a memory-mapped file)."""
        norm = self.opts.norm if norm is None else norm
        block = self.opts.block if block == -999 else block
        return (split, "all", norm, block) not in self._mapped

    def _cache_file(self, name: str) -> str:
        if self._cache_dir is None:
            base = self.opts.cache_dir
            if base:
                Path(base).mkdir(parents=True, exist_ok=True)
            self._cache_dir = Path(tempfile.mkdtemp(prefix="mimkit-tokens-", dir=base))
            weakref.finalize(self, shutil.rmtree, str(self._cache_dir), True)
        return str(self._cache_dir / name)

    def token_cache_info(self) -> dict:
        """Where each all-token cache lives (``memory`` / ``memory-mapped file``) and its size in GB."""
        return {f"{k[0]}/{feature_tag('all', k[2], k[3])}": {
            "where": "memory-mapped file" if k in self._mapped else "memory", "gb": v.numel() * 2 / 2**30}
            for k, v in self._feats.items() if k[1] == "all"}

    def describe(self, data: bool = True) -> dict:
        if not data:
            return {"checkpoint": self.ckpt.path, "step": self.ckpt.step, "epoch": self.ckpt.epoch,
                    "encoder": type(self.encoder).__name__, "mean": list(self.mean), "std": list(self.std),
                    "norm_source": self.norm_source, "img_size": self.img_size, "in_chans": self.in_chans}
        tr, te = self.data("train")[2], self.data("test")[2]
        return {"checkpoint": self.ckpt.path, "step": self.ckpt.step, "epoch": self.ckpt.epoch,
                "encoder": type(self.encoder).__name__, "train_data": tr, "test_data": te,
                "n_train": tr["n"], "n_test": te["n"], "num_classes": len(tr["classes"]),
                "mean": list(self.mean), "std": list(self.std), "norm_source": self.norm_source,
                "block": self.opts.block, "final_norm": self.opts.norm, "img_size": self.img_size,
                "in_chans": self.in_chans, "crop_pct": self.opts.crop_pct, "seed": self.opts.seed,
                "amp": "bf16" if (self.autocast == "auto" and str(self.opts.device).startswith("cuda"))
                or self.autocast is torch.bfloat16 else "off (fp32)"}


def _pools(ctx: EvalContext, default: str) -> list[str]:
    pools = [p.strip() for p in (ctx.opts.pool or default).split(",") if p.strip()]
    if ctx.opts.pool is None and not ctx.encoder.has_class_token:
        pools = [p for p in pools if p not in ("cls", "cls+mean")] or ["mean"]
    return pools


def _need_classes(ctx: EvalContext, protocol: str) -> None:
    """At least 2 training classes: from the class folders before decoding, then on the loaded labels."""
    ctx.check_train_classes(protocol)
    ctx.labels("train")
    ctx.check_train_classes(protocol)


def run_knn(ctx: EvalContext, k: int = 20, temperature: float = 0.07, ks=(10, 20, 100, 200),
            loo_norm: bool = False) -> dict:
    """DINO's weighted kNN on the train bank at several ``k`` (top-1 and top-5, one pass) and Latent MIM's
    leave-one-out 1-NN on the test set, by default on features without the final LayerNorm
    (``loo_norm=False``, as Latent MIM measures it)."""
    from mimkit.eval.knn import knn_eval, loo_1nn_accuracy

    _need_classes(ctx, "kNN")
    ks = sorted({*ks, k})
    n_bank = len(ctx.labels("train"))
    if ks[-1] > n_bank:  # a column names the k it measured: k beyond the bank would be the bank size again
        dropped = [kk for kk in ks if kk > n_bank]
        k = min(k, n_bank)
        ks = sorted({kk for kk in ks if kk <= n_bank} | {k})
        print(f"kNN: the train bank has {n_bank} images; k = {dropped} not measured (k = {ks} are)",
              file=sys.stderr)
    metrics, detail = {}, {}
    o = ctx.opts
    dev = o.device
    for pool in _pools(ctx, "cls,mean"):
        tag = feature_tag(pool, o.norm, o.block)
        tr, te = ctx.features("train", pool), ctx.features("test", pool)
        res = knn_eval(tr, ctx.labels("train"), te, ctx.labels("test"), ks, temperature, ctx.num_classes(),
                       device=dev, show_progress=o.progress)
        loo_feats = te if loo_norm == o.norm else ctx.features("test", pool, norm=loo_norm)
        loo_tag = feature_tag(pool, loo_norm, o.block)
        loo = loo_1nn_accuracy(loo_feats, ctx.labels("test"), device=dev)
        for kk in ks:
            metrics[f"knn{kk}_{tag}"] = res[kk]["top1"]
        metrics[f"knn{k}top5_{tag}"] = res[k]["top5"]
        metrics[f"loo1nn_{loo_tag}"] = loo
        detail[pool] = {"knn": {str(kk): v for kk, v in res.items()}, "loo_1nn": loo,
                        "features": {"pool": pool, "block": o.block, "final_norm": o.norm},
                        "loo_features": {"pool": pool, "block": o.block, "final_norm": loo_norm}}
    return {"protocol": "knn", "metrics": metrics, "pools": detail, "k": k, "ks": ks, "temperature": temperature}


def run_linear(ctx: EvalContext, cfg=None, augment: bool = False) -> dict:
    """BN(affine=False) + Linear probe per pool, on cached features (or with augmentation)."""
    from mimkit.eval.linear import LINEAR_PRESETS, linear_probe_augmented, train_linear_probe

    _need_classes(ctx, "linear-probe")
    cfg = cfg or replace(LINEAR_PRESETS["small"], seed=ctx.opts.seed)
    metrics, detail = {}, {}
    nc = ctx.num_classes()
    o = ctx.opts
    for pool in _pools(ctx, "cls,mean"):
        tag = feature_tag(pool, o.norm, o.block)
        if augment:
            (xtr, ytr, _), (xte, yte, _) = ctx.data("train"), ctx.data("test")
            res = linear_probe_augmented(ctx.encoder, xtr, ytr, xte, yte, cfg, pool=pool, norm=o.norm, block=o.block,
                                         mean=ctx.mean, std=ctx.std, num_classes=nc, device=o.device,
                                         autocast_dtype=ctx.autocast, show_progress=o.progress)
        else:
            res = train_linear_probe(ctx.features("train", pool), ctx.labels("train"), ctx.features("test", pool),
                                     ctx.labels("test"), cfg, num_classes=nc, device=o.device)
        res.pop("model")
        metrics[f"linear_{tag}"] = res["top1"]
        detail[pool] = {**res, "features": {"pool": pool, "block": o.block, "final_norm": o.norm}}
    return {"protocol": "linear", "metrics": metrics, "augment": augment, "pools": detail}


def run_attentive(ctx: EvalContext, cfg=None) -> dict:
    """CAE's attentive probe on the all-token cache (float16, in RAM or memory-mapped)."""
    from mimkit.eval.attentive import AttentiveProbeConfig, train_attentive_probe

    if ctx.opts.pool not in (None, "all"):
        raise ConfigError(f"--pool {ctx.opts.pool} does not apply to the attentive probe: it attends over all "
                            "tokens (drop --pool)")
    _need_classes(ctx, "attentive-probe")
    cfg = cfg or AttentiveProbeConfig(seed=ctx.opts.seed)
    o = ctx.opts
    tr, te = ctx.tokens("train"), ctx.tokens("test")
    res = train_attentive_probe(tr, ctx.labels("train"), te, ctx.labels("test"), ctx.encoder.num_heads, cfg,
                                num_classes=ctx.num_classes(), device=o.device, autocast_dtype=ctx.autocast,
                                show_progress=o.progress,
                                normalize_once=None if all(map(ctx.tokens_in_memory, ("train", "test"))) else False)
    res.pop("model")
    tag = feature_tag("all", o.norm, o.block)
    return {"protocol": "attentive", "metrics": {f"attentive_{tag}": res["top1"]}, **res,
            "features": {"pool": "all tokens", "block": o.block, "final_norm": o.norm},
            "token_cache": ctx.token_cache_info()}


def run_finetune(ctx: EvalContext, cfg=None) -> dict:
    """Full fine-tuning of a copy of the encoder (default preset ``small``); reports the last and the
    best epoch."""
    from mimkit.eval.finetune import finetune, finetune_preset

    o = ctx.opts
    if o.block is not None or not o.norm:
        raise ConfigError("--block / --no-norm do not apply to fine-tuning: it trains the whole encoder with "
                            "MAE's head (global pool + fc_norm); drop them")
    _need_classes(ctx, "fine-tuning")
    cfg = cfg or finetune_preset("small", seed=o.seed)
    if o.pool is not None:
        if o.pool not in ("mean", "cls"):
            raise ConfigError(f"--pool {o.pool} does not apply to fine-tuning; choose mean (MAE's global pool, "
                                "the default) or cls")
        cfg = replace(cfg, global_pool=o.pool)
    (xtr, ytr, _), (xte, yte, _) = ctx.data("train"), ctx.data("test")
    res = finetune(ctx.encoder, xtr, ytr, xte, yte, cfg, mean=ctx.mean, std=ctx.std, num_classes=ctx.num_classes(),
                   device=o.device, autocast_dtype=ctx.autocast, show_progress=o.progress)
    res.pop("model")
    pool = cfg.global_pool
    return {"protocol": "finetune", "metrics": {f"finetune_{pool}": res["top1"], f"finetune_best_{pool}": res["top1_best"]},
            **res}


def run_fewshot(ctx: EvalContext, shots: int = 10, draws: int = 5, C: float = 1.0) -> dict:
    """k-shot logistic regression per pool (default: mean-pooled patches). Only the drawn support images
    are encoded (``shots x classes x draws`` at most), not the whole train split."""
    from mimkit.eval.fewshot import draw_supports, fewshot_logreg

    _need_classes(ctx, "few-shot")
    counts = torch.bincount(ctx.labels("train").long())
    present = torch.nonzero(counts).flatten()
    if len(present) and int(counts[present].min()) < shots:
        c = int(present[counts[present].argmin()])
        names = ctx.data("train")[2].get("classes") or []
        name = repr(names[c]) if c < len(names) else str(c)
        raise ConfigError(f"--shots {shots}: class {name} has only {int(counts[c])} training images; pass --shots "
                            f"{int(counts[c])} or fewer (or a larger --limit-train)")
    supports = draw_supports(ctx.labels("train"), shots, draws, ctx.opts.seed)
    used = torch.from_numpy(np.unique(np.concatenate(supports)))
    pos = {int(i): j for j, i in enumerate(used.tolist())}
    local = [np.array([pos[int(i)] for i in s]) for s in supports]
    metrics, detail = {}, {}
    o = ctx.opts
    for pool in _pools(ctx, "mean"):
        tag = feature_tag(pool, o.norm, o.block)
        tr = ctx.features("train", pool, indices=used)
        res = fewshot_logreg(tr, ctx.labels("train")[used], ctx.features("test", pool), ctx.labels("test"),
                             shots=shots, draws=draws, seed=o.seed, C=C, supports=local)
        res["encoded_train_images"] = len(used)
        metrics[f"fewshot{shots}_{tag}"] = res["mean"]
        metrics[f"fewshot{shots}_{tag}_std"] = res["std"]
        detail[pool] = res
    return {"protocol": "fewshot", "metrics": metrics, "pools": detail}


def run_diagnostics(ctx: EvalContext, k: int = 20, temperature: float = 0.07) -> dict:
    """Sim (patch tokens of test images without the final norm, prefix tokens excluded; with and without
    the diagonal), spectrum / effective rank of the pooled test features, per-class kNN accuracy."""
    from mimkit.eval.diagnostics import patch_similarity, per_class_accuracy, spectrum_summary
    from mimkit.eval.knn import knn_predict

    o = ctx.opts
    tokens = ctx.tokens("test", norm=False)
    prefix = ctx.encoder.num_prefix_tokens
    sim = patch_similarity(tokens[:, prefix - 1 :] if prefix > 1 else tokens, has_cls=prefix > 0)
    metrics = {"sim": sim["sim"], "sim_offdiag": sim["sim_offdiag"]}
    detail = {"sim": {**sim, "final_norm": False, "prefix_excluded": prefix}}
    nc = ctx.num_classes()
    for pool in _pools(ctx, "cls,mean"):
        tag = feature_tag(pool, o.norm, o.block)
        te = ctx.features("test", pool)
        spec = spectrum_summary(te)
        scores = knn_predict(ctx.features("train", pool), ctx.labels("train"), te, k, temperature, nc, device=o.device)
        pcs = per_class_accuracy(scores.argmax(1), ctx.labels("test"), nc)
        metrics[f"erank_{tag}"] = spec["effective_rank"]
        detail[pool] = {"spectrum": spec, "knn_per_class": pcs}
    return {"protocol": "diagnostics", "metrics": metrics, **detail}


def run_segmentation(ctx: EvalContext, cfg=None, num_classes: int | None = None, canvas_layout: str = "native",
                     canvas_objects: int | None = None) -> dict:
    """DINOv2's linear segmentation probe (:mod:`mimkit.eval.segmentation`) on ``--dataset``: an
    ADE20K-layout folder, or ``fashion_mnist`` for generated canvases of a
    :data:`~mimkit.eval.segmentation.CANVAS_LAYOUTS` layout (default ``native``: one garment per 28 px
    canvas, the layout that separates a pretrained encoder from a random one; ``canvas_objects``
    overrides the layout's garment count), resized to the encoder's input;
    ``--limit-train/--limit-test`` canvases, default 1000/250."""
    from mimkit.eval.segmentation import (
        CANVAS_LAYOUTS,
        IGNORE,
        SegProbeConfig,
        canvas_probe_set,
        load_segmentation_folder,
        segmentation_linear_probe,
    )

    o = ctx.opts
    if o.val_split is not None:
        raise ConfigError(f"--val-split {o.val_split:g}: the segmentation probe has its own train/test canvases "
                          "(or the folder's training/validation parts), not a held-out part of a classification "
                          "split; drop --val-split")
    cfg = cfg or SegProbeConfig(seed=o.seed)
    hw, c = ctx.img_hw, ctx.in_chans
    s = hw[0] if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"
    if o.dataset in ("fashion_mnist", "fashion-mnist", "fmnist"):
        if canvas_layout not in CANVAS_LAYOUTS:
            raise ConfigError(f"canvas layout {canvas_layout!r} is unknown: choose one of {', '.join(CANVAS_LAYOUTS)}")
        px, k = CANVAS_LAYOUTS[canvas_layout]
        k = canvas_objects or k
        xtr, mtr = canvas_probe_set(o.limit_train or 1000, "train", o.seed, hw, c, canvas_layout, objects=k)
        xte, mte = canvas_probe_set(o.limit_test or 250, "test", o.seed + 1, hw, c, canvas_layout, objects=k)
        source = (f"generated Fashion-MNIST canvases, layout {canvas_layout} ({px} px, {k} garment"
                  f"{'s' if k > 1 else ''}, resized to {s})")
        num_classes = num_classes or 11
    else:
        xtr, mtr = load_segmentation_folder(o.dataset, "train", hw, c, o.limit_train, o.seed)
        xte, mte = load_segmentation_folder(o.dataset, "test", hw, c, o.limit_test, o.seed)
        source = o.dataset
        if num_classes is None:
            both = torch.cat([mtr.flatten(), mte.flatten()])
            num_classes = int(both[both != IGNORE].max()) + 1
    res = segmentation_linear_probe(ctx.encoder, xtr, mtr, xte, mte, num_classes, cfg, ctx.mean, ctx.std,
                                    device=o.device, autocast_dtype=ctx.autocast, show_progress=o.progress)
    res.pop("head")
    tag = feature_tag("patches", True, None)
    return {"protocol": "segmentation", "metrics": {f"miou_{tag}": res["miou"], f"pixacc_{tag}": res["pixel_acc"]},
            **res, "data": {"source": source, "n_train": len(xtr), "n_test": len(xte)}}


def run_pictures(ctx: EvalContext, out_dir: str | Path = "pictures", n_show: int = 8, tsne_n: int = 1000) -> dict:
    """PCA-of-patch-tokens, class-token attention and t-SNE pictures (:mod:`mimkit.eval.pictures`) of test
    images (t-SNE on ``tsne_n`` of them)."""
    from mimkit.eval.pictures import save_token_pictures

    x, y, info = ctx.data("test")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(ctx.opts.seed))[:tsne_n].sort().values
    pool = "cls" if ctx.encoder.has_class_token else "mean"
    feats = ctx.features("test", pool, indices=idx)
    files = save_token_pictures(ctx.encoder, x[idx], y[idx], ctx.mean, ctx.std, out_dir, info.get("classes"), n_show,
                                ctx.opts.seed, tsne_feats=feats)
    return {"protocol": "pictures", "metrics": {}, "files": {k: str(v) for k, v in files.items()}}


PROTOCOLS = {
    "knn": run_knn,
    "linear": run_linear,
    "attentive": run_attentive,
    "finetune": run_finetune,
    "fewshot": run_fewshot,
    "diagnostics": run_diagnostics,
    "segmentation": run_segmentation,
    "pictures": run_pictures,
}


def evaluate(encoder: torch.nn.Module, protocols=("knn",), opts: EvalOptions | None = None,
             protocol_kwargs: dict[str, dict] | None = None, **adapter_kw) -> dict:
    """Run ``protocols`` on an in-memory encoder (a mimkit or timm ViT, or any ``nn.Module`` through
    :func:`mimkit.nn.adapters.wrap_encoder`, which takes ``adapter_kw`` such as ``num_prefix_tokens``,
    ``img_size``, ``in_chans``). Returns ``{protocol: result}`` plus ``"setup"``::

        res = evaluate(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False),
                       ["knn", "linear"], EvalOptions(dataset="/data/flowers"))
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    ctx = EvalContext(wrap_encoder(encoder, **adapter_kw), opts or EvalOptions())
    ctx.check_classes()
    out = {p: PROTOCOLS[p](ctx, **(protocol_kwargs or {}).get(p, {})) for p in protocols}
    for r in out.values():
        for d in [r, *r.get("pools", {}).values()] if isinstance(r, dict) else []:
            if isinstance(d, dict):
                d.pop("model", None)
    out["setup"] = ctx.describe(data="segmentation" not in protocols)
    return out


def options_dict(opts: EvalOptions) -> dict:
    return asdict(replace(opts))
