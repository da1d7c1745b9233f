"""Dense transfer: a semantic-segmentation *linear* probe on frozen patch tokens, scored by mIoU.

The protocol follows DINOv2's "linear" segmentation evaluation: the encoder is frozen, its patch
tokens (last block, after the final norm) go through ``BatchNorm2d`` + a ``1x1`` convolution to class
logits on the patch grid, which are bilinearly upsampled to the label resolution and trained with
per-pixel cross-entropy (ignore index 255). Test: argmax of the upsampled logits; mean IoU over the
classes that occur (in the labels or the predictions) of the whole evaluation set, from one confusion
matrix (the mmsegmentation convention DINOv2 uses). DINOv2 trains with AdamW for 40k iterations; here
AdamW (lr 1e-3, wd 1e-4) with a linear warm-up and cosine decay for ``epochs`` passes over cached
tokens (the set is small), which is the documented simplification.

Data: any image + mask folder in ADE20K's layout::

    ROOT/images/training/*.jpg|png        ROOT/annotations/training/*.png   (same file stem)
    ROOT/images/validation/*.jpg|png      ROOT/annotations/validation/*.png

Masks hold one class id per pixel. ADE20K's id 0 is "other objects", which mmsegmentation drops with
``reduce_zero_label`` (0 -> 255 ignored, ``c`` -> ``c - 1``); that is the default here too.

:func:`make_canvas_set` generates such tensors (:func:`write_canvas_folder`: such a folder) from
Fashion-MNIST: garments pasted on a dark canvas, each bright pixel labelled with its garment's class
(background is its own class; 11 classes). :data:`CANVAS_LAYOUTS` names three layouts; only the
native-scale ones measure representation quality:

* ``native`` (default): one garment per 28 px canvas, at the scale the encoder was pretrained on. The
  class of a pixel is not in its patch's brightness: the token must know which garment it is part of.
  Two 2-epoch quickstart MAE runs reach mIoU 49.9 and 47.7 against 36-40 for random inits of the
  same ViT (BENCHMARKS.md, "Segmentation canvases").
* ``overlap``: two garments overlaid at the same place (the later one's bright pixels on top); harder,
  smaller gap (28.2 and 29.6 against 23).
* ``scatter``: three garments at random places on a 56 px canvas, halved to the encoder's 28 px. It
  does *not* separate a pretrained encoder from a random one (13.9 and 13.3 against 14.0), so it is a
  plumbing test, not a benchmark: garment-vs-background is a brightness threshold, which a random ViT's
  patch tokens keep (patch embedding and residual stream carry the local intensity and edges), and the
  class needs the garment's shape at 14 px (3.5 patches), a scale the pretrained tokens never saw; both
  encoders end at the background IoU (~88) with near-chance garment IoUs. A 2x2 mosaic of touching
  14 px garments and a dense kNN on the patch tokens do not separate them either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mimkit.errors import DataError

IGNORE = 255
IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# -- data -----------------------------------------------------------------------------------------
# Canvas layouts: (canvas side in px, garments per canvas). Fashion-MNIST garments are 28 px, so
# "native" and "overlap" keep them at the encoder's own scale (a 28 px encoder sees them unresized);
# "scatter" pastes 3 garments on a 56 px canvas that is halved to the encoder's 28 px input. Only the
# native-scale layouts separate a pretrained encoder from a random one (BENCHMARKS.md, "Segmentation
# canvases"); "scatter" is a plumbing test (module doc).
CANVAS_LAYOUTS = {"native": (28, 1), "overlap": (28, 2), "scatter": (56, 3)}


def make_canvas_set(n: int, canvas: int = 28, objects: int = 1, split: str = "train", seed: int = 0,
                    threshold: int = 40, images: torch.Tensor | None = None, labels: torch.Tensor | None = None):
    """``n`` canvases of ``canvas`` px with ``objects`` Fashion-MNIST garments each (random positions,
    later ones on top; a canvas of the garments' size puts every garment at the origin, so ``objects=1``
    is the garment itself and ``objects=2`` overlays two). Returns uint8 images ``(n, 1, canvas,
    canvas)`` and int64 masks ``(n, canvas, canvas)`` in ADE20K's raw convention: 1 = background, ``2 +
    c`` = garment class ``c`` (0 unused). Only a garment's pixels brighter than ``threshold`` are pasted:
    they replace what lies below and carry the garment's label. Deterministic in ``seed``. ``images``/``labels``: the source garments
    (default: Fashion-MNIST's ``split``)."""
    if images is None:
        from mimkit.data import load_fashion_mnist

        images, labels = load_fashion_mnist(split=split)
    g = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    if canvas < size:
        raise ValueError(f"canvas {canvas} is smaller than a garment ({size} px)")
    out = torch.zeros(n, 1, canvas, canvas, dtype=torch.uint8)
    mask = torch.ones(n, canvas, canvas, dtype=torch.int64)
    pick = torch.randint(0, len(images), (n, objects), generator=g)
    pos = torch.randint(0, canvas - size + 1, (n, objects, 2), generator=g)
    rows = torch.arange(n)
    for j in range(objects):  # loop over the few objects, vectorised over canvases
        src = images[pick[:, j], 0]  # (n, s, s)
        fg = src > threshold
        ys = pos[:, j, 0, None, None] + torch.arange(size)[None, :, None]  # (n, s, 1)
        xs = pos[:, j, 1, None, None] + torch.arange(size)[None, None, :]  # (n, 1, s)
        r = rows[:, None, None].expand(n, size, size)
        ys, xs = ys.expand(n, size, size), xs.expand(n, size, size)
        cur = out[r, 0, ys, xs]
        out[r, 0, ys, xs] = torch.where(fg, src, cur)
        lab = (2 + labels[pick[:, j]])[:, None, None].expand(n, size, size)
        mask[r, ys, xs] = torch.where(fg, lab, mask[r, ys, xs])
    return out, mask


def canvas_probe_set(n: int, split: str, seed: int, size: int | tuple[int, int], in_chans: int,
                     layout: str = "native", objects: int | None = None, images: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None):
    """:func:`make_canvas_set` canvases of a :data:`CANVAS_LAYOUTS` ``layout`` (``objects`` overrides its
    garment count) ready for the probe: images resized to the encoder's ``size`` (bicubic) with
    ``in_chans`` channels, masks resized by nearest neighbour and reduced to 0 = background, ``1 + c`` =
    garment class ``c`` (11 classes)."""
    from mimkit.eval.data import adapt_images

    if layout not in CANVAS_LAYOUTS:
        raise ValueError(f"canvas layout {layout!r}: choose one of {', '.join(CANVAS_LAYOUTS)}")
    canvas, k = CANVAS_LAYOUTS[layout]
    x, m = make_canvas_set(n, canvas, objects or k, split, seed, images=images, labels=labels)
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(m.shape[-2:]) != hw:
        m = F.interpolate(m[:, None].float(), size=hw, mode="nearest")[:, 0].long()
    return adapt_images(x, hw, in_chans), m - 1


def write_canvas_folder(root: str | Path, n_train: int = 200, n_val: int = 50, canvas: int = 28, objects: int = 1,
                        seed: int = 0) -> Path:
    """Write :func:`make_canvas_set` canvases as an ADE20K-layout folder (PNG images and masks)."""
    from PIL import Image

    root = Path(root)
    for split, sub, n, s in (("train", "training", n_train, seed), ("test", "validation", n_val, seed + 1)):
        x, m = make_canvas_set(n, canvas, objects, split, s)
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(x[i, 0].numpy()).save(root / "images" / sub / f"{i:06d}.png")
            Image.fromarray(m[i].numpy().astype(np.uint8)).save(root / "annotations" / sub / f"{i:06d}.png")
    return root


def load_segmentation_folder(root: str | Path, split: str, size: int | tuple[int, int], in_chans: int,
                             limit: int | None = None, seed: int = 0, reduce_zero_label: bool = True):
    """Images (uint8 ``(N, in_chans, H, W)``, bicubic) and masks (int64 ``(N, H, W)``, nearest) of an
    ADE20K-layout folder, resized straight to ``size`` (a side, or ``(H, W)``); ``split`` ``train``
    (``training``) or ``test`` (``validation``). Masks use 255 for ignored pixels (after ``reduce_zero_label``)."""
    from PIL import Image


    root = Path(root)
    sub = {"train": "training", "test": "validation"}[split]
    img_dir, ann_dir = root / "images" / sub, root / "annotations" / sub
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise DataError(f"{root} is not in ADE20K's layout: expected {img_dir} and {ann_dir} "
                        "(images/<training|validation>/*.jpg with annotations/<...>/*.png of the same name)")
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMG_EXT)
    if not files:
        raise DataError(f"no images in {img_dir}")
    if limit is not None and limit < len(files):
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        files = [files[i] for i in keep.tolist()]
    mode = "L" if in_chans == 1 else "RGB"
    oh, ow = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    xs, ms = [], []
    for f in files:
        ann = ann_dir / (f.stem + ".png")
        if not ann.is_file():
            raise DataError(f"{f} has no annotation {ann}; every image needs a mask PNG of the same name")
        try:
            im = Image.open(f).convert(mode).resize((ow, oh), Image.Resampling.BICUBIC)
            mk = Image.open(ann).resize((ow, oh), Image.Resampling.NEAREST)
        except OSError as e:
            raise DataError(f"cannot read {f} or its mask ({e}); replace or delete the pair") from e
        a = np.asarray(im, dtype=np.uint8)
        xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        ms.append(np.asarray(mk, dtype=np.int64))
    masks = torch.from_numpy(np.stack(ms))
    if masks.ndim != 3:
        raise DataError(f"masks under {ann_dir} must be single-channel class-id PNGs")
    if reduce_zero_label:
        masks = torch.where(masks == 0, torch.full_like(masks, IGNORE), masks - 1)
        masks[masks == IGNORE - 1] = IGNORE
    return torch.from_numpy(np.stack(xs)), masks


# -- probe ----------------------------------------------------------------------------------------
class LinearSegHead(nn.Module):
    """DINOv2's linear decode head: ``BatchNorm2d`` + ``1x1`` conv on the patch grid ``(B, D, h, w)``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, grid: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        logits = self.conv(self.bn(grid))
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` int64 counts ``[true, predicted]`` over pixels whose target is not 255."""
    valid = target != IGNORE
    idx = target[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(conf: torch.Tensor) -> dict:
    """Mean IoU (%) over classes with a non-empty union, per-class IoU (NaN where empty), pixel accuracy."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = union > 0
    return {"miou": 100.0 * float(iou[present].mean()) if present.any() else float("nan"),
            "per_class_iou": [100.0 * float(v) for v in iou.tolist()],
            "pixel_acc": 100.0 * float(tp.sum() / conf.sum().clamp_min(1))}


@dataclass
class SegProbeConfig:
    """AdamW lr 1e-3, wd 1e-4, batch 16, 20 epochs (1 warm-up), cosine (module doc)."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0


def patch_grid(encoder: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 64, device=None,
               autocast_dtype="auto", show_progress: bool = False) -> torch.Tensor:
    """Frozen patch tokens as a float16 grid ``(N, D, gh, gw)`` (prefix tokens dropped; the encoder's patch
    grid, square for square images)."""
    from mimkit.eval.features import extract_features
    from mimkit.nn.adapters import token_grid

    tokens = extract_features(encoder, images, pool="all", batch_size=batch_size, mean=mean, std=std, device=device,
                              autocast_dtype=autocast_dtype, show_progress=show_progress, out_dtype=torch.float16)
    patches = tokens[:, encoder.num_prefix_tokens:]
    n, L, d = patches.shape
    gh, gw = token_grid(encoder, L, tuple(images.shape[-2:]))
    return patches.transpose(1, 2).reshape(n, d, gh, gw)


def segmentation_linear_probe(encoder: nn.Module, train_images, train_masks, test_images, test_masks,
                              num_classes: int, cfg: SegProbeConfig | None = None, mean=(0.5,), std=(0.5,),
                              device=None, autocast_dtype="auto", show_progress: bool = False) -> dict:
    """Train :class:`LinearSegHead` on frozen tokens and score mIoU on the test set (module doc)."""
    cfg = cfg or SegProbeConfig()
    device = torch.device(device or next(encoder.parameters()).device)
    gtr = patch_grid(encoder, train_images, mean, std, device=device, autocast_dtype=autocast_dtype,
                     show_progress=show_progress)
    gte = patch_grid(encoder, test_images, mean, std, device=device, autocast_dtype=autocast_dtype,
                     show_progress=show_progress)
    return probe_grids(gtr, train_masks, gte, test_masks, num_classes, cfg, device, show_progress)


def probe_grids(gtr: torch.Tensor, train_masks, gte: torch.Tensor, test_masks, num_classes: int,
                cfg: SegProbeConfig | None = None, device=None, show_progress: bool = False) -> dict:
    """The probe of :func:`segmentation_linear_probe` on token grids ``(N, D, gh, gw)`` already extracted
    (:func:`patch_grid`): train :class:`LinearSegHead`, score mIoU on the test grids."""
    from mimkit.eval.features import progress
    from mimkit.eval.optim import set_lr, warmup_cosine

    cfg = cfg or SegProbeConfig()
    device = torch.device(device or "cpu")
    bad = [int(v) for v in torch.unique(torch.cat([train_masks.flatten(), test_masks.flatten()]))
           if v != IGNORE and not 0 <= v < num_classes]
    if bad:
        raise DataError(f"mask values {bad[:5]} are outside 0..{num_classes - 1} (and not 255); pass --num-classes "
                        "covering every class id (after reduce_zero_label)")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    head = LinearSegHead(gtr.shape[1], num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = max(2, min(cfg.batch_size, len(gtr)))
    iters = max(len(gtr) // bs, 1)
    out_size = tuple(train_masks.shape[-2:])
    history = []
    for epoch in progress(range(cfg.epochs), cfg.epochs, "segmentation probe",
                          enabled=None if show_progress else False, unit="epoch"):
        perm = torch.randperm(len(gtr), generator=gen)
        total = 0.0
        for it in range(iters):
            set_lr(opt, warmup_cosine(epoch + it / iters, cfg.lr, cfg.epochs, cfg.warmup_epochs, 0.0))
            idx = perm[it * bs : (it + 1) * bs]
            logits = head(gtr[idx].to(device, torch.float32), out_size)
            loss = F.cross_entropy(logits, train_masks[idx].to(device), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        history.append(total / iters)
    head.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with torch.no_grad():
        for i in range(0, len(gte), 64):
            pred = head(gte[i : i + 64].to(device, torch.float32), tuple(test_masks.shape[-2:])).argmax(1).cpu()
            conf += confusion_matrix(pred, test_masks[i : i + 64], num_classes)
    return {**miou(conf), "history": history, "config": asdict(cfg), "batch_size": bs, "num_classes": num_classes,
            "grid": list(gtr.shape[-2:]), "head": head}
