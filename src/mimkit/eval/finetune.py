"""Full fine-tuning (MAE ``main_finetune.py`` recipe).

* Model: the pretrained encoder with its final ``norm`` removed, global pooling (mean of the patch
  tokens, cls excluded) → a new ``LayerNorm`` ``fc_norm`` → ``Linear`` head (weight trunc-normal std
  2e-5, bias 0). ``pos_embed`` becomes trainable (initialised from the fixed sin-cos).
* Drop path: linearly increasing to ``drop_path`` over the blocks (set on the copied encoder).
* Layer-wise lr decay (MAE ``util/lr_decay.py``): ``n = depth + 1``; layer id 0 for
  ``patch_embed``/``cls_token``/``pos_embed``, ``i + 1`` for block ``i``, ``n`` for everything else
  (``fc_norm``, ``head``); every group's lr is ``lr × decay^(n − id)``.
* AdamW (0.9, 0.999), weight decay 0.05 except 1-D parameters (biases, norms) and ``pos_embed``/
  ``cls_token``; per-iteration warm-up + cosine to ``min_lr``; label smoothing; mixup / cutmix with
  timm's ``Mixup`` ("batch" mode, as MAE's ``main_finetune.py`` configures it).
* Augmentation: batched RandomResizedCrop + flip (:mod:`mimkit.data.augment`); MAE's preset adds
  timm's RandAugment ``rand-m9-mstd0.5-inc1`` and timm's ``RandomErasing`` (p 0.25, per-pixel noise).
  Test images are MAE's eval view (resize to size/0.875, centre crop: :func:`mimkit.eval.data.load_split`).
* Reporting: the test set is evaluated every ``eval_every`` epochs (default 1); the result carries the
  last epoch's accuracy (``top1``) and the best one with its epoch (``top1_best``, ``best_epoch``) —
  MAE's logs report the maximum over epochs.
* Pooling: ``global_pool="mean"`` (MAE's default) or ``"cls"`` (MAE's ``--cls_token``: the class
  token after the encoder's own final norm).

Presets: :data:`FINETUNE_PRESETS` (``mae_vit_base`` = the published recipe; ``small`` =;
``quick`` = a CPU smoke setting).
"""

from __future__ import annotations

import copy
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
    rand_augment: str | None = None  # timm RandAugment spec, e.g. MAE's "rand-m9-mstd0.5-inc1"
    reprob: float = 0.0  # timm RandomErasing probability (MAE: 0.25, mode "pixel")
    global_pool: str = "mean"  # mean (MAE's default) | cls
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    eval_every: int = 1  # epochs between test evaluations (0 = only at the end); best and last are reported


FINETUNE_PRESETS: dict[str, FinetuneConfig] = {
    # MAE ViT-B/16 on ImageNet-1k.
    "mae_vit_base": FinetuneConfig(rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25),
    #, small data (CIFAR / Fashion-MNIST): 50 epochs, lr 1e-3 × batch/512 (= blr 5e-4),
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
    """``encoder`` (final norm removed) → mean of patch tokens → ``fc_norm`` → ``head``
    (``global_pool="cls"``: the class token after the encoder's final norm → ``head``)."""

    def __init__(self, encoder: nn.Module, num_classes: int, drop_path: float = 0.0, global_pool: str = "mean"):
        super().__init__()
        if global_pool not in ("mean", "cls"):
            raise ValueError(f"fine-tune pooling {global_pool!r}: choose mean (MAE's global pool) or cls")
        if global_pool == "cls" and not encoder.has_class_token:
            raise ValueError("this encoder has no class token; fine-tune with --pool mean")
        self.encoder = copy.deepcopy(encoder)
        self.global_pool = global_pool
        self.num_prefix_tokens = encoder.num_prefix_tokens
        dim = self.encoder.embed_dim
        eps = getattr(getattr(self.encoder, "norm", None), "eps", 1e-6)
        self.use_norm = global_pool == "cls" or type(encoder).__name__ == "ModuleEncoder"
        if global_pool == "mean" and hasattr(self.encoder, "norm"):
            self.encoder.norm = nn.Identity()
        if getattr(self.encoder, "pos_embed", None) is not None:
            self.encoder.pos_embed.requires_grad_(True)
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        set_drop_path(self.encoder, drop_path)
        self.fc_norm = nn.LayerNorm(dim, eps=eps) if global_pool == "mean" else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images, norm=self.use_norm)
        pooled = tokens[:, 0] if self.global_pool == "cls" else tokens[:, self.num_prefix_tokens:].mean(1)
        return self.head(self.fc_norm(pooled))


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
    """MAE's ``get_layer_id_for_vit`` on an encoder-relative parameter name; ``num_layers = depth + 1``.
    timm-wrapped names (``model.…``) are read without the prefix; timm's other prefix tokens and its
    pre-norm count as the embedding layer."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name in ("cls_token", "pos_embed", "reg_token", "dist_token") or name.startswith(("patch_embed", "norm_pre")):
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


def make_mixup(cfg: FinetuneConfig, num_classes: int):
    """timm's ``Mixup`` (batch mode: one λ and one mixup/cutmix choice per batch, mixing with the flipped
    batch; targets smoothed by ``label_smoothing``), or ``None`` when both alphas are 0."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob, switch_prob=cfg.switch_prob,
                 mode="batch", label_smoothing=cfg.label_smoothing, num_classes=num_classes)


def rand_augment(images: torch.Tensor, spec: str, mean, generator: torch.Generator) -> torch.Tensor:
    """timm's RandAugment (``rand_augment_transform(spec)``, e.g. MAE's ``rand-m9-mstd0.5-inc1``) on a
    uint8 batch ``(B, C, H, W)``. timm's RandAugment works on PIL images, so this is a per-image loop
    (the price of using the reference implementation; it is off in the small presets)."""
    import random

    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    h = min(images.shape[-2:])  # timm: 0.45 of the shorter side
    ra = rand_augment_transform(spec, {"translate_const": int(h * 0.45),
                                       "img_mean": tuple(int(round(255 * m)) for m in mean)})
    state, np_state = random.getstate(), np.random.get_state()
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    random.seed(seed)  # timm draws ops from numpy's and magnitudes from Python's global generators
    np.random.seed(seed)
    try:
        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for a in arr:
            im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
            out.append(torch.from_numpy(np.asarray(ra(im), dtype=np.uint8).copy()))
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
    x = torch.stack(out)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.to(images.device)


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
    autocast_dtype: torch.dtype | str | None = "auto",
    show_progress: bool = False,
) -> dict:
    """Fine-tune a copy of ``encoder`` (the original is untouched) on uint8 images; returns
    ``{"top1" (last epoch), "top1_best", "best_epoch", "per_class", "lr", "config",
    "history": [{"epoch", "loss", "top1"?}], "model"}``."""
    from mimkit.data.augment import random_resized_crop_flip
    from mimkit.eval.features import default_autocast, progress

    cfg = cfg or FinetuneConfig()
    device = torch.device(device or next(encoder.parameters()).device)
    if autocast_dtype == "auto":
        autocast_dtype = default_autocast(device)
    amp = dict(device_type=device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    model = FinetuneModel(encoder, num_classes, cfg.drop_path, cfg.global_pool).to(device)
    mixup = make_mixup(cfg, num_classes)
    bs = min(cfg.batch_size, len(train_images))
    if mixup is not None and bs % 2:
        bs -= 1  # timm's batch-mode Mixup mixes with the flipped batch: it needs an even batch
    erase = None
    if cfg.reprob > 0:
        from timm.data.random_erasing import RandomErasing

        erase = RandomErasing(cfg.reprob, mode="pixel", max_count=1, device=str(device))
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, bs)
    groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay)
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)
    iters = max(len(train_images) // bs, 1)
    size = tuple(int(v) for v in train_images.shape[-2:])  # (H, W): the crop comes back at the input size
    history = []
    best, best_epoch = -1.0, 0
    model.train()
    flip_p = 0.5 if cfg.flip else 0.0
    for epoch in progress(range(cfg.epochs), cfg.epochs, "fine-tune", enabled=None if show_progress else False,
                          unit="epoch"):
        perm = torch.randperm(len(train_images), generator=gen)
        total = 0.0
        for it in range(iters):
            set_lr(opt, warmup_cosine(epoch + it / iters, lr, cfg.epochs, cfg.warmup_epochs, cfg.min_lr))
            idx = perm[it * bs : (it + 1) * bs]
            y = train_labels[idx].to(device)
            if cfg.rand_augment:  # MAE's order: crop + flip, RandAugment, normalise, erase
                x = train_images[idx].to(device).float()
                x = random_resized_crop_flip(x, size, scale=cfg.crop_scale, flip_p=flip_p, generator=aug_gen,
                                             interpolation="bicubic").round().clamp(0, 255).to(torch.uint8)
                x = normalize_images(rand_augment(x, cfg.rand_augment, mean, gen), mean, std)
            else:
                x = normalize_images(train_images[idx].to(device), mean, std)
                x = random_resized_crop_flip(x, size, scale=cfg.crop_scale, flip_p=flip_p, generator=aug_gen,
                                             interpolation="bicubic")
            if erase is not None:
                x = erase(x)
            with torch.autocast(**amp):
                if mixup is not None:
                    x, target = mixup(x, y)
                    loss = torch.sum(-target * F.log_softmax(model(x).float(), dim=-1), dim=-1).mean()
                else:
                    loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite fine-tuning loss at epoch {epoch}, iteration {it}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        row = {"epoch": epoch + 1, "loss": total / iters}
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            with torch.autocast(**amp):
                row["top1"] = evaluate_classifier(model, test_images, test_labels, mean, std,
                                                  num_classes=num_classes)["top1"]
            if row["top1"] > best:
                best, best_epoch = row["top1"], epoch + 1
        history.append(row)
    with torch.autocast(**amp):
        res = evaluate_classifier(model, test_images, test_labels, mean, std, num_classes=num_classes)
    if history:
        history[-1]["top1"] = res["top1"]
    if res["top1"] >= best:
        best, best_epoch = res["top1"], cfg.epochs
    return {**res, "top1_best": best, "best_epoch": best_epoch, "lr": lr, "config": asdict(cfg), "history": history,
            "model": model}
