"""Linear probe (MAE ``main_linprobe.py`` recipe).

Head = ``BatchNorm1d(D, affine=False, eps=1e-6)`` → ``Linear(D, C)`` (weight trunc-normal std 0.01,
bias 0). The BatchNorm has no parameters; it standardises the (badly scaled) frozen features with batch
statistics during training and running statistics at test time.

Two ways to train it:

* :func:`train_linear_probe` — on cached features (the default: features are extracted once, without
  augmentation; seconds on a CPU). A small-scale simplification of MAE's recipe (no augmentation during the probe).
* :func:`linear_probe_augmented` — MAE's recipe: every batch goes through RandomResizedCrop + flip and
  the frozen encoder (eval mode, no gradients). Test images are encoded without augmentation (our
  images are already at the encoder's size, so there is no resize-256/centre-crop step).

Optimiser: ``lars`` (MAE: momentum 0.9, trust 0.001, wd 0) or ``sgd`` (momentum 0.9);
``lr = base_lr × batch / 256``; linear warm-up then cosine to ``min_lr``, updated every iteration.

BatchNorm statistics: the running averages (momentum 0.1) only converge after tens of updates, and a
short run on a small set makes fewer (5 updates: the test-time standardisation is off and accuracy
falls below chance). With ``recompute_bn`` (default) they are replaced before testing by the exact
mean and (unbiased) variance of the full train features — without augmentation — which is what the
running averages estimate in a long ImageNet run; it changes nothing the head learned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.eval.diagnostics import per_class_accuracy
from mimkit.eval.features import normalize_images, pool_tokens
from mimkit.eval.optim import LARS, epoch_means, scaled_lr, scheduled_batches


@dataclass
class LinearProbeConfig:
    """Defaults: MAE's recipe (blr 0.1, LARS, wd 0, 90 epochs, 10 warm-up), with a batch that suits
    small data sets (MAE uses 16384)."""

    epochs: int = 90
    batch_size: int = 1024
    base_lr: float = 0.1
    lr: float | None = None
    min_lr: float = 0.0
    warmup_epochs: float = 10.0
    weight_decay: float = 0.0
    optimizer: str = "lars"  # lars | sgd
    momentum: float = 0.9
    seed: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)  # augmented probe only
    recompute_bn: bool = True  # exact train-feature BN statistics before testing (module doc)


LINEAR_PRESETS: dict[str, LinearProbeConfig] = {
    # MAE's recipe as written: lr = 0.1 x batch / 256 (6.4 at its batch 16384).
    "mae": LinearProbeConfig(),
    # Small data sets (default of the CLI): batch 256 and MAE's *absolute* LARS lr 6.4. LARS makes each
    # step a fixed fraction of ‖w‖, so scaling the lr down with the batch starves the few steps a
    # small data set offers (Fashion-MNIST 10k/2k, random-init ViT 192/6, cls: 59.4 % with the "mae"
    # preset at batch 1024, 77.5 % with this one; SGD base lr 0.1 at batch 256: 77.6 %).
    "small": LinearProbeConfig(batch_size=256, lr=6.4),
}


class LinearProbe(nn.Module):
    """``BatchNorm1d(affine=False, eps=1e-6)`` → ``Linear``: ``(B, D)`` -> ``(B, C)``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(x))


def make_optimizer(params, cfg, lr: float) -> torch.optim.Optimizer:
    """LARS or momentum SGD with the probe's settings."""
    if cfg.optimizer == "lars":
        return LARS(params, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose lars or sgd")


@torch.no_grad()
def set_bn_statistics(bn: nn.BatchNorm1d, count: int, total: torch.Tensor, total_sq: torch.Tensor) -> None:
    """Set ``bn``'s running mean / unbiased variance from a count, a sum and a sum of squares (float64)."""
    mean = total / count
    var = (total_sq - count * mean * mean) / max(count - 1, 1)
    bn.running_mean.copy_(mean.to(bn.running_mean))
    bn.running_var.copy_(var.clamp_min(0).to(bn.running_var))


@torch.no_grad()
def recompute_bn_statistics(model: LinearProbe, feats: torch.Tensor, batch_size: int = 65536) -> None:
    """Running statistics of ``model.bn`` := the exact mean / unbiased variance of ``feats (N, D)``."""
    dev = model.bn.running_mean.device
    total = torch.zeros(feats.shape[1], dtype=torch.float64, device=dev)
    total_sq = torch.zeros_like(total)
    for i in range(0, len(feats), batch_size):
        x = feats[i : i + batch_size].to(dev, torch.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
    set_bn_statistics(model.bn, len(feats), total, total_sq)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Class predictions ``(N,)`` of ``model`` in eval mode."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = torch.cat([model(x[i : i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def _result(pred: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg, lr: float, history) -> dict:
    return {
        "top1": 100.0 * (pred == labels).float().mean().item(),
        "per_class": per_class_accuracy(pred, labels, num_classes),
        "lr": lr,
        "config": asdict(cfg),
        "history": history,
    }


def train_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    cfg: LinearProbeConfig | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train a :class:`LinearProbe` on cached features ``(N, D)`` and test it.

    Returns ``{"top1": %, "per_class": [%...], "lr", "config", "history": [train loss per epoch]}``.
    """
    cfg = cfg or LinearProbeConfig()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = LinearProbe(train_feats.shape[1], num_classes).to(device)
    bs = min(cfg.batch_size, len(train_feats))
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, bs)
    opt = make_optimizer(model.parameters(), cfg, lr)
    x_all, y_all = train_feats.float().to(device), train_labels.to(device)
    losses = []
    for epoch, idx in scheduled_batches(len(x_all), bs, cfg.epochs, opt, lr, cfg.warmup_epochs, cfg.min_lr, gen):
        idx = idx.to(device)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append((epoch, loss.item()))
    history = epoch_means(losses, cfg.epochs)
    if cfg.recompute_bn:
        recompute_bn_statistics(model, train_feats)
    pred = predict(model, test_feats.float())
    out = _result(pred, test_labels, num_classes, cfg, lr, history)
    out["model"] = model
    return out


def linear_probe_augmented(
    encoder: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    cfg: LinearProbeConfig | None = None,
    pool: str = "cls",
    norm: bool = True,
    block: int | None = None,
    mean=(0.5,),
    std=(0.5,),
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | str | None = "auto",
    show_progress: bool = False,
) -> dict:
    """MAE's linear probe with RandomResizedCrop(``cfg.crop_scale``) + flip through the frozen encoder.

    ``train_images``/``test_images``: uint8 ``(N, C, H, W)`` at the encoder's size. The encoder runs
    batch by batch (bf16 autocast on a GPU by default): no feature or token cache is held.
    """
    from mimkit.data.augment import random_resized_crop_flip
    from mimkit.eval.features import default_autocast, encoder_pooling, extract_features, progress

    cfg = cfg or LinearProbeConfig()
    device = torch.device(device or next(encoder.parameters()).device)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    was = encoder.training
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    if autocast_dtype == "auto":
        autocast_dtype = default_autocast(device)
    pooling = encoder_pooling(encoder, norm)
    model = LinearProbe(encoder.embed_dim * (2 if pool == "cls+mean" else 1), num_classes).to(device)
    bs = min(cfg.batch_size, len(train_images))
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, bs)
    opt = make_optimizer(model.parameters(), cfg, lr)
    size = tuple(int(v) for v in train_images.shape[-2:])  # (H, W)
    losses = []
    try:
        batches = scheduled_batches(len(train_images), bs, cfg.epochs, opt, lr, cfg.warmup_epochs, cfg.min_lr, gen)
        total = cfg.epochs * max(len(train_images) // bs, 1)
        for epoch, idx in progress(batches, total, "linear probe (augmented)", enabled=None if show_progress else False):
            x = normalize_images(train_images[idx].to(device), mean, std)
            x = random_resized_crop_flip(x, size, scale=cfg.crop_scale, generator=aug_gen, interpolation="bicubic")
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                 enabled=autocast_dtype is not None):
                feats = pool_tokens(encoder.forward_features(x, norm=norm, block=block), pool, **pooling)
            loss = F.cross_entropy(model(feats.float()), train_labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append((epoch, loss.item()))
        history = epoch_means(losses, cfg.epochs)
        kw = dict(pool=pool, norm=norm, block=block, mean=mean, std=std, device=device, autocast_dtype=autocast_dtype,
                  show_progress=show_progress)
        if cfg.recompute_bn:  # un-augmented train features, streamed: only their sums are kept
            d = model.bn.running_mean.shape[0]
            s1 = torch.zeros(d, dtype=torch.float64, device=device)
            s2 = torch.zeros_like(s1)
            step = 4096
            for i in range(0, len(train_images), step):
                f = extract_features(encoder, train_images[i : i + step], **kw).to(device, torch.float64)
                s1 += f.sum(0)
                s2 += (f * f).sum(0)
            set_bn_statistics(model.bn, len(train_images), s1, s2)
        test_feats = extract_features(encoder, test_images, **kw)
    finally:
        encoder.train(was)
    pred = predict(model, test_feats)
    out = _result(pred, test_labels, num_classes, cfg, lr, history)
    out["model"] = model
    return out


def logistic_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict:
    """The standard logistic-regression linear probe: scikit-learn ``LogisticRegression(C, max_iter)`` (lbfgs) on
    features standardized with the train set's statistics. A converged convex fit, so it needs no
    lr/epoch tuning and is comparable with the peer anchors in BENCHMARKS.md.

    ``train_feats (N, D)``, ``test_feats (M, D)``; returns ``{"top1": %, "per_class": [...]}``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_feats.float().numpy())
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(scaler.transform(train_feats.float().numpy()), train_labels.numpy())
    pred = torch.from_numpy(clf.predict(scaler.transform(test_feats.float().numpy())))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return {
        "top1": 100.0 * (pred == test_labels).float().mean().item(),
        "per_class": per_class_accuracy(pred, test_labels, num_classes),
        "protocol": f"standardized features + sklearn LogisticRegression(C={C}, max_iter={max_iter})",
    }
