"""One reader for every weight format (mimkit.weights.read_weights): each format recognised once, with
its tensors and what the file says about itself; every other reader in mimkit goes through it."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from mimkit.errors import FileRefusedError, InteropError
from mimkit.interop import export_encoder, to_official_state_dict
from mimkit.methods import MAE
from mimkit.nn import ViTConfig, ViTEncoder
from mimkit.nn.codebook import Codebook
from mimkit.weights import FORMATS, holds_weights, load_encoder, read_codebook, read_weights
from mimkit.weights.checkpoint import atomic_save

SRC = Path(__file__).resolve().parents[1] / "src" / "mimkit"


def tiny_encoder(seed=0) -> ViTEncoder:
    torch.manual_seed(seed)
    return ViTEncoder(ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2)).eval()


def same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_mimkit_checkpoint_file_and_run_directory(tmp_path):
    model = MAE(tiny_model_config())
    config = {"model": {"encoder": {"img_size": 28}}, "method": {"name": "mae"}}
    atomic_save({"model": model.state_dict(), "optimizer": {}, "step": 7, "epoch": 0.5, "config": config},
                tmp_path / "run" / "checkpoint.pt")
    for where in (tmp_path / "run" / "checkpoint.pt", tmp_path / "run"):
        w = read_weights(where)
        assert w.format == "mimkit-checkpoint" and w.step == 7 and w.epoch == 0.5 and w.config == config
        assert same_tensors(w.state, model.state_dict())
        assert w.path == str(tmp_path / "run" / "checkpoint.pt")
        assert holds_weights(where)
    # a run directory kept without its weights (a zoo's records in git) holds none: read_weights refuses it
    (tmp_path / "run" / "checkpoint.pt").unlink()
    (tmp_path / "run" / "config.yaml").write_text("train: {}\n")
    assert not holds_weights(tmp_path / "run") and not holds_weights(tmp_path / "missing.pt")
    with pytest.raises(InteropError, match="directory without checkpoint.pt"):
        read_weights(tmp_path / "run")


def test_export_state_dict_official_mae_and_timm_are_told_apart(tmp_path):
    model = MAE(tiny_model_config(in_chans=3))
    enc_sd = model.encoder.state_dict()
    export_encoder(model, tmp_path / "enc.safetensors")
    torch.save(model.state_dict(), tmp_path / "method.pt")
    torch.save({"model": to_official_state_dict(model)}, tmp_path / "official.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in enc_sd.items()}}, tmp_path / "timm_ddp.pth")
    from safetensors.torch import save_file

    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in enc_sd.items()}, str(tmp_path / "timm.safetensors"))
    expect = {"enc.safetensors": "mimkit-export", "method.pt": "mimkit-state", "official.pth": "official-mae",
              "timm_ddp.pth": "timm", "timm.safetensors": "timm"}
    for name, fmt in expect.items():
        w = read_weights(tmp_path / name)
        assert w.format == fmt, name
        assert w.description == FORMATS[fmt]
    # wrappers (DDP's module., torch.compile's _orig_mod.) are stripped; the tensors are the encoder's
    assert same_tensors(read_weights(tmp_path / "timm_ddp.pth").state, enc_sd)
    assert same_tensors(read_weights(tmp_path / "timm.safetensors").state, enc_sd)
    assert json.loads(read_weights(tmp_path / "enc.safetensors").meta["mimkit_vit_config"])["in_chans"] == 3
    # the official file keeps its own key layout (decoder_*), mapped by the caller that needs a method
    assert "decoder_embed.weight" in read_weights(tmp_path / "official.pth").state


def test_every_encoder_format_gives_the_same_features(tmp_path):
    model = MAE(tiny_model_config(in_chans=3)).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = model.encoder.forward_features(x)
    export_encoder(model, tmp_path / "enc.safetensors")
    torch.save(model.state_dict(), tmp_path / "method.pt")
    torch.save({"model": to_official_state_dict(model)}, tmp_path / "official.pth")
    torch.save(model.encoder.state_dict(), tmp_path / "timm.pth")
    for name in ("enc.safetensors", "method.pt", "official.pth", "timm.pth"):
        enc = load_encoder(tmp_path / name, num_heads=2)
        with torch.no_grad():
            assert torch.allclose(enc.forward_features(x), ref, atol=1e-6), name
    # the same Weights record can be handed on instead of a path (read once)
    w = read_weights(tmp_path / "timm.pth")
    assert torch.allclose(load_encoder(w, num_heads=2).forward_features(x), ref, atol=1e-6)


def test_timm_family_with_register_tokens_comes_back_as_timm(tmp_path):
    import timm

    from mimkit.nn.adapters import TimmEncoder

    m = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                          embed_dim=16, depth=1, num_heads=2, reg_tokens=2).eval()
    torch.save(m.state_dict(), tmp_path / "reg.pth")
    w = read_weights(tmp_path / "reg.pth")
    assert w.format == "timm"
    enc = load_encoder(w, num_heads=2)
    assert isinstance(enc, TimmEncoder) and enc.num_prefix_tokens == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc.forward_features(x), m.forward_features(x), atol=1e-6)


def test_hugging_face_directory_and_file(tmp_path):
    from safetensors.torch import save_file

    sd = {"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(8, 1, 4, 4),
          "vit.embeddings.cls_token": torch.zeros(1, 1, 8)}
    d = tmp_path / "hf"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"image_size": 8, "patch_size": 4, "hidden_size": 8}))
    for where in (d, d / "model.safetensors"):
        w = read_weights(where)
        assert w.format == "hf" and w.meta["hidden_size"] == 8 and same_tensors(w.state, sd)
        assert holds_weights(where)


def test_clip_tower_in_every_layout(tmp_path):
    visual = {"conv1.weight": torch.randn(8, 3, 4, 4), "transformer.resblocks.0.ln_1.weight": torch.ones(8),
              "proj": torch.randn(8, 4)}
    full = {f"visual.{k}": v for k, v in visual.items()} | {"token_embedding.weight": torch.zeros(2, 8)}
    torch.save(full, tmp_path / "openai_sd.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}}, tmp_path / "open_clip.pt")
    torch.save(visual, tmp_path / "tower.pt")
    for name in ("openai_sd.pt", "open_clip.pt", "tower.pt"):
        w = read_weights(tmp_path / name)
        assert w.format == "clip", name
        assert sorted(w.state) == sorted(f"visual.{k}" for k in visual)  # the text tower is left out
        assert torch.equal(w.state["visual.proj"], visual["proj"])
    with pytest.raises(InteropError, match="a CLIP checkpoint.*not an encoder's weights"):
        load_encoder(tmp_path / "tower.pt")


def test_codebook(tmp_path):
    book = Codebook(torch.randn(5, 16), patch_size=4)
    path = book.save(tmp_path / "cb.pt", {"k": 5})
    w = read_weights(path)
    assert w.format == "codebook" and w.meta["patch_size"] == 4
    again = read_codebook(path)
    assert torch.equal(again.centroids, book.centroids) and again.patch_size == 4
    torch.save(tiny_encoder().state_dict(), tmp_path / "enc.pth")
    with pytest.raises(InteropError, match="is a timm ViT state dict or safetensors file, not a codebook"):
        read_codebook(tmp_path / "enc.pth")


def test_what_is_not_weights_is_one_line_naming_the_formats(tmp_path):
    cases = {
        "missing.pt": (None, "not found"),
        "junk.pth": (b"not a checkpoint", "not a readable PyTorch file"),
    }
    for name, (data, message) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(InteropError, match=message) as e:
            read_weights(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    (tmp_path / "empty").mkdir()
    for name, message in (("list.pt", "holds a list"), ("other.pt", "not a ViT state dict"),
                          ("empty", "directory without checkpoint.pt")):
        with pytest.raises(InteropError, match=message) as e:
            read_weights(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(InteropError, match="mimkit reads a mimkit checkpoint .*a mimkit codebook"):
        read_weights(tmp_path / "other.pt")


def test_a_pickle_that_runs_code_is_refused_before_classification(tmp_path, monkeypatch, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"model": {"x": torch.zeros(1)}, "evil": Evil()}, tmp_path / "evil.pt")
    for allow_pickle in ("0", "1"):  # the removed opt-in MIMKIT_ALLOW_PICKLE changes nothing
        monkeypatch.setenv("MIMKIT_ALLOW_PICKLE", allow_pickle)
        with pytest.raises(FileRefusedError, match="mimkit never unpickles such files: convert the weights to a plain "
                                                   "state dict of tensors or to safetensors") as e:
            read_weights(tmp_path / "evil.pt")
        assert "\n" not in str(e.value) and str(tmp_path / "evil.pt") in str(e.value) and "print" in str(e.value)
    assert "ran" not in capsys.readouterr().out


def test_no_module_outside_weights_deserialises_a_file():
    """Every file is read by mimkit.weights: no torch.load, safetensors reading or TorchScript loading
    call anywhere else in src/mimkit (so a new reader cannot skip the verified path). Calls are found in
    the syntax tree, so text that only mentions them (a printed snippet) does not count."""
    import ast

    readers = {"torch.load", "safe_open", "load_file", "torch.jit.load", "jit.load", "safe_load", "pickle.load",
               "pickle.loads", "safetensors.torch.load_file"}

    def name(node) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return f"{name(node.value)}.{node.attr}"
        return ""

    offenders = []
    for path in SRC.rglob("*.py"):
        if path.is_relative_to(SRC / "weights"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = name(node.func)
                if called in readers or any(called.endswith("." + r) for r in readers):
                    if called != "yaml.safe_load":
                        offenders.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {called}")
    assert not offenders, "read files through mimkit.weights:\n" + "\n".join(offenders)
