"""Evaluation inputs: encoders from checkpoints, normalisation statistics, labelled image sets.

* :func:`load_checkpoint_encoder` — :func:`mimkit.interop.load_encoder` (mimkit, timm and official-MAE
  checkpoints); plus the checkpoint's resolved config and epoch/step when the file carries them.
* :func:`resolve_norm` — mean/std: explicit flags > ``config['data']['mean'/'std']`` > defaults by
  channel count (ImageNet for 3 channels, Fashion-MNIST for 1).
* :func:`load_split` — ``fashion_mnist`` or an image folder, resized to the encoder's input size and
  converted to its channel count, as uint8 ``(N, C, S, S)`` + int64 labels, optionally limited to a
  seeded random subset.

Folder layouts for ``--dataset PATH``: ``PATH/train/<class>/…`` with ``PATH/val|test/<class>/…`` gives
the two splits; a plain ``PATH/<class>/…`` folder is split deterministically (80 % train / 20 % test,
seeded, stratified by class) unless ``--test-dataset`` names a separate folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

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


def _read_raw(path: Path) -> object | None:
    if path.suffix == ".safetensors":
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - not a torch file; the encoder loader reports the error
        return None


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


def _step_from_name(path: Path) -> int | None:
    m = re.search(r"(?:checkpoint-|ckpt_step|step[-_]?)(\d+)", path.name)
    return int(m.group(1)) if m else None


def load_checkpoint_encoder(path: str | Path, device: str | torch.device = "cpu", **kw) -> LoadedCheckpoint:
    """Encoder (eval mode, on ``device``) + config/step/epoch of a checkpoint file."""
    path = Path(path)
    from mimkit.interop import InteropError, load_encoder

    if not path.exists():
        raise InteropError(f"checkpoint not found: {path}")
    raw = _read_raw(path)
    encoder = load_encoder(str(path), **kw)
    config = raw.get("config") if isinstance(raw, dict) and isinstance(raw.get("config"), dict) else None
    config = config or getattr(encoder, "source_config", None) or _sidecar_config(path)
    step = raw.get("step") if isinstance(raw, dict) else None
    epoch = raw.get("epoch") if isinstance(raw, dict) else None
    if step is None:
        step = _step_from_name(path)
    return LoadedCheckpoint(
        encoder=encoder.to(device).eval(), path=str(path), config=config,
        step=int(step) if isinstance(step, int | float) else None,
        epoch=float(epoch) if isinstance(epoch, int | float) else None,
    )


def resolve_norm(config: dict | None, in_chans: int, mean=None, std=None) -> tuple[tuple, tuple, str]:
    """``(mean, std, source)`` for an encoder with ``in_chans`` input channels."""
    if mean is not None and std is not None:
        return tuple(mean), tuple(std), "flag"
    data = (config or {}).get("data") or {}
    if data.get("mean") is not None and data.get("std") is not None:
        return tuple(data["mean"]), tuple(data["std"]), "checkpoint config"
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD, "default (ImageNet)"
    return FMNIST_MEAN * in_chans, FMNIST_STD * in_chans, "default (Fashion-MNIST)"


def adapt_images(images: torch.Tensor, size: int, in_chans: int) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> uint8 ``(N, in_chans, size, size)`` (bicubic resize; grey↔RGB)."""
    c = images.shape[1]
    if c != in_chans:
        if c == 1:
            images = images.expand(-1, in_chans, -1, -1).contiguous()
        elif in_chans == 1 and c == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"cannot convert {c}-channel images to {in_chans} channels")
    if images.shape[-1] != size or images.shape[-2] != size:
        out = []
        for i in range(0, len(images), 2048):
            x = F.interpolate(images[i : i + 2048].float(), size=(size, size), mode="bicubic", align_corners=False,
                              antialias=True)
            out.append(x.round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(out) if out else images.new_empty(0, images.shape[1], size, size)
    return images


def _subset(images, labels, limit: int | None, seed: int):
    if limit is None or limit >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return images[idx], labels[idx]


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


def load_split(
    spec: str,
    split: str,
    img_size: int,
    in_chans: int,
    limit: int | None = None,
    seed: int = 0,
    split_folder: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Labelled images of ``spec`` (``fashion_mnist`` or a folder path), ``split`` ``train``/``test``.

    ``split_folder=False`` returns every image of a plain folder (used for ``--test-dataset``).
    Returns ``(uint8 (N, in_chans, S, S), int64 (N,), info)``; ``info`` names the source and classes.
    """
    if spec in ("fashion_mnist", "fashion-mnist", "fmnist"):
        from mimkit.data import FASHION_MNIST_CLASSES, load_fashion_mnist

        images, labels = load_fashion_mnist(split=split)
        info = {"dataset": "fashion_mnist", "split": split, "classes": list(FASHION_MNIST_CLASSES)}
    else:
        from mimkit.data import ImageFolder, load_folder_to_tensor

        root = Path(spec)
        if not root.is_dir():
            raise FileNotFoundError(f"--dataset {spec}: neither 'fashion_mnist' nor an existing folder")
        sub = None
        names = {"train": ("train",), "test": ("test", "val", "validation")}[split]
        for n in names:
            if (root / n).is_dir():
                sub = root / n
                break
        mode = "L" if in_chans == 1 else "RGB"
        folder = ImageFolder(sub or root, labeled=True, mode=mode)
        images, labels = load_folder_to_tensor(folder, img_size, crop=True)
        info = {"dataset": str(root), "split": split, "classes": list(getattr(folder, "classes", []))}
        if sub is None and split_folder:
            idx = _split_folder(labels, split, seed)
            images, labels = images[idx], labels[idx]
            info["split_rule"] = "seeded stratified 80/20 split of one folder"
        elif sub is not None:
            info["folder"] = str(sub)
    images = adapt_images(images, img_size, in_chans)
    images, labels = _subset(images, labels, limit, seed)
    info["n"] = len(labels)
    return images, labels, info
