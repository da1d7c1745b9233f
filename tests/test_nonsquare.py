"""Non-square images (``img_size: [H, W]``) and odd channel counts through the encoder, masking, every
method, the data pipeline and the trainer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mimkit.config import ConfigError, load_config, validate
from mimkit.masking import BlockMasking, build_mask_generator
from mimkit.methods import METHODS
from mimkit.nn.pos_embed import sincos_2d
from mimkit.nn.vit import ViTConfig, ViTEncoder, grid_of
from mimkit.train.loop import build_method

sys.path.insert(0, str(Path(__file__).parent))
from conftest import needs_fmnist  # noqa: E402
from golden_curves import ROOT  # noqa: E402

# 20 x 36 pixels, patch 4: a 5 x 9 grid (H != W, both odd so a transposed grid cannot fit)
HW = [20, 36]
TINY = ["model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
        "model.decoder.embed_dim=32", "model.decoder.depth=1", "model.decoder.num_heads=2",
        f"model.encoder.img_size=[{HW[0]},{HW[1]}]", "model.encoder.patch_size=4"]


def test_encoder_grid_and_positions_follow_a_rectangle():
    enc = ViTEncoder(ViTConfig(img_size=(20, 36), patch_size=4, in_chans=5, embed_dim=16, depth=1, num_heads=2))
    assert enc.grid_size == (5, 9) and enc.num_patches == 45
    # 2-D sin-cos of the 5 x 9 grid, row-major: column code first half, row code second half
    assert torch.equal(enc.pos_embed[0], sincos_2d(16, 5, 9, cls_token=True))
    table = enc.pos_embed[0, 1:].reshape(5, 9, 16)
    assert torch.allclose(table[0, :, :8], table[4, :, :8]) and not torch.allclose(table[:, 0, :8], table[:, 1, :8])
    assert torch.allclose(table[:, 0, 8:], table[:, 8, 8:]) and not torch.allclose(table[0, :, 8:], table[1, :, 8:])
    x = torch.randn(2, 5, 20, 36)
    out, inter = enc.forward_intermediates(x, indices=1)
    assert out.shape == (2, 46, 16) and inter[0].shape == (2, 16, 5, 9)
    with pytest.raises(ValueError, match="does not match the encoder's 20x36"):
        enc(torch.randn(2, 5, 36, 20))
    with pytest.raises(ValueError, match="not divisible"):
        grid_of((20, 30), 4)


def test_encoder_matches_timm_on_a_rectangle():
    from mimkit.interop import timm_model_for

    cfg = ViTConfig(img_size=(8, 20), patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2)
    enc = ViTEncoder(cfg).eval()
    model = timm_model_for(cfg).eval()
    model.load_state_dict(enc.state_dict())
    x = torch.randn(2, 3, 8, 20)
    assert torch.allclose(model.forward_features(x), enc(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["random", "block", "partition", "random_views", "complementary", "sbam"])
def test_masking_kinds_on_a_rectangular_grid(kind):
    from mimkit.masking import MASKING_KINDS, MaskingOptions

    assert kind in MASKING_KINDS
    gen = build_mask_generator(MaskingOptions(kind=kind, ratio=0.6, num_views=3))
    enc = ViTEncoder(ViTConfig(img_size=(20, 36), patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2))
    from mimkit.methods.base import draw_plan

    plan = draw_plan(gen, enc, torch.randn(4, 1, 20, 36), generator=torch.Generator().manual_seed(0))
    plan.validate()
    assert plan.mask.shape == (4 * plan.num_views, 45)
    assert plan.ids_restore.shape == (4 * plan.num_views, 45)


def test_block_masking_places_rectangles_on_an_h_ne_w_grid():
    from mimkit.masking import BlockOptions

    gen = BlockMasking(0.5, BlockOptions(min_patches=4, min_aspect=0.3))
    g = torch.Generator().manual_seed(3)
    m = gen.boolean_mask(64, (5, 9), generator=g)
    assert m.shape == (64, 45)
    assert gen.num_masked(45) == 23 and torch.all(m.sum(1) == 23)  # exact count: 45 - floor(45 * 0.5)
    grid = m.reshape(64, 5, 9)

    def masked_neighbours(g):  # mean count of masked 4-neighbours of a masked cell
        f = g.float()
        n = torch.zeros_like(f)
        n[:, 1:] += f[:, :-1]
        n[:, :-1] += f[:, 1:]
        n[:, :, 1:] += f[:, :, :-1]
        n[:, :, :-1] += f[:, :, 1:]
        return float((n * f).sum() / f.sum())

    rand = torch.zeros(64, 45, dtype=torch.bool)
    rand.scatter_(1, torch.rand(64, 45, generator=g).argsort(1)[:, :23], True)
    # blocks: masked cells cluster (about 2.5 masked neighbours) far above a random mask of the same count (~1.6)
    assert masked_neighbours(grid) > masked_neighbours(rand.reshape(64, 5, 9)) + 0.5
    # blocks reach the right-most columns (8) that a 5 x 5 (or transposed 9 x 5) grid would not have
    assert bool(grid[:, :, 8].any()) and bool(grid[:, 4, :].any())
    with pytest.raises(ValueError, match="does not hold"):
        gen(2, 45, "cpu", grid=(9, 4))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_and_draws_on_a_rectangle(name, tmp_path):
    from mimkit.methods import Progress
    from mimkit.viz import draw_picture

    over = [*TINY, *METHODS[name].preset_overrides(smoke=True)]  # the method's own offline / tiny stand-ins
    cfg = load_config(ROOT / "configs" / f"{name}_fashion_mnist.yaml", over)
    validate(cfg, check_environment=False)
    torch.manual_seed(0)
    model = build_method(cfg)
    assert model.encoder.grid_size == (5, 9)
    x = torch.randn(4, 1, *HW)
    out = model(x, Progress(0, 10, 0.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
    kind = model.capabilities.pictures[0]
    path = draw_picture(kind, model.eval(), (torch.rand(4, 1, *HW) * 255).to(torch.uint8), (0.5,), (0.5,),
                        tmp_path / "p.png")
    assert path.is_file()


def test_reconstruction_is_an_image_of_the_rectangle():
    cfg = load_config(ROOT / "configs" / "mae_fashion_mnist.yaml", [*TINY, "model.encoder.in_chans=3"])
    model = build_method(cfg).eval()
    from mimkit.viz.reconstruction import reconstruct

    x = torch.randn(2, 3, *HW)
    rec = reconstruct(model, x, seed=0)
    for key in ("masked", "pred", "pasted"):
        assert rec[key].shape == (2, 3, *HW), key
    # visible patches are pasted back in place: where the mask is 0 the picture is the original
    keep = (rec["mask"] == 0).reshape(2, 5, 9).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    assert torch.allclose(rec["pasted"][keep.expand_as(x)], x[keep.expand_as(x)], atol=1e-5)


def test_impossible_sizes_are_config_errors():
    with pytest.raises(ConfigError, match=r"must divide every side of model.encoder.img_size=\[20, 30\]"):
        validate(load_config(None, ["model.encoder.img_size=[20,30]", "model.encoder.patch_size=4"]),
                 check_environment=False)
    with pytest.raises(ConfigError, match="img_size"):
        validate(load_config(None, ["model.encoder.img_size=[0,32]", "model.encoder.patch_size=4"]),
                 check_environment=False)


def test_loaders_make_rectangular_batches(tmp_path):
    from PIL import Image

    from mimkit.data import build_dataset, build_loader

    for i in range(6):
        Image.fromarray((torch.rand(30, 50, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / f"{i}.png")
    for in_memory in (True, False):
        for augment in ("rrc_flip", "flip", "none"):
            ds = build_dataset(tmp_path, "train", in_memory_size=(20, 36) if in_memory else None)
            loader = build_loader(ds, 3, out_size=(20, 36), augment=augment, num_workers=0)
            images, _ = next(iter(loader.iter_from(0)))
            assert images.shape == (3, 3, 20, 36), (in_memory, augment)


@needs_fmnist
def test_pretrain_runs_on_a_rectangle_with_fashion_mnist(tmp_path):
    from mimkit.train import pretrain

    cfg = load_config(ROOT / "configs" / "mae_fashion_mnist.yaml", [
        *TINY[:6], "model.encoder.img_size=[28,40]", "data.limit=64", "data.batch_size=32", "train.max_steps=2",
        f"train.out_dir={tmp_path / 'run'}", "eval.knn_train_limit=64", "eval.knn_test_limit=32",
        "train.progress_bar=false", "train.tensorboard=false"])
    res = pretrain(cfg)
    assert res["step"] == 2 and res["knn"]["n_train"] == 64
    assert Path(res["picture"]).is_file()
