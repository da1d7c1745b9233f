"""One reader for every weight file mimkit accepts: :func:`read_weights` recognises the format once.

Every caller that reads weights (``model.init``, ``mimkit eval``, ``mimkit visualize`` / ``export``,
:func:`mimkit.weights.load_encoder`, CAE v2's teacher file, CAE's codebook, Hugging Face import) goes
through :func:`read_weights`, which returns a :class:`Weights`: the tensors as stored (``module.`` /
``_orig_mod.`` wrappers stripped), the format's name and what the file says about itself (a mimkit
config, a ``config.json``, safetensors metadata, the step). Formats, by how they are recognised:

================= ==========================================================================================
format            recognised by
================= ==========================================================================================
mimkit-checkpoint a ``torch.save`` dict with ``model`` and ``config`` (``checkpoint.pt``; a run directory
                  holding one is read too); its mimkit checksum is verified before it is unpickled
mimkit-dcp        a directory with DCP ``.metadata`` and ``trainer.pt`` (``train.strategy=fsdp``), verified
                  against its manifest and consolidated on this process
mimkit-export     safetensors with ``mimkit_vit_config`` in the metadata (``mimkit export``)
mimkit-state      a state dict keyed like a mimkit method (``encoder.*``)
official-mae      facebookresearch/mae pretraining checkpoints (``{"model": ...}`` with ``decoder_embed.*``)
official-cae      Atten4Vis/CAE checkpoints (CAE, CAE v2): a pretraining model (``regresser.*``,
                  ``rd_pos_embed``, ``encoder.*`` with ``attn.q_bias`` / ``gamma_1``), or an encoder alone in
                  that block layout (fine-tuning / probing files); mapped by :mod:`mimkit.weights.official`
timm              a ViT state dict with timm's keys (``patch_embed.proj.weight``, ``pos_embed`` ...), as
                  ``.pth`` / ``.bin`` / ``.safetensors``, also under ``model`` / ``state_dict``; the
                  encoder-only official MAE files (``mae_pretrain_vit_*.pth``) are of this kind
hf                a Hugging Face ``ViTMAE`` directory (``config.json`` + ``model.safetensors`` or
                  ``pytorch_model.bin``) or its safetensors file (``vit.embeddings.*`` keys)
clip              a CLIP checkpoint: OpenAI's TorchScript file or an (open_clip) state dict with the image
                  tower ``visual.conv1.weight`` ...; ``state`` holds the ``visual.*`` tensors
codebook          a mimkit codebook (``python -m mimkit.codebook fit``): ``centroids`` and ``patch_size``
================= ==========================================================================================

Safety (:mod:`mimkit.weights.safe`): pickled files are read with ``torch.load(weights_only=True)``
and a small allowlist, a mimkit checksum verified first; a refusal is a
:class:`~mimkit.errors.FileRefusedError` naming the opt-in. A TorchScript archive (OpenAI's CLIP) is
read with ``torch.jit.load``: its unpickler builds only TorchScript types, but its code is compiled
and may run in torch's interpreter, so it is accepted only when it holds a CLIP image tower. Anything
else is one :class:`~mimkit.errors.InteropError` naming the file and the formats above.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimkit.errors import CheckpointError, FileRefusedError, InteropError
from mimkit.weights.checkpoint import consolidate_dcp, is_dcp_checkpoint, load_checkpoint
from mimkit.weights.official import is_official_cae

FORMATS = {
    "mimkit-checkpoint": "a mimkit checkpoint (checkpoint.pt or its run directory)",
    "mimkit-dcp": "a sharded mimkit checkpoint directory (dcp/step-N)",
    "mimkit-export": "a mimkit export (mimkit export)",
    "mimkit-state": "a mimkit method state dict",
    "official-mae": "an official MAE pretraining checkpoint",
    "official-cae": "an official CAE / CAE v2 checkpoint (Atten4Vis/CAE)",
    "timm": "a timm ViT state dict or safetensors file",
    "hf": "a Hugging Face ViTMAE directory or safetensors file",
    "clip": "a CLIP checkpoint (its image tower)",
    "codebook": "a mimkit codebook",
}
SUPPORTED = ", ".join(FORMATS.values())
_WRAPPERS = ("module.", "_orig_mod.")
_RUN_DIR_FILES = ("checkpoint.pt", "checkpoint.pth", "last.pt")
_HF_PREFIXES = ("vit.embeddings.", "embeddings.patch_embeddings")


@dataclass
class Weights:
    """Tensors read from one file, its format (a key of :data:`FORMATS`) and what the file says.

    ``state``: the tensors keyed as stored (for ``mimkit-checkpoint`` / ``-dcp`` the method's state
    dict; ``clip``: the ``visual.*`` tensors; ``codebook``: ``centroids``). ``config``: the resolved
    mimkit config of a checkpoint. ``meta``: safetensors metadata, a Hugging Face ``config.json``, a
    codebook's fields. ``raw``: the whole unpickled object when it was a dict (other entries such as
    an official checkpoint's ``args``). ``input``: the input the weights were trained on, when the
    file records it (:func:`input_record`: a mimkit checkpoint's ``input``, a mimkit export's
    ``mimkit_input`` metadata, a Hugging Face ``config.json``'s ``image_mean`` / ``image_std``);
    ``None`` for files without the record (older checkpoints, timm and official files)."""

    path: str
    format: str
    state: dict[str, torch.Tensor]
    config: dict | None = None
    meta: dict = field(default_factory=dict)
    step: int | None = None
    epoch: float | None = None
    raw: dict | None = None
    input: dict | None = None

    @property
    def description(self) -> str:
        return FORMATS[self.format]


def input_record(obj, img_size=None, in_chans=None) -> dict | None:
    """The input normalisation a file records, as ``{"mean": [...], "std": [...], "img_size": [H, W],
    "in_chans": C, "origin": text}`` (``img_size`` / ``in_chans`` / ``origin`` when known; the arguments
    fill what ``obj`` lacks), or ``None`` when ``obj`` holds no usable mean and std (one positive value
    per channel, or one for all)."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError:
            return None
    if not isinstance(obj, dict):
        return None
    try:
        mean = [float(v) for v in obj["mean"]]
        std = [float(v) for v in obj["std"]]
    except (KeyError, TypeError, ValueError):
        return None
    if not mean or not std or (len(mean) != len(std) and 1 not in (len(mean), len(std))) or min(std) <= 0:
        return None
    out: dict = {"mean": mean, "std": std}
    size = obj.get("img_size", img_size)
    if isinstance(size, int | float) and not isinstance(size, bool):
        out["img_size"] = [int(size), int(size)]
    elif isinstance(size, list | tuple) and len(size) == 2:
        out["img_size"] = [int(size[0]), int(size[1])]
    chans = obj.get("in_chans", in_chans)
    if isinstance(chans, int) and not isinstance(chans, bool):
        out["in_chans"] = chans
    if isinstance(obj.get("origin"), str):
        out["origin"] = obj["origin"]
    return out


def _hf_input(cfg: dict) -> dict | None:
    """``image_mean`` / ``image_std`` of a Hugging Face ``config.json`` (as ``mimkit export --format hf``
    writes them) or of the ``preprocessor_config.json`` beside it (passed merged in)."""
    if "image_mean" not in cfg or "image_std" not in cfg:
        return None
    return input_record({"mean": cfg["image_mean"], "std": cfg["image_std"]}, cfg.get("image_size"),
                        cfg.get("num_channels"))


def strip_wrappers(sd: dict) -> dict:
    """Drop a ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefix every key carries."""
    for prefix in _WRAPPERS:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_verified(path: str | Path) -> object:
    """The object of a ``torch.save`` file, weights only, its mimkit checksum verified when it has
    one (:func:`mimkit.weights.checkpoint.load_checkpoint`). A refusal stays a
    :class:`~mimkit.errors.FileRefusedError`; an unreadable file is an :class:`InteropError`."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"weight file not found: {path}")
    try:
        return load_checkpoint(path, map_location="cpu", verify=True, require_checksum=False)
    except FileRefusedError:
        raise
    except CheckpointError as e:
        cause = e.__cause__ or e
        raise InteropError(f"{path} is not a readable PyTorch file ({type(cause).__name__}: "
                           f"{str(cause).splitlines()[0] if str(cause) else ''})") from e


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise InteropError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); copy or export "
                           "it again") from e


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``): a zip with ``code/`` or ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torchscript(path: str | Path, what: str = "TorchScript file") -> torch.jit.ScriptModule:
    """A ``torch.jit.save`` archive on the CPU (CLIP's released weights, a CAE tokenizer). Its
    unpickler builds only TorchScript types, but its code is compiled and may run in torch's
    interpreter: give only files from a source you trust. Errors are one-line
    :class:`InteropError` s."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{what} {path} not found")
    if not is_torchscript(path):
        raise InteropError(f"{what} {path} is not a TorchScript archive (torch.jit.save); save the module with "
                           "torch.jit.save(torch.jit.script(module), path)")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a damaged archive
        raise InteropError(f"{what} {path} could not be read by torch.jit.load ({type(e).__name__}); copy it "
                           "again") from e


def clip_visual(sd: dict) -> dict | None:
    """The image tower of a CLIP state dict as OpenAI-keyed ``visual.*`` tensors (from a full model,
    also under ``state_dict`` or with ``module.`` prefixes as open_clip saves it, or an image-tower-only
    dict with ``conv1.weight`` ...), or ``None`` when ``sd`` is not CLIP."""
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        return None
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    if "conv1.weight" in sd and "transformer.resblocks.0.ln_1.weight" in sd:
        sd = {"visual." + k: v for k, v in sd.items()}
    if "visual.conv1.weight" not in sd or "visual.transformer.resblocks.0.ln_1.weight" not in sd:
        return None
    return {k: v for k, v in sd.items() if k.startswith("visual.")}


def read_clip_visual(path: str | Path) -> dict | None:
    """The ``visual.*`` tensors of a CLIP checkpoint, or ``None`` when ``path`` is not one (or is not
    a readable file); a safety refusal is raised (:class:`~mimkit.errors.FileRefusedError`)."""
    try:
        w = read_weights(path)
    except FileRefusedError:
        raise
    except (InteropError, CheckpointError):
        return None
    return w.state if w.format == "clip" else None


def _hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")))


def _read_hf(p: Path) -> Weights:
    """A ``save_pretrained`` directory (or its safetensors file): HF-keyed tensors + ``config.json``."""
    cfg_path = p / "config.json" if p.is_dir() else p.parent / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    pre_path = cfg_path.parent / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) or sorted(p.glob("pytorch_model*.bin"))
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            sd.update(_read_safetensors(f)[0])
        else:
            obj = read_verified(f)
            if not _tensor_dict(obj):
                raise InteropError(f"{f} holds no state dict; give a directory written by save_pretrained")
            sd.update(obj)
    return Weights(str(p), "hf", sd, meta=cfg, input=_hf_input(cfg) or _hf_input({**cfg, **pre}))


def _from_dict(p: Path, obj: dict) -> Weights:
    """Classify an unpickled dict."""
    if isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict) and "model" in obj["config"]:
        step, epoch = obj.get("step"), obj.get("epoch")
        return Weights(str(p), "mimkit-checkpoint", strip_wrappers(obj["model"]), config=obj["config"],
                       step=int(step) if isinstance(step, int | float) else None,
                       epoch=float(epoch) if isinstance(epoch, int | float) else None, raw=obj,
                       input=input_record(obj.get("input")))
    if isinstance(obj.get("centroids"), torch.Tensor) and "patch_size" in obj:
        meta = {k: v for k, v in obj.items() if k != "centroids"}
        return Weights(str(p), "codebook", {"centroids": obj["centroids"]}, meta=meta, raw=obj)
    visual = clip_visual(obj)
    if visual is not None:
        return Weights(str(p), "clip", visual, raw=obj)
    sd = obj
    for key in ("model", "state_dict", "model_state"):
        if _tensor_dict(sd.get(key)):
            sd = sd[key]
            break
    sd = strip_wrappers(sd)
    if not _tensor_dict(sd):
        raise InteropError(f"{p}: no state dict found in it (keys {list(obj)[:6]}); mimkit reads {SUPPORTED}")
    return Weights(str(p), _state_format(p, sd), sd, raw=obj)


def _state_format(p: Path, sd: dict) -> str:
    if "decoder_embed.weight" in sd:
        return "official-mae"
    if is_official_cae(sd):  # before mimkit-state: its keys start with encoder. too
        return "official-cae"
    if any(k.startswith("encoder.") for k in sd):
        return "mimkit-state"
    if any(k.startswith(_HF_PREFIXES) for k in sd):
        return "hf"
    if "patch_embed.proj.weight" in sd or "pos_embed" in sd:
        return "timm"
    raise InteropError(f"{p}: not a ViT state dict mimkit knows, no ViT encoder weights in it (no "
                       f"patch_embed.proj.weight / pos_embed; keys start {', '.join(list(sd)[:4])}); mimkit reads "
                       f"{SUPPORTED}")


def holds_weights(path: str | Path) -> bool:
    """Whether ``path`` is something :func:`read_weights` would read rather than refuse as missing: a
    file, or a directory holding a sharded (DCP) checkpoint, a Hugging Face ViTMAE export or a run's
    ``checkpoint.pt``. A run directory whose weights were removed (records kept without them) is not."""
    p = Path(path).expanduser()
    if p.is_file():
        return True
    return p.is_dir() and (is_dcp_checkpoint(p) or _hf_dir(p) or any((p / n).is_file() for n in _RUN_DIR_FILES))


def read_weights(path: str | Path) -> Weights:
    """Read ``path`` (see the module docstring for the formats and how each is recognised)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InteropError(f"{path}: not found; give the path of a weight file ({SUPPORTED})")
    if p.is_dir():
        if is_dcp_checkpoint(p):
            obj = consolidate_dcp(p)
            w = _from_dict(p, obj)
            w.format = "mimkit-dcp"
            return w
        if _hf_dir(p):
            return _read_hf(p)
        latest = [p / n for n in _RUN_DIR_FILES if (p / n).is_file()]
        if not latest:  # not holds_weights(p)
            raise InteropError(f"{p} is a directory without checkpoint.pt, a sharded checkpoint or a Hugging Face "
                               "config.json; give a checkpoint file, a run directory or a ViTMAE directory")
        p = latest[0]
    if p.suffix == ".safetensors":
        sd, meta = _read_safetensors(p)
        sd = strip_wrappers(sd)
        if "mimkit_vit_config" in meta:
            return Weights(str(p), "mimkit-export", sd, meta=meta, input=input_record(meta.get("mimkit_input")))
        if any(k.startswith(_HF_PREFIXES) for k in sd):
            return _read_hf(p)
        visual = clip_visual(sd)
        if visual is not None:
            return Weights(str(p), "clip", visual, meta=meta)
        return Weights(str(p), _state_format(p, sd), sd, meta=meta)
    if is_torchscript(p):
        visual = clip_visual(load_torchscript(p, "CLIP checkpoint").state_dict())
        if visual is None:
            raise InteropError(f"{p} is a TorchScript archive without a CLIP image tower; mimkit reads {SUPPORTED}")
        return Weights(str(p), "clip", visual)
    obj = read_verified(p)
    if not isinstance(obj, dict):
        raise InteropError(f"{p} holds a {type(obj).__name__}, not a state dict or checkpoint; mimkit reads "
                           f"{SUPPORTED}")
    return _from_dict(p, obj)


def step_from_name(path: str | Path) -> int | None:
    """A step number in a checkpoint's file name (``checkpoint-00000120.pt``, ``ckpt_step120``)."""
    m = re.search(r"(?:checkpoint-|ckpt_step|step[-_]?)(\d+)", Path(path).name)
    return int(m.group(1)) if m else None
