"""Hugging Face ``ViTMAEForPreTraining`` export / import: equal losses and predictions given the same noise
(models built from a config; nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimkit.config import ConfigError  # noqa: E402
from mimkit.hf import export_hf, from_hf_state_dict, mae_from_hf, to_hf_state_dict  # noqa: E402
from mimkit.methods.base import DecoderConfig, ModelConfig  # noqa: E402
from mimkit.methods.mae import MAE, MAEOptions  # noqa: E402
from mimkit.nn.vit import ViTConfig  # noqa: E402


def tiny_mae(norm_pix=True, in_chans=3, img=12, ratio=0.75, seed=0) -> MAE:
    torch.manual_seed(seed)
    opts = MAEOptions(norm_target=norm_pix)
    opts.masking.ratio = ratio
    # 3 heads of width 8 and 2 decoder heads of width 8: a head split mix-up would change the outputs
    enc = ViTConfig(img_size=img, patch_size=4, in_chans=in_chans, embed_dim=24, depth=2, num_heads=3)
    model = MAE(ModelConfig(enc, DecoderConfig(16, 2, 2, 2.0)), opts)
    with torch.no_grad():  # biases and norms away from their init, so a mis-mapped tensor shows
        for name, p in model.named_parameters():
            if "pos_embed" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("norm_pix,in_chans", [(True, 3), (False, 1)])
def test_export_gives_equal_losses_and_predictions(tmp_path, norm_pix, in_chans):
    from transformers import ViTMAEForPreTraining

    model = tiny_mae(norm_pix, in_chans)
    out = export_hf(model, tmp_path / "hf")
    assert (out / "config.json").is_file()
    hf = ViTMAEForPreTraining.from_pretrained(str(out)).eval()
    assert hf.config.norm_pix_loss == norm_pix and hf.config.mask_ratio == 0.75
    x = torch.randn(3, in_chans, 12, 12)
    noise = torch.rand(3, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x, noise=noise)
        theirs = hf(pixel_values=x, noise=noise)
    assert torch.equal(theirs.mask, ours.plan.mask)
    assert theirs.loss.item() == pytest.approx(ours.loss.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(theirs.logits, ours.pred, atol=1e-5)
    # the positions are the same table (facebookresearch/mae's layout)
    assert torch.allclose(hf.vit.embeddings.position_embeddings, model.encoder.pos_embed)


def test_import_gives_the_same_model(tmp_path):
    model = tiny_mae(True, 3)
    export_hf(model, tmp_path / "hf")
    back = mae_from_hf(tmp_path / "hf")
    x = torch.randn(2, 3, 12, 12)
    noise = torch.rand(2, 9)
    with torch.no_grad():
        assert back(x, noise=noise).loss.item() == pytest.approx(model(x, noise=noise).loss.item(), rel=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_both_transformers_key_layouts_round_trip():
    sd = tiny_mae().state_dict()
    for layout in ("v4", "v5"):
        hf = to_hf_state_dict(sd, layout)
        assert any(("attention.attention.query" if layout == "v4" else "attention.q_proj") in k for k in hf)
        back = from_hf_state_dict(hf)
        assert set(back) == set(sd)
        assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_model_init_from_a_hf_directory(tmp_path):
    from mimkit.init_from import apply_init

    model = tiny_mae(True, 3)
    export_hf(model, tmp_path / "hf")
    fresh = tiny_mae(True, 3, seed=5)
    report = apply_init(fresh, tmp_path / "hf")
    assert "Hugging Face" in report.kind and not report.new
    x, noise = torch.randn(2, 3, 12, 12), torch.rand(2, 9)
    with torch.no_grad():
        assert fresh(x, noise=noise).loss.item() == pytest.approx(model(x, noise=noise).loss.item(), rel=1e-6)


def test_export_refuses_what_vitmae_cannot_hold(tmp_path):
    torch.manual_seed(0)
    rect = MAE(ModelConfig(ViTConfig(img_size=(8, 12), patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2),
                           DecoderConfig(8, 1, 2)))
    with pytest.raises(ConfigError, match="square images only; this encoder is 8x12"):
        export_hf(rect, tmp_path / "x")
    ls = MAE(ModelConfig(ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                                   layer_scale=0.1), DecoderConfig(8, 1, 2)))
    with pytest.raises(ConfigError, match="no layer scale"):
        export_hf(ls, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_export_format_hf(tmp_path, capsys):
    from transformers import ViTMAEForPreTraining

    from mimkit.cli import main
    from mimkit.config import load_config, to_dict
    from mimkit.train.loop import build_method

    cfg = load_config(None, ["model.encoder.img_size=12", "model.encoder.patch_size=4", "model.encoder.in_chans=1",
                             "model.encoder.embed_dim=24", "model.encoder.depth=1", "model.encoder.num_heads=3",
                             "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2"])
    model = perturb(build_method(cfg)).eval()
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 1}, tmp_path / "checkpoint.pt")
    assert main(["export", str(tmp_path / "checkpoint.pt"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "ViTMAEForPreTraining" in capsys.readouterr().out
    hf = ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    x, noise = torch.randn(2, 1, 12, 12), torch.rand(2, 9)
    with torch.no_grad():
        assert hf(pixel_values=x, noise=noise).loss.item() == pytest.approx(model(x, noise=noise).loss.item(), rel=1e-5)


def perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def test_eval_reads_a_hf_directory_with_the_same_features(tmp_path):
    from mimkit.eval.data import load_checkpoint_encoder

    model = tiny_mae(True, 3)
    export_hf(model, tmp_path / "hf")
    enc = load_checkpoint_encoder(tmp_path / "hf").encoder
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(enc.forward_features(x), model.encoder.forward_features(x), atol=1e-5)
