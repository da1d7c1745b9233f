"""``mimkit eval`` on an encoder with a rectangular input (``img_size: [H, W]``, H != W, gh != gw):
every protocol, the resize rule of folders and Fashion-MNIST, the token grids of the dense probe and
the pictures, and a one-line error for an input size the encoder cannot take."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimkit.config import ConfigError
from mimkit.eval.features import normalize_images
from mimkit.eval.protocols import PROTOCOLS, EvalContext, EvalOptions
from mimkit.nn.vit import ViTConfig, ViTEncoder

sys.path.insert(0, str(Path(__file__).parent))
from conftest import needs_fmnist  # noqa: E402
from test_eval_trust import reference_knn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HW = (28, 40)  # patch 4: a 7 x 10 grid


@pytest.fixture(scope="module")
def rect_ckpt(tmp_path_factory) -> Path:
    """A 28x40 MAE checkpoint written by the trainer (one step on 64 Fashion-MNIST images)."""
    from mimkit.config import load_config
    from mimkit.train import pretrain

    out = tmp_path_factory.mktemp("rect") / "run"
    cfg = load_config(ROOT / "configs" / "mae_fashion_mnist.yaml", [
        f"model.encoder.img_size=[{HW[0]},{HW[1]}]", "model.encoder.patch_size=4", "model.encoder.embed_dim=32",
        "model.encoder.depth=1", "model.encoder.num_heads=2", "model.decoder.embed_dim=32", "model.decoder.depth=1",
        "model.decoder.num_heads=2", "train.max_steps=1", "data.limit=64", "data.batch_size=32",
        f"train.out_dir={out}", "eval.knn_train_limit=64", "eval.knn_test_limit=32", "train.progress_bar=false",
        "train.tensorboard=false"])
    pretrain(cfg)
    return out / "checkpoint.pt"


def _two_class_folder(root: Path, n: int = 8, size=(30, 52)) -> Path:
    """Non-square RGB PNGs: horizontal stripes (class ``h``) and vertical stripes (class ``v``)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    h, w = size
    for c in ("h", "v"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            period = 4 + i % 3
            ramp = (torch.arange(h if c == "h" else w) // (period // 2)) % 2
            stripes = ramp[:, None].expand(h, w) if c == "h" else ramp[None, :].expand(h, w)
            img = (stripes * 180 + 30 + torch.randint(0, 40, (h, w), generator=g)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(img.numpy()).convert("RGB").save(root / c / f"{i}.png")
    return root


def test_token_grid_and_input_check():
    from mimkit.nn.adapters import ModuleEncoder, check_input_size, encoder_img_hw, encoder_img_size, token_grid

    enc = ViTEncoder(ViTConfig(img_size=HW, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2))
    assert encoder_img_hw(enc) == HW and encoder_img_size(enc) == HW
    sq = ViTEncoder(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2))
    assert encoder_img_size(sq) == 28 and encoder_img_hw(sq) == (28, 28)
    assert token_grid(enc, 70, HW) == (7, 10)
    assert token_grid(torch.nn.Identity(), 70, HW) == (7, 10)  # no grid_size: from the images' aspect
    assert token_grid(torch.nn.Identity(), 49, (28, 28)) == (7, 7)
    with pytest.raises(ValueError, match="do not form a grid"):
        token_grid(torch.nn.Identity(), 70, (28, 28))
    check_input_size(enc, HW, 1)
    with pytest.raises(ConfigError, match=r"28x28 do not fit the encoder's 28x40 input \(7x10 patches of 4 px\)"):
        check_input_size(enc, (28, 28), 1)
    # a module without a grid, told the wrong size: one blank image shows it, as a one-line error
    wrapped = ModuleEncoder(enc, img_size=28)
    assert wrapped.img_hw == (28, 28)
    with pytest.raises(ConfigError, match="does not take 1x28x28 images") as e:
        EvalContext(wrapped)
    assert "\n" not in str(e.value)
    assert ModuleEncoder(enc).img_hw == HW and ModuleEncoder(enc).img_size == HW  # from the module's img_hw


def test_folder_and_tensor_resize_rules(tmp_path):
    from PIL import Image

    from mimkit.eval.data import adapt_images, center_crop, load_split

    root = _two_class_folder(tmp_path / "imgs", n=3, size=(30, 52))
    x, y, info = load_split(str(root), "train", HW, 1, split_folder=False)
    assert x.shape == (6, 1, *HW) and x.dtype == torch.uint8 and y.tolist() == [0] * 3 + [1] * 3
    assert info["resize"] == "cover 32x46 (aspect kept), centre crop 28x40 (crop_pct 0.875)"
    # reference: scale 30x52 to cover 32x46 (scale max(32/30, 46/52)) -> 32x55, centre 32x46, centre 28x40
    im = Image.open(root / "h" / "0.png").convert("L").resize((55, 32), Image.Resampling.BICUBIC)
    ref = torch.from_numpy(np.asarray(im.crop((4, 0, 50, 32)), dtype=np.uint8).copy())[None, None]
    assert torch.equal(x[:1], center_crop(ref, HW))
    x1, _, info1 = load_split(str(root), "train", HW, 3, split_folder=False, crop_pct=1.0)
    assert x1.shape == (6, 3, *HW) and info1["resize"] == "cover 28x40 (aspect kept), centre crop 28x40"
    # square sizes keep the old rule and wording
    xs, _, infos = load_split(str(root), "train", 28, 1, split_folder=False)
    assert xs.shape == (6, 1, 28, 28) and infos["resize"] == "shorter side to 32, centre crop 28 (crop_pct 0.875)"
    assert torch.equal(load_split(str(root), "train", (28, 28), 1, split_folder=False)[0], xs)
    # tensors (Fashion-MNIST): interpolated to (H, W)
    t = (torch.rand(3, 1, 28, 28) * 255).to(torch.uint8)
    ref = F.interpolate(t.float(), size=HW, mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(adapt_images(t, HW, 1), ref.round().clamp(0, 255).to(torch.uint8))


@needs_fmnist
def test_every_protocol_on_a_rectangular_checkpoint(rect_ckpt, tmp_path, monkeypatch):
    from mimkit.eval import pictures as viz
    from mimkit.eval.attentive import AttentiveProbeConfig
    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.eval.finetune import finetune_preset
    from mimkit.eval.linear import LINEAR_PRESETS
    from mimkit.eval.segmentation import SegProbeConfig

    ck = load_checkpoint_encoder(rect_ckpt)
    enc = ck.encoder
    assert enc.img_hw == HW and enc.grid_size == (7, 10)
    ctx = EvalContext(ck, EvalOptions(limit_train=96, limit_test=32, progress=False, batch_size=64))
    assert ctx.img_hw == HW and ctx.img_size == [28, 40]
    x, y, info = ctx.data("test")
    assert x.shape == (32, 1, *HW) and info["resize"] == "whole image resized to 28x40"

    # features through the eval path == the encoder's own forward on the same resized images
    with torch.no_grad():
        own = enc.forward_features(normalize_images(x, ctx.mean, ctx.std))
    torch.testing.assert_close(ctx.features("test", "cls"), own[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ctx.features("test", "mean"), own[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ctx.tokens("test").float(), own, rtol=2e-3, atol=2e-3)  # float16 cache

    def in_range(res, draws=1):
        """Every accuracy is a whole number of correct images among the 32 test images (few-shot: the mean
        of ``draws`` such numbers): the protocol scored exactly the test split."""
        vals = [v for k, v in res["metrics"].items() if not k.endswith("_std")]
        return vals and all(abs(v * 32 * draws / 100 - round(v * 32 * draws / 100)) < 1e-4 for v in vals)

    knn = PROTOCOLS["knn"](ctx, ks=(5,), k=5)
    assert in_range(knn) and {"knn5_cls", "loo1nn_cls-noLN", "loo1nn_mean-noLN"} <= set(knn["metrics"])
    # by hand: DINO's vote (k = 5) on the encoder's own train features, leave-one-out 1-NN without the final norm
    xtr, ytr, _ = ctx.data("train")
    with torch.no_grad():
        own_tr = enc.forward_features(normalize_images(xtr, ctx.mean, ctx.std))
        raw = enc.forward_features(normalize_images(x, ctx.mean, ctx.std), norm=False)
    votes = reference_knn(own_tr[:, 0], ytr.numpy(), own[:, 0], 5, 0.07, ctx.num_classes())
    assert knn["metrics"]["knn5_cls"] == pytest.approx(100 * np.mean(votes.argmax(1) == y.numpy()))
    rn = F.normalize(raw[:, 0], dim=1)
    nearest = (rn @ rn.T).fill_diagonal_(-2.0).argmax(1)
    assert knn["metrics"]["loo1nn_cls-noLN"] == pytest.approx(100 * float((y[nearest] == y).float().mean()))
    lin = replace(LINEAR_PRESETS["small"], epochs=2, warmup_epochs=0.2)
    assert in_range(PROTOCOLS["linear"](ctx, cfg=lin))
    seen = []  # the augmented probe's random-resized crops come back at (H, W)
    from mimkit.data import augment

    real = augment.random_resized_crop_flip

    def crop(*a, **k):
        out = real(*a, **k)
        seen.append(tuple(out.shape[-2:]))
        return out

    monkeypatch.setattr(augment, "random_resized_crop_flip", crop)
    assert in_range(PROTOCOLS["linear"](ctx, cfg=lin, augment=True)) and set(seen) == {HW}
    seen.clear()
    ft = PROTOCOLS["finetune"](ctx, cfg=finetune_preset("small", epochs=1, batch_size=32, warmup_epochs=0.1))
    assert in_range(ft) and set(seen) == {HW}
    monkeypatch.undo()
    att = PROTOCOLS["attentive"](ctx, cfg=AttentiveProbeConfig(epochs=2, warmup_epochs=0.2))
    assert in_range(att)
    few = PROTOCOLS["fewshot"](ctx, shots=2, draws=2)
    assert in_range(few, draws=2) and all(in_range({"metrics": {"a": a}}) for a in few["pools"]["mean"]["accs"])
    diag = PROTOCOLS["diagnostics"](ctx, k=5)
    # Sim by hand: mean cosine over all pairs of patch tokens (no cls, no final norm), averaged over images
    pn = F.normalize(raw[:, 1:], dim=-1)
    assert diag["metrics"]["sim"] == pytest.approx(float((pn @ pn.transpose(1, 2)).mean()), abs=2e-3)  # fp16 cache
    # effective rank by hand: exp(entropy) of the normalised singular values of the centred cls features
    sv = torch.linalg.svdvals((own[:, 0] - own[:, 0].mean(0)).double())
    p = sv / sv.sum()
    assert diag["metrics"]["erank_cls"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)

    grids = []
    real_pca = viz.pca_rgb
    monkeypatch.setattr(viz, "pca_rgb", lambda t, g=None: grids.append(tuple(real_pca(t, g).shape)) or real_pca(t, g))
    pics = PROTOCOLS["pictures"](ctx, out_dir=tmp_path / "pics", n_show=3, tsne_n=20)
    assert grids == [(3, 7, 10, 3)]
    assert set(pics["files"]) == {"pca", "attention", "tsne"} and all(Path(f).stat().st_size > 1000
                                                                      for f in pics["files"].values())
    maps = viz.cls_attention(enc, normalize_images(x[:3], ctx.mean, ctx.std))
    captured = {}
    with torch.no_grad():
        enc.run_blocks(enc.with_cls(enc.patch_tokens(normalize_images(x[:3], ctx.mean, ctx.std))),
                       attn_callback=lambda i, a: captured.__setitem__(i, a))
    torch.testing.assert_close(maps, captured[0][:, :, 0, 1:].mean(1).reshape(3, 7, 10), rtol=1e-5, atol=1e-6)

    seg_ctx = EvalContext(ck, EvalOptions(limit_train=24, limit_test=8, progress=False))
    seg = PROTOCOLS["segmentation"](seg_ctx, cfg=SegProbeConfig(epochs=2, batch_size=8))
    assert seg["grid"] == [7, 10] and seg["num_classes"] == 11 and len(seg["per_class_iou"]) == 11
    # mIoU: the mean over the classes present (a class with an empty union is NaN and left out)
    assert seg["metrics"]["miou_patches"] == pytest.approx(np.nanmean(seg["per_class_iou"]))
    assert "resized to 28x40" in seg["data"]["source"]


def test_segmentation_folder_and_patch_grid_on_a_rectangle(tmp_path):
    from PIL import Image

    from mimkit.eval.segmentation import load_segmentation_folder, patch_grid

    for sub in ("training", "validation"):
        (tmp_path / "images" / sub).mkdir(parents=True)
        (tmp_path / "annotations" / sub).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((30, 50), 100 + i, np.uint8)).save(tmp_path / "images" / sub / f"{i}.png")
            mask = np.zeros((30, 50), np.uint8)
            mask[:, 25:] = 2
            Image.fromarray(mask).save(tmp_path / "annotations" / sub / f"{i}.png")
    x, m = load_segmentation_folder(tmp_path, "train", HW, 1)
    assert x.shape == (2, 1, *HW) and m.shape == (2, *HW)
    assert (m[:, :, :20] == 255).all() and (m[:, :, 20:] == 1).all()  # 0 ignored, 2 -> 1, split at W / 2
    enc = ViTEncoder(ViTConfig(img_size=HW, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)).eval()
    g = patch_grid(enc, x, (0.5,), (0.5,))
    with torch.no_grad():
        own = enc.forward_features(normalize_images(x, (0.5,), (0.5,)))[:, 1:]
    assert g.shape == (2, 16, 7, 10)
    torch.testing.assert_close(g[:, :, 2, 3].float(), own[:, 2 * 10 + 3], rtol=2e-3, atol=2e-3)  # row-major


def test_cli_evaluates_a_folder_of_non_square_images(tmp_path, capsys):
    from mimkit.cli import main

    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(img_size=HW, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2))
    cfg = {"model": {"encoder": {"img_size": list(HW), "patch_size": 4, "in_chans": 1, "embed_dim": 16,
                                 "depth": 1, "num_heads": 2}}, "data": {"mean": [0.4], "std": [0.3]}}
    ckpt = tmp_path / "rect.pt"
    torch.save({"model": {"encoder." + k: v for k, v in enc.state_dict().items()}, "config": cfg, "step": 3}, ckpt)
    root = _two_class_folder(tmp_path / "imgs", n=8, size=(36, 60))
    out = tmp_path / "out"
    assert main(["eval", "knn", str(ckpt), "--dataset", str(root), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    res = json.loads((out / "knn.json").read_text())
    assert res["setup"]["img_size"] == [28, 40] and res["setup"]["n_train"] + res["setup"]["n_test"] == 16
    assert res["setup"]["train_data"]["resize"] == "cover 32x46 (aspect kept), centre crop 28x40 (crop_pct 0.875)"
    # by hand on the same split: the saved encoder on images scaled by the checkpoint's mean 0.4 / std 0.3,
    # DINO's vote at k = 10 and leave-one-out 1-NN without the final norm (stripes: both must be 100 %)
    ctx = EvalContext(enc.eval(), EvalOptions(dataset=str(root), progress=False))
    (xtr, ytr, _), (xte, yte, _) = ctx.data("train"), ctx.data("test")
    with torch.no_grad():
        tr, te = (enc.forward_features((v.float() / 255 - 0.4) / 0.3) for v in (xtr, xte))
        raw = F.normalize(enc.forward_features((xte.float() / 255 - 0.4) / 0.3, norm=False)[:, 0], dim=1)
    votes = reference_knn(tr[:, 0], ytr.numpy(), te[:, 0], 10, 0.07, 2)
    nearest = (raw @ raw.T).fill_diagonal_(-2.0).argmax(1)
    assert res["metrics"]["knn10_cls"] == pytest.approx(100 * np.mean(votes.argmax(1) == yte.numpy())) == 100.0
    assert res["metrics"]["loo1nn_cls-noLN"] == pytest.approx(100 * float((yte[nearest] == yte).float().mean()))
    assert main(["eval", "fewshot", str(ckpt), "--dataset", str(root), "--shots", "2", "--draws", "2", "--out",
                 str(out), "--device", "cpu", "--no-progress"]) == 0
    few = json.loads((out / "fewshot.json").read_text())
    accs, n_test = few["pools"]["mean"]["accs"], res["setup"]["n_test"]
    assert len(accs) == 2 and few["metrics"]["fewshot2_mean"] == pytest.approx(np.mean(accs))
    assert all(abs(a * n_test / 100 - round(a * n_test / 100)) < 1e-4 for a in accs)  # whole test images
    # the setup block of a report names the rectangle
    from mimkit.eval.report import setup_markdown

    assert "encoder input 28x40 px" in setup_markdown([{"setup": res["setup"], "results": {}}], ["knn"])
