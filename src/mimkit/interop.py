"""Moving weights in and out: timm-keyed safetensors export, timm ViT and official MAE imports.

* :func:`export_encoder` writes the encoder with timm ``VisionTransformer`` keys to safetensors, with
  the encoder shape in the file's metadata; :func:`timm_model_for` builds the matching timm model.
* :func:`mae_from_official` loads a full official MAE pretraining checkpoint (encoder *and* decoder)
  into :class:`~mimkit.methods.MAE`; :func:`to_official_state_dict` is the inverse mapping.
* :func:`cae_from_official` loads an official CAE / CAE v2 pretraining checkpoint (Atten4Vis/CAE: encoder,
  regressor, decoder or CAE v2 head, mask token, both row-first position tables) into
  :class:`~mimkit.methods.CAE` / :class:`~mimkit.methods.CAEv2` (key map: :mod:`mimkit.weights.official`).
* Reading is :mod:`mimkit.weights` (one reader for every format, weights only, checksums verified);
  :func:`load_encoder`, :func:`load_timm_encoder`, :func:`infer_vit_config`, :func:`read_verified`
  and the official key maps are re-exported here for the public API.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mimkit.errors import InteropError
from mimkit.methods.base import DecoderConfig, ModelConfig
from mimkit.nn.vit import ViTConfig, ViTEncoder
from mimkit.weights.checkpoint import shareable
from mimkit.weights.encoders import (  # noqa: F401 - the public API of mimkit.interop
    infer_vit_config,
    load_encoder,
    load_timm_encoder,
    needs_timm,
    timm_kwargs_from_state_dict,
)
from mimkit.weights.official import (  # noqa: F401 - the public API of mimkit.interop
    OFFICIAL_CAE_DECODER_HEADS,
    from_official_cae_state_dict,
    from_official_state_dict,
    is_official_cae,
    official_cae_encoder,
    official_cae_heads,
    official_cae_layout,
    to_official_state_dict,
)
from mimkit.weights.read import (
    read_verified,  # noqa: F401
    read_weights,
)


def _encoder_of(model) -> ViTEncoder:
    return model if isinstance(model, ViTEncoder) else model.encoder


def export_encoder(model, path: str | Path, input: dict | None = None) -> Path:
    """Write the encoder (``model`` or ``model.encoder``) as timm-keyed safetensors.

    The file's metadata holds ``mimkit_vit_config`` (JSON of :class:`ViTConfig`) and, given ``input``
    (the record of a checkpoint, :attr:`mimkit.weights.Weights.input`), ``mimkit_input``: JSON of the
    input normalisation the encoder was trained with (``mean``, ``std``) and its ``img_size`` /
    ``in_chans``, which :func:`read_weights` returns as the export's ``input`` and evaluation uses."""
    from safetensors.torch import save_file

    from mimkit.weights.read import input_record

    enc = _encoder_of(model)
    sd = {k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"mimkit_vit_config": json.dumps(asdict(enc.cfg)), "format": "timm"}
    record = input_record({**input, "img_size": [int(v) for v in enc.img_hw], "in_chans": enc.in_chans}) \
        if isinstance(input, dict) else None
    if record is not None:
        meta["mimkit_input"] = json.dumps(record)
    save_file(sd, str(path), metadata=meta)
    return shareable(path)  # safetensors creates the file owner-only


def timm_kwargs(cfg: ViTConfig) -> dict:
    """``timm.create_model`` arguments of a timm ``VisionTransformer`` with the shape of ``cfg``
    (cls-token pooling, no head); the one place that maps a :class:`ViTConfig` to timm."""
    kw = dict(pretrained=False, num_classes=0, global_pool="token", img_size=cfg.img_size, patch_size=cfg.patch_size,
              in_chans=cfg.in_chans, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
              mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias)
    if cfg.layer_scale is not None:
        kw["init_values"] = cfg.layer_scale
    return kw


def timm_model_for(cfg: ViTConfig, **kwargs):
    """A timm ``VisionTransformer`` with the same shape (cls-token pooling, no head)."""
    import timm

    return timm.create_model("vit_base_patch16_224", **{**timm_kwargs(cfg), **kwargs})


def timm_load_snippet(cfg: ViTConfig, path: str | Path) -> str:
    """Python lines that load an export of an encoder of shape ``cfg`` into timm (printed by
    ``mimkit export``)."""
    args = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(cfg).items())
    return (f'import timm, safetensors.torch\nmodel = timm.create_model("vit_base_patch16_224", {args})\n'
            f'model.load_state_dict(safetensors.torch.load_file("{path}"))')
























def mae_from_official(path: str | Path, num_heads: int | None = None, decoder_num_heads: int = 16,
                      norm_target: bool = True):
    """Load an official MAE pretraining checkpoint (``{'model': state_dict}``, encoder + decoder).

    The released checkpoints use 16 decoder heads and were trained with ``norm_pix_loss`` (mimkit's ``norm_target``)."""
    from mimkit.methods.mae import MAE, MAEOptions

    w = read_weights(path)
    sd = w.state
    if w.format != "official-mae":
        raise InteropError(f"{path} is {w.description}, not an official MAE *pretraining* checkpoint with decoder "
                           "weights (use load_encoder for encoder-only files)")
    enc_cfg = infer_vit_config({k: v for k, v in sd.items() if not k.startswith("decoder")}, num_heads)
    dd = sd["decoder_embed.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
    mlp = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / dd
    model = MAE(ModelConfig(enc_cfg, DecoderConfig(dd, depth, decoder_num_heads, mlp)),
                MAEOptions(norm_target=norm_target))
    model.load_state_dict(from_official_state_dict(sd))
    return model


def _depth(sd: dict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return 1 + max(ids) if ids else 0


def cae_from_official(path: str | Path, num_heads: int | None = None,
                      decoder_num_heads: int = OFFICIAL_CAE_DECODER_HEADS, options=None):
    """A mimkit :class:`~mimkit.methods.CAE` or :class:`~mimkit.methods.CAEv2` holding an official CAE /
    CAE v2 pretraining checkpoint (Atten4Vis/CAE ``{"model": ...}``), whose forward on a mask equals the
    official model's on the same boolean mask (mimkit's block masks list ids in raster order, as the official
    boolean indexing does).

    Shapes come from the weights: encoder, regressor width / depth / MLP ratio, decoder depth, head width,
    whether there is a projection and layer scale. Heads are not in the shapes: ``num_heads`` defaults to
    the official register functions' (12 for tiny / small / base, 16 for large), ``decoder_num_heads`` to the
    official 12 (regressor and decoder). The position tables (``encoder.pos_embed``, ``rd_pos_embed``) are
    loaded as stored, in the official row-first layout (:mod:`mimkit.nn.pos_embed`). The alignment encoder
    is not loaded: mimkit's stop-gradient alignment target runs the encoder's own weights.

    ``options`` (:class:`~mimkit.methods.CAEOptions` / :class:`~mimkit.methods.CAEv2Options`) gives what the
    weights do not say; its ``regressor_depth``, ``layer_scale`` and vocabulary size are set from the file.
    A CAE whose decoder predicts token ids (the released files: DALL-E's 8192) needs
    ``CAEOptions(target="tokenizer", tokenizer=...)`` (or ``target="codebook"``); a pixel head (``p*p*C``
    outputs) defaults to ``target="pixel"``. A CAE v2 file holds no teacher: give
    ``CAEv2Options(teacher_path=...)`` (the CLIP checkpoint it was trained against, as wide as the head)."""
    from mimkit.methods.cae import CAE, CAEOptions
    from mimkit.methods.cae_v2 import CAEv2, CAEv2Options

    w = read_weights(path)
    sd = w.state
    layout = official_cae_layout(sd) if w.format == "official-cae" else None
    if layout not in ("cae", "cae_v2"):
        what = "an official CAE encoder alone" if layout else w.description
        raise InteropError(f"{path} is {what}, not an official CAE / CAE v2 pretraining checkpoint with regressor "
                           "weights (use load_encoder for the encoder)")
    state, _ = from_official_cae_state_dict(sd)
    enc_sd = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    enc_cfg = infer_vit_config(enc_sd, num_heads or official_cae_heads(int(enc_sd["pos_embed"].shape[-1])))
    d = int(sd["mask_token"].shape[-1])
    q = sd["regresser.regressor_blocks.0.cross_attn.q.weight"]
    if q.shape[0] != d or d % decoder_num_heads:
        raise InteropError(f"{path}: the regressor is {d} wide with {q.shape[0]} attention channels; mimkit's needs "
                           f"them equal and divisible by decoder_num_heads={decoder_num_heads}")
    reg_depth, dec_depth = _depth(sd, "regresser.regressor_blocks."), _depth(sd, "decoder.decoder_blocks.")
    mlp = sd["regresser.regressor_blocks.0.mlp_cross.fc1.weight"].shape[0] / d
    out = int(sd["decoder.head.weight"].shape[0])
    # regressor and decoder share one layer-scale setting; officially a 0 init keeps the regressor's gammas at 1
    reg_gammas = [v for k, v in sd.items() if k.startswith("regresser.") and ".gamma_" in k]
    layer_scale = 0.1 if any(".gamma_" in k for k in sd if k.startswith("decoder.decoder_blocks.")) or \
        any(not bool(torch.all(g == 1)) for g in reg_gammas) else None
    if layer_scale is None:
        state = {k: v for k, v in state.items() if not (k.startswith("regressor.") and ".ls" in k)}
    model_cfg = ModelConfig(enc_cfg, DecoderConfig(d, dec_depth, decoder_num_heads, mlp))
    if layout == "cae":
        patch_dim = enc_cfg.patch_size**2 * enc_cfg.in_chans
        o = options if options is not None else CAEOptions(target="pixel" if out == patch_dim else "tokenizer")
        if not isinstance(o, CAEOptions):
            raise InteropError(f"{path} is an official CAE checkpoint: pass options=CAEOptions(...), not "
                               f"{type(o).__name__}")
        if (o.target == "pixel" and out != patch_dim) or (o.target == "tokenizer" and not o.tokenizer):
            raise InteropError(f"{path}: the decoder predicts {out} token ids (a {patch_dim}-value pixel head would "
                               "be a pixel target); pass options=CAEOptions(target='tokenizer', "
                               "tokenizer='package.module:attr') naming the tokenizer it was trained against "
                               "(DALL-E's dVAE for the released files)")
        size = {"tokenizer": {"tokenizer_vocab": out}, "codebook": {"codebook_size": out}}.get(o.target, {})
        model = CAE(model_cfg, replace(o, regressor_depth=reg_depth, layer_scale=layer_scale, **size))
    else:
        o = options if options is not None else CAEv2Options()
        if not isinstance(o, CAEv2Options):
            raise InteropError(f"{path} is an official CAE v2 checkpoint: pass options=CAEv2Options(...), not "
                               f"{type(o).__name__}")
        if o.teacher_path is None and not o.teacher_random_init:
            raise InteropError(f"{path}: an official CAE v2 checkpoint holds no teacher; pass "
                               "options=CAEv2Options(teacher_path=...) with the CLIP checkpoint it was trained "
                               f"against ({out}-wide features)")
        model = CAEv2(model_cfg, replace(o, regressor_depth=reg_depth, layer_scale=layer_scale))
        if model.head is None or model.head.head.out_features != out:
            have = "no teacher" if model.head is None else f"a {model.head.head.out_features}-wide teacher"
            raise InteropError(f"{path}: the CAE v2 head predicts {out}-wide teacher features; method.teacher_path "
                               f"gives {have}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("teacher.", "codebook.")) and k != "_extra_state"]
    if missing or unexpected:
        raise InteropError(f"{path}: the weights do not fit the mimkit {layout} built from them; missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model

