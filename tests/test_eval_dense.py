"""Dense transfer (linear segmentation probe, mIoU) and token pictures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def test_native_canvases_by_hand_and_deterministic():
    """Canvas = garment size: every garment at the origin; one garment is itself (dim pixels dropped),
    two overlay (the later one's bright pixels on top). Hand-written 4x4 images and masks."""
    from mimkit.eval.segmentation import make_canvas_set

    a = torch.tensor([[0, 100, 100, 0], [0, 100, 100, 0], [0, 100, 30, 0], [0, 0, 0, 0]], dtype=torch.uint8)
    b = torch.tensor([[200, 0, 0, 0], [200, 0, 0, 0], [200, 200, 200, 200], [0, 0, 0, 0]], dtype=torch.uint8)
    src, lab = torch.stack([a, b])[:, None], torch.tensor([3, 7])  # raw labels: A -> 5, B -> 9, background 1
    x, m = make_canvas_set(4, canvas=4, objects=1, seed=0, images=src[:1], labels=lab[:1])
    assert torch.equal(x[:, 0], torch.tensor([[0, 100, 100, 0], [0, 100, 100, 0], [0, 100, 0, 0], [0] * 4],
                                             dtype=torch.uint8).expand(4, 4, 4))
    assert torch.equal(m, torch.tensor([[1, 5, 5, 1], [1, 5, 5, 1], [1, 5, 1, 1], [1] * 4]).expand(4, 4, 4))
    top = [200, 100, 100, 0]
    expect = {  # (lower, upper) -> (image, mask)
        "AA": ([[0, 100, 100, 0], [0, 100, 100, 0], [0, 100, 0, 0], [0] * 4],
               [[1, 5, 5, 1], [1, 5, 5, 1], [1, 5, 1, 1], [1] * 4]),
        "BB": (b.tolist(), [[9, 1, 1, 1], [9, 1, 1, 1], [9] * 4, [1] * 4]),
        "AB": ([top, top, [200] * 4, [0] * 4], [[9, 5, 5, 1], [9, 5, 5, 1], [9] * 4, [1] * 4]),
        "BA": ([top, top, [200, 100, 200, 200], [0] * 4], [[9, 5, 5, 1], [9, 5, 5, 1], [9, 5, 9, 9], [1] * 4]),
    }
    x, m = make_canvas_set(16, canvas=4, objects=2, seed=3, images=src, labels=lab)
    seen = set()
    for i in range(16):
        hit = [k for k, (im, mk) in expect.items() if torch.equal(x[i, 0], torch.tensor(im, dtype=torch.uint8))]
        assert len(hit) == 1, x[i, 0]
        assert torch.equal(m[i], torch.tensor(expect[hit[0]][1])), (hit, m[i])
        seen.add(hit[0])
    assert {"AB", "BA"} <= seen  # both stacking orders occur in this draw
    x2, m2 = make_canvas_set(16, canvas=4, objects=2, seed=3, images=src, labels=lab)
    assert torch.equal(x, x2) and torch.equal(m, m2)  # deterministic by seed
    x3, _ = make_canvas_set(16, canvas=4, objects=2, seed=4, images=src, labels=lab)
    assert not torch.equal(x, x3)


def test_canvas_probe_set_layouts():
    from mimkit.eval.segmentation import CANVAS_LAYOUTS, canvas_probe_set, make_canvas_set

    src, lab = garments()
    x, m = canvas_probe_set(6, "train", 2, 28, 1, "native", images=src, labels=lab)
    rx, rm = make_canvas_set(6, 28, 1, seed=2, images=src, labels=lab)
    assert torch.equal(x, rx) and torch.equal(m, rm - 1)  # unresized, masks 0 = background, 1 + c = class c
    assert set(m.unique().tolist()) <= set(range(11)) and (m == 0).any()
    x, m = canvas_probe_set(6, "train", 2, 14, 3, "scatter", images=src, labels=lab)  # 56 px canvas -> 14 px
    assert x.shape == (6, 3, 14, 14) and m.shape == (6, 14, 14)
    _, rm = make_canvas_set(6, 56, 3, seed=2, images=src, labels=lab)
    assert torch.equal(m, rm[:, ::4, ::4] - 1)  # nearest neighbour
    assert CANVAS_LAYOUTS["overlap"] == (28, 2)
    with pytest.raises(ValueError, match="choose one of native"):
        canvas_probe_set(2, "train", 0, 28, 1, "tiles", images=src, labels=lab)


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


def test_reported_miou_is_the_returned_heads_iou_counted_by_hand():
    """The mIoU, per-class IoU and pixel accuracy the probe reports are those of its returned head's
    predictions on the test grids, counted here pixel by pixel (ignored pixels left out)."""
    from mimkit.eval.segmentation import SegProbeConfig, probe_grids

    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 3, (50, 4, 4), generator=g)
    masks = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (50, 8, 8): 2x2 pixels per token
    masks[45:, 0] = 255  # an ignored row in some test masks
    grids = torch.nn.functional.one_hot(coarse, 4).permute(0, 3, 1, 2).float()
    grids = grids + 0.9 * torch.randn(grids.shape, generator=g)  # noisy tokens: an imperfect probe
    res = probe_grids(grids[:40], masks[:40], grids[40:], masks[40:], 3, SegProbeConfig(epochs=3, batch_size=8,
                                                                                         lr=5e-2))
    with torch.no_grad():
        pred = res["head"](grids[40:], (8, 8)).argmax(1)
    target, valid = masks[40:], masks[40:] != 255
    ious = []
    for c in range(3):
        inter = int(((pred == c) & (target == c) & valid).sum())
        union = int((((pred == c) | (target == c)) & valid).sum())
        ious.append(100.0 * inter / union)
    assert res["per_class_iou"] == pytest.approx(ious) and res["miou"] == pytest.approx(sum(ious) / 3)
    assert res["pixel_acc"] == pytest.approx(100.0 * int(((pred == target) & valid).sum()) / int(valid.sum()))
    assert 30 < res["miou"] < 99  # learned something, and not a foregone number


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
    assert res["data"]["n_train"] == 40 and res["data"]["n_test"] == 10
    # the default is the layout that measures something (one garment per 28 px canvas), not the scatter one
    assert "layout native (28 px, 1 garment, resized to 28)" in res["data"]["source"]
    args = parser.parse_args(["eval", "segmentation", str(ckpt), "--limit-train", "40", "--limit-test", "10",
                              "--epochs", "1", "--out", str(out), "--no-progress", "--canvas-layout", "scatter"])
    assert args.func(args) == 0
    res = json.loads((out / "segmentation.json").read_text())
    assert "layout scatter (56 px, 3 garments, resized to 28)" in res["data"]["source"]
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "segmentation", str(ckpt), "--canvas-layout", "grid"])


def test_token_pictures_and_attention_equal_the_blocks_own(tmp_path, monkeypatch):
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
    from matplotlib.figure import Figure

    titles, save = {}, Figure.savefig

    def titled_save(fig, path, *a, **k):  # every picture says what it shows
        sup = fig._suptitle.get_text() if fig._suptitle is not None else ""
        titles[Path(path).stem] = sup or " ".join(ax.get_title() for ax in fig.axes).strip()
        return save(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", titled_save)
    files = save_token_pictures(enc, images, torch.arange(30) % 3, (0.3,), (0.3,), tmp_path, n_show=3)
    assert set(files) == {"pca", "attention", "tsne"} and all(f.stat().st_size > 1000 for f in files.values())
    assert "principal components" in titles["pca"] and "class-token attention" in titles["attention"]
    assert titles["tsne"].startswith("t-SNE")
