"""Evaluation inputs: encoders from checkpoints, normalisation statistics, labelled image sets.

* :func:`load_checkpoint_encoder` — :func:`mimkit.weights.load_encoder` (mimkit, timm and official-MAE
  checkpoints); plus the checkpoint's resolved config and epoch/step when the file carries them.
* :func:`resolve_norm` — mean/std: explicit flags > the normalisation the file records (the run's
  training normalisation: a mimkit checkpoint's ``input``, an export's ``mimkit_input`` metadata, a
  Hugging Face config's ``image_mean`` / ``image_std``; :attr:`mimkit.weights.Weights.input`) >
  ``config['data']['mean'/'std']`` (checkpoints written before the record) > the encoder's
  ``input_norm`` (a named timm model's ``pretrained_cfg``) > defaults by channel count (ImageNet for 3
  channels, Fashion-MNIST for 1). The source says which, and a flag that differs from what the file
  records is a warning naming both. :func:`norm_line` is the line ``mimkit eval`` prints.
* :func:`load_split` — ``fashion_mnist`` or an image folder, resized to the encoder's input size and
  converted to its channel count, as uint8 ``(N, C, H, W)`` + int64 labels, optionally limited to a
  seeded random subset (drawn from the file list *before* decoding, so ``--limit-train 5000`` on a
  folder of a million images decodes 5000).

Labels: one class -> index map per evaluation. The training split's sorted class folders define it
(or ``class_names`` gives it) and every other split is mapped through it by *name*, so
``train/{a,b,c}`` with ``val/{a,c}`` labels ``val/c`` as 2, not 1. A split with a class the training
split lacks is an error (:class:`~mimkit.errors.DataError`): a kNN bank or a probe cannot predict
it.

Resize: folder images (any size) follow MAE's and Latent MIM's evaluation transform — resize the
shorter side to ``size / crop_pct`` (256 for 224 at the default ``crop_pct`` 0.875), then centre-crop
``size``. ``crop_pct=1`` resizes the shorter side straight to ``size``. A rectangular encoder input
``(H, W)`` generalises this: resize (aspect kept) so the image covers ``(H / crop_pct, W / crop_pct)``,
centre-crop that, then centre-crop ``(H, W)``. The built-in Fashion-MNIST is taken whole at its native
28 px (interpolated to the encoder's ``(H, W)`` only when it expects another size), as in pretraining.

Folder layouts for ``--dataset PATH``: ``PATH/train/<class>/…`` with ``PATH/val|test/<class>/…`` gives
the two splits; a plain ``PATH/<class>/…`` folder is split deterministically (80 % train / 20 % test,
seeded, stratified by class) unless ``--test-dataset`` names a separate folder.

Validation split (``val_split``, ``--val-split``): for choosing settings without looking at the test
split, the training split is divided once more (seeded, stratified by class): ``train`` is what is left
and ``test`` is the held-out part, so every protocol reports validation accuracy and the test split is
never read. A count (``10000``: exactly that many) or a fraction (``0.1``) of the training split, spread
over the classes in proportion, every class keeping at least one image; the held-out images are the
same whatever ``--seed`` (:data:`VAL_SEED`). The held-out images may have been seen, without labels, in
pretraining (the test images never are): validation numbers choose settings, the test split reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mimkit.errors import DataError
from mimkit.hf import mae_from_hf
from mimkit.nn.vit import image_hw
from mimkit.weights import load_encoder, read_weights
from mimkit.weights.read import step_from_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


@dataclass
class LoadedCheckpoint:
    encoder: torch.nn.Module
    path: str
    config: dict | None = None
    step: int | None = None
    epoch: float | None = None
    meta: dict = field(default_factory=dict)
    input: dict | None = None  # the input record of the file (Weights.input): normalisation, size, channels
    format: str | None = None  # the file's format (a key of mimkit.weights.FORMATS); None: an in-memory encoder


def _sidecar_config(path: Path) -> dict | None:
    """A resolved config saved beside the checkpoint (``config.yaml`` / ``config.json``)."""
    for name in ("config.yaml", "config.yml", "config.json"):
        p = path.parent / name
        if p.is_file():
            text = p.read_text()
            if p.suffix == ".json":
                return json.loads(text)
            import yaml

            return yaml.safe_load(text)
    return None


def load_checkpoint_encoder(path: str | Path, device: str | torch.device = "cpu", **kw) -> LoadedCheckpoint:
    """Encoder (eval mode, on ``device``) + config/step/epoch of any weight file or directory
    :func:`mimkit.weights.read_weights` reads (a run directory means its ``checkpoint.pt``; a Hugging
    Face ``ViTMAEForPreTraining`` directory, e.g. ``mimkit export --format hf``, its encoder)."""
    w = read_weights(path)
    if w.format == "hf":
        return LoadedCheckpoint(encoder=mae_from_hf(w.path).encoder.to(device).eval(), path=w.path, input=w.input,
                                format=w.format)
    encoder = load_encoder(w, **kw)
    config = w.config or _sidecar_config(Path(w.path))
    step = w.step if w.step is not None else step_from_name(w.path)
    return LoadedCheckpoint(encoder=encoder.to(device).eval(), path=w.path, config=config, step=step, epoch=w.epoch,
                            input=w.input, format=w.format)


_RECORD_PLACES = {"mimkit-checkpoint": "the checkpoint", "mimkit-dcp": "the checkpoint",
                  "mimkit-export": "the export's metadata", "hf": "the Hugging Face config"}


def _values(v) -> str:
    return ",".join(f"{float(x):g}" for x in v)


def _same(a, b) -> bool:
    """Equal normalisation values (one value stands for every channel)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        if 1 not in (len(a), len(b)):
            return False
        a, b = (a * len(b), b) if len(a) == 1 else (a, b * len(a))
    return all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b))


def _warn(msg: str) -> None:
    import sys

    print(f"warning: {msg}", file=sys.stderr)


def resolve_norm(config: dict | None, in_chans: int, mean=None, std=None, *, recorded: dict | None = None,
                 file_format: str | None = None, encoder=None, warn=_warn) -> tuple[tuple, tuple, str]:
    """``(mean, std, source)`` for an encoder with ``in_chans`` input channels (module doc for the order).

    ``recorded``: the file's input record (:attr:`mimkit.weights.Weights.input`); ``file_format``: the
    format of the file the encoder came from (``None``: an in-memory encoder), which names where the record
    is, or says that the file has none; ``encoder``: its ``input_norm`` (a named timm model's), when set, is
    used before the defaults. A ``mean`` / ``std`` flag that differs from the file's record (or its
    config's) is used, with a warning (``warn``) naming both."""
    data = (config or {}).get("data") or {}
    place = _RECORD_PLACES.get(file_format or "", "the file")
    enc_norm = getattr(encoder, "input_norm", None) if encoder is not None else None
    if recorded is not None and recorded.get("mean") and recorded.get("std"):
        origin = recorded.get("origin")
        base = (tuple(recorded["mean"]), tuple(recorded["std"]),
                f"recorded in {place}: the training normalisation" + (f", {origin}" if origin else ""))
    elif data.get("mean") is not None and data.get("std") is not None:
        base = tuple(data["mean"]), tuple(data["std"]), "checkpoint config"
    elif enc_norm is not None:
        base = tuple(enc_norm[0]), tuple(enc_norm[1]), str(enc_norm[2])
    else:
        base = ((IMAGENET_MEAN, IMAGENET_STD, "default (ImageNet)") if in_chans == 3 else
                (FMNIST_MEAN * in_chans, FMNIST_STD * in_chans, "default (Fashion-MNIST)"))
        if file_format in ("mimkit-checkpoint", "mimkit-dcp", "mimkit-export"):
            base = (*base[:2], base[2] + f"; {place} records no input normalisation (written before mimkit "
                                         "recorded it)")
        elif file_format is not None:
            base = (*base[:2], base[2] + f"; {place} records no input normalisation")
    if mean is None and std is None:
        return base
    if base[2] == "checkpoint config" or base[2].startswith("recorded in"):
        differ = [(flag, given, have) for flag, given, have in (("--mean", mean, base[0]), ("--std", std, base[1]))
                  if given is not None and not _same(given, have)]
        if differ:
            where = place if base[2].startswith("recorded in") else "the checkpoint's config"
            warn(" and ".join(f"{flag} {_values(given)}" for flag, given, _ in differ)
                 + f" differ{'s' if len(differ) == 1 else ''} from the normalisation recorded in {where} ("
                 + ", ".join(f"{flag[2:]} {_values(have)}" for flag, _, have in differ) + "); evaluating with "
                 + " ".join(f"{flag} {_values(given)}" for flag, given, _ in differ) + " as given")
    # a flag replaces its own value only (--mean alone keeps the std of the config / default)
    source = "flag" if mean is not None and std is not None else f"flag + {base[2]}"
    return (tuple(base[0] if mean is None else mean), tuple(base[1] if std is None else std), source)


def norm_line(mean, std, source: str) -> str:
    """The line ``mimkit eval`` prints: which normalisation it uses and where it comes from."""
    return f"normalisation: mean {_values(mean)}, std {_values(std)} ({source})"


def _size_text(hw: tuple[int, int]) -> str:
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def adapt_images(images: torch.Tensor, size: int | tuple[int, int], in_chans: int) -> torch.Tensor:
    """uint8 ``(N, C, h, w)`` -> uint8 ``(N, in_chans, H, W)`` for ``size`` a side ``H = W`` or ``(H, W)``
    (bicubic resize; grey↔RGB)."""
    oh, ow = image_hw(size)
    c = images.shape[1]
    if c != in_chans:
        if c == 1:
            images = images.expand(-1, in_chans, -1, -1).contiguous()
        elif in_chans == 1 and c == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"cannot convert {c}-channel images to {in_chans} channels")
    if images.shape[-1] != ow or images.shape[-2] != oh:
        out = []
        for i in range(0, len(images), 2048):
            x = F.interpolate(images[i : i + 2048].float(), size=(oh, ow), mode="bicubic", align_corners=False,
                              antialias=True)
            out.append(x.round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(out) if out else images.new_empty(0, images.shape[1], oh, ow)
    return images


def subset_indices(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded random subset of ``limit`` items (``None``: keep everything): the
    ``--limit-train`` / ``--limit-test`` rule, also the end-of-run kNN's (``eval.knn_*_limit``)."""
    if limit is None or limit >= n:
        return None
    if limit < 1:

        raise DataError(f"--limit-train/--limit-test {limit}: the limit must be at least 1")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def _subset(images, labels, limit: int | None, seed: int):
    idx = subset_indices(len(labels), limit, seed)
    return (images, labels) if idx is None else (images[idx], labels[idx])


def _split_folder(labels: torch.Tensor, split: str, seed: int = 0, test_fraction: float = 0.2) -> torch.Tensor:
    """Deterministic stratified split of one folder's indices."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_test = max(1, round(test_fraction * len(members))) if len(members) > 1 else 0
        keep.append(members[:n_test] if split == "test" else members[n_test:])
    return torch.cat(keep).sort().values


VAL_SEED = 0
"""Seed of the validation hold-out: the same held-out images whatever ``--seed`` (probe seeds, subsets)."""


def holdout_part(labels: torch.Tensor, split: str, val_split: float, where: str) -> tuple[torch.Tensor, int]:
    """Sorted indices of the training split's ``train`` part (fitting) or ``test`` part (held out) for
    ``val_split`` (a count >= 1, or a fraction of the ``n`` images: ``round(f * n)``), and the held-out
    count. Exactly that many are held out, spread over the classes in proportion to their size (largest
    remainder), each class keeping at least one image to fit on; the images are drawn with
    :data:`VAL_SEED`. A :class:`~mimkit.errors.DataError` when the count leaves nothing on either side."""
    n = len(labels)
    want = int(val_split) if val_split >= 1 else round(val_split * n)
    classes, counts = labels.unique(return_counts=True)
    room = (counts - 1).clamp(min=0)  # every class keeps one image for the probe to fit on
    if not 1 <= want <= int(room.sum()):
        raise DataError(f"--val-split {val_split:g}: {where} has {n} training images in {len(classes)} classes; "
                        f"hold out between 1 and {int(room.sum())} of them (every class keeps one to fit on): a "
                        "count, or a fraction in (0, 1)")
    exact = counts.double() * want / n
    quota = torch.minimum(exact.floor().long(), room)
    left = want - int(quota.sum())
    order = (exact - exact.floor()).argsort(descending=True, stable=True).tolist()
    while left > 0:  # the remainder, one image per class in order of the largest fractional share
        for i in order:
            if left and quota[i] < room[i]:
                quota[i] += 1
                left -= 1
    gen = torch.Generator().manual_seed(VAL_SEED)
    parts = []
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        parts.append(members[:q] if split == "test" else members[q:])
    return torch.cat(parts).sort().values, want


def remap_classes(folder_classes: list[str], class_names: list[str] | None, where: str) -> torch.Tensor | None:
    """Index table ``folder label -> evaluation label`` mapping ``folder_classes`` into ``class_names``
    by name (``None`` when they are identical). A class missing from ``class_names`` is a
    :class:`~mimkit.errors.DataError` naming it."""
    if class_names is None or list(folder_classes) == list(class_names):
        return None

    index = {c: i for i, c in enumerate(class_names)}
    extra = [c for c in folder_classes if c not in index]
    if extra:
        shown = ", ".join(repr(c) for c in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise DataError(f"{where} has class folder(s) {shown} that the training split lacks "
                        f"(it has {len(class_names)}: {', '.join(class_names[:8])}{' ...' if len(class_names) > 8 else ''}); "
                        "the classifier cannot predict them: remove them or add them to the training split")
    return torch.tensor([index[c] for c in folder_classes], dtype=torch.int64)


def split_classes(spec: str, split: str = "train") -> list[str]:
    """The class names of a split without decoding any image (the training split's map)."""
    if spec in ("fashion_mnist", "fashion-mnist", "fmnist"):
        from mimkit.data import FASHION_MNIST_CLASSES

        return list(FASHION_MNIST_CLASSES)
    from mimkit.data import ImageFolder

    root = Path(spec)
    names = {"train": ("train",), "test": ("test", "val", "validation")}[split]
    sub = next((root / n for n in names if (root / n).is_dir()), None)
    _check_layout(root, split, sub)
    return list(ImageFolder(sub or root, labeled=True).classes)


def _check_layout(root: Path, split: str, sub: Path | None) -> None:

    if not root.is_dir():
        raise DataError(f"--dataset {root}: neither 'fashion_mnist' nor an existing folder; pass an image folder "
                        "with one sub-folder per class (or PATH/train and PATH/val)")
    if sub is None and split == "test" and (root / "train").is_dir():
        raise DataError(f"{root} has a train/ folder but no val/ or test/ folder; add one, or pass --test-dataset")


_VAL_NAMES = {"train": "train (validation held out)", "test": "validation (held out of train)"}


def _val_rule(held: int, n_all: int) -> str:
    return (f"validation split: {held} of the {n_all} training images held out (stratified by class, seed "
            f"{VAL_SEED}); the test split is not read")


def center_crop(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Centre ``size x size`` (or ``(H, W)``) crop of ``(N, C, H, W)`` images at least that large."""
    oh, ow = image_hw(size)
    h, w = images.shape[-2:]
    top, left = (h - oh) // 2, (w - ow) // 2
    return images[..., top : top + oh, left : left + ow].contiguous()


def _decode(folder, size: int | tuple[int, int], show_progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``load_folder_to_tensor`` in chunks of 512 files, with a progress bar."""
    import copy

    from mimkit.data import load_folder_to_tensor
    from mimkit.eval.features import progress

    samples = folder.samples
    starts = range(0, len(samples), 512)
    parts = []
    for i in progress(starts, len(starts), f"decode {folder.root.name}", enabled=None if show_progress else False,
                      unit="x512 images"):
        part = copy.copy(folder)
        part.samples = samples[i : i + 512]
        parts.append(load_folder_to_tensor(part, size, crop=True))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def load_split(
    spec: str,
    split: str,
    img_size: int | tuple[int, int],
    in_chans: int,
    limit: int | None = None,
    seed: int = 0,
    split_folder: bool = True,
    class_names: list[str] | None = None,
    crop_pct: float = 0.875,
    show_progress: bool = False,
    root: str | None = None,
    val_split: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Labelled images of ``spec`` (``fashion_mnist`` or a folder path), ``split`` ``train``/``test``.

    ``val_split``: hold out this many (a count >= 1) or this fraction of the training split, stratified by
    class (:func:`holdout_part`): ``train`` is the rest and ``test`` the held-out part; the test split is not
    read (module doc). ``limit`` then subsets the part asked for.

    ``split_folder=False`` returns every image of a plain folder (used for ``--test-dataset``).
    ``class_names``: the evaluation's class -> index map (the training split's classes); folder labels
    are mapped into it by name (module doc). ``crop_pct``: MAE's resize-then-centre-crop ratio for folder
    images. ``img_size``: a side or ``(H, W)``. ``root``: where Fashion-MNIST is (default: its search).
    Returns ``(uint8 (N, in_chans, H, W), int64 (N,), info)``;
    ``info`` names the source, the classes and the resize rule.
    """

    hw = image_hw(img_size)
    square = hw[0] == hw[1]
    if square:
        img_size = hw[0]
    if not 0 < crop_pct <= 1:
        raise DataError(f"crop_pct {crop_pct}: must be in (0, 1] (MAE evaluates at 0.875 = 224/256)")
    source = "train" if val_split is not None else split  # the validation part comes out of the training split
    if spec in ("fashion_mnist", "fashion-mnist", "fmnist"):
        from mimkit.data import FASHION_MNIST_CLASSES, load_fashion_mnist

        images, labels = load_fashion_mnist(root, split=source)
        classes = list(FASHION_MNIST_CLASSES)
        remap = remap_classes(classes, class_names, f"fashion_mnist {source}")
        if remap is not None:
            labels = remap[labels]
        held = None
        if val_split is not None:
            part, held = holdout_part(labels, split, val_split, "fashion_mnist")
            n_all = len(labels)
            images, labels = images[part], labels[part]
        images, labels = _subset(images, labels, limit, seed)
        info = {"dataset": "fashion_mnist", "split": split if held is None else _VAL_NAMES[split],
                "classes": list(class_names or classes),
                "resize": "whole image (native 28 px)" if img_size == 28 else
                f"whole image resized to {_size_text(hw)}"}
        if held is not None:
            info["split_rule"] = _val_rule(held, n_all)
    else:
        from mimkit.data import ImageFolder

        root = Path(spec)
        names = {"train": ("train",), "test": ("test", "val", "validation")}[source]
        sub = next((root / n for n in names if (root / n).is_dir()), None)
        if split_folder:
            _check_layout(root, source, sub)
        elif not root.is_dir():
            raise DataError(f"--test-dataset {root}: not an existing folder")
        mode = "L" if in_chans == 1 else "RGB"
        folder = ImageFolder(sub or root, labeled=True, mode=mode)
        folder_classes = list(folder.classes)
        info = {"dataset": str(root), "split": split}
        targets = torch.tensor(folder.targets, dtype=torch.int64)
        keep = torch.arange(len(targets))
        if sub is None and split_folder:
            keep = _split_folder(targets, source, seed)
            info["split_rule"] = "seeded stratified 80/20 split of one folder"
        elif sub is not None:
            info["folder"] = str(sub)
        if val_split is not None and split_folder:
            part, held = holdout_part(targets[keep], split, val_split, str(sub or root))
            n_all = len(keep)
            keep = keep[part]
            info["split"] = _VAL_NAMES[split]
            info["split_rule"] = "; ".join(filter(None, [info.get("split_rule"), _val_rule(held, n_all)]))
        pick = subset_indices(len(keep), limit, seed)  # before decoding: only these files are read
        if pick is not None:
            keep = keep[pick]
        where = str(sub or root) + (f" ({source} part)" if sub is None and split_folder else "")
        remap = remap_classes(folder_classes, class_names, where)
        folder.samples = [folder.samples[i] for i in keep.tolist()]
        load_hw = hw if crop_pct >= 1 else (int(round(hw[0] / crop_pct)), int(round(hw[1] / crop_pct)))
        load_size = load_hw[0] if square else load_hw
        images, labels = _decode(folder, load_size, show_progress)
        if load_hw != hw:
            images = center_crop(images, img_size)
        if remap is not None:
            labels = remap[labels]
        info["classes"] = list(class_names or folder_classes)
        info["folder_classes"] = folder_classes
        if square:
            info["resize"] = (f"shorter side to {load_size}, centre crop {img_size} (crop_pct {crop_pct:g})"
                              if load_size != img_size else f"shorter side to {img_size}, centre crop")
        else:
            info["resize"] = (f"cover {_size_text(load_hw)} (aspect kept), centre crop {_size_text(hw)}"
                              + (f" (crop_pct {crop_pct:g})" if load_hw != hw else ""))
    images = adapt_images(images, img_size, in_chans)
    info["n"] = len(labels)
    return images, labels, info
