"""Build the training loader and the kNN evaluation arrays from a :class:`~mimkit.config.Config`.

The loader is any :class:`~mimkit.data.spec.Loader`, made from one :class:`~mimkit.data.spec.LoaderSpec`
(:func:`loader_spec`) whatever the source (in memory, an image folder, shards)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mimkit.config import Config, ConfigError
from mimkit.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, build_loader
from mimkit.data.spec import Batch, Loader, LoaderSpec
from mimkit.errors import DataError
from mimkit.nn.vit import image_hw
from mimkit.train.distributed import DistInfo


@dataclass
class TrainData:
    """What the loop needs from a data set: a batch loader and, for kNN/pictures, raw uint8 arrays."""

    loader: Loader
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
            seen.update(dict.fromkeys(ds.skipped))
            if ds.folder is not None:
                seen.update(dict.fromkeys(str(p) for p in ds.folder.bad_files))
        seen.update(self.loader.skipped)
        return sorted(seen)

    def batches(self, first: int, usable: int) -> Iterator[Batch]:
        """Batches from the ``first``-th (counted over epochs) on, without end: the first ``usable``
        batches of each epoch (those that fill whole optimizer steps), epoch after epoch."""
        per_epoch = len(self.loader)
        epoch, start = divmod(first, per_epoch)
        while True:
            if start < usable:
                for i, batch in enumerate(self.loader.iter_from(epoch, start)):
                    if start + i >= usable:
                        break
                    yield batch
            epoch += 1
            start = 0


def loader_spec(cfg: Config, info: DistInfo, mean: tuple | None = None, std: tuple | None = None) -> LoaderSpec:
    """The loader settings of ``cfg`` for this process (``mean``/``std``: the data set's)."""
    d, enc = cfg.data, cfg.model.encoder
    return LoaderSpec(batch_size=d.batch_size, mean=mean, std=std, out_size=enc.img_size, augment=d.augment,
                      scale=tuple(d.crop_scale), num_workers=d.num_workers, device=info.device, seed=cfg.train.seed,
                      rank=info.rank, world_size=info.world_size, drop_last=True, skip_corrupt=d.skip_corrupt)


def build_shard_data(cfg: Config, info: DistInfo) -> TrainData:
    """A :class:`~mimkit.data.shards.ShardLoader` over the shard directory ``data.dataset``."""
    from mimkit.data.shards import ShardIndex, ShardLoader

    d, enc = cfg.data, cfg.model.encoder
    if d.in_memory:
        raise ConfigError(f"data.dataset={d.dataset} is a shard directory (mimkit data prepare), which is streamed; "
                          "set data.in_memory=false")
    index = ShardIndex(d.dataset, d.limit)
    if index.in_chans != enc.in_chans:
        raise DataError(f"shards {d.dataset} hold {index.in_chans}-channel images but model.encoder.in_chans="
                        f"{enc.in_chans}; set model.encoder.in_chans={index.in_chans}")
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if index.in_chans == 3 else ((0.5,), (0.5,))
    mean, std = tuple(d.mean or default_mean), tuple(d.std or default_std)
    try:
        loader = ShardLoader(index, spec=loader_spec(cfg, info, mean, std), shuffle_buffer=d.shuffle_buffer)
    except ValueError as e:
        raise ConfigError(f"shards {d.dataset}: {e} (x {info.world_size} process(es)); lower data.batch_size") from e
    return TrainData(loader=loader, in_chans=index.in_chans, mean=mean, std=std)


def build_train_data(cfg: Config, info: DistInfo) -> TrainData:
    d, enc = cfg.data, cfg.model.encoder
    from mimkit.data.shards import is_shard_dir

    if is_shard_dir(d.dataset):
        return build_shard_data(cfg, info)
    mode = "L" if enc.in_chans == 1 else "RGB"
    ds = build_dataset(d.dataset, "train", root=d.root, in_memory_size=enc.img_size if (
        d.in_memory and d.dataset.lower() not in ("fashion_mnist", "fashion-mnist", "fmnist")) else None,
        mode=mode, skip_corrupt=d.skip_corrupt, mean=d.mean, std=d.std, limit=d.limit, follow_links=d.follow_links)
    if ds.in_chans != enc.in_chans:
        raise DataError(
            f"data set {d.dataset} has {ds.in_chans} channel(s) but model.encoder.in_chans={enc.in_chans}; "
            f"set model.encoder.in_chans={ds.in_chans}"
        )
    try:
        loader = build_loader(ds, spec=loader_spec(cfg, info, ds.mean, ds.std), decode=d.decode)
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
    # evaluation split: the data set's test split (Fashion-MNIST) or data.eval_dataset; read only when a
    # kNN or the picture will use it (the zoo's validation runs never touch the test split)
    e = cfg.eval
    eval_source = None
    if e.knn_at_end or e.knn_every_epochs > 0 or e.picture_at_end:
        eval_source = d.eval_dataset or ("fashion_mnist" if ds.name == "fashion_mnist" else None)
    if eval_source is not None and (ds.images is not None):
        ev = build_dataset(eval_source, "test", root=d.eval_root or d.root, in_memory_size=None
                           if eval_source.lower() in ("fashion_mnist", "fashion-mnist", "fmnist") else enc.img_size,
                           mode=mode, mean=d.mean, std=d.std, follow_links=d.follow_links)
        data.test_images, data.test_labels = ev.images, ev.labels
    if data.train_labels is not None and bool((data.train_labels < 0).all()):
        data.train_labels = None  # unlabelled data: no kNN, pictures still work
    hw = image_hw(enc.img_size)
    if data.train_images is not None and tuple(data.train_images.shape[-2:]) != hw:
        # kNN and pictures feed these to the encoder: resize once to its (H, W) (e.g. 28x28 Fashion-MNIST
        # for a non-square img_size); the training loader resizes/crops its own batches
        data.train_images = _resized_uint8(data.train_images, hw)
        if data.test_images is not None:
            data.test_images = _resized_uint8(data.test_images, hw)
    return data


def _resized_uint8(images: torch.Tensor, hw: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
    """uint8 ``(N, C, h, w)`` -> uint8 ``(N, C, H, W)`` (bilinear, antialiased), in chunks."""
    import torch.nn.functional as F

    if tuple(images.shape[-2:]) == hw:
        return images
    out = [F.interpolate(images[i : i + chunk].float(), size=hw, mode="bilinear", align_corners=False,
                         antialias=True).round_().clamp_(0, 255).to(torch.uint8) for i in range(0, len(images), chunk)]
    return torch.cat(out)
