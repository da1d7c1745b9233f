"""Hugging Face ``transformers`` interoperability: MAE encoder + decoder <-> ``ViTMAEForPreTraining``.

* :func:`export_hf` writes a mimkit MAE-family model (MAE, EMAE, SBAM: the encoder and the MAE
  decoder) as a ``ViTMAEForPreTraining`` directory (``config.json`` + ``model.safetensors``, by
  ``save_pretrained``) that ``ViTMAEForPreTraining.from_pretrained(dir)`` loads; the config carries the
  method's ``mask_ratio`` and ``norm_pix_loss``.
* :func:`from_hf_state_dict` maps such a directory's weights (read by :func:`mimkit.weights.read_weights`,
  format ``hf``) to mimkit keys, for ``model.init`` (:mod:`mimkit.init_from`); :func:`mae_from_hf`
  builds the :class:`~mimkit.methods.MAE`. Reading needs only ``safetensors`` (``transformers`` is
  needed for export).

Both ``transformers`` key layouts are read: 4.x (``vit.encoder.layer.N.attention.attention.query`` ...,
the layout of the checkpoints on the Hub such as ``facebook/vit-mae-base``) and 5.x
(``vit.layers.N.attention.q_proj`` ...); export uses the installed version's. The model is the same:
pre-norm blocks with exact GELU, fixed 2-D sin-cos positions in MAE's channel order (the Hugging Face
table equals facebookresearch/mae's ``get_2d_sincos_pos_embed``), MAE's random masking from ``noise``
and the masked-patch MSE with the optional per-patch normalised target; given the same ``noise`` the
two give the same loss (``tests/test_hf.py``). Hugging Face's ``patchify`` takes square images only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mimkit.errors import ConfigError
from mimkit.weights import read_weights
from mimkit.weights.checkpoint import shareable

# per-block names: mimkit (timm) <- Hugging Face, both layouts; q/k/v are fused into qkv
_BLOCK_V5 = {"attention.o_proj": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_QKV_V5 = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
_BLOCK_V4 = {"attention.output.dense": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
_QKV_V4 = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_FLAT = {  # mimkit key <- Hugging Face key
    "encoder.cls_token": "vit.embeddings.cls_token",
    "encoder.pos_embed": "vit.embeddings.position_embeddings",
    "encoder.patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "encoder.patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "encoder.norm.weight": "vit.layernorm.weight",
    "encoder.norm.bias": "vit.layernorm.bias",
    "decoder.mask_token": "decoder.mask_token",
    "decoder.pos_embed": "decoder.decoder_pos_embed",
    "decoder.embed.weight": "decoder.decoder_embed.weight",
    "decoder.embed.bias": "decoder.decoder_embed.bias",
    "decoder.norm.weight": "decoder.decoder_norm.weight",
    "decoder.norm.bias": "decoder.decoder_norm.bias",
    "decoder.pred.weight": "decoder.decoder_pred.weight",
    "decoder.pred.bias": "decoder.decoder_pred.bias",
}
_LAYER_PREFIXES = {"v5": ("vit.layers.", "decoder.decoder_layers."),
                   "v4": ("vit.encoder.layer.", "decoder.decoder_layers.")}
# transformers 5.x writes the 4.x names on save_pretrained, its decoder blocks as ``decoder.decoder_encoder.layer.N``
_DECODER_ALIASES = ("decoder.decoder_layers.", "decoder.decoder_encoder.layer.")


def _layout(keys) -> str:
    keys = list(keys)
    if any(".attention.q_proj." in k for k in keys):
        return "v5"
    if any(".attention.attention.query." in k for k in keys):
        return "v4"
    raise ConfigError("not a Hugging Face ViTMAE state dict (no attention q_proj / attention.query keys); give a "
                      "ViTMAEForPreTraining directory written by save_pretrained")


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``ViTMAEForPreTraining`` keys (4.x or 5.x) -> mimkit MAE keys (q, k, v fused)."""
    if sd and all(k.startswith(("embeddings.", "encoder.layer.", "layers.", "layernorm.")) for k in sd):
        sd = {f"vit.{k}": v for k, v in sd.items()}  # a bare ViTMAEModel
    layout = _layout(sd)
    block, qkv = (_BLOCK_V5, _QKV_V5) if layout == "v5" else (_BLOCK_V4, _QKV_V4)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _FLAT.items():
        if theirs in sd:
            out[ours] = sd[theirs]
    enc_prefix = _LAYER_PREFIXES[layout][0]
    dec_prefix = next((a for a in _DECODER_ALIASES if any(k.startswith(a) for k in sd)), _DECODER_ALIASES[0])
    for ours_prefix, theirs_prefix in zip(("encoder.blocks.", "decoder.blocks."), (enc_prefix, dec_prefix)):
        ids = sorted({int(m.group(1)) for k in sd if (m := re.match(re.escape(theirs_prefix) + r"(\d+)\.", k))})
        for i in ids:
            src, dst = f"{theirs_prefix}{i}.", f"{ours_prefix}{i}."
            for theirs, ours in block.items():
                for kind in ("weight", "bias"):
                    if f"{src}{theirs}.{kind}" in sd:
                        out[f"{dst}{ours}.{kind}"] = sd[f"{src}{theirs}.{kind}"]
            for kind in ("weight", "bias"):
                parts = [sd.get(f"{src}{name}.{kind}") for name in qkv]
                if all(p is not None for p in parts):
                    out[f"{dst}attn.qkv.{kind}"] = torch.cat(parts, 0)
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], layout: str = "v5") -> dict[str, torch.Tensor]:
    """mimkit MAE keys -> Hugging Face keys of ``layout`` (``v5``: transformers 5.x, ``v4``: 4.x)."""
    block, qkv = (_BLOCK_V5, _QKV_V5) if layout == "v5" else (_BLOCK_V4, _QKV_V4)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _FLAT.items():
        out[theirs] = sd[ours]
    for ours_prefix, theirs_prefix in zip(("encoder.blocks.", "decoder.blocks."), _LAYER_PREFIXES[layout]):
        ids = sorted({int(m.group(1)) for k in sd if (m := re.match(re.escape(ours_prefix) + r"(\d+)\.", k))})
        for i in ids:
            src, dst = f"{ours_prefix}{i}.", f"{theirs_prefix}{i}."
            for theirs, ours in block.items():
                for kind in ("weight", "bias"):
                    out[f"{dst}{theirs}.{kind}"] = sd[f"{src}{ours}.{kind}"]
            for kind in ("weight", "bias"):
                if f"{src}attn.qkv.{kind}" in sd:
                    for name, part in zip(qkv, sd[f"{src}attn.qkv.{kind}"].chunk(3, 0)):
                        out[f"{dst}{name}.{kind}"] = part.contiguous()
    return out


# --------------------------------------------------------------------------------------------------
# export


def hf_config_for(model, input: dict | None = None):
    """The ``ViTMAEConfig`` of a mimkit MAE-family model (shapes, ``mask_ratio``, ``norm_pix_loss``).
    ``input`` (a checkpoint's record, :attr:`mimkit.weights.Weights.input`): its normalisation is stored
    as ``image_mean`` / ``image_std`` (one value per channel; what ``ViTImageProcessor`` calls them), which
    :func:`mimkit.weights.read_weights` reads back as the directory's ``input``."""
    from transformers import ViTMAEConfig

    enc = model.encoder
    c = enc.cfg
    h, w = enc.img_hw
    if h != w:
        raise ConfigError(f"Hugging Face ViTMAEForPreTraining takes square images only; this encoder is {h}x{w}. "
                          "Export the encoder with `mimkit export` (timm keys) instead")
    if c.layer_scale:
        raise ConfigError("ViTMAE has no layer scale; this encoder uses model.encoder.layer_scale, export it with "
                          "`mimkit export` (timm keys) instead")
    dec = getattr(model, "decoder", None)
    needed = ("embed", "mask_token", "pos_embed", "blocks", "norm", "pred")
    if dec is None or not all(hasattr(dec, n) for n in needed) or dec.pred.out_features != enc.patch_size**2 * enc.in_chans:
        raise ConfigError(f"{type(model).__name__} has no MAE pixel decoder; Hugging Face export takes MAE, EMAE or "
                          "SBAM models (use `mimkit export` for the encoder of any method)")
    if abs(c.norm_eps - 1e-6) > 1e-12:
        raise ConfigError(f"ViTMAE uses one layer_norm_eps for encoder and decoder; this encoder's norm_eps is "
                          f"{c.norm_eps}, the decoder's 1e-6")
    opts = getattr(model, "options", None)
    masking = getattr(opts, "masking", None)
    ratio = float(getattr(masking, "ratio", 0.75)) if getattr(masking, "kind", "random") == "random" else 0.75
    blk = dec.blocks[0] if len(dec.blocks) else None
    return ViTMAEConfig(
        image_size=h, patch_size=enc.patch_size, num_channels=enc.in_chans, hidden_size=enc.embed_dim,
        num_hidden_layers=len(enc.blocks), num_attention_heads=enc.num_heads,
        intermediate_size=enc.blocks[0].mlp.fc1.out_features, qkv_bias=c.qkv_bias, layer_norm_eps=c.norm_eps,
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        decoder_hidden_size=dec.decoder_dim, decoder_num_hidden_layers=len(dec.blocks),
        decoder_num_attention_heads=blk.attn.num_heads if blk is not None else 1,
        decoder_intermediate_size=blk.mlp.fc1.out_features if blk is not None else 4 * dec.decoder_dim,
        mask_ratio=ratio, norm_pix_loss=bool(getattr(opts, "norm_target", True)), **_norm_fields(input, enc.in_chans),
    )


def _norm_fields(input: dict | None, in_chans: int) -> dict:
    """``image_mean`` / ``image_std`` (one value per channel) of a checkpoint's input record, or nothing."""
    from mimkit.weights.read import input_record

    rec = input_record(input) if input is not None else None
    if rec is None:
        return {}
    per_channel = lambda v: [float(x) for x in (v * in_chans if len(v) == 1 else v)]  # noqa: E731
    return {"image_mean": per_channel(rec["mean"]), "image_std": per_channel(rec["std"])}


def to_hf_model(model, input: dict | None = None):
    """A ``transformers.ViTMAEForPreTraining`` holding ``model``'s encoder and decoder (eval mode);
    ``input``: the checkpoint's input record (:func:`hf_config_for`)."""
    from transformers import ViTMAEForPreTraining

    hf = ViTMAEForPreTraining(hf_config_for(model, input))
    layout = "v5" if any(".attention.q_proj." in k for k in hf.state_dict()) else "v4"
    sd = to_hf_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, layout)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"the installed transformers' ViTMAE does not match mimkit's mapping (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}); report this with `pip show transformers`")
    return hf.eval()


def export_hf(model, out_dir: str | Path, input: dict | None = None) -> Path:
    """Write ``model`` (MAE / EMAE / SBAM) as a ``ViTMAEForPreTraining`` directory. ``input`` (the
    checkpoint's record, :attr:`mimkit.weights.Weights.input`): the input normalisation it was trained
    with goes into ``config.json`` as ``image_mean`` / ``image_std`` (read back by
    :func:`mimkit.weights.read_weights` and used by ``mimkit eval``)."""
    out = Path(out_dir)
    hf = to_hf_model(model, input)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return shareable(out)  # safetensors creates its files owner-only


# --------------------------------------------------------------------------------------------------
# import


def mae_from_hf(path: str | Path):
    """Build a :class:`~mimkit.methods.MAE` from a ``ViTMAEForPreTraining`` directory (shapes from its
    ``config.json``, ``norm_pix_loss`` and ``mask_ratio`` too)."""
    from mimkit.methods.base import DecoderConfig, ModelConfig
    from mimkit.methods.mae import MAE, MAEOptions
    from mimkit.nn.vit import ViTConfig

    w = read_weights(path)
    p, sd, cfg = Path(w.path), w.state, w.meta
    if w.format != "hf":
        raise ConfigError(f"{p} is {w.description}, not a Hugging Face ViTMAE directory; give a directory written "
                          "by ViTMAEForPreTraining.save_pretrained")
    if not cfg:
        raise ConfigError(f"{p}: no config.json beside the weights; give the save_pretrained directory")
    hidden = cfg["hidden_size"]
    enc = ViTConfig(img_size=cfg["image_size"], patch_size=cfg["patch_size"], in_chans=cfg.get("num_channels", 3),
                    embed_dim=hidden, depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                    mlp_ratio=cfg["intermediate_size"] / hidden, qkv_bias=cfg.get("qkv_bias", True),
                    norm_eps=cfg.get("layer_norm_eps", 1e-12))
    dd = cfg["decoder_hidden_size"]
    dec = DecoderConfig(dd, cfg["decoder_num_hidden_layers"], cfg["decoder_num_attention_heads"],
                        cfg["decoder_intermediate_size"] / dd)
    opts = MAEOptions(norm_target=bool(cfg.get("norm_pix_loss", False)))
    opts.masking.ratio = float(cfg.get("mask_ratio", 0.75))
    model = MAE(ModelConfig(enc, dec), opts)
    if abs(enc.norm_eps - 1e-6) > 1e-12:
        for m in model.decoder.modules():  # one eps for encoder and decoder in ViTMAE
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = enc.norm_eps
    model.load_state_dict(from_hf_state_dict(sd))
    return model.eval()
