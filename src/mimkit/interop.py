"""Moving weights in and out: timm-keyed safetensors export, timm ViT and official MAE imports.

* :func:`export_encoder` writes the encoder with timm ``VisionTransformer`` keys to safetensors, with
  the encoder shape in the file's metadata; :func:`timm_model_for` builds the matching timm model.
* :func:`load_encoder` reads a mimkit checkpoint, an exported safetensors file, a timm ViT state dict
  or an official MAE ``.pth`` and returns a :class:`~mimkit.nn.ViTEncoder`; timm ViTs of the other
  families (register tokens as in DINOv2-reg, no class token with ``fc_norm``, distilled DeiT, CLIP's
  pre-norm), recognised from their keys or named with ``timm_model``, come back as a
  :class:`mimkit.eval.adapters.TimmEncoder` around the timm model itself.
* ``.pt``/``.pth`` files are read through the trainer's verified loader
  (:func:`mimkit.train.checkpoint.load_checkpoint`, :mod:`mimkit.safe_load`): weights only (no file
  runs code when it is read), a mimkit checksum is verified before the file is deserialised, and a
  mimkit training checkpoint without one is refused; foreign weight files (official MAE, timm) need
  none.
* :func:`mae_from_official` loads a full official MAE pretraining checkpoint (encoder *and* decoder)
  into :class:`~mimkit.methods.MAE`; :func:`to_official_state_dict` is the inverse mapping.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from mimkit.methods.base import DecoderConfig, ModelConfig
from mimkit.nn.vit import ViTConfig, ViTEncoder

# official MAE decoder names -> mimkit MAEDecoder names
_OFFICIAL_DECODER = {
    "decoder_embed.": "decoder.embed.",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.pos_embed",
    "decoder_blocks.": "decoder.blocks.",
    "decoder_norm.": "decoder.norm.",
    "decoder_pred.": "decoder.pred.",
}
# heads of the published ViT sizes (not recoverable from weight shapes)
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}


class InteropError(ValueError):
    """A weight file could not be understood; the message names the file and the fix."""


def _encoder_of(model) -> ViTEncoder:
    return model if isinstance(model, ViTEncoder) else model.encoder


def export_encoder(model, path: str | Path) -> Path:
    """Write the encoder (``model`` or ``model.encoder``) as timm-keyed safetensors.

    The file's metadata holds ``mimkit_vit_config`` (JSON of :class:`ViTConfig`)."""
    from safetensors.torch import save_file

    enc = _encoder_of(model)
    sd = {k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"mimkit_vit_config": json.dumps(asdict(enc.cfg)), "format": "timm"})
    return path


def timm_model_for(cfg: ViTConfig, **kwargs):
    """A timm ``VisionTransformer`` with the same shape (cls-token pooling, no head)."""
    import timm

    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="token",
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        init_values=cfg.layer_scale, **kwargs,
    )


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
                     mlp_ratio=mlp, layer_scale=float(sd["blocks.0.ls1.gamma"][0]) if ls else None)


def read_verified(path: str | Path) -> object:
    """A weight file through the trainer's verified, weights-only loader (a checksum is verified when
    the file has one; see :mod:`mimkit.safe_load`); errors as :class:`InteropError` (a refusal keeps
    its message, which names the opt-in)."""
    from mimkit.safe_load import FileRefusedError
    from mimkit.train.checkpoint import CheckpointError, load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise InteropError(f"weight file not found: {path}")
    try:
        return load_checkpoint(path, map_location="cpu", verify=True, require_checksum=False)
    except FileRefusedError as e:
        raise InteropError(str(e)) from e
    except CheckpointError as e:
        cause = e.__cause__ or e
        raise InteropError(f"{path} is not a readable PyTorch file ({type(cause).__name__}: "
                           f"{str(cause).splitlines()[0] if str(cause) else ''})") from e


def _read_any(path: Path, raw: object | None = None) -> tuple[dict, dict]:
    """(state dict or checkpoint dict, safetensors metadata)."""
    if not path.is_file():
        raise InteropError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise InteropError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    obj = raw if raw is not None else read_verified(path)
    if not isinstance(obj, dict):
        raise InteropError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    return obj, {}


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
    """A :class:`mimkit.eval.adapters.TimmEncoder` around a timm model (``timm_model`` by name, shapes
    from the weights; or a ``VisionTransformer`` rebuilt from the keys) holding ``sd`` exactly."""
    import timm

    from mimkit.eval.adapters import TimmEncoder

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


def load_encoder(path: str | Path, num_heads: int | None = None, strict: bool = True, timm_model: str | None = None,
                 _raw: object | None = None):
    """A :class:`ViTEncoder` from any supported weight file (see module doc); a
    :class:`~mimkit.eval.adapters.TimmEncoder` for timm ViT families beyond the plain one, or when
    ``timm_model`` names the timm architecture.

    Returns the encoder in eval mode; also sets ``encoder.source_config`` to the checkpoint's config
    dict when the file is a mimkit checkpoint (for normalization statistics), else ``None``.
    """
    path = Path(path)
    obj, meta = _read_any(path, _raw)
    config = None
    if "model" in obj and isinstance(obj["model"], dict):
        config = obj.get("config")
        sd = obj["model"]
    else:
        sd = obj
    if any(k.startswith("encoder.") for k in sd):
        sd = _strip(sd, "encoder.")
    elif any(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    if timm_model is not None or (config is None and "mimkit_vit_config" not in meta and needs_timm(sd)):
        enc = load_timm_encoder({k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")},
                                timm_model, num_heads, str(path))
        enc.source_config = config
        return enc
    sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token" or k.startswith("head")
                                                 or k.startswith("fc_norm"))}
    if config is not None and isinstance(config, dict) and "model" in config:
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


def mae_from_official(path: str | Path, num_heads: int | None = None, decoder_num_heads: int = 16,
                      norm_pix_loss: bool = True):
    """Load an official MAE pretraining checkpoint (``{'model': state_dict}``, encoder + decoder).

    The released checkpoints use 16 decoder heads and were trained with ``norm_pix_loss``."""
    from mimkit.methods.mae import MAE, MAEOptions

    obj, _ = _read_any(Path(path))
    sd = obj.get("model", obj)
    if "decoder_embed.weight" not in sd:
        raise InteropError(f"{path} has no decoder weights; it is not an MAE *pretraining* checkpoint "
                           "(use load_encoder for encoder-only files)")
    enc_cfg = infer_vit_config({k: v for k, v in sd.items() if not k.startswith("decoder")}, num_heads)
    dd = sd["decoder_embed.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
    mlp = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / dd
    model = MAE(ModelConfig(enc_cfg, DecoderConfig(dd, depth, decoder_num_heads, mlp)),
                MAEOptions(norm_pix_loss=norm_pix_loss))
    model.load_state_dict(from_official_state_dict(sd))
    return model
