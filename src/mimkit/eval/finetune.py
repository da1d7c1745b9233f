"""Full fine-tuning (MAE ``main_finetune.py`` recipe, methods_b §2.7).

* Model: the pretrained encoder with its final ``norm`` removed, global pooling (mean of the patch
  tokens, cls excluded) → a new ``LayerNorm`` ``fc_norm`` → ``Linear`` head (weight trunc-normal std
  2e-5, bias 0). ``pos_embed`` becomes trainable (initialised from the fixed sin-cos).
* Drop path: linearly increasing to ``drop_path`` over the blocks (set on the copied encoder).
* Layer-wise lr decay (MAE ``util/lr_decay.py``): ``n = depth + 1``; layer id 0 for
  ``patch_embed``/``cls_token``/``pos_embed``, ``i + 1`` for block ``i``, ``n`` for everything else
  (``fc_norm``, ``head``); every group's lr is ``lr × decay^(n − id)``.
* AdamW (0.9, 0.999), weight decay 0.05 except 1-D parameters (biases, norms) and ``pos_embed``/
  ``cls_token``; per-iteration warm-up + cosine to ``min_lr``; label smoothing; optional batched
  mixup / cutmix (:func:`mixup_cutmix`, timm's "batch" mode: one λ and one choice per batch).
* Augmentation: batched RandomResizedCrop + flip (:mod:`mimkit.data.augment`). Not implemented:
  RandAugment and random erasing (MAE's ImageNet recipe uses both).

Presets: :data:`FINETUNE_PRESETS` (``mae_vit_base`` = the published recipe; ``small`` = methods_b §6.4;
``quick`` = a CPU smoke setting).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mimkit.eval.diagnostics import per_class_accuracy
from mimkit.eval.features import normalize_images
from mimkit.eval.optim import scaled_lr, set_lr, warmup_cosine


@dataclass
class FinetuneConfig:
    """Defaults: MAE ViT-B fine-tuning (batch 1024, blr 5e-4, 100 epochs, warm-up 5, layer decay 0.65,
    drop path 0.1, smoothing 0.1, mixup 0.8, cutmix 1.0, wd 0.05, min lr 1e-6)."""

    epochs: int = 100
    batch_size: int = 1024
    base_lr: float = 5e-4
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    eval_every: int = 0  # epochs between test evaluations (0 = only at the end)


FINETUNE_PRESETS: dict[str, FinetuneConfig] = {
    # MAE ViT-B/16 on ImageNet-1k (methods_b §2.7).
    "mae_vit_base": FinetuneConfig(),
    # methods_b §6.4, small data (CIFAR / Fashion-MNIST): 50 epochs, lr 1e-3 × batch/512 (= blr 5e-4),
    # layer decay 0.75, drop path 0.1, smoothing 0.1; batch 256; milder crops for tiny images; no mixup.
    "small": FinetuneConfig(epochs=50, batch_size=256, base_lr=5e-4, layer_decay=0.75, mixup=0.0, cutmix=0.0,
                            crop_scale=(0.35, 1.0)),
    # A few minutes on a CPU: the small preset for 5 epochs with 1 warm-up epoch.
    "quick": FinetuneConfig(epochs=5, batch_size=256, base_lr=5e-4, warmup_epochs=1.0, layer_decay=0.75,
                            mixup=0.0, cutmix=0.0, crop_scale=(0.35, 1.0)),
}


def finetune_preset(name: str, **overrides) -> FinetuneConfig:
    """A preset with some fields replaced."""
    if name not in FINETUNE_PRESETS:
        raise ValueError(f"unknown fine-tune preset {name!r}; choose one of {', '.join(FINETUNE_PRESETS)}")
    return replace(FINETUNE_PRESETS[name], **overrides)


class FinetuneModel(nn.Module):
    """``encoder`` (final norm removed) → mean of patch tokens → ``fc_norm`` → ``head``."""

    def __init__(self, encoder: nn.Module, num_classes: int, drop_path: float = 0.0):
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        dim = self.encoder.embed_dim
        eps = getattr(self.encoder.norm, "eps", 1e-6)
        self.encoder.norm = nn.Identity()
        self.encoder.pos_embed.requires_grad_(True)
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        set_drop_path(self.encoder, drop_path)
        self.fc_norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images, norm=False)
        return self.head(self.fc_norm(tokens[:, 1:].mean(1)))


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Stochastic depth ``linspace(0, rate, depth)[i]`` on block ``i`` (every ``DropPath`` in it)."""
    depth = len(encoder.blocks)
    rates = torch.linspace(0, rate, depth).tolist() if depth else []
    for r, blk in zip(rates, encoder.blocks):
        for m in blk.modules():
            if hasattr(m, "rate") and type(m).__name__ == "DropPath":
                m.rate = r
            elif type(m).__name__ == "DropPath" and hasattr(m, "drop_prob"):  # timm's DropPath
                m.drop_prob = r


def layer_id(name: str, num_layers: int) -> int:
    """MAE's ``get_layer_id_for_vit`` on an encoder-relative parameter name; ``num_layers = depth + 1``."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(
    model: FinetuneModel,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    no_weight_decay: tuple[str, ...] = ("pos_embed", "cls_token"),
) -> list[dict]:
    """AdamW param groups with ``lr_scale = layer_decay^(n − layer_id)`` and no decay for 1-D
    parameters and ``no_weight_decay`` names. Each group also carries ``names`` (for inspection)."""
    n = len(model.encoder.blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rel = name[len("encoder."):] if name.startswith("encoder.") else name
        lid = layer_id(rel, n) if name.startswith("encoder.") else n
        decay = not (p.ndim == 1 or rel in no_weight_decay)
        key = (lid, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (n - lid), "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _rand_beta(alpha: float, gen: torch.Generator) -> float:
    """One Beta(α, α) draw, reproducible from a torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot with label smoothing: ``1 − s + s/C`` on the label, ``s/C`` elsewhere. Rows sum to 1."""
    off = smoothing / num_classes
    y = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return y.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def mixup_cutmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Batched mixup / cutmix with the batch's mirror image (``x.flip(0)``), one λ per batch.

    Mixup: ``x = λ x + (1 − λ) x_flip``. Cutmix: a box of area ``≈ (1 − λ)`` of the image is pasted from
    ``x_flip`` and λ is corrected to the exact kept area. Targets: ``λ y + (1 − λ) y_flip`` with smoothed
    one-hot ``y``, so every row sums to 1. Returns ``(images, targets (B, C), info)``.
    """
    gen = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    y = soft_targets(labels, num_classes, smoothing)
    info = {"mode": "none", "lam": 1.0}
    if torch.rand(1, generator=gen).item() >= prob or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return images, y, info
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(1, generator=gen).item() < switch_prob)
    x = images.clone()
    if use_cutmix:
        lam = _rand_beta(cutmix_alpha, gen)
        h, w = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy = int(torch.randint(0, h, (1,), generator=gen))
        cx = int(torch.randint(0, w, (1,), generator=gen))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        info = {"mode": "cutmix", "lam": lam, "box": (y0, y1, x0, x1)}
    else:
        lam = _rand_beta(mixup_alpha, gen)
        x = images * lam + images.flip(0) * (1.0 - lam)
        info = {"mode": "mixup", "lam": lam}
    return x, lam * y + (1.0 - lam) * y.flip(0), info


@torch.no_grad()
def evaluate_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std,
                        batch_size: int = 512, num_classes: int | None = None) -> dict:
    """Top-1 and per-class accuracy of ``model`` on uint8 ``images``."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    preds = []
    for i in range(0, len(images), batch_size):
        x = normalize_images(images[i : i + batch_size].to(dev), mean, std)
        preds.append(model(x).argmax(1).cpu())
    model.train(was)
    pred = torch.cat(preds)
    return {"top1": 100.0 * (pred == labels).float().mean().item(),
            "per_class": per_class_accuracy(pred, labels, num_classes)}


def finetune(
    encoder: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    cfg: FinetuneConfig | None = None,
    mean=(0.5,),
    std=(0.5,),
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Fine-tune a copy of ``encoder`` (the original is untouched) on uint8 images; returns
    ``{"top1", "per_class", "lr", "config", "history": [{"epoch", "loss", "top1"?}], "model"}``."""
    from mimkit.data.augment import random_resized_crop_flip

    cfg = cfg or FinetuneConfig()
    device = torch.device(device or next(encoder.parameters()).device)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    model = FinetuneModel(encoder, num_classes, cfg.drop_path).to(device)
    bs = min(cfg.batch_size, len(train_images))
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, bs)
    groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay)
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)
    iters = max(len(train_images) // bs, 1)
    size = train_images.shape[-1]
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(train_images), generator=gen)
        total = 0.0
        for it in range(iters):
            set_lr(opt, warmup_cosine(epoch + it / iters, lr, cfg.epochs, cfg.warmup_epochs, cfg.min_lr))
            idx = perm[it * bs : (it + 1) * bs]
            x = normalize_images(train_images[idx].to(device), mean, std)
            y = train_labels[idx].to(device)
            x = random_resized_crop_flip(x, size, scale=cfg.crop_scale, flip_p=0.5 if cfg.flip else 0.0,
                                         generator=aug_gen, interpolation="bicubic")
            if mixing:
                x, target, _ = mixup_cutmix(x, y, num_classes, cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.switch_prob,
                                            cfg.label_smoothing, gen)
                loss = torch.sum(-target * F.log_softmax(model(x), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite fine-tuning loss at epoch {epoch}, iteration {it}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        row = {"epoch": epoch + 1, "loss": total / iters}
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            row["top1"] = evaluate_classifier(model, test_images, test_labels, mean, std, num_classes=num_classes)["top1"]
        history.append(row)
    res = evaluate_classifier(model, test_images, test_labels, mean, std, num_classes=num_classes)
    if history:
        history[-1]["top1"] = res["top1"]
    return {**res, "lr": lr, "config": asdict(cfg), "history": history, "model": model}
