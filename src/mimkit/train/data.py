"""Build the training loader and the kNN evaluation arrays from a :class:`~mimkit.config.Config`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimkit.config import Config, ConfigError
from mimkit.data import build_dataset, build_loader
from mimkit.data.errors import DataError
from mimkit.train.distributed import DistInfo


@dataclass
class TrainData:
    """What the loop needs from a data set: a batch loader and, for kNN/pictures, raw uint8 arrays."""

    loader: object
    in_chans: int
    mean: tuple
    std: tuple
    train_images: torch.Tensor | None = None
    train_labels: torch.Tensor | None = None
    test_images: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    dataset: object | None = None  # the DatasetInfo (skipped-file bookkeeping)

    def skipped_files(self) -> list[str]:
        """Corrupt files skipped so far (``data.skip_corrupt``) on this process: those left out while
        decoding into memory and those the streaming loader met (in any worker)."""
        seen: dict[str, None] = {}
        ds = self.dataset
        if ds is not None:
            seen.update(dict.fromkeys(getattr(ds, "skipped", ())))
            folder = getattr(ds, "folder", None)
            if folder is not None:
                seen.update(dict.fromkeys(str(p) for p in folder.bad_files))
        seen.update(getattr(self.loader, "skipped", {}))
        return sorted(seen)


def build_train_data(cfg: Config, info: DistInfo) -> TrainData:
    d, enc = cfg.data, cfg.model.encoder
    mode = "L" if enc.in_chans == 1 else "RGB"
    ds = build_dataset(d.dataset, "train", root=d.root, in_memory_size=enc.img_size if (
        d.in_memory and d.dataset.lower() not in ("fashion_mnist", "fashion-mnist", "fmnist")) else None,
        mode=mode, skip_corrupt=d.skip_corrupt, mean=d.mean, std=d.std, limit=d.limit)
    if ds.in_chans != enc.in_chans:
        raise DataError(
            f"data set {d.dataset} has {ds.in_chans} channel(s) but model.encoder.in_chans={enc.in_chans}; "
            f"set model.encoder.in_chans={ds.in_chans}"
        )
    try:
        loader = build_loader(
            ds, d.batch_size, out_size=enc.img_size, augment=d.augment, device=info.device,
            num_workers=d.num_workers, scale=tuple(d.crop_scale), seed=cfg.train.seed,
            rank=info.rank, world_size=info.world_size, drop_last=True,
        )
    except ValueError as e:
        if "no batches" not in str(e):
            raise
        n = len(ds)
        raise ConfigError(
            f"data set {d.dataset} has {n} images, fewer than one batch per process (data.batch_size="
            f"{d.batch_size} x {info.world_size} process(es)); lower data.batch_size or use more images"
        ) from e
    data = TrainData(loader=loader, in_chans=ds.in_chans, mean=ds.mean, std=ds.std, dataset=ds)
    if ds.images is not None:
        data.train_images, data.train_labels = ds.images, ds.labels
    # evaluation split: the data set's test split (Fashion-MNIST) or data.eval_dataset
    eval_source = d.eval_dataset
    if eval_source is None and ds.name == "fashion_mnist":
        eval_source = "fashion_mnist"
    if eval_source is not None and (ds.images is not None):
        ev = build_dataset(eval_source, "test", root=d.eval_root or d.root, in_memory_size=None
                           if eval_source.lower() in ("fashion_mnist", "fashion-mnist", "fmnist") else enc.img_size,
                           mode=mode, mean=d.mean, std=d.std)
        data.test_images, data.test_labels = ev.images, ev.labels
    if data.train_labels is not None and bool((data.train_labels < 0).all()):
        data.train_labels = None  # unlabelled data: no kNN, pictures still work
    return data
