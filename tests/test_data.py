"""Tests for mimkit.data (CPU, fast)."""

from __future__ import annotations

import gzip
import hashlib
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FILES,
    DataError,
    FolderLoader,
    ImageFolder,
    InMemoryLoader,
    build_dataset,
    build_loader,
    download_fashion_mnist,
    find_fashion_mnist,
    flip_only,
    load_fashion_mnist,
    load_folder_to_tensor,
    normalize,
    random_resized_crop_flip,
    read_idx,
    rrc_params,
    write_idx,
)
from mimkit.data import fashion_mnist as fm

# ------------------------------------------------------------------------------------------------
# IDX files
# ------------------------------------------------------------------------------------------------


def _idx_bytes(code: int, dims: list[int], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def test_idx_hand_written_header(tmp_path: Path) -> None:
    # int16 big-endian payload written by hand, independent of write_idx
    values = np.array([[1, -2, 300], [4, 5, -32768]], dtype=">i2")
    path = tmp_path / "x.idx"
    path.write_bytes(_idx_bytes(0x0B, [2, 3], values.tobytes()))
    t = read_idx(path)
    assert t.dtype == torch.int16 and t.shape == (2, 3)
    assert t.tolist() == values.astype(np.int16).tolist()

    gz = tmp_path / "y-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(0x08, [4], bytes([0, 7, 9, 255]))))
    assert read_idx(gz).tolist() == [0, 7, 9, 255]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path: Path, dtype: torch.dtype, suffix: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 3, 4, generator=g) * 100 - (0 if dtype == torch.uint8 else 50)).to(dtype)
    path = write_idx(tmp_path / f"t-idx3{suffix}", x)
    y = read_idx(path)
    assert y.dtype == dtype and torch.equal(x, y)


def test_idx_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope-idx3-ubyte.gz"
    with pytest.raises(DataError, match="not found") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_idx_corrupt_files(tmp_path: Path) -> None:
    good = _idx_bytes(0x08, [3, 2, 2], bytes(range(12)))
    cases = {
        "truncated.gz": gzip.compress(good)[:-6],
        "garbage.gz": b"\x1f\x8b\x08\x00" + b"\xff" * 40,
        "notgzip.gz": b"<html>404</html>",
        "badmagic.idx": b"\x12\x34\x08\x03" + good[4:],
        "short.idx": good[:-1],
        "long.idx": good + b"\x00",
        "header.idx": good[:9],
        "empty.idx": b"",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError) as e:
            read_idx(path)
        assert str(path) in str(e.value), name
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "badmagic.idx")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short.idx")


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST: locating, downloading, loading
# ------------------------------------------------------------------------------------------------


def _fake_fashion(folder: Path, n_train: int = 6, n_test: int = 4, n_test_labels: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for split, n, nl in (("train", n_train, n_train), ("t10k", n_test, n_test_labels or n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g).byte())
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", torch.randint(0, 10, (nl,), generator=g).byte())
    return folder


def test_find_missing_mentions_fixes(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        find_fashion_mnist(tmp_path / "empty")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "download_fashion_mnist" in msg
    assert str(tmp_path / "empty") in msg


def test_find_and_load_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _fake_fashion(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv("MIMKIT_DATA", str(tmp_path / "data"))
    assert find_fashion_mnist() == folder
    assert find_fashion_mnist(tmp_path / "data") == folder  # root/fashion-mnist
    # the fake files are not the official data: verification refuses them ...
    with pytest.raises(DataError, match="checksum mismatch") as e:
        load_fashion_mnist(folder, "train")
    assert "train-images-idx3-ubyte.gz" in str(e.value)
    # ... unless told not to
    images, labels = load_fashion_mnist(folder, "test", verify=False)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (4,) and labels.dtype == torch.int64


def test_load_count_mismatch(tmp_path: Path) -> None:
    folder = _fake_fashion(tmp_path, n_test=4, n_test_labels=5)
    with pytest.raises(DataError, match="count mismatch") as e:
        load_fashion_mnist(folder, "test", verify=False)
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)


def test_download_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = _fake_fashion(tmp_path / "mirror")
    good = {n: hashlib.md5((mirror / n).read_bytes()).hexdigest() for n in FILES}
    dest = tmp_path / "dest"
    out = download_fashion_mnist(dest, base_url=mirror.as_uri() + "/", checksums=good)
    assert out == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILES)
    assert (dest / "t10k-labels-idx1-ubyte.gz").read_bytes() == (mirror / "t10k-labels-idx1-ubyte.gz").read_bytes()

    # a mismatching checksum: DataError, nothing left behind (neither the file nor the .part)
    bad = dict(good)
    bad["train-labels-idx1-ubyte.gz"] = "0" * 32
    dest2 = tmp_path / "dest2"
    with pytest.raises(DataError, match="checksum mismatch") as e:
        download_fashion_mnist(dest2, base_url=mirror.as_uri(), checksums=bad)
    assert "train-labels-idx1-ubyte.gz" in str(e.value)
    assert not (dest2 / "train-labels-idx1-ubyte.gz").exists()
    assert not list(dest2.glob("*.part"))

    # already-present verified files are not fetched again; network errors become DataError
    def fail(url: str, dest: Path, timeout: float) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fm, "_fetch", fail)
    download_fashion_mnist(dest, base_url="http://unreachable.invalid/", checksums=good)
    with pytest.raises(DataError, match="download of http://unreachable.invalid/"):
        download_fashion_mnist(dest, base_url="http://unreachable.invalid/", checksums=good, force=True)


def test_official_checksum_table() -> None:
    assert FILES["train-images-idx3-ubyte.gz"].gz_md5 == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert FILES["t10k-labels-idx1-ubyte.gz"].gz_md5 == "bb300cfdad3c16e7a12a480ee83cd310"
    assert fm.BASE_URL == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def _real_fashion() -> Path:
    try:
        return find_fashion_mnist()
    except DataError:
        pytest.skip("Fashion-MNIST files not installed (apt-get install dataset-fashion-mnist)")


def test_real_fashion_mnist() -> None:
    _real_fashion()
    images, labels = load_fashion_mnist(split="train")
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.equal(labels.bincount(), torch.full((10,), 6000))
    x = images[:10000].float() / 255
    assert abs(x.mean().item() - FASHION_MNIST_MEAN[0]) < 0.01
    assert abs(x.std().item() - FASHION_MNIST_STD[0]) < 0.01
    test_images, test_labels = load_fashion_mnist(split="test")
    assert test_images.shape == (10000, 1, 28, 28) and test_labels.shape == (10000,)


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------


def _png(path: Path, seed: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


@pytest.fixture()
def labeled_dir(tmp_path: Path) -> Path:
    root = tmp_path / "labeled"
    for c, cls in enumerate(["cat", "dog", "emu"]):
        for k in range(3):
            _png(root / cls / f"{k}.png", 10 * c + k)
    _png(root / "dog" / "nested" / "9.PNG", 99, mode="L")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_labeled(labeled_dir: Path) -> None:
    ds = ImageFolder(labeled_dir)
    assert ds.labeled and ds.classes == ["cat", "dog", "emu"] and ds.num_classes == 3
    assert len(ds) == 10
    assert ds.targets == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    image, label = ds[4]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    grey = ImageFolder(labeled_dir, mode="L", transform=lambda im: torch.from_numpy(np.array(im)))
    x, _ = grey[0]
    assert x.shape == (10, 12) and grey.in_chans == 1


def test_image_folder_unlabeled(tmp_path: Path, labeled_dir: Path) -> None:
    flat = tmp_path / "flat"
    for k in range(4):
        _png(flat / f"{k}.jpg", k)
    ds = ImageFolder(flat)
    assert not ds.labeled and len(ds) == 4 and set(ds.targets) == {-1} and ds.num_classes == 0
    # labeled=False on a class layout: every image, recursively, label -1
    ds = ImageFolder(labeled_dir, labeled=False)
    assert len(ds) == 10 and set(ds.targets) == {-1}
    with pytest.raises(DataError, match="labeled=True"):
        ImageFolder(flat, labeled=True)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as e:
        ImageFolder(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty")


def test_image_folder_corrupt(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for k in range(4):
        _png(root / f"{k}.png", k)
    (root / "1.png").write_bytes(b"definitely not a png")
    good = (root / "3.png").read_bytes()
    (root / "2.png").write_bytes(good[: len(good) // 2])  # truncated

    ds = ImageFolder(root)
    ds[0]
    with pytest.raises(DataError, match="corrupt") as e:
        ds[1]
    assert str(root / "1.png") in str(e.value) and "skip_corrupt=True" in str(e.value)

    ds = ImageFolder(root, skip_corrupt=True)
    ref3 = np.asarray(ds[3][0])
    image, _ = ds[1]  # 1 and 2 are corrupt -> substitute = sample 3
    assert np.array_equal(np.asarray(image), ref3)
    assert ds.num_skipped == 2 and ds.num_substituted == 1
    assert ds.bad_files == [root / "1.png", root / "2.png"]
    ds[2]
    assert ds.num_skipped == 2 and ds.num_substituted == 2

    ds = ImageFolder(root, skip_corrupt=True)
    assert ds.verify() == [root / "1.png", root / "2.png"]
    assert len(ds) == 2 and ds.num_skipped == 2
    assert ImageFolder(root).verify() == [root / "1.png", root / "2.png"]  # report only

    with pytest.raises(DataError, match="1.png"):
        load_folder_to_tensor(root, 8)
    x, y = load_folder_to_tensor(root, 8, skip_corrupt=True)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.uint8 and y.tolist() == [-1, -1]


def test_load_folder_to_tensor(labeled_dir: Path) -> None:
    x, y = load_folder_to_tensor(labeled_dir, 16, mode="L")
    assert x.shape == (10, 1, 16, 16) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == ImageFolder(labeled_dir).targets
    x, _ = load_folder_to_tensor(labeled_dir, 6, crop=False)
    assert x.shape == (10, 3, 6, 6)


# ------------------------------------------------------------------------------------------------
# Augmentation
# ------------------------------------------------------------------------------------------------


def _images(b: int = 8, c: int = 3, h: int = 20, w: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_rrc_deterministic_and_shape() -> None:
    x = _images()
    a = random_resized_crop_flip(x, 16, generator=torch.Generator().manual_seed(3))
    b = random_resized_crop_flip(x, 16, generator=torch.Generator().manual_seed(3))
    c = random_resized_crop_flip(x, 16, generator=torch.Generator().manual_seed(4))
    assert a.shape == (8, 3, 16, 16) and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random_resized_crop_flip(x, (12, 24), interpolation="bicubic").shape == (8, 3, 12, 24)


def test_rrc_identity_and_flip() -> None:
    x = _images()
    same = random_resized_crop_flip(x, 20, scale=(1, 1), ratio=(1, 1), flip_p=0.0)
    assert torch.allclose(same, x, atol=1e-5)
    mirrored = random_resized_crop_flip(x, 20, scale=(1, 1), ratio=(1, 1), flip_p=1.0)
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-5)
    assert torch.equal(flip_only(x, 1.0), x.flip(-1)) and torch.equal(flip_only(x, 0.0), x)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    some = flip_only(x, 0.5, g1)
    flipped = torch.rand(8, generator=g2) < 0.5
    assert 0 < flipped.sum() < 8
    for i in range(8):
        assert torch.equal(some[i], x[i].flip(-1) if flipped[i] else x[i])


def test_rrc_matches_torchvision_crop() -> None:
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = _images(16, 3, 28, 28)
    out = random_resized_crop_flip(x, 32, flip_p=0.0, generator=torch.Generator().manual_seed(5))
    top, left, h, w = rrc_params(16, 28, 28, generator=torch.Generator().manual_seed(5))
    assert ((h >= 1) & (h <= 28) & (w >= 1) & (w <= 28)).all()
    ref = torch.stack(
        [
            tvf.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32], antialias=False)
            for i in range(16)
        ]
    )
    # equal away from the crop edges (there grid_sample may read real pixels just outside the box)
    assert torch.allclose(out[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-5)


def test_rrc_params_fallback() -> None:
    # no candidate can fit a 1:1 box of >= 90% area in a 10x200 image -> center crop 10x10
    top, left, h, w = rrc_params(3, 10, 200, scale=(0.9, 1.0), ratio=(1.0, 1.0))
    assert h.tolist() == [10] * 3 and w.tolist() == [10] * 3
    assert top.tolist() == [0] * 3 and left.tolist() == [95] * 3


def test_normalize() -> None:
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3)
    y = normalize(x, (0.2,), (0.5,))
    assert y.dtype == torch.float32
    assert torch.allclose(y.flatten(), torch.tensor([-0.4, 1.6, 0.0]), atol=1e-6)
    assert normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), (0.1, 0.2, 0.3), (1, 1, 1)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError):
        normalize(torch.zeros(2, 3, 4, 4), (0.1, 0.2), (1, 1))


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------


def _uint8_data(n: int = 100, c: int = 1, s: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)
    return images, torch.arange(n)  # label = sample id, to track which samples were served


def _loader(**kw) -> InMemoryLoader:
    images, labels = _uint8_data()
    args = dict(batch_size=8, mean=(0.5,), std=(0.25,), out_size=10, seed=7)
    args.update(kw)
    return InMemoryLoader(images, labels, **args)


def _collect(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


def test_in_memory_loader_basic_and_deterministic() -> None:
    loader = _loader()
    assert len(loader) == 12  # 100 // 8
    batches = _collect(loader)
    assert len(batches) == 12
    x, y = batches[0]
    assert x.shape == (8, 1, 10, 10) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = _collect(_loader())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == 96  # no repeats within an epoch
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in loader]), seen)


def test_in_memory_loader_resume() -> None:
    loader = _loader()
    full = _collect(loader.iter_from(3))
    tail = _collect(_loader().iter_from(3, start_batch=5))
    assert len(tail) == len(full) - 5
    for (xa, ya), (xb, yb) in zip(full[5:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert _collect(loader.iter_from(3, start_batch=len(loader))) == []


def test_in_memory_loader_ranks() -> None:
    r0 = _loader(rank=0, world_size=2, batch_size=5)
    r1 = _loader(rank=1, world_size=2, batch_size=5)
    assert len(r0) == len(r1) == 10
    y0 = torch.cat([y for _, y in r0]).tolist()
    y1 = torch.cat([y for _, y in r1]).tolist()
    assert not set(y0) & set(y1) and sorted(y0 + y1) == list(range(100))
    # drop_last=False pads by wrapping around so that every sample is covered
    a = _loader(rank=0, world_size=3, drop_last=False, batch_size=8)
    b = _loader(rank=1, world_size=3, drop_last=False, batch_size=8)
    c = _loader(rank=2, world_size=3, drop_last=False, batch_size=8)
    ys = [torch.cat([y for _, y in r]).tolist() for r in (a, b, c)]
    assert [len(v) for v in ys] == [34, 34, 34] and set(sum(ys, [])) == set(range(100))


def test_in_memory_loader_modes_and_counts() -> None:
    images = torch.zeros(60000, 1, 2, 2, dtype=torch.uint8)
    loader = InMemoryLoader(images, None, 256, mean=(0.0,), std=(1.0,), augment="none")
    assert len(loader) == 234
    assert len(InMemoryLoader(images, None, 256, mean=(0.0,), std=(1.0,), drop_last=False)) == 235
    x, y = next(iter(loader))
    assert x.shape == (256, 1, 2, 2) and (y == -1).all()

    data, labels = _uint8_data(16, 3, 8)
    plain = InMemoryLoader(data, labels, 4, mean=(0.5,), std=(0.5,), augment="none", shuffle=False)
    x, y = next(iter(plain))
    assert y.tolist() == [0, 1, 2, 3]
    assert torch.allclose(x, normalize(data[:4], (0.5,), (0.5,)))
    flipped = InMemoryLoader(data, labels, 4, mean=(0.5,), std=(0.5,), augment="flip", flip_p=1.0, shuffle=False)
    assert torch.allclose(next(iter(flipped))[0], x.flip(-1))
    with pytest.raises(ValueError, match="no batches"):
        InMemoryLoader(data, labels, 32, mean=(0.5,), std=(0.5,))


def test_folder_loader(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for k in range(10):
        _png(root / ("a" if k < 5 else "b") / f"{k}.png", k, size=(20, 16))
    kw = dict(out_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=3)
    main = FolderLoader(root, 3, num_workers=0, **kw)
    assert len(main) == 3
    state = torch.random.get_rng_state()
    full = _collect(main.iter_from(2))
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    assert full[0][0].shape == (3, 3, 8, 8) and full[0][1].dtype == torch.int64
    tail = _collect(FolderLoader(root, 3, num_workers=0, **kw).iter_from(2, start_batch=1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[1:], tail))
    workers = _collect(FolderLoader(root, 3, num_workers=2, **kw).iter_from(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, workers))
    r0 = FolderLoader(root, 1, num_workers=0, rank=0, world_size=2, **kw).indices(0).tolist()
    r1 = FolderLoader(root, 1, num_workers=0, rank=1, world_size=2, **kw).indices(0).tolist()
    assert sorted(r0 + r1) == list(range(10))


def test_build_dataset(tmp_path: Path, labeled_dir: Path) -> None:
    info = build_dataset(labeled_dir)
    assert not info.in_memory and info.folder is not None
    assert info.in_chans == 3 and info.num_classes == 3 and len(info) == 10 and len(info.mean) == 3
    loader = build_loader(info, 2, out_size=8, num_workers=0)
    assert isinstance(loader, FolderLoader) and next(iter(loader))[0].shape == (2, 3, 8, 8)

    split_root = tmp_path / "splits"
    for k in range(3):
        _png(split_root / "val" / f"{k}.png", k)
    info = build_dataset(split_root, "val", in_memory_size=8, mode="L")
    assert info.in_memory and info.images.shape == (3, 1, 8, 8) and info.num_classes == 0
    loader = build_loader(info, 3, augment="flip")
    assert isinstance(loader, InMemoryLoader) and next(iter(loader))[0].shape == (3, 1, 8, 8)

    with pytest.raises(DataError, match="unknown data set"):
        build_dataset(tmp_path / "nothing-here")


def test_build_dataset_fashion_mnist() -> None:
    _real_fashion()
    info = build_dataset("fashion_mnist", "test")
    assert info.in_memory and info.images.shape == (10000, 1, 28, 28)
    assert info.in_chans == 1 and info.num_classes == 10 and info.mean == FASHION_MNIST_MEAN
    loader = build_loader(info, 256, out_size=28)
    assert len(loader) == 39
