"""``model.init``: starting any method from an official MAE checkpoint, timm weights, a mimkit checkpoint or
export, with position-embedding and channel adaptation, reports, and one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mimkit.config import ConfigError, load_config, validate
from mimkit.init_from import apply_init
from mimkit.interop import export_encoder, to_official_state_dict
from mimkit.methods.base import DecoderConfig, ModelConfig
from mimkit.methods.mae import MAE, MAEOptions
from mimkit.nn.pos_embed import sincos_2d
from mimkit.nn.vit import ViTConfig
from mimkit.train.loop import build_method

sys.path.insert(0, str(Path(__file__).parent))
from conftest import needs_fmnist  # noqa: E402
from golden_curves import ROOT  # noqa: E402


def mae(img=16, chans=3, seed=0, width=24, dec=16) -> MAE:
    torch.manual_seed(seed)
    enc = ViTConfig(img_size=img, patch_size=4, in_chans=chans, embed_dim=width, depth=2, num_heads=3)
    return MAE(ModelConfig(enc, DecoderConfig(dec, 1, 2, 2.0)), MAEOptions(norm_target=True)).eval()


def perturbed(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def test_official_checkpoint_gives_the_same_model(tmp_path):
    src = perturbed(mae())
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": to_official_state_dict(src)}, path)
    model = mae(seed=7)
    report = apply_init(model, path)
    assert report.kind.startswith("official MAE pretraining checkpoint") and not report.new and not report.unused
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        assert model(x, noise=noise).loss.item() == pytest.approx(src(x, noise=noise).loss.item(), rel=1e-6)


def test_rectangular_target_regenerates_sincos_positions(tmp_path):
    src = perturbed(mae())
    path = tmp_path / "mae.pth"
    torch.save({"model": to_official_state_dict(src)}, path)
    model = mae(img=(16, 24))
    report = apply_init(model, path)
    assert "2-D sin-cos regenerated for the 4x6 grid (file: 4x4)" in report.adapted["encoder.pos_embed"]
    assert "decoder.pos_embed" in report.adapted
    assert torch.equal(model.encoder.pos_embed[0], sincos_2d(24, 4, 6, cls_token=True))
    for k, v in src.state_dict().items():
        if "pos_embed" not in k:
            assert torch.equal(model.state_dict()[k], v), k


def test_learned_timm_positions_are_resized_as_timm_does(tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    kw = dict(pretrained=False, num_classes=5, patch_size=4, in_chans=3, embed_dim=24, depth=2, num_heads=3)
    src = timm.create_model("vit_base_patch16_224", img_size=16, **kw)
    with torch.no_grad():
        src.pos_embed.normal_(std=0.5)  # learned (not sin-cos)
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = mae(img=(16, 24))
    report = apply_init(model, path)
    assert report.kind == "timm ViT safetensors (encoder)"
    assert "resized bicubically 4x4 -> 4x6" in report.adapted["encoder.pos_embed"]
    assert {"head.weight", "head.bias"} <= set(report.unused)
    assert any(k.startswith("decoder.") for k in report.new) and not any(k.startswith("encoder.") for k in report.new)
    # timm's own load path on a (16, 24) model gives the same encoder
    ref = timm.create_model("vit_base_patch16_224", img_size=(16, 24), **kw).eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(src.state_dict()), ref))
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        assert torch.allclose(model.encoder(x), ref.forward_features(x), atol=1e-5)


@pytest.mark.parametrize("src_c,dst_c", [(3, 1), (1, 3), (3, 5)])
def test_channel_adaptation_rule(tmp_path, src_c, dst_c):
    src = perturbed(mae(chans=src_c))
    path = tmp_path / "export.safetensors"
    export_encoder(src, path)
    model = mae(chans=dst_c)
    report = apply_init(model, path)
    how = report.adapted["encoder.patch_embed.proj.weight"]
    assert f"{src_c} -> {dst_c} input channels" in how
    w_src, w_new = src.encoder.patch_embed.proj.weight, model.encoder.patch_embed.proj.weight
    if dst_c == 1:
        assert torch.allclose(w_new, w_src.sum(1, keepdim=True))
    else:  # channels repeated cyclically, scaled by src/dst: a grey image gives the source's response
        idx = torch.arange(dst_c) % src_c
        assert torch.allclose(w_new, w_src[:, idx] * src_c / dst_c)
        grey = torch.rand(2, 1, 16, 16)
        with torch.no_grad():
            a = model.encoder.patch_embed(grey.expand(-1, dst_c, -1, -1))
            b = src.encoder.patch_embed(grey.expand(-1, src_c, -1, -1))
        if src_c == 1 or dst_c % src_c == 0:
            assert torch.allclose(a, b, atol=1e-5)
    assert "decoder.pred.weight" in report.new  # a mimkit export holds no decoder
    assert report.fresh_head_note() is None  # no loaded decoder under the fresh head


def test_pixel_head_of_another_channel_count_starts_fresh(tmp_path):
    src = perturbed(mae(chans=3))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": to_official_state_dict(src)}, path)
    model = mae(chans=1, seed=3)
    before = model.decoder.pred.weight.clone()
    report = apply_init(model, path)
    assert "decoder.pred.weight" in report.new and "decoder.pred.weight" in report.unused
    assert torch.equal(model.decoder.pred.weight, before)
    assert torch.equal(model.decoder.blocks[0].attn.qkv.weight, src.decoder.blocks[0].attn.qkv.weight)
    # a fresh head under a loaded decoder is said, with the alternative
    assert "note: the pixel head decoder.pred starts fresh" in report.summary()
    assert "model.init_parts=encoder" in report.summary()
    enc_only = apply_init(mae(chans=1, seed=3), path, parts="encoder")
    assert enc_only.fresh_head_note() is None  # the whole decoder starts fresh: nothing to warn about


def tiny_cfg(method: str, extra=()):
    ov = ["model.encoder.embed_dim=24", "model.encoder.depth=2", "model.encoder.num_heads=3",
          "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2", "model.encoder.img_size=16",
          "model.encoder.patch_size=4", "model.encoder.in_chans=3", *extra]
    return load_config(ROOT / "configs" / f"{method}_fashion_mnist.yaml", ov)


def test_mimkit_checkpoint_into_another_method_copies_the_ema_teacher(tmp_path):
    src = perturbed(mae())
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": src.state_dict(), "config": {"model": {"encoder": {"img_size": 16, "patch_size": 4,
                                                                          "in_chans": 3}}, "method": {"name": "mae"}},
                "step": 9}, path)
    extra = ["method.projector.hidden_dim=32", "method.masking.num_keep=null"]
    model = build_method(tiny_cfg("latent_mim", extra))
    with pytest.raises(ConfigError, match=r"decoder.pred.weight .* or model.init_parts=encoder"):
        apply_init(model, path)
    report = apply_init(model, path, parts="encoder")
    assert report.kind == "mimkit checkpoint (mae, step 9)"
    assert "target.branch" in report.copied
    online, teacher = model.encoder.state_dict(), model.target.branch["encoder"].state_dict()
    assert all(torch.equal(teacher[k], online[k]) for k in online)
    assert torch.equal(online["blocks.1.mlp.fc2.weight"], src.encoder.blocks[1].mlp.fc2.weight)


def test_errors_name_the_problem_and_leave_the_model_alone(tmp_path):
    model = mae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="file not found"):
        apply_init(model, tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="model.init=.*junk.pth"):
        apply_init(model, tmp_path / "junk.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "cnn.pth")
    with pytest.raises(ConfigError, match="no ViT encoder weights"):
        apply_init(model, tmp_path / "cnn.pth")
    wide = tmp_path / "wide.pth"
    torch.save({"model": to_official_state_dict(mae(width=48))}, wide)
    with pytest.raises(ConfigError, match=r"set model.encoder.embed_dim to the file's width"):
        apply_init(model, wide)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ConfigError, match="model.init=.*does not exist"):
        validate(load_config(None, [f"model.init={tmp_path / 'missing.pth'}"]))


@needs_fmnist
def test_pretrain_starts_from_an_export_and_records_it(tmp_path, capfd):
    from mimkit.train import pretrain

    src = perturbed(mae(img=28, chans=1))
    path = export_encoder(src, tmp_path / "enc.safetensors")
    cfg = load_config(ROOT / "configs" / "mae_fashion_mnist.yaml", [
        "model.encoder.embed_dim=24", "model.encoder.depth=2", "model.encoder.num_heads=3", "model.decoder.embed_dim=16",
        "model.decoder.depth=1", "model.decoder.num_heads=2", "model.encoder.img_size=[28,32]", f"model.init={path}",
        "data.limit=64", "data.batch_size=32", "train.max_steps=1", f"train.out_dir={tmp_path / 'run'}",
        "eval.knn_at_end=false", "eval.picture_at_end=false", "train.progress_bar=false", "train.tensorboard=false"])
    pretrain(cfg)
    err = capfd.readouterr().err
    assert "model.init:" in err and "mimkit export (encoder)" in err
    assert "effective batch 32 (32/process x 1 accum x 1)" in err and f"initialised from {path}" in err
    rec = json.loads((tmp_path / "run" / "init.json").read_text())
    assert "encoder.blocks.0.attn.qkv.weight" in rec["loaded"]
    assert "encoder.pos_embed" in rec["adapted"] and "decoder.pred.weight" in rec["newly_initialised"]


def _mae_cfg(depth=2, layer_scale=None) -> MAE:
    torch.manual_seed(0)
    enc = ViTConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=24, depth=depth, num_heads=3,
                    layer_scale=layer_scale)
    return MAE(ModelConfig(enc, DecoderConfig(16, 1, 2, 2.0)), MAEOptions())


def test_a_deeper_file_is_an_error_not_a_truncation(tmp_path):
    path = tmp_path / "deep.pth"
    torch.save({"model": to_official_state_dict(_mae_cfg(depth=3))}, path)
    model = _mae_cfg(depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"the file's encoder has 3 blocks, the model 2; set model.encoder.depth=3"):
        apply_init(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_file_without_layer_scale_names_the_layer_scale_setting(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"model": to_official_state_dict(_mae_cfg())}, path)
    with pytest.raises(ConfigError, match=r"no layer scale .*model.encoder.layer_scale=null"):
        apply_init(_mae_cfg(layer_scale=0.1), path)


@pytest.mark.parametrize("family,needle", [("deit_tiny_distilled_patch16_224", "has dist_token"),
                                           ("vit_small_patch14_reg4_dinov2", "has reg_token"),
                                           ("vit_base_patch16_clip_224", "norm_pre, CLIP-style")])
def test_timm_families_mimkit_cannot_hold_are_one_line_errors(tmp_path, family, needle):
    import timm

    sd = timm.create_model(family, pretrained=False, img_size=32, patch_size=16, embed_dim=24, depth=2,
                           num_heads=3).state_dict()
    torch.save(sd, tmp_path / "w.pth")
    torch.manual_seed(0)
    enc = ViTConfig(img_size=32, patch_size=16, in_chans=3, embed_dim=24, depth=2, num_heads=3)
    with pytest.raises(ConfigError, match=needle):
        apply_init(MAE(ModelConfig(enc, DecoderConfig(16, 1, 2, 2.0)), MAEOptions()), tmp_path / "w.pth")


def test_a_file_with_layer_scale_into_a_model_without_is_an_error(tmp_path):
    path = tmp_path / "ls.pth"
    torch.save({"model": _mae_cfg(layer_scale=0.1).state_dict(), "config": {"model": {}}}, path)
    with pytest.raises(ConfigError, match=r"has layer scale; set model.encoder.layer_scale"):
        apply_init(_mae_cfg(), path)
