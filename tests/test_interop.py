import pytest
import torch
from conftest import tiny_model_config

from mimkit.interop import (
    InteropError,
    export_encoder,
    load_encoder,
    mae_from_official,
    timm_model_for,
    to_official_state_dict,
)
from mimkit.methods import MAE


def test_export_loads_in_timm_with_identical_features(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = MAE(tiny_model_config(in_chans=3, layer_scale=0.1))
    path = export_encoder(model, tmp_path / "enc.safetensors")
    timm_vit = timm_model_for(model.encoder.cfg)
    missing, unexpected = timm_vit.load_state_dict(load_file(str(path)), strict=True)
    timm_vit.eval()
    model.eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        ours = model.encoder.forward_features(x)
        theirs = timm_vit.forward_features(x)
    assert torch.allclose(ours, theirs, atol=1e-5)
    back = load_encoder(path).eval()
    assert torch.allclose(back.forward_features(x), ours, atol=1e-6)


def test_official_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MAE(tiny_model_config(in_chans=3))
    torch.save({"model": to_official_state_dict(model)}, tmp_path / "mae.pth")
    loaded = mae_from_official(tmp_path / "mae.pth", num_heads=2, decoder_num_heads=2)
    x = torch.randn(2, 3, 28, 28)
    noise = torch.rand(2, 49)
    assert torch.allclose(loaded(x, noise=noise).loss, model(x, noise=noise).loss, atol=0)
    enc = load_encoder(tmp_path / "mae.pth", num_heads=2)
    assert torch.allclose(enc.forward_features(x), model.encoder.eval().forward_features(x), atol=1e-6)


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(InteropError, match="not found"):
        load_encoder(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InteropError, match="not a readable"):
        load_encoder(tmp_path / "junk.pth")
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(InteropError, match="not a ViT"):
        load_encoder(tmp_path / "other.pth")


def test_timm_state_dict_loads_as_encoder(tmp_path):
    from mimkit.nn import ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=192, depth=2, num_heads=3)
    timm_vit = timm_model_for(cfg).eval()
    torch.save(timm_vit.state_dict(), tmp_path / "timm_vit.pth")
    enc = load_encoder(tmp_path / "timm_vit.pth")  # heads inferred from the published width (192 -> 3)
    assert enc.cfg.depth == 2 and enc.cfg.patch_size == 8 and enc.num_heads == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc.forward_features(x), timm_vit.forward_features(x), atol=1e-5)


def test_a_wrong_timm_model_name_is_a_one_line_error():
    import timm

    from mimkit.interop import InteropError, load_timm_encoder

    sd = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32).state_dict()
    with pytest.raises(InteropError, match=r"w.pth: these weights are not a vit_base_patch16_224 .*pos_embed"):
        load_timm_encoder(sd, "vit_base_patch16_224", path="w.pth")


def test_cli_export_is_shareable_prints_a_working_timm_snippet_and_refuses_wrong_heads(tmp_path, capsys):
    """`mimkit export` writes a file others can read (not safetensors' owner-only 0600), prints the
    timm lines that load it (run here: same features), and a --num-heads that disagrees with the
    recorded heads is refused instead of loading weights that would compute something else."""
    import os

    from mimkit.cli import main
    from mimkit.train.checkpoint import atomic_save

    torch.manual_seed(0)
    model = MAE(tiny_model_config(in_chans=3, layer_scale=0.1)).eval()
    enc_cfg = {k: getattr(model.encoder.cfg, k) for k in model.encoder.cfg.__dataclass_fields__}
    atomic_save({"model": model.state_dict(), "config": {"model": {"encoder": enc_cfg}}, "step": 1},
                tmp_path / "checkpoint.pt")
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(tmp_path / "checkpoint.pt"), str(out)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask
    text = capsys.readouterr().out
    snippet = text.split("load it in timm with:\n", 1)[1]
    scope: dict = {}
    exec(snippet, scope)  # the printed lines, as a user pastes them
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(scope["model"].eval().forward_features(x), model.encoder.forward_features(x), atol=1e-5)
    with pytest.raises(InteropError, match="records 2 attention heads; --num-heads 4 disagrees"):
        load_encoder(out, num_heads=4)
    assert load_encoder(out, num_heads=2).cfg.num_heads == 2
