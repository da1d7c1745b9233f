"""Protocol runners shared by ``mimkit eval <protocol>`` and ``mimkit report``.

An :class:`EvalContext` holds one loaded encoder, its normalisation and the evaluation data, and caches
extracted features so several protocols on one checkpoint encode each image once. Each ``run_*``
returns ``{"protocol", "metrics": {column: number}, ...details}``; ``metrics`` are the columns of the
markdown tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from mimkit.eval.data import LoadedCheckpoint, load_split, resolve_norm
from mimkit.eval.features import extract_features


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
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device: str = "cpu"
    batch_size: int = 256  # feature extraction batch
    seed: int = 0


class EvalContext:
    """Encoder + data + cached features for one checkpoint."""

    def __init__(self, ckpt: LoadedCheckpoint, opts: EvalOptions):
        self.ckpt = ckpt
        self.opts = opts
        self.encoder = ckpt.encoder.to(opts.device).eval()
        self.in_chans = int(self.encoder.patch_embed.proj.in_channels)
        self.img_size = int(self.encoder.grid_size[0] * self.encoder.patch_size)
        self.mean, self.std, self.norm_source = resolve_norm(ckpt.config, self.in_chans, opts.mean, opts.std)
        self._data: dict[str, tuple] = {}
        self._feats: dict[tuple, torch.Tensor] = {}

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """uint8 images, labels and info of ``train`` or ``test``."""
        if split not in self._data:
            o = self.opts
            if split == "test" and o.test_dataset:
                self._data[split] = load_split(o.test_dataset, "test", self.img_size, self.in_chans, o.limit_test,
                                               o.seed, split_folder=False)
            else:
                limit = o.limit_train if split == "train" else o.limit_test
                self._data[split] = load_split(o.dataset, split, self.img_size, self.in_chans, limit, o.seed)
        return self._data[split]

    def labels(self, split: str) -> torch.Tensor:
        return self.data(split)[1]

    def features(self, split: str, pool: str, norm: bool | None = None, block: int | None = -999,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Cached features of ``split`` (``block=-999`` = the context's ``--block``)."""
        norm = self.opts.norm if norm is None else norm
        block = self.opts.block if block == -999 else block
        key = (split, pool, norm, block, dtype)
        if key not in self._feats:
            if pool == "all":
                out = []
                images = self.data(split)[0]
                step = 4096
                for i in range(0, len(images), step):  # keep the (N, 1+L, D) cache compact
                    out.append(extract_features(self.encoder, images[i : i + step], pool="all", norm=norm, block=block,
                                                batch_size=self.opts.batch_size, mean=self.mean, std=self.std,
                                                device=self.opts.device).to(dtype))
                self._feats[key] = torch.cat(out)
            else:
                pools = ["cls", "mean"]
                if pool not in pools:
                    pools = [pool]
                feats = extract_features(self.encoder, self.data(split)[0], pool=pools, norm=norm, block=block,
                                         batch_size=self.opts.batch_size, mean=self.mean, std=self.std,
                                         device=self.opts.device)
                for p, f in feats.items():
                    self._feats[(split, p, norm, block, dtype)] = f.to(dtype)
        return self._feats[key]

    def describe(self) -> dict:
        tr, te = self.data("train")[2], self.data("test")[2]
        return {"checkpoint": self.ckpt.path, "step": self.ckpt.step, "epoch": self.ckpt.epoch,
                "train_data": tr, "test_data": te, "mean": list(self.mean), "std": list(self.std),
                "norm_source": self.norm_source, "block": self.opts.block, "final_norm": self.opts.norm,
                "img_size": self.img_size, "in_chans": self.in_chans}


def _pools(opts: EvalOptions, default: str) -> list[str]:
    return [p.strip() for p in (opts.pool or default).split(",") if p.strip()]


def _num_classes(ctx: EvalContext) -> int:
    return int(max(ctx.labels("train").max(), ctx.labels("test").max())) + 1


def run_knn(ctx: EvalContext, k: int = 20, temperature: float = 0.07) -> dict:
    """Train-bank weighted kNN (DINO) and leave-one-out 1-NN on the test set (Latent MIM)."""
    from mimkit.eval.knn import knn_accuracy, loo_1nn_accuracy

    metrics, detail = {}, {}
    for pool in _pools(ctx.opts, "cls,mean"):
        tr, te = ctx.features("train", pool), ctx.features("test", pool)
        knn = knn_accuracy(tr, ctx.labels("train"), te, ctx.labels("test"), k=k, temperature=temperature)
        loo = loo_1nn_accuracy(te, ctx.labels("test"))
        metrics[f"knn_{pool}"] = knn
        metrics[f"loo1nn_{pool}"] = loo
        detail[pool] = {"knn": knn, "loo_1nn": loo}
    return {"protocol": "knn", "metrics": metrics, "pools": detail, "k": k, "temperature": temperature}


def run_linear(ctx: EvalContext, cfg=None, augment: bool = False) -> dict:
    """BN(affine=False) + Linear probe per pool, on cached features (or with augmentation)."""
    from mimkit.eval.linear import LINEAR_PRESETS, linear_probe_augmented, train_linear_probe

    cfg = cfg or replace(LINEAR_PRESETS["small"], seed=ctx.opts.seed)
    metrics, detail = {}, {}
    nc = _num_classes(ctx)
    for pool in _pools(ctx.opts, "cls,mean"):
        if augment:
            (xtr, ytr, _), (xte, yte, _) = ctx.data("train"), ctx.data("test")
            res = linear_probe_augmented(ctx.encoder, xtr, ytr, xte, yte, cfg, pool=pool, norm=ctx.opts.norm,
                                         block=ctx.opts.block, mean=ctx.mean, std=ctx.std, num_classes=nc,
                                         device=ctx.opts.device)
        else:
            res = train_linear_probe(ctx.features("train", pool), ctx.labels("train"), ctx.features("test", pool),
                                     ctx.labels("test"), cfg, num_classes=nc, device=ctx.opts.device)
        res.pop("model")
        metrics[f"linear_{pool}"] = res["top1"]
        detail[pool] = res
    return {"protocol": "linear", "metrics": metrics, "augment": augment, "pools": detail}


def run_attentive(ctx: EvalContext, cfg=None) -> dict:
    """CAE's attentive probe on cached all-token features (float16 cache)."""
    from mimkit.eval.attentive import AttentiveProbeConfig, train_attentive_probe

    cfg = cfg or AttentiveProbeConfig(seed=ctx.opts.seed)
    tr = ctx.features("train", "all", dtype=torch.float16)
    te = ctx.features("test", "all", dtype=torch.float16)
    res = train_attentive_probe(tr, ctx.labels("train"), te, ctx.labels("test"), ctx.encoder.num_heads, cfg,
                                num_classes=_num_classes(ctx), device=ctx.opts.device)
    res.pop("model")
    return {"protocol": "attentive", "metrics": {"attentive": res["top1"]}, **res}


def run_finetune(ctx: EvalContext, cfg=None) -> dict:
    """Full fine-tuning of a copy of the encoder (default preset ``small``)."""
    from mimkit.eval.finetune import finetune, finetune_preset

    cfg = cfg or finetune_preset("small", seed=ctx.opts.seed)
    (xtr, ytr, _), (xte, yte, _) = ctx.data("train"), ctx.data("test")
    res = finetune(ctx.encoder, xtr, ytr, xte, yte, cfg, mean=ctx.mean, std=ctx.std, num_classes=_num_classes(ctx),
                   device=ctx.opts.device)
    res.pop("model")
    return {"protocol": "finetune", "metrics": {"finetune": res["top1"]}, **res}


def run_fewshot(ctx: EvalContext, shots: int = 10, draws: int = 5, C: float = 1.0) -> dict:
    """k-shot logistic regression per pool (default: mean-pooled patches)."""
    from mimkit.eval.fewshot import fewshot_logreg

    metrics, detail = {}, {}
    for pool in _pools(ctx.opts, "mean"):
        res = fewshot_logreg(ctx.features("train", pool), ctx.labels("train"), ctx.features("test", pool),
                             ctx.labels("test"), shots=shots, draws=draws, seed=ctx.opts.seed, C=C)
        metrics[f"fewshot{shots}_{pool}"] = res["mean"]
        metrics[f"fewshot{shots}_{pool}_std"] = res["std"]
        detail[pool] = res
    return {"protocol": "fewshot", "metrics": metrics, "pools": detail}


def run_diagnostics(ctx: EvalContext, k: int = 20, temperature: float = 0.07) -> dict:
    """Sim (patch tokens of test images without the final norm, cls excluded; with and without the
    diagonal), spectrum / effective rank of the pooled test features, per-class kNN accuracy."""
    from mimkit.eval.diagnostics import patch_similarity, per_class_accuracy, spectrum_summary
    from mimkit.eval.knn import knn_predict

    tokens = ctx.features("test", "all", norm=False, dtype=torch.float16)
    sim = patch_similarity(tokens)  # float16 cache; similarities are computed in float32
    metrics = {"sim": sim["sim"], "sim_offdiag": sim["sim_offdiag"]}
    detail = {"sim": {**sim, "final_norm": False, "cls_excluded": True}}
    nc = _num_classes(ctx)
    for pool in _pools(ctx.opts, "cls,mean"):
        te = ctx.features("test", pool)
        spec = spectrum_summary(te)
        scores = knn_predict(ctx.features("train", pool), ctx.labels("train"), te, k, temperature, nc)
        pcs = per_class_accuracy(scores.argmax(1), ctx.labels("test"), nc)
        metrics[f"erank_{pool}"] = spec["effective_rank"]
        detail[pool] = {"spectrum": spec, "knn_per_class": pcs}
    return {"protocol": "diagnostics", "metrics": metrics, **detail}


PROTOCOLS = {
    "knn": run_knn,
    "linear": run_linear,
    "attentive": run_attentive,
    "finetune": run_finetune,
    "fewshot": run_fewshot,
    "diagnostics": run_diagnostics,
}


def options_dict(opts: EvalOptions) -> dict:
    return asdict(replace(opts))
