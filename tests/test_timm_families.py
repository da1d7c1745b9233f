"""timm ViT families at small sizes through :func:`mimkit.weights.load_encoder`: timm's own features
(DINOv2 register tokens, no class token + ``fc_norm``, CLIP's pre-norm, distilled DeiT at 28, 32, 42
and 56 px), the grid from a recorded or given size (never guessed when prefix tokens make the position
table fit two grids), CLIP's activation and the head count only from what the keys or a named model
tell, and the named model's normalisation on ``encoder.input_norm``. Random weights, small widths."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mimkit.errors import InteropError
from mimkit.nn.adapters import TimmEncoder
from mimkit.nn.vit import ViTConfig, ViTEncoder
from mimkit.weights import load_encoder

timm = pytest.importorskip("timm")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
# name: (timm model, kwargs, named: loaded with timm_model=the model's name)
FAMILIES = {
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {}, False),  # cls + 4 registers, no_embed_class, layer scale
    "nocls_reg4_fc_norm": ("vit_base_patch16_224", dict(class_token=False, reg_tokens=4, no_embed_class=True,
                                                        global_pool="avg", fc_norm=True), False),
    "nocls_fc_norm": ("vit_base_patch16_224", dict(class_token=False, global_pool="avg", fc_norm=True), False),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", {}, True),  # norm_pre, eps 1e-5, QuickGELU
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, False),  # cls + distillation token
}
PATCH = {28: 14, 32: 16, 42: 14, 56: 14}  # 2x2, 2x2, 3x3, 4x4 grids


def _timm(name: str, size: int | tuple[int, int], patch: int, embed_dim: int = 192, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, patch_size=patch,
                              embed_dim=embed_dim, depth=2, num_heads=kw.pop("num_heads", 3), **kw).eval()
    with torch.no_grad():  # every parameter matters: positions, prefix tokens, norms, layer scale, blocks
        for n, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p))
            if "gamma" in n:
                p.add_(0.5)
    return model


def _square_fits(model) -> int:
    """How many square grids the model's position table fits (with / without prefix positions)."""
    n, prefix = model.pos_embed.shape[1], model.num_prefix_tokens
    return sum(s >= 1 and round(s**0.5) ** 2 == s for s in ({n - prefix, n} if prefix else {n}))


@pytest.mark.parametrize("size", sorted(PATCH))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_gives_timm_features(tmp_path, family, size):
    name, kw, named = FAMILIES[family]
    model = _timm(name, size, PATCH[size], **kw)
    path = tmp_path / f"{family}_{size}.pth"
    torch.save(model.state_dict(), path)
    by = {"timm_model": name} if named else {}
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model.forward_features(x)
        loads = [load_encoder(path, img_size=size, **by)]
        if _square_fits(model) > 1:  # DINOv2-reg4 at 42 px: 9 positions = 3x3 without prefix or 2x2 with 5
            with pytest.raises(InteropError, match=r"both fit; give the size .*--img-size 42") as e:
                load_encoder(path, **by)
            assert "\n" not in str(e.value)
        else:
            loads.append(load_encoder(path, **by))
        for enc in loads:
            assert isinstance(enc, TimmEncoder)
            assert enc.img_size == size and enc.num_prefix_tokens == model.num_prefix_tokens
            torch.testing.assert_close(enc.forward_features(x), ref, rtol=1e-5, atol=1e-5)
            assert (enc.input_norm is not None) == named


def test_the_issue_cases_are_exact_or_one_line_errors(tmp_path):
    """reg4 at 28 px (was a complex-round TypeError), at 42 px (was rebuilt as a 28 px model), reg4 + no
    class token + fc_norm at 32 px (was a grid-0 ValueError)."""
    cases = [("vit_small_patch14_reg4_dinov2", 28, 14, {}), ("vit_small_patch14_reg4_dinov2", 42, 14, {}),
             ("vit_base_patch16_224", 32, 16, FAMILIES["nocls_reg4_fc_norm"][1])]
    for name, size, patch, kw in cases:
        model = _timm(name, size, patch, **kw)
        torch.save(model.state_dict(), tmp_path / "w.pth")
        x = torch.randn(1, 3, size, size)
        for given in (size, None):
            if given is None and size == 42:
                with pytest.raises(InteropError, match="--img-size 42 or --img-size 28"):
                    load_encoder(tmp_path / "w.pth", timm_model=name)  # naming the model does not fix the grid
                continue
            enc = load_encoder(tmp_path / "w.pth", img_size=given)
            with torch.no_grad():
                torch.testing.assert_close(enc.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("given,needle", [
    (56, r"pos_embed has 9 positions, which fit no 56 px input \(4x4 patches of 14 px\) with 1 class, 4 register "
         r"tokens .*--img-size.*e\.g\. 28 or 42"),
    (50, r"image size 50 is not a whole number of the weights' 14 px patches; .*--img-size"),
    ((28, 42), r"fit no 28,42 px input \(2x3 patches"),
])
def test_a_size_that_fits_no_grid_is_a_one_line_error(tmp_path, given, needle):
    torch.save(_timm("vit_small_patch14_reg4_dinov2", 42, 14).state_dict(), tmp_path / "w.pth")
    with pytest.raises(InteropError, match=needle) as e:
        load_encoder(tmp_path / "w.pth", img_size=given)
    assert "\n" not in str(e.value)


def test_a_rectangular_grid_comes_from_the_given_size(tmp_path):
    model = _timm("vit_small_patch14_reg4_dinov2", (28, 42), 14)  # 6 positions: a 1x1 square grid "fits" too
    torch.save(model.state_dict(), tmp_path / "w.pth")
    enc = load_encoder(tmp_path / "w.pth", img_size=(28, 42))
    x = torch.randn(2, 3, 28, 42)
    assert enc.img_hw == (28, 42) and enc.grid_size == (2, 3)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
    # a plain ViT (one class token) with a rectangular grid stays a mimkit ViTEncoder at the given size
    plain = _timm("vit_base_patch16_224", (28, 42), 14)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    enc = load_encoder(tmp_path / "plain.pth", img_size=(28, 42))
    assert isinstance(enc, ViTEncoder) and enc.cfg.img_size == (28, 42)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), plain.forward_features(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(InteropError, match="7 positions, which form no square grid .*--img-size H,W"):
        load_encoder(tmp_path / "plain.pth")


def test_a_recorded_size_wins_and_a_different_given_size_is_an_error(tmp_path):
    from dataclasses import asdict

    from safetensors.torch import save_file

    cfg = ViTConfig(img_size=28, patch_size=14, in_chans=3, embed_dim=16, depth=1, num_heads=2)
    enc = ViTEncoder(cfg)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "e.safetensors"),
              metadata={"mimkit_vit_config": json.dumps(asdict(cfg))})
    assert load_encoder(tmp_path / "e.safetensors", img_size=28).cfg.img_size == 28
    with pytest.raises(InteropError, match=r"records an input of 28 px; --img-size 42 disagrees"):
        load_encoder(tmp_path / "e.safetensors", img_size=42)


# -- CLIP ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_base_patch16_clip_quickgelu_224", "vit_base_patch16_clip_224"])
def test_clip_layout_needs_the_model_name_and_then_is_exact(tmp_path, name):
    model = _timm(name, 32, 16)
    torch.save(model.state_dict(), tmp_path / "clip.pth")
    with pytest.raises(InteropError, match=r"CLIP-layout ViT \(norm_pre\): LayerNorm eps 1e-5, but QuickGELU or GELU "
                                           r"is not in the keys; .*--timm-model") as e:
        load_encoder(tmp_path / "clip.pth")
    assert "\n" not in str(e.value)
    x = torch.randn(2, 3, 32, 32)
    enc = load_encoder(tmp_path / "clip.pth", timm_model=name)
    block = enc.model.blocks[0]
    assert block.norm1.eps == 1e-5 and type(block.mlp.act).__name__ == ("QuickGELU" if "quickgelu" in name else "GELU")
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
        other = "vit_base_patch16_clip_224" if "quickgelu" in name else "vit_base_patch16_clip_quickgelu_224"
        wrong = load_encoder(tmp_path / "clip.pth", timm_model=other).forward_features(x)
    assert not torch.allclose(wrong, model.forward_features(x), atol=1e-3)  # why the name cannot be guessed
    mean, std, source = enc.input_norm
    assert mean == pytest.approx(CLIP_MEAN) and "timm pretrained_cfg" in source and name in source


# -- heads -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,width,heads", [("vit_medium_patch16_gap_256", 512, 8),
                                              ("vit_little_patch16_reg4_gap_256", 320, 5)])
def test_widths_without_a_published_head_count(tmp_path, name, width, heads):
    model = _timm(name, 32, 16, embed_dim=width, num_heads=heads)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(InteropError, match=rf"a {width}-wide ViT has no published head count; pass the heads with "
                                           r"--num-heads .*--timm-model") as e:
        load_encoder(tmp_path / "w.pth")
    assert "\n" not in str(e.value)
    x = torch.randn(2, 3, 32, 32)
    for kw in ({"timm_model": name}, {"num_heads": heads}):  # the named config's heads, or given
        enc = load_encoder(tmp_path / "w.pth", **kw)
        assert enc.num_heads == heads
        with torch.no_grad():
            torch.testing.assert_close(enc.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
    # a named model of another width does not lend its head count
    with pytest.raises(InteropError, match=rf"{width}-wide ViT has no published head count and vit_base_patch16_224 "
                                           r"is 768 wide \(12 heads\); pass the heads with --num-heads"):
        load_encoder(tmp_path / "w.pth", timm_model="vit_base_patch16_224")
    with pytest.raises(InteropError, match=rf"7 heads do not divide the {width}-wide ViT"):
        load_encoder(tmp_path / "w.pth", num_heads=7)


# -- normalisation ---------------------------------------------------------------------------------
def test_normalisation_comes_from_the_named_models_pretrained_cfg(tmp_path):
    model = _timm("vit_base_patch16_224", 32, 16)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    assert load_encoder(tmp_path / "w.pth").input_norm is None  # a plain ViT: the file does not say
    mean, std, source = load_encoder(tmp_path / "w.pth", timm_model="vit_base_patch16_224.augreg_in21k").input_norm
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)
    assert source == "timm pretrained_cfg (vit_base_patch16_224.augreg_in21k)"
    mean, _, source = load_encoder(tmp_path / "w.pth", timm_model="deit_tiny_patch16_224").input_norm
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and "deit_tiny_patch16_224" in source
    reg = _timm("vit_small_patch14_reg4_dinov2", 28, 14)
    torch.save(reg.state_dict(), tmp_path / "reg.pth")
    assert load_encoder(tmp_path / "reg.pth").input_norm is None  # recognised from the keys, not named


def test_cli_img_size_reaches_load_encoder():
    from mimkit.eval.cli import _img_size, _load_kw, register, register_report

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    register_report(sub)
    args = parser.parse_args(["eval", "knn", "w.pth", "--img-size", "42", "--timm-model", "x", "--num-heads", "5"])
    assert _load_kw(args) == {"img_size": 42, "timm_model": "x", "num_heads": 5}
    assert _load_kw(parser.parse_args(["report", "w.pth", "--img-size", "28,42"]))["img_size"] == (28, 42)
    assert "img_size" not in _load_kw(parser.parse_args(["eval", "knn", "w.pth"]))
    assert _img_size("224x160") == (224, 160) and _img_size("56,56") == 56
    with pytest.raises(argparse.ArgumentTypeError, match="give a side or H,W"):
        _img_size("0")
