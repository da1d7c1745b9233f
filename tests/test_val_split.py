"""``--val-split``: a validation split carved out of the training split, for choosing settings without
ever reading the test split."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mimkit.data
from mimkit.errors import ConfigError, DataError
from mimkit.eval.data import load_split
from mimkit.eval.protocols import EvalContext, EvalOptions
from mimkit.nn import ViTEncoder

ROOT = Path(__file__).resolve().parents[1]


def _indexed_fashion(n: int = 600):
    """Stand-in for Fashion-MNIST's training split: image i carries i in its first two pixels, labels
    i % 10; reading the test split fails (the validation split must not touch it)."""
    idx = torch.arange(n)
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (idx // 256).to(torch.uint8), (idx % 256).to(torch.uint8)
    labels = idx % 10

    def load(root=None, split="train"):
        if split != "train":
            raise AssertionError(f"the {split} split was read")
        return images.clone(), labels.clone()

    return load


def _ids(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()


@pytest.mark.parametrize("val_split, n_val", [(120, 120), (0.25, 150)])
def test_fashion_mnist_validation_is_a_stratified_part_of_train_and_test_is_never_read(monkeypatch, val_split, n_val):
    monkeypatch.setattr(mimkit.data, "load_fashion_mnist", _indexed_fashion(600))
    tr_x, tr_y, tr_info = load_split("fashion_mnist", "train", 28, 1, val_split=val_split, seed=3)
    va_x, va_y, va_info = load_split("fashion_mnist", "test", 28, 1, val_split=val_split, seed=3)
    tr_ids, va_ids = _ids(tr_x), _ids(va_x)
    assert len(va_ids) == n_val and len(tr_ids) == 600 - n_val
    assert set(tr_ids.tolist()).isdisjoint(va_ids.tolist())
    assert sorted(tr_ids.tolist() + va_ids.tolist()) == list(range(600))  # nothing lost, nothing doubled
    assert torch.equal(tr_y, tr_ids % 10) and torch.equal(va_y, va_ids % 10)  # labels travel with their images
    assert torch.bincount(va_y, minlength=10).tolist() == [n_val // 10] * 10  # stratified
    assert va_info["split"].startswith("validation") and "test split is not read" in va_info["split_rule"]
    assert f"{n_val} of the 600 training images held out" in va_info["split_rule"]
    # the held-out images do not move with --seed (probe seeds, subsets): one validation set per data set
    other = _ids(load_split("fashion_mnist", "test", 28, 1, val_split=val_split, seed=4)[0])
    assert torch.equal(other, va_ids)
    # --limit-test subsets the validation part (seeded by --seed), never reaching outside it
    lim = _ids(load_split("fashion_mnist", "test", 28, 1, limit=30, val_split=val_split, seed=3)[0])
    lim4 = _ids(load_split("fashion_mnist", "test", 28, 1, limit=30, val_split=val_split, seed=4)[0])
    assert len(lim) == 30 and set(lim.tolist()) <= set(va_ids.tolist()) and not torch.equal(lim, lim4)


def test_a_count_is_held_out_exactly_and_every_class_keeps_an_image(monkeypatch):
    """Per-class rounding must not change the count, and no class may be emptied from the fitting part."""
    monkeypatch.setattr(mimkit.data, "load_fashion_mnist", _indexed_fashion(600))  # 60 per class
    for n in (1, 7, 583, 590):
        tr_y = load_split("fashion_mnist", "train", 28, 1, val_split=n)[1]
        va_y = load_split("fashion_mnist", "test", 28, 1, val_split=n)[1]
        assert len(va_y) == n and len(tr_y) == 600 - n
        counts = torch.bincount(va_y, minlength=10)
        assert int(counts.max() - counts.min()) <= 1  # in proportion (equal classes: within one image)
        assert torch.bincount(tr_y, minlength=10).min() >= 1
    for bad in (591, 599):  # 600 - 10: every class keeps one
        with pytest.raises(DataError, match="hold out between 1 and 590"):
            load_split("fashion_mnist", "test", 28, 1, val_split=bad)


def test_uneven_classes_are_held_out_in_proportion(tmp_path):
    _folder(tmp_path / "train", {"a": 2, "b": 40, "c": 18})
    spec = str(tmp_path)
    for val, expect in ((0.75, [1, 30, 14]), (30, [1, 20, 9]), (3, [0, 2, 1])):
        va = load_split(spec, "test", 12, 1, crop_pct=1.0, val_split=val)[1]
        tr = load_split(spec, "train", 12, 1, crop_pct=1.0, val_split=val)[1]
        assert torch.bincount(va, minlength=3).tolist() == expect, val
        assert torch.bincount(tr, minlength=3).min() >= 1


def _folder(root: Path, classes: dict[str, int], start: int = 0) -> None:
    """``classes`` name -> image count; image j of the folder has grey level start + j (its id)."""
    j = start
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for _ in range(n):
            Image.fromarray(np.full((12, 12), j, np.uint8)).save(root / name / f"{j}.png")
            j += 1


def _grey(images: torch.Tensor) -> list[int]:
    return images[:, 0, 6, 6].tolist()


def test_folder_validation_comes_from_train_and_a_mismatched_test_folder_is_not_read(tmp_path):
    _folder(tmp_path / "train", {"a": 20, "b": 10, "c": 30})
    _folder(tmp_path / "test", {"a": 2, "zz": 3}, start=200)  # a class train lacks: an error if it were read
    spec = str(tmp_path)
    with pytest.raises(DataError, match="zz"):
        load_split(spec, "test", 12, 1, crop_pct=1.0, class_names=["a", "b", "c"])
    tr = load_split(spec, "train", 12, 1, crop_pct=1.0, val_split=0.2)
    va = load_split(spec, "test", 12, 1, crop_pct=1.0, val_split=0.2, class_names=tr[2]["classes"])
    assert torch.bincount(va[1], minlength=3).tolist() == [4, 2, 6]  # 20 % of every class
    assert sorted(_grey(tr[0]) + _grey(va[0])) == list(range(60)) and max(_grey(va[0])) < 200
    assert va[2]["folder"] == str(tmp_path / "train")
    # the labels of each held-out image are its own folder's
    for grey, label in zip(_grey(va[0]), va[1].tolist(), strict=True):
        assert label == (0 if grey < 20 else 1 if grey < 30 else 2)


def test_one_folder_validation_is_cut_from_its_80_percent_train_part(tmp_path):
    _folder(tmp_path / "all", {"a": 50, "b": 50})
    spec = str(tmp_path / "all")
    test = set(_grey(load_split(spec, "test", 12, 1, crop_pct=1.0)[0]))
    train = set(_grey(load_split(spec, "train", 12, 1, crop_pct=1.0)[0]))
    tr = set(_grey(load_split(spec, "train", 12, 1, crop_pct=1.0, val_split=20)[0]))
    va = set(_grey(load_split(spec, "test", 12, 1, crop_pct=1.0, val_split=20)[0]))
    assert len(va) == 20 and tr | va == train and not tr & va and not va & test


def test_impossible_validation_sizes_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(mimkit.data, "load_fashion_mnist", _indexed_fashion(600))
    for bad in (600, 5000):
        with pytest.raises(DataError, match=r"--val-split .*600 training images in 10 classes; hold out between 1 "
                                            r"and 590") as e:
            load_split("fashion_mnist", "test", 28, 1, val_split=bad)
        assert "\n" not in str(e.value)
    from mimkit.eval.cli import _val_split

    assert _val_split("10000") == 10000 and isinstance(_val_split("10000"), int) and _val_split("0.1") == 0.1
    for text in ("0", "1.5", "-3", "ten", "1.0e9x", "inf", "1e400", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            _val_split(text)


def test_val_split_and_test_dataset_contradict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mimkit.cli", "eval", "knn", str(tmp_path / "none.pt"), "--val-split",
                           "100", "--test-dataset", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode != 0
    assert "--val-split 100 with --test-dataset" in proc.stderr and "give one of them" in proc.stderr
    enc = ViTEncoder(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match="give one of them"):  # also through the Python API
        EvalContext(enc, EvalOptions(val_split=100, test_dataset=str(tmp_path), progress=False))


def test_the_segmentation_probe_refuses_a_validation_split():
    from mimkit.eval.protocols import run_segmentation

    enc = ViTEncoder(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    ctx = EvalContext(enc, EvalOptions(val_split=0.1, progress=False))
    with pytest.raises(ConfigError, match="segmentation probe .* drop --val-split"):
        run_segmentation(ctx)


def test_pretraining_reads_no_test_split_when_nothing_measures_on_it(monkeypatch):
    """The zoo's validation runs: with the end-of-run kNN, periodic kNN and picture off, the trainer does
    not read the test split at all; with the kNN on it does."""
    import mimkit.data.loaders
    from mimkit.config import load_config
    from mimkit.train.data import build_train_data
    from mimkit.train.distributed import DistInfo
    from tests.conftest import TINY_RUN

    monkeypatch.setattr(mimkit.data.loaders, "load_fashion_mnist", _indexed_fashion(600))
    cfg = load_config(ROOT / "configs/mae_fashion_mnist.yaml", [*TINY_RUN, "data.batch_size=8"])
    data = build_train_data(cfg, DistInfo())
    assert data.test_images is None and data.train_images is not None
    cfg = load_config(ROOT / "configs/mae_fashion_mnist.yaml", [*TINY_RUN, "data.batch_size=8", "eval.knn_at_end=true"])
    with pytest.raises(AssertionError, match="the test split was read"):
        build_train_data(cfg, DistInfo())


def test_knn_on_the_validation_split_votes_for_the_held_out_images(monkeypatch):
    """The protocols see the held-out images as their test split: kNN through the context equals a hand
    kNN (cosine, k=5, exp(sim/0.07) votes) between the two parts."""
    monkeypatch.setattr(mimkit.data, "load_fashion_mnist", _indexed_fashion(400))
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    ctx = EvalContext(enc, EvalOptions(val_split=100, progress=False))
    ctx.check_classes()  # no test folder is consulted
    from mimkit.eval.protocols import run_knn

    res = run_knn(ctx, k=5, ks=(5,))
    assert ctx.describe()["n_test"] == 100 and ctx.describe()["n_train"] == 300
    held = _ids(ctx.data("test")[0])
    assert len(set(held.tolist())) == 100 and set(held.tolist()).isdisjoint(_ids(ctx.data("train")[0]).tolist())
    tr = torch.nn.functional.normalize(ctx.features("train", "cls"), dim=1)
    te = torch.nn.functional.normalize(ctx.features("test", "cls"), dim=1)
    sim, nn_idx = (te @ tr.T).topk(5, dim=1)
    votes = torch.zeros(100, 10).scatter_add_(1, ctx.labels("train")[nn_idx], (sim / 0.07).exp())
    by_hand = 100 * (votes.argmax(1) == held % 10).float().mean().item()
    assert res["metrics"]["knn5_cls"] == pytest.approx(by_hand, abs=1e-4)
