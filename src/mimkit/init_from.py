"""``model.init``: start pretraining any method from public or earlier weights.

Sources (recognised from the file, nothing to declare):

* an official MAE checkpoint (facebookresearch/mae, ``{"model": state_dict}``): with ``decoder_*``
  keys (e.g. ``mae_visualize_vit_large.pth``) encoder *and* decoder, mapped by
  :func:`mimkit.interop.from_official_state_dict`; the encoder-only ``mae_pretrain_vit_*.pth`` files
  have timm's keys and load as the encoder;
* an official CAE / CAE v2 checkpoint (Atten4Vis/CAE): encoder, regressor, decoder (CAE) or head (CAE v2),
  mask token and position tables, mapped by :func:`mimkit.weights.official.from_official_cae_state_dict`
  (the alignment encoder is not used: mimkit's alignment target shares the encoder); an encoder-only
  fine-tuning file loads as the encoder;
* a timm ``VisionTransformer`` state dict (``.pth`` / ``.bin`` / ``.safetensors``; classifier ``head.*``
  and ``fc_norm.*`` are not used): the encoder;
* a mimkit checkpoint (``checkpoint.pt``, or a sharded ``train.strategy=fsdp`` checkpoint directory: the
  whole method, so the decoder too when the method has the same parts) or a mimkit export
  (``mimkit export``: the encoder);
* a Hugging Face ``ViTMAEForPreTraining`` directory (``save_pretrained``) or its safetensors file:
  encoder and decoder, through :mod:`mimkit.hf`.

Adaptation to the model being trained (rules of timm's checkpoint loading, ``timm.layers``):

* **position embeddings** on another grid: a table that is the 2-D sin-cos table of its grid (MAE's
  fixed positions, mimkit's) is regenerated for the new grid (exactly what the model would build); one in
  official CAE's row-first layout (:mod:`mimkit.nn.pos_embed`) is regenerated row first, keeping its layout;
  any other (learned) table is resized bicubically with timm's ``resample_abs_pos_embed``
  (antialiased, the class-token row kept), as ``timm.create_model(..., img_size=...)`` does;
* **patch embedding** with another channel count: timm's ``adapt_input_conv`` with the source's
  channel count as base: to 1 channel the kernels are summed over the source channels; otherwise the
  source channels are repeated cyclically up to the new count and scaled by ``C_src / C_new`` (so a
  grey image copied to every channel gives the same response); another patch size: timm's
  ``resample_patch_embed`` (FlexiViT's pseudo-inverse resize);
* the **pixel head** ``decoder.pred`` predicts ``p*p*C`` values: when ``p`` or ``C`` differ from the
  source it starts fresh (reported);
* a target branch that starts as a copy of online modules (an EMA teacher; the method lists them in
  ``Method.target_copies()``) and that the file does not hold is set to a copy of the loaded encoder
  (and projector), as each method builds it equal to the student. Nothing else is copied: a frozen
  teacher keeps its own weights.

Any other shape difference is an error naming the key and the setting to change (or
``model.init_parts=encoder`` when only the decoder differs). What was loaded, adapted, newly
initialised and left unused is returned as a report (written to ``init.json`` by the trainer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mimkit.errors import CheckpointError, ConfigError, FileRefusedError, InteropError
from mimkit.hf import from_hf_state_dict
from mimkit.nn.vit import image_hw
from mimkit.weights import Weights, read_weights
from mimkit.weights.official import from_official_cae_state_dict, from_official_state_dict, official_cae_layout

INIT_PARTS = ("all", "encoder")
_CLASSIFIER_PREFIXES = ("head.", "head_dist.", "fc_norm.", "pre_logits.")


@dataclass
class InitSource:
    """Weights read from a file, keyed like a mimkit method (``encoder.*``, ``decoder.*`` ...)."""

    path: str
    kind: str
    state: dict[str, torch.Tensor]
    img_size: tuple[int, int] | None = None  # the source's image (H, W) when the file says it
    patch_size: int | None = None
    in_chans: int | None = None
    unused: list[str] = field(default_factory=list)  # keys of the file that are not model weights here


@dataclass
class InitReport:
    source: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    copied: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "loaded": self.loaded, "adapted": self.adapted,
                "newly_initialised": self.new, "copied": self.copied, "unused_from_file": self.unused}

    def summary(self) -> str:
        def few(keys, n=6):
            keys = list(keys)
            return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "") if keys else "none"

        lines = [f"model.init: {self.source} ({self.kind})",
                 f"  loaded {len(self.loaded) + len(self.adapted)} tensors"
                 + (f", {len(self.adapted)} adapted:" if self.adapted else "")]
        lines += [f"    {k}: {how}" for k, how in self.adapted.items()]
        if self.copied:
            lines.append(f"  copied: {few(f'{k} <- {v}' for k, v in self.copied.items())}")
        lines.append(f"  newly initialised ({len(self.new)}): {few(_group(self.new))}")
        lines.append(f"  in the file but not used ({len(self.unused)}): {few(_group(self.unused))}")
        note = self.fresh_head_note()
        if note:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def fresh_head_note(self) -> str | None:
        """A warning when the pixel head starts fresh under a loaded decoder: the trained decoder
        then feeds a random head, and the first steps can train worse than from scratch (measured on
        the README walkthrough continued onto RGB 32x48)."""
        head_new = any(k.startswith("decoder.pred.") for k in self.new)
        decoder_loaded = any(k.startswith("decoder.") and not k.startswith("decoder.pred.")
                             for k in [*self.loaded, *self.adapted])
        if not (head_new and decoder_loaded):
            return None
        return ("the pixel head decoder.pred starts fresh (another patch size or channel count) under the loaded "
                "decoder, so the first steps can train worse than from scratch; model.init_parts=encoder starts the "
                "whole decoder fresh instead")


def _group(keys: list[str]) -> list[str]:
    """Collapse ``decoder.blocks.0.x`` ... to ``decoder.blocks.*`` for short messages."""
    out: dict[str, None] = {}
    for k in keys:
        parts = k.split(".")
        if len(parts) > 2 and parts[1] == "blocks" or len(parts) > 3 and parts[2] == "blocks":
            i = parts.index("blocks")
            out[".".join(parts[: i + 1]) + ".*"] = None
        else:
            out[k] = None
    return list(out)


# --------------------------------------------------------------------------------------------------
# reading


def _encoder_only(sd: dict, path: str, kind: str, cfg: dict | None = None) -> InitSource:
    unused = [k for k in sd if k.startswith(_CLASSIFIER_PREFIXES)]
    state = {f"encoder.{k}": v for k, v in sd.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    src = InitSource(path, kind, state, unused=unused)
    if cfg:
        src.img_size, src.patch_size, src.in_chans = image_hw(cfg["img_size"]), int(cfg["patch_size"]), int(cfg["in_chans"])
    return src


_FIX = ("model.init takes an official MAE pretraining checkpoint, a timm ViT state dict or safetensors file, a "
        "mimkit checkpoint or export, or a Hugging Face ViTMAE directory")


def _from_hf(w: Weights) -> InitSource:
    """A ``ViTMAEForPreTraining`` directory (or its safetensors file), keys mapped by :mod:`mimkit.hf`."""
    out = from_hf_state_dict(w.state)
    if "encoder.patch_embed.proj.weight" not in out:
        raise ConfigError(f"model.init={w.path}: no ViTMAE patch embedding in it; give a ViTMAEForPreTraining or "
                          "ViTMAEModel directory")
    kind = "Hugging Face ViTMAE" + (" (encoder + decoder)" if "decoder.embed.weight" in out else " (encoder)")
    src = InitSource(w.path, kind, out)
    cfg = w.meta
    if cfg.get("image_size") and cfg.get("patch_size"):
        src.img_size = image_hw(cfg["image_size"])
        src.patch_size, src.in_chans = int(cfg["patch_size"]), int(cfg.get("num_channels", 3))
    return src


def read_init_source(path: str | Path) -> InitSource:
    """Read ``path`` (see the module docstring for what it may be) into method-keyed weights, through
    :func:`mimkit.weights.read_weights` (which recognises the format)."""
    try:
        w = read_weights(path)
    except FileRefusedError as e:  # not loaded for safety: the message names the file and the opt-in
        raise FileRefusedError(f"model.init={path}: {e}") from e
    except (InteropError, CheckpointError) as e:
        if not Path(path).expanduser().exists():
            raise ConfigError(f"model.init={path}: file not found; give the path of the weights to start from "
                              f"({_FIX})") from e
        raise ConfigError(f"model.init={path}: {e}; {_FIX}") from e
    p = w.path
    if w.format == "hf":
        return _from_hf(w)
    if w.format == "mimkit-export":
        return _encoder_only(w.state, p, "mimkit export (encoder)", json.loads(w.meta["mimkit_vit_config"]))
    if w.format in ("mimkit-checkpoint", "mimkit-dcp"):
        cfg = w.config or {}
        enc = cfg.get("model", {}).get("encoder") or {}
        step = w.step if w.step is not None else "?"
        src = InitSource(p, f"mimkit checkpoint ({cfg.get('method', {}).get('name', '?')}, step {step})", w.state)
        if enc:
            src.img_size, src.patch_size, src.in_chans = image_hw(enc["img_size"]), enc["patch_size"], enc["in_chans"]
        return _check(src, _FIX)
    if w.format == "official-mae":
        return _check(InitSource(p, "official MAE pretraining checkpoint (encoder + decoder)",
                                 from_official_state_dict(w.state)), _FIX)
    if w.format == "official-cae":  # encoder, regressor, decoder / CAE v2 head (alignment encoder unused)
        state, unused = from_official_cae_state_dict(w.state)
        kind = {"cae": "official CAE pretraining checkpoint", "cae_v2": "official CAE v2 pretraining checkpoint",
                "encoder": "official CAE encoder"}[official_cae_layout(w.state)]
        return _check(InitSource(p, kind, state, unused=unused), _FIX)
    if w.format == "mimkit-state":
        return _check(InitSource(p, "mimkit method state dict", w.state), _FIX)
    if w.format == "timm":
        kind = ("timm ViT safetensors (encoder)" if Path(p).suffix == ".safetensors"
                else "ViT state dict with timm / official MAE keys (encoder)")
        return _check(_encoder_only(w.state, p, kind), _FIX)
    raise ConfigError(f"model.init={path} is {w.description}, not weights to start pretraining from; {_FIX}")


def _check(src: InitSource, fix: str) -> InitSource:
    if "encoder.patch_embed.proj.weight" not in src.state or "encoder.pos_embed" not in src.state:
        some = ", ".join(list(src.state)[:4])
        raise ConfigError(f"model.init={src.path}: no ViT encoder weights in it (no patch_embed.proj.weight / "
                          f"pos_embed; keys start {some}); {fix}")
    return src


# --------------------------------------------------------------------------------------------------
# adapting


def _is_sincos(table: torch.Tensor, grid: tuple[int, int], row_first: bool = False) -> bool:
    """Whether ``table`` is the 2-D sin-cos table of ``grid`` (with a cls row), in MAE's column-first
    layout or, with ``row_first``, official CAE's (:mod:`mimkit.nn.pos_embed`)."""
    from mimkit.nn.pos_embed import sincos_2d

    d = table.shape[-1]
    if d % 4:
        return False
    ref = sincos_2d(d, *grid, cls_token=True, row_first=row_first)
    return table.shape[-2] == ref.shape[0] and torch.allclose(table.reshape(ref.shape).float(), ref, atol=1e-4)


def _source_grid(src: InitSource, length: int, key: str) -> tuple[int, int]:
    if src.img_size is not None and src.patch_size:
        g = (src.img_size[0] // src.patch_size, src.img_size[1] // src.patch_size)
        if g[0] * g[1] == length:
            return g
    side = round(length**0.5)
    if side * side != length:
        raise ConfigError(f"model.init={src.path}: {key} holds {length} positions, not a square grid, and the file "
                          "does not say its image size; export it with mimkit (which records it) or use a square model")
    return side, side


def _adapt_pos(src: InitSource, key: str, w: torch.Tensor, target: torch.Tensor,
               grid: tuple[int, int], encoder_prefixes: tuple[str, ...] = ("encoder.",)) -> tuple[torch.Tensor | None, str]:
    """(new table or None = keep the model's own sin-cos, description). Keys under ``encoder_prefixes``
    (the encoder and its copies) have the encoder's width, the others the decoder's."""
    from timm.layers import resample_abs_pos_embed

    if w.shape[-1] != target.shape[-1]:
        part = "encoder" if key.startswith(encoder_prefixes) else "decoder"
        raise ConfigError(f"model.init={src.path}: {key} is {w.shape[-1]} wide, the model's {target.shape[-1]}; "
                          f"set model.{part}.embed_dim to the file's width")
    old = _source_grid(src, w.shape[1] - 1, key)
    if old == tuple(grid):
        return w, "same grid"
    if _is_sincos(w[0], old):
        return None, f"2-D sin-cos regenerated for the {grid[0]}x{grid[1]} grid (file: {old[0]}x{old[1]})"
    if _is_sincos(w[0], old, row_first=True):  # official CAE's layout: regenerated in it, not in the model's
        from mimkit.nn.pos_embed import sincos_2d

        new = sincos_2d(w.shape[-1], *grid, cls_token=True, row_first=True)[None].to(w.dtype)
        return new, (f"2-D sin-cos, row first (official CAE layout), regenerated for the {grid[0]}x{grid[1]} grid "
                     f"(file: {old[0]}x{old[1]})")
    new = resample_abs_pos_embed(w.float(), new_size=list(grid), old_size=list(old), num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=True)
    return new.to(w.dtype), f"resized bicubically {old[0]}x{old[1]} -> {grid[0]}x{grid[1]} (timm resample_abs_pos_embed)"


def _adapt_patch_embed(src: InitSource, key: str, w: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, str]:
    from timm.layers import resample_patch_embed
    from timm.models import adapt_input_conv

    notes = []
    if w.shape[0] != target.shape[0]:
        raise ConfigError(f"model.init={src.path}: {key} is {w.shape[0]} wide, the model's {target.shape[0]}; set "
                          "model.encoder.embed_dim to the file's width")
    c_src, c_new = w.shape[1], target.shape[1]
    if c_src != c_new:
        w = adapt_input_conv(c_new, w, base_chans=c_src)
        rule = "summed over channels" if c_new == 1 else f"channels repeated and scaled by {c_src}/{c_new}"
        notes.append(f"{c_src} -> {c_new} input channels ({rule}, timm adapt_input_conv)")
    if tuple(w.shape[-2:]) != tuple(target.shape[-2:]):
        old = tuple(w.shape[-2:])
        w = resample_patch_embed(w.float(), list(target.shape[-2:]), interpolation="bicubic", antialias=True).to(w.dtype)
        notes.append(f"patch {old[0]} -> {target.shape[-1]} (timm resample_patch_embed)")
    return w, "; ".join(notes)


def apply_init(model: nn.Module, path: str | Path, parts: str = "all") -> InitReport:
    """Load ``path`` into ``model`` (a mimkit method) with the adaptations of the module docstring.

    Raises :class:`~mimkit.config.ConfigError` (one line: the key and the fix) before changing the model
    when a tensor cannot be adapted."""
    if parts not in INIT_PARTS:
        raise ConfigError(f"model.init_parts={parts!r} is not one of {', '.join(INIT_PARTS)}")
    src = read_init_source(path)
    report = InitReport(src.path, src.kind)
    own = model.state_dict()
    enc = model.encoder
    grid = tuple(enc.grid_size)
    copies = model.target_copies()
    encoder_prefixes = ("encoder.", *(c.prefix + "." for c in copies))
    new_state: dict[str, torch.Tensor] = {}
    pixel_layout_changed = (src.patch_size not in (None, enc.patch_size)) or (src.in_chans not in (None, enc.in_chans))
    w_src = src.state["encoder.patch_embed.proj.weight"]
    pixel_layout_changed |= tuple(w_src.shape[1:]) != tuple(enc.patch_embed.proj.weight.shape[1:])
    tokens = [n for n in ("reg_token", "dist_token") if f"encoder.{n}" in src.state]
    if tokens or "encoder.cls_token" not in src.state:
        what = " and ".join(tokens) if tokens else "no cls_token"
        raise ConfigError(f"model.init={src.path}: the file's ViT has {what}; mimkit's encoder has exactly one class "
                          "token, so it cannot start from these weights: start from a plain ViT with a class token "
                          "(MAE, DeiT, timm vit_*_patch16_*); mimkit eval --timm-model still evaluates them")
    extra = [k for k in src.state if k.startswith("encoder.") and k not in own and not k.startswith("encoder.blocks.")]
    extra += [k for k in src.state if k.startswith("encoder.blocks.") and k not in own
              and int(k.split(".")[2]) < len(enc.blocks)]
    if extra:
        if all(".ls1." in k or ".ls2." in k for k in extra):
            fix = "the file's encoder has layer scale; set model.encoder.layer_scale (e.g. 0.1; the file's values load)"
        elif any(k.startswith("encoder.norm_pre.") for k in extra):
            fix = "the file's encoder normalises before the blocks (norm_pre, CLIP-style), which mimkit's does not"
        else:
            fix = "the model has no place for them; set model.encoder.* to the file's encoder"
        raise ConfigError(f"model.init={src.path}: the file's encoder has tensors the model lacks ({', '.join(extra[:3])}"
                          f"{' ...' if len(extra) > 3 else ''}); {fix}")
    problems = []
    used: set[str] = set()
    for key, target in own.items():
        if parts == "encoder" and not key.startswith("encoder."):
            continue
        if key not in src.state:
            continue
        w = src.state[key]
        used.add(key)
        if key.endswith("pos_embed") and w.ndim == 3:
            new, how = _adapt_pos(src, key, w, target, grid, encoder_prefixes)
            if new is None:
                report.adapted[key] = how
                continue
            w = new
            if how != "same grid":
                report.adapted[key] = how
        elif key.endswith("patch_embed.proj.weight") and w.shape != target.shape:
            w, how = _adapt_patch_embed(src, key, w, target)
            report.adapted[key] = how
        if w.shape != target.shape:
            if key.startswith("decoder.pred.") and pixel_layout_changed:
                used.discard(key)  # listed as unused from the file, and new in the model
                continue  # the pixel head of another patch size / channel count starts fresh
            problems.append(f"{key} {tuple(w.shape)} vs the model's {tuple(target.shape)}")
            continue
        new_state[key] = w.to(target.dtype)
        if key not in report.adapted:
            report.loaded.append(key)
    if problems:
        enc_bad = [p for p in problems if p.startswith("encoder.")]
        fix = ("set model.encoder.* (embed_dim, depth, num_heads, mlp_ratio) to the file's encoder" if enc_bad else
               "set model.decoder.* to the file's decoder, or model.init_parts=encoder to load only the encoder")
        raise ConfigError(f"model.init={src.path}: {len(problems)} tensor(s) do not fit and cannot be adapted "
                          f"({'; '.join(problems[:3])}); {fix}")
    if not any(k.startswith("encoder.blocks.") for k in new_state):
        raise ConfigError(f"model.init={src.path}: none of the encoder blocks fit this model (the file has "
                          f"{sum(k.startswith('encoder.blocks.') for k in src.state)} block tensors); set "
                          "model.encoder.depth / embed_dim to the file's")
    file_depth = len({k.split(".")[2] for k in src.state if k.startswith("encoder.blocks.")})
    if file_depth > len(enc.blocks):
        raise ConfigError(f"model.init={src.path}: the file's encoder has {file_depth} blocks, the model "
                          f"{len(enc.blocks)}; set model.encoder.depth={file_depth}")
    missing_enc = [k for k in own if k.startswith("encoder.") and k not in new_state and k not in report.adapted]
    if missing_enc and all(".ls1." in k or ".ls2." in k for k in missing_enc):
        raise ConfigError(f"model.init={src.path}: the file's encoder has no layer scale ({missing_enc[0]} and "
                          f"{len(missing_enc) - 1} more are not in it); set model.encoder.layer_scale=null")
    if missing_enc:
        raise ConfigError(f"model.init={src.path}: the file lacks encoder tensors {missing_enc[:4]}; set "
                          "model.encoder.depth (and layer_scale) to the file's encoder")
    model.load_state_dict(new_state, strict=False)
    # a copy (EMA teacher) that the file does not hold starts equal to the loaded student, as when built
    copied: set[str] = set()
    for c in copies:
        if any(k.startswith(c.prefix + ".") for k in new_state):
            continue
        c.sync()
        report.copied[c.prefix] = "the loaded online modules (EMA teacher = student at the start)"
        copied |= {k for k in own if k.startswith(c.prefix + ".")}
    report.new = [k for k in own if k not in new_state and k not in report.adapted and k not in copied]
    report.unused += [k for k in src.state if k not in used] + src.unused
    return report
