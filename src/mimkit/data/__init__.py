"""Data sets, loaders and batched augmentation for mimkit.

* :mod:`.fashion_mnist`: IDX files, :func:`find_fashion_mnist`, :func:`download_fashion_mnist`,
  :func:`load_fashion_mnist` -> ``uint8 (N, 1, 28, 28)``, ``int64 (N,)``.
* :mod:`.folder`: :class:`ImageFolder` (labeled or unlabeled), :func:`load_folder_to_tensor`.
* :mod:`.augment`: on-device :func:`random_resized_crop_flip`, :func:`flip_only`, :func:`normalize`.
* :mod:`.loaders`: :class:`InMemoryLoader`, :class:`FolderLoader`, :func:`build_dataset`,
  :func:`build_loader`.
* :mod:`.shards`: webdataset tar shards: :func:`prepare_shards` (``mimkit data prepare``) and the
  streaming :class:`ShardLoader` (shuffle buffer, exact resumable position).
* :mod:`.spec`: :class:`LoaderSpec` (the settings every loader takes) and the :class:`Loader` protocol
  the loaders follow; :mod:`.common`: what the loaders share (seeds, rank-sharded order, workers).

Every failure to find or read data raises :class:`DataError` with the path and a fix.
"""

from mimkit.errors import DataError

from .augment import flip_only, normalize, random_resized_crop_flip, rrc_params
from .fashion_mnist import (
    BASE_URL,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FILES,
    SPLITS,
    FileChecksum,
    default_cache_dir,
    download_fashion_mnist,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    verify_fashion_mnist,
    write_idx,
)
from .folder import IMG_EXTENSIONS, ImageFolder, load_folder_to_tensor
from .loaders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetInfo,
    FolderLoader,
    InMemoryLoader,
    Loader,
    LoaderSpec,
    build_dataset,
    build_loader,
    folder_transform,
    shard_indices,
)
from .shards import ShardLoader, is_shard_dir, prepare_shards

__all__ = [
    "BASE_URL",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FILES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "SPLITS",
    "ShardLoader",
    "DataError",
    "DatasetInfo",
    "FileChecksum",
    "FolderLoader",
    "ImageFolder",
    "InMemoryLoader",
    "Loader",
    "LoaderSpec",
    "build_dataset",
    "build_loader",
    "default_cache_dir",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "flip_only",
    "folder_transform",
    "is_shard_dir",
    "load_fashion_mnist",
    "load_folder_to_tensor",
    "normalize",
    "prepare_shards",
    "random_resized_crop_flip",
    "read_idx",
    "rrc_params",
    "shard_indices",
    "verify_fashion_mnist",
    "write_idx",
]
