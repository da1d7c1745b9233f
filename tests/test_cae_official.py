"""Official CAE / CAE v2 checkpoints (Atten4Vis/CAE): recognised, mapped onto mimkit's CAE / CAE v2, the
encoder loaded alone, ``model.init`` from them, and their row-first position tables.

Nothing is fetched: an official-layout state dict is written here from a tiny mimkit model by an
inverse key mapping of this file (independent of :mod:`mimkit.weights.official`), with position tables
computed by the official formula (``build_2d_sincos_position_embedding``), also written here."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from mimkit.errors import InteropError
from mimkit.init_from import _is_sincos, apply_init
from mimkit.interop import cae_from_official, export_encoder
from mimkit.methods import CAE, CAEOptions, CAEv2, CAEv2Options
from mimkit.methods.base import DecoderConfig, ModelConfig
from mimkit.nn import ViTConfig, ViTEncoder
from mimkit.nn.pos_embed import sincos_1d, sincos_2d
from mimkit.weights import FORMATS, load_encoder, read_weights
from mimkit.weights.official import official_cae_heads

TEACHER = ViTConfig(img_size=28, patch_size=7, in_chans=1, embed_dim=24, depth=1, num_heads=2)


# -- the official side, written independently ------------------------------------------------------
def official_table(dim: int, h: int, w: int) -> torch.Tensor:
    """``(1, 1 + h*w, dim)``: Atten4Vis/CAE ``build_2d_sincos_position_embedding(dim, use_cls_token=True)``."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)
    return torch.cat([torch.zeros(1, dim), emb])[None]


def official_block(sd: dict, src: str, dst: str, dim: int) -> dict:
    """mimkit/timm ``Block`` keys under ``src`` -> the official layout under ``dst`` (no key bias)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(src):
            continue
        rest = k[len(src):]
        if rest == "attn.qkv.bias":
            out[dst + "attn.q_bias"] = v[:dim].clone()
            out[dst + "attn.v_bias"] = v[2 * dim:].clone()  # the key bias is dropped (softmax-invariant)
            continue
        rest = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}.get(rest, rest)
        out[dst + rest] = v.clone()
    return out


REGRESSOR_NAMES = {"norm_q": "norm1_q", "norm_k": "norm1_k", "norm_v": "norm1_v", "norm2": "norm2_cross",
                   "mlp": "mlp_cross", "ls1.gamma": "gamma_1_cross", "ls2.gamma": "gamma_2_cross",
                   "cross_attn.q.bias": "cross_attn.q_bias", "cross_attn.v.bias": "cross_attn.v_bias"}


def to_official(model) -> dict:
    """A mimkit CAE / CAE v2 -> the ``model`` state dict the official ``ContextAutoencoderViT`` saves."""
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and not k.startswith("teacher.")}
    enc, d = model.encoder, model.regressor.mask_token.shape[-1]
    out = {}
    for k, v in sd.items():
        if k.startswith("encoder.") and not k.startswith("encoder.blocks."):
            out[k] = v.clone()
    for i in range(len(enc.blocks)):
        out.update(official_block(sd, f"encoder.blocks.{i}.", f"encoder.blocks.{i}.", enc.embed_dim))
    v2 = isinstance(model, CAEv2)
    if not v2:  # the alignment encoder: a copy of the encoder
        out.update({"alignment_encoder." + k[len("encoder."):]: v.clone() for k, v in list(out.items())})
    if "proj.0.weight" in sd:
        out.update({"encoder_to_regresser.weight": sd["proj.0.weight"], "encoder_to_regresser.bias": sd["proj.0.bias"],
                    "encoder_to_regresser_norm.weight": sd["proj.1.weight"],
                    "encoder_to_regresser_norm.bias": sd["proj.1.bias"]})
    out["rd_pos_embed"] = sd["regressor.pos_embed"].clone()
    out["mask_token"] = sd["regressor.mask_token"].clone()
    for k, v in sd.items():
        if k.startswith("regressor.blocks."):
            i, rest = k[len("regressor.blocks."):].split(".", 1)
            for new, old in REGRESSOR_NAMES.items():
                if rest == new or rest.startswith(new + "."):
                    rest = old + rest[len(new):]
                    break
            out[f"regresser.regressor_blocks.{i}.{rest}"] = v.clone()
    if v2:  # held by the official model, not used by CAE v2
        out["regresser.norm.weight"], out["regresser.norm.bias"] = torch.ones(d), torch.zeros(d)
        out.update({"decoder.norm.weight": sd["head.norm.weight"], "decoder.norm.bias": sd["head.norm.bias"],
                    "decoder.head.weight": sd["head.head.weight"], "decoder.head.bias": sd["head.head.bias"]})
    else:
        out["regresser.norm.weight"], out["regresser.norm.bias"] = sd["regressor.norm.weight"], sd["regressor.norm.bias"]
        for i in range(len(model.decoder.blocks)):
            out.update(official_block(sd, f"decoder.blocks.{i}.", f"decoder.decoder_blocks.{i}.", d))
        for k in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
            out[f"decoder.{k}"] = sd[f"decoder.{k}"]
    return out


# -- the mimkit side ---------------------------------------------------------------------------------
def perturbed(model, seed=1):
    """Every trained tensor moved off its initial value (biases, gammas and LayerNorms included), and the
    position tables set to the official ones: the model *is* the official model, in mimkit's keys."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("teacher.") and "pos_embed" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        h, w = model.encoder.grid_size
        model.encoder.pos_embed.copy_(official_table(model.encoder.embed_dim, h, w))
        model.regressor.pos_embed.copy_(official_table(model.regressor.pos_embed.shape[-1], h, w))
    return model.eval()


def model_config(proj: bool, **enc) -> ModelConfig:
    cfg = tiny_model_config(**enc)
    return cfg if proj else ModelConfig(cfg.encoder, DecoderConfig(embed_dim=32, depth=1, num_heads=2))


def cae(proj=True, seed=0, **enc):
    torch.manual_seed(seed)
    return CAE(model_config(proj, **enc), CAEOptions(regressor_depth=2))


def teacher_file(tmp_path):
    torch.manual_seed(5)
    return str(export_encoder(ViTEncoder(TEACHER), tmp_path / "teacher.safetensors"))


def cae_v2(tmp_path, proj=True, seed=0):
    torch.manual_seed(seed)
    return CAEv2(model_config(proj), CAEv2Options(regressor_depth=2, teacher_path=teacher_file(tmp_path)))


def save_official(model, path, sabotage=None):
    sd = to_official(model)
    if sabotage:
        sabotage(sd)
    torch.save({"model": sd, "epoch": 299}, path)
    return path


def images(b=3, seed=0):
    return torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def same_step(a, b, x, plan) -> float:
    """Largest difference of loss and predictions of two models on one batch and mask."""
    with torch.no_grad():
        oa, ob = a(x, plan=plan), b(x, plan=plan)
    return max((oa.loss - ob.loss).abs().item(), (oa.pred.float() - ob.pred.float()).abs().max().item())


# -- the position table layout -----------------------------------------------------------------------
def test_official_table_is_row_first_not_mae_layout():
    for dim, g in ((32, 7), (16, 14), (768, 14)):
        ref = official_table(dim, g, g)[0]
        torch.testing.assert_close(sincos_2d(dim, g, cls_token=True, row_first=True), ref, atol=2e-5, rtol=0)
        assert (sincos_2d(dim, g, cls_token=True) - ref).abs().max() > 0.5  # MAE's layout is another table
    # row first: the first half encodes the row of a row-major grid, the second the column (rectangles too)
    t = sincos_2d(16, 2, 3, row_first=True)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(t[i * 3 + j, :8], sincos_1d(8, torch.tensor([i]))[0].float())
            torch.testing.assert_close(t[i * 3 + j, 8:], sincos_1d(8, torch.tensor([j]))[0].float())
    torch.testing.assert_close(sincos_2d(16, 2, 3), torch.cat([t[:, 8:], t[:, :8]], 1))  # MAE: column first
    table = official_table(32, 7, 7)[0]
    assert _is_sincos(table, (7, 7), row_first=True) and not _is_sincos(table, (7, 7))
    mae = sincos_2d(32, 7, cls_token=True)
    assert _is_sincos(mae, (7, 7)) and not _is_sincos(mae, (7, 7), row_first=True)


# -- recognition ---------------------------------------------------------------------------------------
def test_read_weights_recognises_official_cae(tmp_path):
    src = perturbed(cae())
    save_official(src, tmp_path / "cae.pth")
    v2 = perturbed(cae_v2(tmp_path))
    save_official(v2, tmp_path / "caev2.pth")
    enc_only = {k[len("encoder."):]: v for k, v in to_official(src).items() if k.startswith("encoder.")}
    enc_only.update({"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)})
    torch.save({"model": enc_only}, tmp_path / "finetuned.pth")
    torch.save(src.state_dict(), tmp_path / "mimkit_state.pt")
    for name, fmt in (("cae.pth", "official-cae"), ("caev2.pth", "official-cae"), ("finetuned.pth", "official-cae"),
                      ("mimkit_state.pt", "mimkit-state")):
        w = read_weights(tmp_path / name)
        assert w.format == fmt, name
        assert w.description == FORMATS[fmt]
    assert "rd_pos_embed" in read_weights(tmp_path / "cae.pth").state  # stored keys, mapped by the caller


# -- the whole method ----------------------------------------------------------------------------------
@pytest.mark.parametrize("proj", [True, False])
def test_cae_from_official_equals_the_official_model(tmp_path, proj):
    src = perturbed(cae(proj))
    path = save_official(src, tmp_path / "cae.pth")
    model = cae_from_official(path, num_heads=2, decoder_num_heads=2).eval()
    assert isinstance(model, CAE) and isinstance(model.proj, torch.nn.Sequential) == proj
    # the official tables are loaded as stored (row first), not rebuilt in mimkit's layout
    assert torch.equal(model.encoder.pos_embed, official_table(32, 7, 7))
    assert torch.equal(model.regressor.pos_embed, official_table(16 if proj else 32, 7, 7))
    x = images()
    plan = src.make_plan(x, None, torch.Generator().manual_seed(0))
    assert same_step(model, src, x, plan) < 1e-5
    with torch.no_grad():
        a, b = model(x, plan=plan), src(x, plan=plan)
    torch.testing.assert_close(a.metrics["loss_align"], b.metrics["loss_align"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("proj", [True, False])
def test_cae_v2_from_official_equals_the_official_model(tmp_path, proj):
    src = perturbed(cae_v2(tmp_path, proj))
    path = save_official(src, tmp_path / "caev2.pth")
    opts = CAEv2Options(teacher_path=src.options.teacher_path)
    model = cae_from_official(path, num_heads=2, decoder_num_heads=2, options=opts).eval()
    assert isinstance(model, CAEv2) and isinstance(model.regressor.norm, torch.nn.Identity)
    x = images()
    plan = src.make_plan(x, None, torch.Generator().manual_seed(0))
    assert same_step(model, src, x, plan) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(model.predict(x, plan), src.predict(x, plan), atol=1e-5, rtol=0)
    with pytest.raises(InteropError, match="holds no teacher"):
        cae_from_official(path, num_heads=2, decoder_num_heads=2)


def _swap(a: str, b: str):
    def go(sd):
        sd[a], sd[b] = sd[b], sd[a]
    return go


def _mae_table(sd):
    sd["encoder.pos_embed"] = sincos_2d(32, 7, cls_token=True)[None]


@pytest.mark.parametrize("sabotage", [
    _swap("encoder.blocks.0.attn.q_bias", "encoder.blocks.0.attn.v_bias"),
    _swap("regresser.regressor_blocks.1.cross_attn.q_bias", "regresser.regressor_blocks.1.cross_attn.v_bias"),
    _swap("regresser.regressor_blocks.0.norm1_q.weight", "regresser.regressor_blocks.0.norm1_k.weight"),
    _swap("decoder.decoder_blocks.0.gamma_1", "decoder.decoder_blocks.0.gamma_2"),
    _mae_table,
], ids=["encoder-qv-bias", "regressor-qv-bias", "regressor-q-k-norm", "decoder-gammas", "mae-table"])
def test_a_wrong_mapping_breaks_the_equality(tmp_path, sabotage):
    """The equality above is not vacuous: the same check fails for a file mapped one step wrong."""
    src = perturbed(cae())
    path = save_official(src, tmp_path / "cae.pth", sabotage)
    model = cae_from_official(path, num_heads=2, decoder_num_heads=2).eval()
    x = images()
    assert same_step(model, src, x, src.make_plan(x, None, torch.Generator().manual_seed(0))) > 1e-3


def test_cae_from_official_refuses_what_it_cannot_build(tmp_path):
    src = perturbed(cae())
    sd = to_official(src)
    enc_only = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    torch.save({"model": enc_only}, tmp_path / "enc.pth")
    with pytest.raises(InteropError, match="encoder alone"):
        cae_from_official(tmp_path / "enc.pth", num_heads=2)
    sd["decoder.head.weight"], sd["decoder.head.bias"] = torch.zeros(8192, 16), torch.zeros(8192)  # DALL-E ids
    torch.save({"model": sd}, tmp_path / "tokens.pth")
    with pytest.raises(InteropError, match="tokenizer"):
        cae_from_official(tmp_path / "tokens.pth", num_heads=2, decoder_num_heads=2)
    model = cae_from_official(tmp_path / "tokens.pth", num_heads=2, decoder_num_heads=2,
                              options=CAEOptions(target="tokenizer", tokenizer="some.module:Tokenizer"))
    assert model.options.tokenizer_vocab == 8192 and model.decoder.head.out_features == 8192
    assert official_cae_heads(192) == official_cae_heads(384) == official_cae_heads(768) == 12
    assert official_cae_heads(1024) == 16


# -- the encoder alone --------------------------------------------------------------------------------
def test_load_encoder_gives_the_official_encoder(tmp_path):
    src = perturbed(cae())
    save_official(src, tmp_path / "cae.pth")
    enc_only = {k[len("encoder."):]: v for k, v in to_official(src).items() if k.startswith("encoder.")}
    enc_only.update({"head.weight": torch.randn(10, 32), "head.bias": torch.zeros(10)})  # a fine-tuned file
    torch.save({"model": enc_only}, tmp_path / "finetuned.pth")
    x = images()
    with torch.no_grad():
        want = src.encoder.forward_features(x)
        for name in ("cae.pth", "finetuned.pth"):
            enc = load_encoder(tmp_path / name, num_heads=2)
            assert isinstance(enc, ViTEncoder) and enc.cfg.layer_scale is None and enc.cfg.qkv_bias
            assert torch.equal(enc.pos_embed, official_table(32, 7, 7))  # as stored, row first
            torch.testing.assert_close(enc.forward_features(x), want, atol=1e-5, rtol=0)


# -- model.init ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("proj", [True, False])
def test_model_init_loads_an_official_cae_file(tmp_path, proj):
    src = perturbed(cae(proj))
    path = save_official(src, tmp_path / "cae.pth")
    model = cae(proj, seed=7)
    report = apply_init(model, path)
    assert report.kind == "official CAE pretraining checkpoint" and not report.new and not report.adapted
    assert report.unused and all(k.startswith("alignment_encoder.") for k in report.unused)
    x = images()
    model.eval()
    assert same_step(model, src, x, src.make_plan(x, None, torch.Generator().manual_seed(0))) < 1e-5


def test_model_init_loads_an_official_cae_v2_file(tmp_path):
    src = perturbed(cae_v2(tmp_path))
    path = save_official(src, tmp_path / "caev2.pth")
    model = cae_v2(tmp_path, seed=7)
    report = apply_init(model, path)
    assert report.kind == "official CAE v2 pretraining checkpoint" and not report.adapted
    assert all(k.startswith("teacher.") or k == "_extra_state" for k in report.new)  # the teacher is not in it
    assert report.unused == ["regresser.norm.weight", "regresser.norm.bias"]
    x = images()
    model.eval()
    assert same_step(model, src, x, src.make_plan(x, None, torch.Generator().manual_seed(0))) < 1e-5


def test_model_init_on_another_grid_regenerates_the_row_first_tables(tmp_path):
    path = save_official(perturbed(cae()), tmp_path / "cae.pth")
    model = cae(img_size=32)  # an 8x8 grid; the file's is 7x7
    report = apply_init(model, path)
    for key, width in (("encoder.pos_embed", 32), ("regressor.pos_embed", 16)):
        assert "row first" in report.adapted[key] and "8x8 grid (file: 7x7)" in report.adapted[key]
        table = model.state_dict()[key][0]
        torch.testing.assert_close(table, sincos_2d(width, 8, cls_token=True, row_first=True))
        torch.testing.assert_close(table, official_table(width, 8, 8)[0], atol=2e-5, rtol=0)
        assert (table - sincos_2d(width, 8, cls_token=True)).abs().max() > 0.5  # not the model's own layout
