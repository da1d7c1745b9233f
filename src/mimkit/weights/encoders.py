"""Encoders from weights: a :class:`~mimkit.nn.ViTEncoder` or a timm model behind the evaluation
interface, built from what :func:`mimkit.weights.read_weights` read.

* :func:`load_encoder` takes a mimkit checkpoint (single file or sharded), a mimkit export, a timm ViT
  state dict, an official MAE checkpoint or an official CAE / CAE v2 checkpoint (its encoder; 12 heads
  below ViT-L as the official models) and returns a :class:`~mimkit.nn.ViTEncoder`;
  timm ViTs of the other families (register tokens as in DINOv2-reg, no class token with
  ``fc_norm``, distilled DeiT, CLIP's pre-norm), recognised from their keys or named with
  ``timm_model``, come back as a :class:`~mimkit.nn.adapters.TimmEncoder` around the timm model.
* :func:`infer_vit_config` / :func:`timm_kwargs_from_state_dict`: the encoder shape from timm-keyed
  weights.

What the keys cannot tell is given or refused, never guessed (each refusal one :class:`InteropError`
line naming the flag):

* the grid (:func:`pos_layout`): from the size the file records or ``img_size`` (``--img-size``);
  without either, the one square grid the position table fits, with or without positions for the
  prefix tokens (class, register, distillation); a table that fits two or none needs the size.
* the heads: ``num_heads`` (``--num-heads``), else those of the ``timm_model`` named when it has the
  weights' width, else those of the published size with that width (192, 384, 768, 1024, 1280, 1408).
* CLIP's layout (``norm_pre``, LayerNorm eps 1e-5) is in the keys, its activation (OpenAI's QuickGELU
  or GELU) is not: such weights need ``timm_model`` (``--timm-model``), which fixes block, activation
  and eps; the shapes always come from the weights.
* normalisation: ``encoder.input_norm = (mean, std, source)`` from the named timm model's
  ``pretrained_cfg`` (its tag when the name carries one), else ``None`` (the file does not say).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mimkit.errors import InteropError
from mimkit.nn.adapters import TimmEncoder
from mimkit.nn.vit import ViTConfig, ViTEncoder, optional_image_hw
from mimkit.weights.official import official_cae_encoder, official_cae_heads
from mimkit.weights.read import FORMATS, Weights, read_weights

_ENCODER_FORMATS = ("mimkit-checkpoint", "mimkit-dcp", "mimkit-export", "mimkit-state", "official-mae", "official-cae",
                    "timm")
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
_CLIP_HINT = "vit_base_patch16_clip_quickgelu_224 (QuickGELU: OpenAI's CLIP) or vit_base_patch16_clip_224 (GELU)"


def _size_text(hw: tuple[int, int]) -> str:
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]},{hw[1]}"


def _square_side(n: int) -> int | None:
    """The side of an ``n``-cell square grid (``n >= 1``), else ``None``."""
    if n < 1:
        return None
    s = int(round(n**0.5))
    return s if s * s == n else None


def prefix_tokens(sd: dict) -> tuple[int, int, int]:
    """``(class, register, distillation)`` token counts of timm-keyed weights."""
    reg = sd.get("reg_token")
    return int("cls_token" in sd), int(reg.shape[1]) if reg is not None else 0, int("dist_token" in sd)


def pos_layout(sd: dict, img_size: int | tuple[int, int] | None = None,
               path: str = "weights") -> tuple[tuple[int, int], bool]:
    """The patch grid ``(gh, gw)`` of timm-keyed weights and whether their position table leaves the
    prefix tokens out (timm's ``no_embed_class``).

    The table holds ``grid`` or ``grid + prefix`` positions. With ``img_size`` (the size the weights were
    trained at: a side or ``(H, W)``) the grid is ``(H/p, W/p)`` and the table must fit it; without it,
    the grid is the one square grid that fits, and a table that fits two (prefix tokens make
    ``n`` and ``n - prefix`` both squares: DINOv2-reg4 at 42 px is 9 positions, a 3x3 grid without
    prefix positions or a 2x2 grid with 5) or none is a one-line :class:`InteropError` asking for the
    size (``--img-size`` / ``img_size=``)."""
    try:
        w, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
    except KeyError as e:
        raise InteropError(f"{path}: not a ViT state dict: missing {e}") from e
    ph, pw = int(w.shape[-2]), int(w.shape[-1])
    patch = str(ph) if ph == pw else f"{ph}x{pw}"
    n = int(pos.shape[-2]) if pos.ndim >= 2 else int(pos.shape[0])
    cls, reg, dist = prefix_tokens(sd)
    prefix = cls + reg + dist
    what = "no prefix token" if not prefix else ", ".join(
        t for t in (f"{cls} class" if cls else "", f"{reg} register" if reg else "", f"{dist} distillation"
                    if dist else "") if t) + f" token{'s' if prefix > 1 else ''}"
    squares = [(s, p_out) for s, p_out in ((_square_side(n - prefix) if prefix else None, False),
                                           (_square_side(n), prefix > 0)) if s is not None]
    fits = " or ".join(f"{s * ph}" + ("" if ph == pw else f",{s * pw}") for s, _ in squares)
    hw = optional_image_hw(img_size)
    if hw is not None:
        h, wd = hw
        if h < 1 or wd < 1 or h % ph or wd % pw:
            raise InteropError(f"{path}: image size {_size_text(hw)} is not a whole number of the weights' {patch} px "
                               f"patches; give the size they were trained at with --img-size (img_size=)"
                               + (f", e.g. {fits}" if fits else ""))
        gh, gw = h // ph, wd // pw
        if prefix and n == gh * gw + prefix:
            return (gh, gw), False
        if n == gh * gw:
            return (gh, gw), prefix > 0
        raise InteropError(f"{path}: pos_embed has {n} positions, which fit no {_size_text(hw)} px input ({gh}x{gw} "
                           f"patches of {patch} px) with {what} (that takes {gh * gw}"
                           + (f" or {gh * gw + prefix}" if prefix else "") + " positions); give the size the weights "
                           "were trained at with --img-size (img_size=)" + (f", e.g. {fits}" if fits else ""))
    if len(squares) == 1:
        (s, no_embed), = squares
        return (s, s), no_embed
    if not squares:
        raise InteropError(f"{path}: pos_embed has {n} positions, which form no square grid of {patch} px patches "
                           f"with {what}; give the image size the weights were trained at with --img-size H,W "
                           "(img_size=(H, W))")
    (a, _), (b, _) = squares
    raise InteropError(f"{path}: pos_embed has {n} positions with {what}: a {a * ph} px input ({a}x{a} patches, "
                       f"positions for the prefix tokens too) and a {b * ph} px one ({b}x{b} patches, none for the "
                       f"prefix tokens) both fit; give the size the weights were trained at: --img-size {b * ph} "
                       f"or --img-size {a * ph} (img_size=)")


def _check_heads(d: int, heads: int, path: str) -> int:
    if heads < 1 or d % heads:
        raise InteropError(f"{path}: {heads} heads do not divide the {d}-wide ViT; pass a divisor of {d} with "
                           "--num-heads (num_heads=)")
    return heads


def _heads(d: int, num_heads: int | None, path: str = "weights", named: tuple[str, int, int] | None = None) -> int:
    """Attention heads of a ``d``-wide ViT (not in the shapes): ``num_heads`` when given, else those of
    the timm architecture named (``named = (name, its width, its heads)``) when it has this width, else
    those of the published size with this width; otherwise a one-line error naming ``--num-heads``."""
    if num_heads:
        return _check_heads(d, int(num_heads), path)
    if named is not None and named[1] == d:
        return _check_heads(d, named[2], path)
    if d in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[d]
    if named is not None:
        raise InteropError(f"{path}: a {d}-wide ViT has no published head count and {named[0]} is {named[1]} wide "
                           f"({named[2]} heads); pass the heads with --num-heads (num_heads=)")
    raise InteropError(f"{path}: a {d}-wide ViT has no published head count; pass the heads with --num-heads "
                       "(num_heads=), or name the timm architecture with --timm-model (timm_model=)")


def infer_vit_config(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                     img_size: int | tuple[int, int] | None = None, path: str = "weights") -> ViTConfig:
    """Encoder shape from timm/MAE-keyed weights (one class token, positions for it). Heads are not
    in the shapes: taken from ``num_heads`` or the published size with that width. The grid: from
    ``img_size`` when given (checked against the position table), else the square grid that fits."""
    try:
        w = sd["patch_embed.proj.weight"]
        sd["pos_embed"]
    except KeyError as e:
        raise InteropError(f"not a ViT state dict: missing {e}") from e
    d, c, p, _ = w.shape
    (gh, gw), no_embed_class = pos_layout(sd, img_size, path)
    if no_embed_class:
        raise InteropError(f"{path}: the position table has no class-token position (timm's no_embed_class); load "
                           "it as a timm model (mimkit.weights.load_encoder does)")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = _heads(d, num_heads, path)
    mlp = sd["blocks.0.mlp.fc1.weight"].shape[0] / d
    ls = "blocks.0.ls1.gamma" in sd
    size = gh * p if gh == gw else (gh * p, gw * p)
    return ViTConfig(img_size=size, patch_size=p, in_chans=c, embed_dim=d, depth=depth, num_heads=heads,
                     mlp_ratio=mlp, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                     layer_scale=float(sd["blocks.0.ls1.gamma"][0]) if ls else None)


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


_TIMM_ONLY_KEYS = ("reg_token", "dist_token", "fc_norm.weight", "norm_pre.weight")


def needs_timm(sd: dict, img_size: int | tuple[int, int] | None = None) -> bool:
    """Whether a timm-keyed state dict is a ViT family :class:`ViTEncoder` cannot hold (register or
    distillation tokens, no class token, ``fc_norm`` pooling, a pre-norm, positions without the class
    token)."""
    if any(k in sd for k in _TIMM_ONLY_KEYS) or "cls_token" not in sd:
        return True
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        return False
    try:
        return pos_layout(sd, img_size)[1]  # no_embed_class
    except InteropError:  # the builder says why, naming the file
        return False


def is_clip_layout(sd: dict) -> bool:
    """timm's CLIP image tower layout: a LayerNorm after the embeddings (``norm_pre``, CLIP's
    ``ln_pre``), before the blocks."""
    return "norm_pre.weight" in sd and "norm_pre.bias" in sd


def timm_kwargs_from_state_dict(sd: dict, num_heads: int | None = None, img_size: int | tuple[int, int] | None = None,
                                path: str = "weights", named: tuple[str, int, int] | None = None) -> dict:
    """timm ``VisionTransformer`` arguments that rebuild the model these weights came from (the grid
    by :func:`pos_layout`, the heads as :func:`_heads`)."""
    try:
        w = sd["patch_embed.proj.weight"]
    except KeyError as e:
        raise InteropError(f"not a ViT state dict: missing {e}") from e
    d, c, ph, pw = w.shape
    (gh, gw), no_embed_class = pos_layout(sd, img_size, path)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = _heads(d, num_heads, path, named)
    cls, reg, _ = prefix_tokens(sd)
    hw = (gh * ph, gw * pw)
    kw = dict(img_size=hw[0] if hw[0] == hw[1] else hw, patch_size=ph if ph == pw else (ph, pw), in_chans=c, embed_dim=d, depth=depth,
              num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / d,
              qkv_bias="blocks.0.attn.qkv.bias" in sd, class_token=bool(cls), reg_tokens=reg,
              no_embed_class=no_embed_class, pre_norm="norm_pre.weight" in sd)
    if "blocks.0.ls1.gamma" in sd:
        kw["init_values"] = float(sd["blocks.0.ls1.gamma"][0])
    if "fc_norm.weight" in sd:
        kw.update(global_pool="avg", fc_norm=True)
    elif not cls:
        kw.update(global_pool="avg", fc_norm=False)
    return kw


def _named_shape(timm_model: str, path: str) -> tuple[str, int, int]:
    """``(name, width, heads)`` of a timm architecture, built on the meta device (no memory, no weights)."""
    import timm

    try:
        with torch.device("meta"):
            m = timm.create_model(timm_model, pretrained=False, num_classes=0)
    except RuntimeError as e:  # timm's "Unknown model"
        raise InteropError(f"{path}: timm cannot build {timm_model!r} ({str(e).splitlines()[0] if str(e) else e}); "
                           "pass a name from timm.list_models()") from e
    blocks = getattr(m, "blocks", None)
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks is not None and len(blocks) else None
    return timm_model, int(getattr(m, "embed_dim", 0) or 0), int(heads or 0)


def timm_input_norm(model, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...], str] | None:
    """``(mean, std, source)`` from a timm model's ``pretrained_cfg`` (the tag named, else the
    architecture's default tag), or ``None`` when it has none for ``in_chans`` channels."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != in_chans or len(std) != in_chans:
        return None
    name = cfg.get("architecture") or type(model).__name__
    tag = f".{cfg['tag']}" if cfg.get("tag") else ""
    return (tuple(float(v) for v in mean), tuple(float(v) for v in std), f"timm pretrained_cfg ({name}{tag})")


def load_timm_encoder(sd: dict, timm_model: str | None = None, num_heads: int | None = None, path: str = "weights",
                      img_size: int | tuple[int, int] | None = None):
    """A :class:`mimkit.nn.adapters.TimmEncoder` around a timm model (``timm_model`` by name, shapes
    from the weights; or a ``VisionTransformer`` rebuilt from the keys) holding ``sd`` exactly.

    ``encoder.input_norm`` is ``(mean, std, source)`` from the named model's ``pretrained_cfg`` when
    ``timm_model`` is given, else ``None`` (the weights do not say). Weights in CLIP's layout
    (``norm_pre``) need ``timm_model``: their activation (QuickGELU or GELU) is not in the keys."""
    import timm

    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
    if timm_model is None and is_clip_layout(sd):
        raise InteropError(f"{path}: CLIP-layout ViT (norm_pre): LayerNorm eps 1e-5, but QuickGELU or GELU is not in "
                           f"the keys; name the architecture with --timm-model (timm_model=), e.g. {_CLIP_HINT}")
    named = _named_shape(timm_model, path) if timm_model is not None else None
    kw = timm_kwargs_from_state_dict(sd, num_heads, img_size, path, named)
    if "dist_token" in sd and timm_model is None:
        timm_model = "deit_base_distilled_patch16_224"  # the only ViT family with a distillation token
    try:
        if timm_model is None:
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **kw)
        else:
            # the name fixes the architecture (block type, activation, norm eps, distillation); the weights its shape
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
    enc = TimmEncoder(model.eval()).eval()
    enc.input_norm = timm_input_norm(model, enc.in_chans) if named is not None else None
    return enc


def _recorded_size(config: dict | None, meta: dict) -> tuple[int, int] | None:
    if config is not None and "model" in config:
        return optional_image_hw(config["model"]["encoder"].get("img_size", 224))
    if "mimkit_vit_config" in meta:
        return optional_image_hw(json.loads(meta["mimkit_vit_config"]).get("img_size", 224))
    return None


def load_encoder(source: str | Path | Weights, num_heads: int | None = None, strict: bool = True,
                 timm_model: str | None = None, img_size: int | tuple[int, int] | None = None):
    """A :class:`~mimkit.nn.ViTEncoder` (eval mode) from a weight file or :class:`Weights` (see the
    module doc); a :class:`~mimkit.nn.adapters.TimmEncoder` for timm ViT families beyond the plain one,
    or when ``timm_model`` names the timm architecture.

    ``img_size`` (a side or ``(H, W)``): the input the weights were trained at, which fixes the patch
    grid of files that do not record it (timm state dicts: required when the position table fits two
    grids, see :func:`pos_layout`); a mimkit checkpoint or export records it, and a different
    ``img_size`` is an error.

    Also sets ``encoder.source_config`` to the checkpoint's config dict when the file is a mimkit
    checkpoint (for normalization statistics), else ``None``; and ``encoder.input_norm`` to
    ``(mean, std, source)`` when the weights' normalisation is known from ``timm_model``'s
    ``pretrained_cfg``, else ``None``."""
    w = source if isinstance(source, Weights) else read_weights(source)
    path, config, meta = w.path, w.config, w.meta
    if w.format not in _ENCODER_FORMATS:
        raise InteropError(f"{path} is {w.description}, not an encoder's weights; give {', '.join(FORMATS[f] for f in _ENCODER_FORMATS)}")
    recorded, given = _recorded_size(config, meta), optional_image_hw(img_size)
    if recorded is not None and given is not None and recorded != given:
        raise InteropError(f"{path} records an input of {_size_text(recorded)} px; --img-size {_size_text(given)} "
                           f"disagrees: drop it (or give {_size_text(recorded)})")
    sd = w.state
    if w.format == "official-mae":
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    elif w.format == "official-cae":  # timm keys; the official row-first position table loads as stored
        sd = official_cae_encoder(sd)
        num_heads = num_heads or official_cae_heads(int(sd["pos_embed"].shape[-1]))
    elif any(k.startswith("encoder.") for k in sd):
        sd = _strip(sd, "encoder.")
    if timm_model is not None or (config is None and "mimkit_vit_config" not in meta and needs_timm(sd, given)):
        enc = load_timm_encoder({k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")},
                                timm_model, num_heads, path, given or recorded)
        enc.source_config = config
        return enc
    sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token" or k.startswith("head")
                                                 or k.startswith("fc_norm"))}
    if config is not None and "model" in config:
        cfg = ViTConfig(**{**config["model"]["encoder"], "drop_path_rate": 0.0})
    elif "mimkit_vit_config" in meta:
        cfg = ViTConfig(**json.loads(meta["mimkit_vit_config"]))
    else:
        cfg = infer_vit_config(sd, num_heads, given, path)
    if num_heads is not None and num_heads != cfg.num_heads:  # the file records its heads: a different one is wrong
        raise InteropError(f"{path} records {cfg.num_heads} attention heads; --num-heads {num_heads} disagrees (the "
                           "weights would load and compute something else): drop it")
    enc = ViTEncoder(cfg)
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise InteropError(f"{path}: weights do not fit the inferred encoder {cfg}; missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    enc.source_config = config
    enc.input_norm = None
    return enc.eval()
