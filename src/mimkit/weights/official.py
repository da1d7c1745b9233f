"""Official checkpoints' key layouts <-> mimkit's: facebookresearch/mae and Atten4Vis/CAE (CAE, CAE v2).

facebookresearch/mae ``models_mae.MaskedAutoencoderViT``: the encoder has timm's keys (``blocks.*``,
``patch_embed.*``, ``cls_token``, ``pos_embed``, ``norm.*``); the decoder's are ``decoder_embed``,
``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``, which
map one to one onto :class:`~mimkit.nn.decoder.MAEDecoder`'s.
"""

from __future__ import annotations

import re

import torch

from mimkit.errors import InteropError

# official MAE decoder names -> mimkit MAEDecoder names
_OFFICIAL_DECODER = {
    "decoder_embed.": "decoder.embed.",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.pos_embed",
    "decoder_blocks.": "decoder.blocks.",
    "decoder_norm.": "decoder.norm.",
    "decoder_pred.": "decoder.pred.",
}


def from_official_state_dict(sd: dict) -> dict:
    """Official MAE keys (``blocks.*``, ``decoder_blocks.*``, ``mask_token``...) -> mimkit MAE keys."""
    out = {}
    for k, v in sd.items():
        for old, new in _OFFICIAL_DECODER.items():
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
        else:
            out["encoder." + k] = v
    return out


def to_official_state_dict(model) -> dict:
    """mimkit :class:`MAE` state dict -> official ``models_mae.MaskedAutoencoderViT`` keys."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            out[k[len("encoder."):]] = v
            continue
        for old, new in _OFFICIAL_DECODER.items():
            if k.startswith(new):
                out[old + k[len(new):]] = v
                break
        else:
            raise InteropError(f"no official name for {k}")
    return out



# --------------------------------------------------------------------------------------------------
# Atten4Vis/CAE (CAE and CAE v2)
#
# Pretraining checkpoints (``models/modeling_cae.py`` ``ContextAutoencoderViT``) are ``{"model": sd}``:
#   encoder.*                      VisionTransformerEncoder: patch_embed.proj, cls_token, pos_embed (fixed sin-cos,
#                                  row first: mimkit.nn.pos_embed), blocks.N.{norm1, attn.qkv.weight (no bias),
#                                  attn.q_bias, attn.v_bias, attn.proj, gamma_1, norm2, mlp.fc1, mlp.fc2, gamma_2}, norm
#   alignment_encoder.*            CAE only: a copy of encoder.* (refreshed from it at every step)
#   encoder_to_regresser[_norm].*  Linear + LN when the regressor is narrower than the encoder
#   rd_pos_embed, mask_token       the regressor/decoder positions (row first) and the mask token
#   regresser.regressor_blocks.N.* {norm1_q, norm1_k, norm1_v, cross_attn.{q,k,v}.weight, cross_attn.q_bias,
#                                  cross_attn.v_bias, cross_attn.proj, gamma_1_cross, norm2_cross, mlp_cross.*,
#                                  gamma_2_cross}
#   regresser.norm.*               the regressor's final LN (CAE v2 holds it but does not use it)
#   decoder.*                      CAE: decoder_blocks.N.* (encoder block layout), norm, head;
#                                  CAE v2 (model_type caev2): no blocks, norm + head = CAE v2's head
# Fine-tuning / linear-probe checkpoints (``models/modeling_finetune.py`` ``VisionTransformer``) hold the encoder
# alone, unprefixed, in the same block layout (``fc_norm`` when mean-pooled, ``head``, probe heads).
#
# The official attention has no key bias: mimkit's fused qkv bias is cat(q_bias, 0, v_bias). Layer scale
# gamma_1/gamma_2 is timm's ls1.gamma/ls2.gamma. mimkit's CAE has no alignment encoder: its stop-gradient
# alignment target runs the encoder's own weights (what the official copy holds), so alignment_encoder.* is
# not used.

_CAE_BLOCK_KEY = re.compile(r"^(encoder\.)?blocks\.\d+\.(attn\.q_bias|attn\.v_bias|gamma_1)$")
_REL_POS = ("relative_position_bias_table", "relative_position_index", "rel_pos_bias.")
# parts of a fine-tuning / probing checkpoint that are not the encoder
_PROBE_PREFIXES = ("query_token", "attentive_blocks.", "lm_head.")

# official CAE regressor block names -> mimkit RegressorBlock names
_REGRESSOR_BLOCK = {
    "norm1_q.": "norm_q.",
    "norm1_k.": "norm_k.",
    "norm1_v.": "norm_v.",
    "norm2_cross.": "norm2.",
    "mlp_cross.": "mlp.",
    "gamma_1_cross": "ls1.gamma",
    "gamma_2_cross": "ls2.gamma",
    "cross_attn.q_bias": "cross_attn.q.bias",
    "cross_attn.v_bias": "cross_attn.v.bias",
}


def official_cae_heads(width: int) -> int:
    """Encoder heads of the official register functions (``cae_{tiny,small,base,large}_patch16_224*``):
    12 for tiny / small / base (192 / 384 / 768 wide; tiny and small are *not* timm's 3 / 6), 16 for large."""
    return 16 if width == 1024 else 12


# The official regressor / decoder heads: ContextAutoencoderViT's ``decoder_num_heads=12`` default, which
# no script changes (``--decoder_num_heads`` is parsed but never reaches the model).
OFFICIAL_CAE_DECODER_HEADS = 12


def official_cae_layout(sd: dict) -> str | None:
    """``"cae"`` / ``"cae_v2"`` (a whole pretraining model: ``regresser.*`` / ``rd_pos_embed``; CAE v2's
    decoder has no blocks), ``"encoder"`` (an encoder alone in the official block layout, ``encoder.``
    prefixed or not: ``attn.q_bias`` / ``gamma_1`` keys), or ``None`` when ``sd`` is not an official CAE
    state dict."""
    if "rd_pos_embed" in sd or any(k.startswith("regresser.") for k in sd):
        return "cae" if any(k.startswith("decoder.decoder_blocks.") for k in sd) else "cae_v2"
    if any(_CAE_BLOCK_KEY.match(k) for k in sd):
        return "encoder"
    return None


def is_official_cae(sd: dict) -> bool:
    """Whether ``sd`` is in the official CAE key layout (:func:`official_cae_layout`)."""
    return official_cae_layout(sd) is not None


def _fused_blocks(sd: dict, src: str, dst: str, fill_bias: bool = False) -> dict:
    """Blocks in the official (BEiT-style) layout under ``src`` -> timm ``Block`` keys under ``dst``:
    ``attn.q_bias`` + ``attn.v_bias`` -> ``attn.qkv.bias = cat(q, 0, v)``, ``gamma_1/2`` -> ``ls1/2.gamma``.
    ``fill_bias``: a zero ``qkv.bias`` for blocks without ``q_bias`` (the target always has one)."""
    out, q_bias, v_bias, qkv = {}, {}, {}, {}
    for k, v in sd.items():
        if not k.startswith(src):
            continue
        idx, rest = k[len(src):].split(".", 1)
        if rest == "attn.q_bias":
            q_bias[idx] = v
        elif rest == "attn.v_bias":
            v_bias[idx] = v
        else:
            if rest == "attn.qkv.weight":
                qkv[idx] = v
            rest = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}.get(rest, rest)
            out[f"{dst}{idx}.{rest}"] = v
    for idx, w in qkv.items():
        if idx in q_bias or idx in v_bias:
            if idx not in q_bias or idx not in v_bias:
                raise InteropError(f"{src}{idx}.attn has only one of q_bias / v_bias")
            q, v = q_bias[idx], v_bias[idx]
            out[f"{dst}{idx}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        elif fill_bias:
            out[f"{dst}{idx}.attn.qkv.bias"] = w.new_zeros(w.shape[0])
    return out


def _encoder_timm(enc: dict) -> tuple[dict, list[str]]:
    """An unprefixed official encoder -> (timm keys, keys dropped: probe parts, BatchNorm statistics)."""
    rel = [k for k in enc if any(r in k for r in _REL_POS)]
    if rel:
        raise InteropError(f"the encoder uses relative position biases ({rel[0]}); mimkit's ViT has absolute "
                           "positions only, so these weights cannot be loaded")
    if "pos_embed" not in enc:
        raise InteropError("the encoder holds no pos_embed (fine-tuned without --sin_pos_emb); mimkit's ViT needs "
                           "its absolute positions")
    bn_stats = "fc_norm.weight" not in enc  # LP_BatchNorm of a linear probe: running statistics only
    out = _fused_blocks(enc, "blocks.", "blocks.")
    dropped = []
    for k, v in enc.items():
        if k.startswith("blocks."):
            continue
        if k.startswith(_PROBE_PREFIXES) or (bn_stats and k.startswith("fc_norm.")):
            dropped.append(k)
        else:
            out[k] = v
    return out, dropped


def _encoder_prefix(sd: dict) -> str:
    return "encoder." if any(k.startswith("encoder.") for k in sd) else ""


def official_cae_encoder(sd: dict) -> dict:
    """The encoder of an official CAE state dict (a whole pretraining model, or a fine-tuning / probing
    checkpoint) with timm ``VisionTransformer`` keys: ``patch_embed.proj.*``, ``cls_token``, ``pos_embed``
    (the official row-first table, as stored), ``blocks.N.*`` (fused qkv bias, ``ls1/ls2.gamma``),
    ``norm.*``; a fine-tuned file's ``fc_norm.*`` and ``head.*`` are kept (timm's names already), probe
    parts and BatchNorm statistics dropped. Relative position biases are refused (mimkit's ViT has
    absolute positions only)."""
    if official_cae_layout(sd) is None:
        raise InteropError("not an official CAE state dict (no regresser.*, rd_pos_embed, attn.q_bias or gamma_1 keys)")
    prefix = _encoder_prefix(sd)
    return _encoder_timm({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})[0]


def _regressor_blocks(sd: dict) -> dict:
    out = {}
    src = "regresser.regressor_blocks."
    for k, v in sd.items():
        if not k.startswith(src):
            continue
        idx, rest = k[len(src):].split(".", 1)
        for old, new in _REGRESSOR_BLOCK.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[f"regressor.blocks.{idx}.{rest}"] = v
        if rest == "cross_attn.q.weight" and f"{src}{idx}.cross_attn.q_bias" not in sd:
            # no q/v bias in the file (qkv_bias=False): mimkit's regressor always has them, at zero
            out[f"regressor.blocks.{idx}.cross_attn.q.bias"] = v.new_zeros(v.shape[0])
            out[f"regressor.blocks.{idx}.cross_attn.v.bias"] = v.new_zeros(v.shape[0])
    return out


def from_official_cae_state_dict(sd: dict) -> tuple[dict, list[str]]:
    """An official CAE / CAE v2 state dict -> (mimkit method keys, official keys not used).

    ============================================ ================================================
    official                                     mimkit (:class:`~mimkit.methods.CAE` / ``CAEv2``)
    ============================================ ================================================
    ``encoder.*`` (blocks fused, see above)      ``encoder.*``
    ``encoder_to_regresser.*`` / ``_norm.*``     ``proj.0.*`` / ``proj.1.*``
    ``rd_pos_embed``, ``mask_token``             ``regressor.pos_embed``, ``regressor.mask_token``
    ``regresser.regressor_blocks.N.*``           ``regressor.blocks.N.*`` (``norm1_q`` -> ``norm_q``,
                                                 ``norm2_cross`` -> ``norm2``, ``mlp_cross`` -> ``mlp``,
                                                 ``gamma_*_cross`` -> ``ls*.gamma``, ``cross_attn.q_bias``
                                                 -> ``cross_attn.q.bias`` ...)
    ``regresser.norm.*``                         ``regressor.norm.*`` (CAE; unused by CAE v2)
    ``decoder.decoder_blocks.N.*``               ``decoder.blocks.N.*`` (CAE)
    ``decoder.norm.*``, ``decoder.head.*``       ``decoder.norm/head.*`` (CAE), ``head.norm/head.*`` (CAE v2)
    ``alignment_encoder.*``                      not used: mimkit's alignment target shares ``encoder``
    ============================================ ================================================

    An encoder-only file maps to ``encoder.*`` (its classifier ``head.*`` / ``fc_norm.*`` not used)."""
    layout = official_cae_layout(sd)
    if layout is None:
        raise InteropError("not an official CAE state dict (no regresser.*, rd_pos_embed, attn.q_bias or gamma_1 keys)")
    prefix = _encoder_prefix(sd)
    enc, dropped = _encoder_timm({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    classifier = [k for k in enc if k.startswith(("head.", "fc_norm."))]
    out = {f"encoder.{k}": v for k, v in enc.items() if k not in classifier}
    unused = [prefix + k for k in dropped + classifier]
    if layout == "encoder":
        return out, unused + [k for k in sd if not k.startswith(prefix)]
    top = {"encoder_to_regresser.": "proj.0.", "encoder_to_regresser_norm.": "proj.1.",
           "rd_pos_embed": "regressor.pos_embed", "mask_token": "regressor.mask_token"}
    if layout == "cae":
        top.update({"regresser.norm.": "regressor.norm.", "decoder.norm.": "decoder.norm.",
                    "decoder.head.": "decoder.head."})
        out.update(_fused_blocks(sd, "decoder.decoder_blocks.", "decoder.blocks.", fill_bias=True))
    else:
        top.update({"decoder.norm.": "head.norm.", "decoder.head.": "head.head."})
    out.update(_regressor_blocks(sd))
    done = ("encoder.", "regresser.regressor_blocks.") + (("decoder.decoder_blocks.",) if layout == "cae" else ())
    for k, v in sd.items():
        if k.startswith(done):
            continue
        for old, new in top.items():
            if k == old or (old.endswith(".") and k.startswith(old)):
                out[new + k[len(old):]] = v
                break
        else:
            unused.append(k)  # alignment_encoder.* (CAE), regresser.norm.* (CAE v2)
    return out, unused
