"""Dense transfer (linear segmentation probe, mIoU) and token pictures."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from mimkit.nn import ViTConfig, ViTEncoder


def garments(n=40, size=28, seed=0):
    """Stand-in garments: a filled square whose side depends on the class (no data set needed)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        s = 6 + c
        images[i, 0, 2 : 2 + s, 3 : 3 + s] = 200
    return images, labels


def test_canvas_set_pastes_garments_with_their_labels():
    from mimkit.eval.segmentation import make_canvas_set

    src, lab = garments()
    x, m = make_canvas_set(5, canvas=56, objects=2, seed=1, images=src, labels=lab)
    assert x.shape == (5, 1, 56, 56) and m.shape == (5, 56, 56) and x.dtype == torch.uint8
    assert set(m.unique().tolist()) <= set(range(1, 12)) and (m == 1).any()
    assert torch.equal(x[:, 0] > 40, m > 1)  # labelled exactly where a garment is bright
    # the last pasted garment is on top: its whole bright square carries its label
    g = torch.Generator().manual_seed(1)
    pick = torch.randint(0, len(src), (5, 2), generator=g)
    pos = torch.randint(0, 56 - 28 + 1, (5, 2, 2), generator=g)
    i = 0
    y0, x0 = pos[i, 1].tolist()
    c = int(lab[pick[i, 1]])
    s = 6 + c
    assert (m[i, y0 + 2 : y0 + 2 + s, x0 + 3 : x0 + 3 + s] == 2 + c).all()


def test_miou_by_hand():
    from mimkit.eval.segmentation import IGNORE, confusion_matrix, miou

    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, target, 4)
    assert conf.sum() == 7 and conf[0, 1] == 1 and conf[2, 0] == 1
    res = miou(conf)
    # class 0: tp 1, fp 1 (a 2 read as 0), fn 1 -> 1/3; class 1: tp 3, fp 1 -> 3/4; class 2: tp 1, fn 1 -> 1/2
    assert res["miou"] == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert np.isnan(res["per_class_iou"][3]) and res["pixel_acc"] == pytest.approx(100 * 5 / 7)


def test_ade_layout_folder_and_reduce_zero_label(tmp_path):
    from PIL import Image

    from mimkit.errors import DataError
    from mimkit.eval.segmentation import load_segmentation_folder

    for sub in ("training", "validation"):
        (tmp_path / "images" / sub).mkdir(parents=True)
        (tmp_path / "annotations" / sub).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(tmp_path / "images" / sub / f"{i}.jpg")
            mask = np.zeros((16, 16), np.uint8)
            mask[:, 8:] = 3
            Image.fromarray(mask).save(tmp_path / "annotations" / sub / f"{i}.png")
    x, m = load_segmentation_folder(tmp_path, "train", 8, 3)
    assert x.shape == (2, 3, 8, 8) and m.shape == (2, 8, 8)
    assert (m[:, :, :4] == 255).all() and (m[:, :, 4:] == 2).all()  # 0 -> ignored, 3 -> 2
    (tmp_path / "annotations" / "validation" / "1.png").unlink()
    with pytest.raises(DataError, match="has no annotation"):
        load_segmentation_folder(tmp_path, "test", 8, 3)
    with pytest.raises(DataError, match="ADE20K's layout"):
        load_segmentation_folder(tmp_path / "images", "train", 8, 3)


def test_linear_segmentation_probe_learns_from_informative_tokens():
    """Patch tokens that encode the pixel class: the probe must segment far above a constant guess."""
    from mimkit.eval.segmentation import SegProbeConfig, segmentation_linear_probe

    class Oracle(torch.nn.Module):  # tokens = class one-hot of each 4x4 patch's majority pixel, plus noise
        num_prefix_tokens, has_class_token, embed_dim, pool_norm = 1, True, 8, None

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward_features(self, x, norm=True, block=None):
            inten = x[:, 0].unfold(1, 4, 4).unfold(2, 4, 4).mean((-1, -2))  # (B, 4, 4)
            cls = (inten > 0).long() + (inten > 1).long()
            tok = torch.nn.functional.one_hot(cls.flatten(1), 8).float() * 3 + 0.1 * torch.randn(*cls.flatten(1).shape, 8)
            return torch.cat([torch.zeros(len(x), 1, 8), tok], 1)

    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (60, 4, 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    images = (masks * 100 + 20).to(torch.uint8)[:, None]
    res = segmentation_linear_probe(Oracle(), images[:40], masks[:40], images[40:], masks[40:], 3,
                                    SegProbeConfig(epochs=30, batch_size=8, lr=5e-2), mean=(0.3,), std=(0.3,))
    assert res["miou"] > 80 and res["grid"] == [4, 4]
    from mimkit.errors import DataError

    with pytest.raises(DataError, match="outside 0..1"):
        segmentation_linear_probe(Oracle(), images[:8], masks[:8], images[:8], masks[:8], 2, SegProbeConfig(epochs=1))


def test_cli_segmentation_on_generated_canvases(tmp_path):
    from mimkit.eval.cli import register

    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2))
    ckpt = tmp_path / "c.pt"
    torch.save({"model": {"encoder." + k: v for k, v in enc.state_dict().items()},
                "config": {"model": {"encoder": dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1,
                                                     num_heads=2)}}}, ckpt)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["eval", "segmentation", str(ckpt), "--limit-train", "40", "--limit-test", "10",
                              "--epochs", "2", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    res = json.loads((out / "segmentation.json").read_text())
    assert 0 < res["metrics"]["miou_patches"] <= 100 and res["num_classes"] == 11 and res["grid"] == [7, 7]
    assert res["data"]["n_train"] == 40


def test_token_pictures_and_attention_equal_the_blocks_own(tmp_path):
    from mimkit.eval.pictures import cls_attention, pca_rgb, save_token_pictures

    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2)).eval()
    x = torch.randn(3, 1, 28, 28)
    maps = cls_attention(enc, x)
    captured = {}  # the block's own attention weights (mimkit's attn_callback hook)
    with torch.no_grad():
        enc.run_blocks(enc.with_cls(enc.patch_tokens(x)), attn_callback=lambda i, a: captured.__setitem__(i, a))
    ref = captured[len(enc.blocks) - 1][:, :, 0, 1:].mean(1).reshape(3, 4, 4)
    torch.testing.assert_close(maps, ref, rtol=1e-5, atol=1e-6)
    assert maps.shape == (3, 4, 4) and (maps.sum((1, 2)) < 1).all()  # the rest goes to the class token
    rgb = pca_rgb(torch.randn(2, 16, 32))
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() == 0 and rgb.max() == 1
    images = (torch.rand(30, 1, 28, 28) * 255).to(torch.uint8)
    files = save_token_pictures(enc, images, torch.arange(30) % 3, (0.3,), (0.3,), tmp_path, n_show=3)
    assert set(files) == {"pca", "attention", "tsne"} and all(f.stat().st_size > 1000 for f in files.values())
