"""Encoders from weights: a :class:`~mimkit.nn.ViTEncoder` or a timm model behind the evaluation
interface, built from what :func:`mimkit.weights.read_weights` read.

* :func:`load_encoder` takes a mimkit checkpoint (single file or sharded), a mimkit export, a timm ViT
  state dict, an official MAE checkpoint or an official CAE / CAE v2 checkpoint (its encoder; 12 heads
  below ViT-L as the official models) and returns a :class:`~mimkit.nn.ViTEncoder`;
  timm ViTs of the other families (register tokens as in DINOv2-reg, no class token with
  ``fc_norm``, distilled DeiT, CLIP's pre-norm), recognised from their keys or named with
  ``timm_model``, come back as a :class:`~mimkit.nn.adapters.TimmEncoder` around the timm model.
* :func:`infer_vit_config` / :func:`timm_kwargs_from_state_dict`: the encoder shape from timm-keyed
  weights (heads are not in the shapes: given, or those of the published size with that width).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mimkit.errors import InteropError
from mimkit.nn.adapters import TimmEncoder
from mimkit.nn.vit import ViTConfig, ViTEncoder
from mimkit.weights.official import official_cae_encoder, official_cae_heads
from mimkit.weights.read import FORMATS, Weights, read_weights

_ENCODER_FORMATS = ("mimkit-checkpoint", "mimkit-dcp", "mimkit-export", "mimkit-state", "official-mae", "official-cae",
                    "timm")
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}


def infer_vit_config(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> ViTConfig:
    """Encoder shape from timm/MAE-keyed weights. Heads are not in the shapes: taken from
    ``num_heads`` or the published size with that width."""
    try:
        w = sd["patch_embed.proj.weight"]
        pos = sd["pos_embed"]
    except KeyError as e:
        raise InteropError(f"not a ViT state dict: missing {e}") from e
    d, c, p, _ = w.shape
    n = pos.shape[1] - 1 if "cls_token" in sd else pos.shape[1]
    side = int(round(n**0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = num_heads or _HEADS_BY_WIDTH.get(d)
    if heads is None:
        raise InteropError(f"cannot tell the number of heads of a {d}-wide ViT; pass num_heads")
    mlp = sd["blocks.0.mlp.fc1.weight"].shape[0] / d
    ls = "blocks.0.ls1.gamma" in sd
    return ViTConfig(img_size=side * p, patch_size=p, in_chans=c, embed_dim=d, depth=depth, num_heads=heads,
                     mlp_ratio=mlp, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                     layer_scale=float(sd["blocks.0.ls1.gamma"][0]) if ls else None)


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


_TIMM_ONLY_KEYS = ("reg_token", "dist_token", "fc_norm.weight", "norm_pre.weight")


def needs_timm(sd: dict) -> bool:
    """Whether a timm-keyed state dict is a ViT family :class:`ViTEncoder` cannot hold (register or
    distillation tokens, no class token, ``fc_norm`` pooling, a pre-norm, positions without the class
    token)."""
    if any(k in sd for k in _TIMM_ONLY_KEYS) or "cls_token" not in sd:
        return True
    pos, w = sd.get("pos_embed"), sd.get("patch_embed.proj.weight")
    if pos is not None and pos.ndim == 3 and w is not None:
        n = pos.shape[1]
        return round(n**0.5) ** 2 == n and round((n - 1) ** 0.5) ** 2 != n - 1  # no_embed_class
    return False


def timm_kwargs_from_state_dict(sd: dict, num_heads: int | None = None) -> dict:
    """timm ``VisionTransformer`` arguments that rebuild the model these weights came from."""
    try:
        w, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
    except KeyError as e:
        raise InteropError(f"not a ViT state dict: missing {e}") from e
    d, c, p, _ = w.shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = num_heads or _HEADS_BY_WIDTH.get(d)
    if heads is None:
        raise InteropError(f"cannot tell the number of heads of a {d}-wide ViT; pass num_heads (--num-heads)")
    class_token = "cls_token" in sd
    reg = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    prefix = int(class_token) + reg + int("dist_token" in sd)
    n = pos.shape[1]
    if prefix and round((n - prefix) ** 0.5) ** 2 == n - prefix:
        grid, no_embed_class = round((n - prefix) ** 0.5), False
    elif round(n**0.5) ** 2 == n:
        grid, no_embed_class = round(n**0.5), prefix > 0
    else:
        raise InteropError(f"pos_embed of length {n} fits no square grid with {prefix} prefix token(s)")
    kw = dict(img_size=grid * p, patch_size=p, in_chans=c, embed_dim=d, depth=depth, num_heads=heads,
              mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / d, qkv_bias="blocks.0.attn.qkv.bias" in sd,
              class_token=class_token, reg_tokens=reg, no_embed_class=no_embed_class,
              pre_norm="norm_pre.weight" in sd)
    if "blocks.0.ls1.gamma" in sd:
        kw["init_values"] = float(sd["blocks.0.ls1.gamma"][0])
    if "fc_norm.weight" in sd:
        kw.update(global_pool="avg", fc_norm=True)
    elif not class_token:
        kw.update(global_pool="avg", fc_norm=False)
    return kw


def load_timm_encoder(sd: dict, timm_model: str | None = None, num_heads: int | None = None, path: str = "weights"):
    """A :class:`mimkit.nn.adapters.TimmEncoder` around a timm model (``timm_model`` by name, shapes
    from the weights; or a ``VisionTransformer`` rebuilt from the keys) holding ``sd`` exactly."""
    import timm

    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
    kw = timm_kwargs_from_state_dict(sd, num_heads)
    if "dist_token" in sd and timm_model is None:
        timm_model = "deit_base_distilled_patch16_224"
    try:
        if timm_model is None:
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **kw)
        else:
            # the name fixes the architecture (block type, activation, distillation); the weights its shape
            model = timm.create_model(timm_model, pretrained=False, num_classes=0, **kw)
    except RuntimeError as e:  # timm's "Unknown model"
        raise InteropError(f"{path}: timm cannot build {timm_model!r} ({e}); pass a name from timm.list_models()") from e
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of another shape (e.g. a distillation token the named model lacks)
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise InteropError(f"{path}: these weights are not a {timm_model or 'plain timm ViT'} ({first}); pass the "
                           "timm model they came from with --timm-model NAME") from None
    if missing or unexpected:
        hint = "pass the timm model it came from with --timm-model NAME" if timm_model is None else \
            f"these weights are not a {timm_model}"
        raise InteropError(f"{path}: weights do not fit the timm ViT {timm_model or kw}; missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}; {hint}")
    return TimmEncoder(model.eval()).eval()


def load_encoder(source: str | Path | Weights, num_heads: int | None = None, strict: bool = True,
                 timm_model: str | None = None):
    """A :class:`~mimkit.nn.ViTEncoder` (eval mode) from a weight file or :class:`Weights` (see the
    module doc); a :class:`~mimkit.nn.adapters.TimmEncoder` for timm ViT families beyond the plain one,
    or when ``timm_model`` names the timm architecture.

    Also sets ``encoder.source_config`` to the checkpoint's config dict when the file is a mimkit
    checkpoint (for normalization statistics), else ``None``."""
    w = source if isinstance(source, Weights) else read_weights(source)
    path, config, meta = w.path, w.config, w.meta
    if w.format not in _ENCODER_FORMATS:
        raise InteropError(f"{path} is {w.description}, not an encoder's weights; give {', '.join(FORMATS[f] for f in _ENCODER_FORMATS)}")
    sd = w.state
    if w.format == "official-mae":
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    elif w.format == "official-cae":  # timm keys; the official row-first position table loads as stored
        sd = official_cae_encoder(sd)
        num_heads = num_heads or official_cae_heads(int(sd["pos_embed"].shape[-1]))
    elif any(k.startswith("encoder.") for k in sd):
        sd = _strip(sd, "encoder.")
    if timm_model is not None or (config is None and "mimkit_vit_config" not in meta and needs_timm(sd)):
        enc = load_timm_encoder({k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")},
                                timm_model, num_heads, path)
        enc.source_config = config
        return enc
    sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token" or k.startswith("head")
                                                 or k.startswith("fc_norm"))}
    if config is not None and "model" in config:
        cfg = ViTConfig(**{**config["model"]["encoder"], "drop_path_rate": 0.0})
    elif "mimkit_vit_config" in meta:
        cfg = ViTConfig(**json.loads(meta["mimkit_vit_config"]))
    else:
        cfg = infer_vit_config(sd, num_heads)
    enc = ViTEncoder(cfg)
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise InteropError(f"{path}: weights do not fit the inferred encoder {cfg}; missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    enc.source_config = config
    return enc.eval()
