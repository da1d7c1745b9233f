"""Record golden fixtures from the official code of MAE, CAE, CAE v2 and PCAE into tests/official/<method>.json.

Usage (each path a local checkout of the official repository; nothing is fetched)::

    python scripts/record_official_fixtures.py --mae /path/to/facebookresearch/mae \\
        --cae /path/to/Atten4Vis/CAE --pcae /path/to/caddyless/PCAE [--only mae,cae] [--dry-run]

For each method the script

1. builds a tiny mimkit model (:func:`mimkit_model`: 32x32 RGB images, patch 4, an 8x8 grid) whose every
   trained tensor is drawn from a seed that depends only on the tensor's name (:func:`fill_`), so the test
   rebuilds it without the official code; position tables are the official formula's (MAE's column-first
   table for MAE / PCAE, CAE's row-first one for CAE / CAE v2);
2. builds the official model at the same shapes with the official code, loads those weights mapped to the
   official keys (mimkit's mappings, :mod:`mimkit.weights.official`: ``to_official_state_dict`` for MAE and
   the MAE-shaped PCAE student; the inverse of ``from_official_cae_state_dict`` for CAE / CAE v2, checked by
   a round trip) with ``strict=True``;
3. runs the official forward and the official loss on fixed inputs and masks (MAE and PCAE draw their
   random masking inside the official forward, from a seeded global RNG; CAE and CAE v2 take a block mask
   drawn by mimkit's block generator, given to the official model as ``bool_masked_pos``), and writes
   the loss, the loss parts, a few output values (:func:`summary`), the mask (as a permutation) and the
   official commit into ``tests/official/<method>.json``;
4. runs the mimkit model on the same inputs and prints the differences it measured (also stored, under
   ``measured``).

``tests/test_official_fixtures.py`` rebuilds the mimkit side with :func:`mimkit_model` / :func:`inputs` /
:func:`plan_of` and compares.

The official code is run as it is, with these shims for APIs that changed since it was written (each is
applied only while the official code is imported or run, and undone after):

* ``timm.models.vision_transformer.Block(qk_scale=None)`` (MAE): newer timm dropped the argument; the shim
  accepts ``None`` (the default scale) and refuses anything else;
* ``np.float`` (MAE / PCAE ``util/pos_embed.py``): removed in numpy 1.24; set to ``float`` (= ``np.float64``,
  what it aliased);
* ``furnace.utils`` (CAE, imported by ``models/modeling_finetune.py``): replaced by an empty module; it
  needs ``torch._six`` and tensorboardX, and the pretraining model uses nothing of it;
* ``Tensor.cuda(device)`` (CAE ``ContextAutoencoderViT.forward`` moves ``rd_pos_embed`` with
  ``.cuda(x.device)``): ``.to(device)`` while the official CAE forward runs, so it runs on the CPU;
* the official losses computed outside the models (CAE / CAE v2 ``furnace/engine_for_pretraining.py``,
  PCAE ``engine_pretrain.py``) are the quoted lines of those files, run here on the model outputs (the
  engines themselves need CUDA, a data loader and an optimizer).

CAE's DALL-E tokens are replaced by fixed random ids (:class:`FixtureTokens`, the same in both); CAE v2's
CLIP teacher is the official ``clip/modeling_clip_helper.py`` ``VisionTransformer`` at a tiny shape in fp32
(the official runs cast CLIP to fp16), whose OpenAI-keyed weights (:func:`clip_state`) mimkit reads as a
CLIP file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import re
import subprocess
import sys
import types
import warnings
import zlib
from argparse import Namespace
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "official"
METHODS = ("mae", "cae", "cae_v2", "pcae")
REPOS = {"mae": "facebookresearch/mae", "cae": "Atten4Vis/CAE", "cae_v2": "Atten4Vis/CAE", "pcae": "caddyless/PCAE"}
FILES = {
    "mae": ["models_mae.py", "util/pos_embed.py"],
    "cae": ["models/modeling_cae.py", "models/modeling_cae_helper.py", "models/modeling_finetune.py",
            "furnace/engine_for_pretraining.py"],
    "cae_v2": ["models/modeling_cae.py", "models/modeling_cae_helper.py", "models/modeling_finetune.py",
               "clip/modeling_clip_helper.py", "furnace/engine_for_pretraining.py"],
    "pcae": ["models_mae.py", "engine_pretrain.py", "util/pos_embed.py"],
}

# the fixed case: shapes and seeds
B, IMG, PATCH, CHANS = 4, 32, 4, 3
L = (IMG // PATCH) ** 2
WEIGHT_SEED, IMAGE_SEED, MASK_SEED, TOKEN_SEED = 0, 1, 2, 3
VOCAB = 40  # CAE's token vocabulary here (DALL-E's is 8192)
CLIP_WIDTH, CLIP_LAYERS, CLIP_OUT = 128, 1, 24  # CAE v2's teacher: 2 heads (width // 64, as CLIP)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CAE_V2_MASKED = 10  # of 64: CAE v2 Tiny's 30 of 196, scaled (round(64 * 30 / 196))


# -- the mimkit side (also used by tests/test_official_fixtures.py) ------------------------------------
def _gen(name: str, seed: int = WEIGHT_SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def fill_(named: dict[str, torch.Tensor], seed: int = WEIGHT_SEED) -> None:
    """Overwrite tensors in place with values drawn from ``seed`` and each tensor's name alone (independent
    of the model's own initialisation and of the other tensors): matrices ``N(0, 1/fan_in)``, LayerNorm
    weights ``1 + N(0, 0.1)``, LayerScale gammas ``0.5 + N(0, 0.1)``, biases ``N(0, 0.1)``, tokens and the rest
    ``N(0, 0.2)``."""
    with torch.no_grad():
        for name, t in named.items():
            r = torch.randn(t.shape, generator=_gen(name, seed), dtype=torch.float64)
            leaf = name.rsplit(".", 1)[-1]
            if t.ndim >= 2 and leaf == "weight":
                v = r / (t[0].numel() ** 0.5)
            elif leaf == "weight":
                v = 1 + 0.1 * r
            elif "gamma" in name:
                v = 0.5 + 0.1 * r
            elif leaf == "bias":
                v = 0.1 * r
            else:
                v = 0.2 * r
            t.copy_(v.to(t.dtype))


def _filled_parameters(model, skip=("pos_embed", "teacher.")) -> dict[str, torch.Tensor]:
    return {k: p for k, p in model.named_parameters() if not any(s in k for s in skip)}


def _no_key_bias(model) -> None:
    """Zero the key third of every fused ``qkv.bias`` (the official CAE attention has no key bias)."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("attn.qkv.bias"):
                d = p.shape[0] // 3
                p[d : 2 * d] = 0


def _row_first_tables(model) -> None:
    """The official CAE tables (``build_2d_sincos_position_embedding``: row first) in encoder and regressor."""
    from mimkit.nn.pos_embed import sincos_2d

    with torch.no_grad():
        for table in (model.encoder.pos_embed, model.regressor.pos_embed):
            g = IMG // PATCH
            table.copy_(sincos_2d(table.shape[-1], g, g, cls_token=True, row_first=True)[None])


class FixtureTokens:
    """CAE's tokenizer for the fixture: fixed ids in ``[0, VOCAB)`` per image and patch (the official target
    is DALL-E's; any fixed ids pin the same cross-entropy)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(TOKEN_SEED)
        return torch.randint(0, VOCAB, (images.shape[0], L), generator=g)


def clip_state(seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """OpenAI-keyed ``visual.*`` tensors of a tiny CLIP image tower (CAE v2's teacher), drawn by :func:`fill_`."""
    w, g = CLIP_WIDTH, IMG // PATCH
    shapes = {"visual.conv1.weight": (w, CHANS, PATCH, PATCH), "visual.class_embedding": (w,),
              "visual.positional_embedding": (g * g + 1, w), "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,),
              "visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,), "visual.proj": (w, CLIP_OUT)}
    for i in range(CLIP_LAYERS):
        p = f"visual.transformer.resblocks.{i}."
        shapes.update({p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                       p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                       p + "ln_1.weight": (w,), p + "ln_1.bias": (w,), p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                       p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
                       p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,)})
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    fill_(sd, seed)
    return sd


def mimkit_model(name: str, teacher_path: str | None = None):
    """The fixture's mimkit model of method ``name`` in eval mode (CAE v2: its CLIP teacher from
    ``teacher_path``, a file holding :func:`clip_state`)."""
    from mimkit.masking import BlockOptions, MaskingOptions
    from mimkit.methods import CAE, MAE, PCAE, CAEOptions, CAEv2, CAEv2Options, MAEOptions, PCAEOptions
    from mimkit.methods.base import DecoderConfig, ModelConfig
    from mimkit.nn import ViTConfig

    block = MaskingOptions(kind="block", ratio=0.5, block=BlockOptions(min_patches=4, min_aspect=0.3))
    if name == "mae":
        cfg = ModelConfig(ViTConfig(IMG, PATCH, CHANS, 32, 2, 2), DecoderConfig(32, 1, 2))
        model = MAE(cfg, MAEOptions(norm_target=True))
    elif name == "cae":
        cfg = ModelConfig(ViTConfig(IMG, PATCH, CHANS, 32, 2, 2, layer_scale=0.1), DecoderConfig(16, 1, 2))
        model = CAE(cfg, CAEOptions(target="tokenizer", tokenizer=f"{Path(__file__).stem}:FixtureTokens",
                                    tokenizer_vocab=VOCAB, align_weight=2.0, regressor_depth=2, layer_scale=0.1,
                                    masking=block))
    elif name == "cae_v2":
        if teacher_path is None:
            raise ValueError("cae_v2 needs teacher_path (a file holding clip_state())")
        cfg = ModelConfig(ViTConfig(IMG, PATCH, CHANS, 32, 2, 2, layer_scale=0.1), DecoderConfig(16, 0, 2))
        model = CAEv2(cfg, CAEv2Options(teacher_path=teacher_path, teacher_norm=True, data_mean=IMAGENET_MEAN,
                                        data_std=IMAGENET_STD, teacher_mean=CLIP_MEAN, teacher_std=CLIP_STD,
                                        size_preset="none", regressor_depth=1, layer_scale=0.1,
                                        masking=MaskingOptions(kind="block", num_keep=L - CAE_V2_MASKED,
                                                               block=BlockOptions(min_patches=4, min_aspect=0.3))))
    elif name == "pcae":
        cfg = ModelConfig(ViTConfig(IMG, PATCH, CHANS, PATCH * PATCH * CHANS, 3, 3), DecoderConfig(32, 1, 2))
        model = PCAE(cfg, PCAEOptions(keep=0.5, drop="similarity", drop_stages=3, drop_case=0, decoder_drop_path=0.0,
                                      masking=MaskingOptions(kind="random", ratio=0.75)))
    else:
        raise ValueError(f"unknown fixture {name!r}; choose one of {METHODS}")
    fill_(_filled_parameters(model))
    if name in ("cae", "cae_v2"):
        _no_key_bias(model)
        _row_first_tables(model)
    return model.eval()


def inputs(name: str) -> dict[str, torch.Tensor]:
    """``images (B, 3, 32, 32)`` the model's input; CAE v2 also ``clip_images``: the same pixels normalised
    with CLIP's statistics (the official second view; mimkit re-normalises ``images`` itself)."""
    g = torch.Generator().manual_seed(IMAGE_SEED)
    if name != "cae_v2":
        return {"images": torch.randn(B, CHANS, IMG, IMG, generator=g)}
    pixels = torch.rand(B, CHANS, IMG, IMG, generator=g)

    def norm(mean, std):
        return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)

    return {"images": norm(IMAGENET_MEAN, IMAGENET_STD), "clip_images": norm(CLIP_MEAN, CLIP_STD)}


def plan_of(fixture: dict):
    """The fixture's mask as a :class:`~mimkit.masking.MaskPlan` (``perm``: visible ids first)."""
    from mimkit.masking import MaskPlan

    return MaskPlan.from_permutation(torch.tensor(fixture["perm"]), fixture["num_keep"]).validate()


def summary(t: torch.Tensor, k: int = 12) -> dict:
    """``shape``, ``mean``, ``abs_mean`` and ``values`` at ``k`` evenly spaced flat indices ``at``."""
    t = t.detach().double().flatten() if t.ndim else t.detach().double().view(1)
    at = torch.linspace(0, t.numel() - 1, min(k, t.numel())).round().long()
    return {"mean": float(t.mean()), "abs_mean": float(t.abs().mean()), "at": at.tolist(),
            "values": t[at].tolist()}


def mimkit_outputs(name: str, model, fixture: dict, x: dict) -> dict:
    """The mimkit values that the fixture records for method ``name`` (same keys as the official ones)."""
    plan = plan_of(fixture)
    images = x["images"]
    with torch.no_grad():
        out = model(images, plan=plan)
        if name == "mae":
            latent = model.encoder.forward_masked(images, plan.ids_keep)
            return {"loss": float(out.loss), "pred": out.pred, "latent": latent}
        if name == "cae":
            lat = model.latents(images, plan)
            return {"loss": float(out.loss), "loss_main": float(out.metrics["loss_ce"]),
                    "loss_align": float(out.metrics["loss_align"]), "logits": out.pred.flatten(0, 1),
                    "latent_predict": lat["z_m"], "latent_target": lat["z_bar"]}
        if name == "cae_v2":
            return {"loss": float(out.loss), "outputs": out.pred, "labels": out.target}
        return {"loss": float(out.loss), "retained_ids": out.plan.ids_target.tolist(), "latent": out.pred,
                "target_unit": F.normalize(out.target.float(), dim=-1)}


def compare(recorded: dict, got: dict) -> dict[str, float]:
    """Largest absolute difference per recorded key (ids: 0 when equal, inf otherwise)."""
    diffs = {}
    for key, want in recorded.items():
        have = got[key]
        if isinstance(want, float):
            diffs[key] = abs(float(have) - want)
        elif isinstance(want, list):
            diffs[key] = 0.0 if have == want else float("inf")
        else:
            s = summary(have)
            if s["at"] != want["at"]:
                diffs[key] = float("inf")
                continue
            parts = [abs(s[k] - want[k]) for k in ("mean", "abs_mean")]
            parts += [abs(a - b) for a, b in zip(s["values"], want["values"])]
            diffs[key] = max(parts)
    return diffs


# -- the official side ------------------------------------------------------------------------------------
@contextlib.contextmanager
def official_code(repo: Path, stubs: dict[str, types.ModuleType] | None = None):
    """Import from ``repo`` (first on ``sys.path``, ``stubs`` in ``sys.modules``); on exit forget every module
    imported from it (MAE and PCAE both have ``models_mae`` and ``util``) and the stubs."""
    repo = Path(repo).resolve()
    before = set(sys.modules)
    sys.path.insert(0, str(repo))
    for k, v in (stubs or {}).items():
        sys.modules[k] = v
    try:
        with warnings.catch_warnings():  # deprecated timm import paths, timm registry names registered twice
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.path.remove(str(repo))
        for k in set(sys.modules) - before:
            f = getattr(sys.modules[k], "__file__", None) or ""
            paths = getattr(sys.modules[k], "__path__", None)
            inside = f.startswith(str(repo)) or any(str(p).startswith(str(repo)) for p in (paths or []))
            if inside or k in (stubs or {}):
                del sys.modules[k]


@contextlib.contextmanager
def np_float():
    """``np.float`` (removed in numpy 1.24) as the ``float`` it aliased, for ``util/pos_embed.py``."""
    had = "float" in np.__dict__
    np.float = float
    try:
        yield
    finally:
        if not had:
            del np.float


@contextlib.contextmanager
def timm_block_with_qk_scale():
    """timm's ``Block`` accepting the ``qk_scale=None`` argument newer timm dropped (MAE's ``models_mae``)."""
    import timm.models.vision_transformer as tv

    original = tv.Block

    class Block(original):
        def __init__(self, *args, qk_scale=None, **kw):
            if qk_scale is not None:
                raise ValueError("the shim only supports qk_scale=None (the default scale)")
            super().__init__(*args, **kw)

    tv.Block = Block
    try:
        yield
    finally:
        tv.Block = original


@contextlib.contextmanager
def cuda_is_to():
    """``Tensor.cuda(device)`` as ``Tensor.to(device)``: the official CAE forward calls ``.cuda(x.device)``."""
    original = torch.Tensor.cuda

    def cuda(self, device=None, non_blocking=False, **kw):
        return self.to(device if device is not None else "cuda", non_blocking=non_blocking)

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def commit_of(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _load_strict(module, sd: dict) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"official {type(module).__name__}: missing {missing}, unexpected {unexpected}")


def _table_diff(official: torch.Tensor, ours: torch.Tensor) -> float:
    return float((official.detach().float() - ours.detach().float()).abs().max())


def record_mae(repo: Path, model, x: dict) -> tuple[dict, dict, dict]:
    from mimkit.weights.official import from_official_state_dict, to_official_state_dict

    with official_code(repo), np_float(), timm_block_with_qk_scale():
        import models_mae

        official = models_mae.MaskedAutoencoderViT(
            img_size=IMG, patch_size=PATCH, in_chans=CHANS, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            norm_pix_loss=True).eval()
    sd = to_official_state_dict(model)
    checks = {"pos_embed_official_vs_mimkit": _table_diff(official.pos_embed, sd["pos_embed"]),
              "decoder_pos_embed_official_vs_mimkit": _table_diff(official.decoder_pos_embed, sd["decoder_pos_embed"]),
              "mapping_round_trip": all(torch.equal(v, model.state_dict()[k])
                                        for k, v in from_official_state_dict(sd).items())}
    _load_strict(official, sd)
    images = x["images"]
    with torch.no_grad():
        torch.manual_seed(MASK_SEED)  # random_masking's torch.rand is the forward's first draw
        loss, pred, mask = official(images, mask_ratio=0.75)
        torch.manual_seed(MASK_SEED)
        latent, mask2, _ = official.forward_encoder(images, 0.75)
        torch.manual_seed(MASK_SEED)
        noise = torch.rand(B, L)
    perm = torch.argsort(noise, dim=1)  # the official ids_shuffle
    keep = int(L * (1 - 0.75))
    fixture = {"perm": perm.tolist(), "num_keep": keep}
    assert torch.equal(plan_of(fixture).mask, mask) and torch.equal(mask, mask2), "the official mask is not the noise's"
    return fixture, {"loss": float(loss), "pred": pred, "latent": latent}, checks


def _block_perm(model, x: dict) -> dict:
    """A block mask from mimkit's generator (seeded): visible ids then masked ids, each in raster order (the
    official boolean-mask order)."""
    plan = model.make_plan(x["images"], None, torch.Generator().manual_seed(MASK_SEED))
    vis, msk = plan.ids_keep.sort(1).values, plan.ids_masked().sort(1).values
    return {"perm": torch.cat([vis, msk], 1).tolist(), "num_keep": plan.num_keep}


def to_official_cae(model) -> dict:
    """A mimkit CAE / CAE v2 state dict -> the official ``ContextAutoencoderViT`` keys: the inverse of
    :func:`mimkit.weights.official.from_official_cae_state_dict` (checked by a round trip)."""
    from mimkit.methods import CAEv2
    from mimkit.weights.official import _REGRESSOR_BLOCK

    v2 = isinstance(model, CAEv2)
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and not k.startswith("teacher.")}
    inverse = {new: old for old, new in _REGRESSOR_BLOCK.items()}
    out = {}

    def block(k: str, v: torch.Tensor, dst: str) -> None:
        idx, rest = k.split(".", 1)
        if rest == "attn.qkv.bias":
            d = v.shape[0] // 3
            assert not v[d : 2 * d].any(), "a key bias has no official place"
            out[f"{dst}{idx}.attn.q_bias"], out[f"{dst}{idx}.attn.v_bias"] = v[:d], v[2 * d :]
            return
        out[f"{dst}{idx}." + {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}.get(rest, rest)] = v

    top = {"proj.0.": "encoder_to_regresser.", "proj.1.": "encoder_to_regresser_norm.",
           "regressor.pos_embed": "rd_pos_embed", "regressor.mask_token": "mask_token"}
    top.update({"head.norm.": "decoder.norm.", "head.head.": "decoder.head."} if v2 else
               {"regressor.norm.": "regresser.norm.", "decoder.norm.": "decoder.norm.", "decoder.head.": "decoder.head."})
    for k, v in sd.items():
        if k.startswith("encoder.blocks."):
            block(k[len("encoder.blocks."):], v, "encoder.blocks.")
        elif k.startswith("decoder.blocks."):
            block(k[len("decoder.blocks."):], v, "decoder.decoder_blocks.")
        elif k.startswith("encoder."):
            out[k] = v
        elif k.startswith("regressor.blocks."):
            idx, rest = k[len("regressor.blocks."):].split(".", 1)
            for new, old in inverse.items():  # "norm_q." -> "norm1_q.", "ls1.gamma" -> "gamma_1_cross"
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            out[f"regresser.regressor_blocks.{idx}.{rest}"] = v
        else:
            for src, dst in top.items():
                if k == src or (src.endswith(".") and k.startswith(src)):
                    out[dst + k[len(src):]] = v
                    break
            else:
                raise KeyError(f"no official name for {k}")
    if v2:  # held by the official CAE v2 model, not used by it
        d = sd["regressor.mask_token"].shape[-1]
        out["regresser.norm.weight"], out["regresser.norm.bias"] = torch.ones(d), torch.zeros(d)
    else:  # the alignment encoder: the official copy of the encoder (refreshed from it every step)
        out.update({"alignment_encoder." + k[len("encoder."):]: v.clone() for k, v in list(out.items())
                    if k.startswith("encoder.")})
    return out


def _cae_round_trip(model, sd: dict) -> bool:
    from mimkit.weights.official import from_official_cae_state_dict

    mapped, _ = from_official_cae_state_dict(sd)
    own = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and not k.startswith("teacher.")}
    return set(mapped) == set(own) and all(torch.equal(mapped[k], own[k]) for k in own)


def _cae_stubs() -> dict[str, types.ModuleType]:
    return {"furnace.utils": types.ModuleType("furnace.utils")}


def _official_cae(repo: Path, model_type: str, **kw):
    with official_code(repo, _cae_stubs()), contextlib.redirect_stdout(io.StringIO()):
        from models.modeling_cae import ContextAutoencoderViT

        args = Namespace(model_type=model_type, regressor_depth=kw["regressor_depth"],
                         decoder_embed_dim=kw["decoder_embed_dim"], decoder_depth=kw["decoder_depth"],
                         num_out_dim=kw.get("num_out_dim"))
        return ContextAutoencoderViT(img_size=IMG, patch_size=PATCH, in_chans=CHANS, embed_dim=32, depth=2, num_heads=2,
                                     mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                     init_values=0.1, decoder_num_heads=2, decoder_layer_scale_init_value=0.1,
                                     args=args, **kw).eval()


def record_cae(repo: Path, model, x: dict) -> tuple[dict, dict, dict]:
    official = _official_cae(repo, "cae", regressor_depth=2, decoder_embed_dim=16, decoder_depth=1,
                             decoder_num_classes=VOCAB)
    sd = to_official_cae(model)
    checks = {"pos_embed_official_vs_mimkit": _table_diff(official.encoder.pos_embed, sd["encoder.pos_embed"]),
              "rd_pos_embed_official_vs_mimkit": _table_diff(official.rd_pos_embed, sd["rd_pos_embed"]),
              "mapping_round_trip": _cae_round_trip(model, sd)}
    _load_strict(official, sd)
    fixture = _block_perm(model, x)
    images = x["images"]
    bool_masked_pos = plan_of(fixture).mask.bool()
    labels = FixtureTokens()(images)
    with torch.no_grad(), cuda_is_to():
        outputs, latent_predict, latent_target = official(images, bool_masked_pos=bool_masked_pos)
    # furnace/engine_for_pretraining.py (model_type cae):
    #   labels = input_ids[bool_masked_pos]
    #   loss_main = nn.CrossEntropyLoss()(input=outputs.float(), target=labels)
    #   loss_align = args.align_loss_weight * F.mse_loss(latent_predict.float(), latent_target.detach().float(),
    #                                                    reduction="mean")
    #   loss = loss_main + loss_align
    loss_main = torch.nn.CrossEntropyLoss()(input=outputs.float(), target=labels[bool_masked_pos])
    mse = F.mse_loss(latent_predict.float(), latent_target.detach().float(), reduction="mean")
    loss = loss_main + 2.0 * mse
    return fixture, {"loss": float(loss), "loss_main": float(loss_main), "loss_align": float(mse), "logits": outputs,
                     "latent_predict": latent_predict, "latent_target": latent_target}, checks


def record_cae_v2(repo: Path, model, x: dict, teacher_sd: dict) -> tuple[dict, dict, dict]:
    official = _official_cae(repo, "caev2", regressor_depth=1, decoder_embed_dim=16, decoder_depth=0,
                             num_out_dim=CLIP_OUT)
    with official_code(repo, _cae_stubs()):
        from clip.modeling_clip_helper import VisionTransformer

        clip = VisionTransformer(input_resolution=IMG, patch_size=PATCH, width=CLIP_WIDTH, layers=CLIP_LAYERS,
                                 heads=CLIP_WIDTH // 64, output_dim=CLIP_OUT).eval()
    _load_strict(clip, {k[len("visual."):]: v for k, v in teacher_sd.items()})
    sd = to_official_cae(model)
    checks = {"pos_embed_official_vs_mimkit": _table_diff(official.encoder.pos_embed, sd["encoder.pos_embed"]),
              "rd_pos_embed_official_vs_mimkit": _table_diff(official.rd_pos_embed, sd["rd_pos_embed"]),
              "mapping_round_trip": _cae_round_trip(model, sd)}
    _load_strict(official, sd)
    fixture = _block_perm(model, x)
    bool_masked_pos = plan_of(fixture).mask.bool()
    with torch.no_grad(), cuda_is_to():
        # furnace/engine_for_pretraining.py (model_type caev2, discrete_vae_type clip):
        input_ids = clip(x["clip_images"])  # d_vae.extract_image_features(images) = visual(image)
        C = input_ids.shape[-1]
        cls_token_labels = input_ids[:, :1, :]
        input_ids = input_ids[:, 1:, :]
        masked_labels = input_ids[bool_masked_pos].reshape(B, -1, C)
        unmasked_labels = input_ids[~bool_masked_pos].reshape(B, -1, C)
        labels = torch.cat([cls_token_labels, unmasked_labels, masked_labels], dim=1)
        outputs, _, _ = official(x["images"], bool_masked_pos=bool_masked_pos)
        labels = labels / labels.norm(dim=-1, keepdim=True)
        C = outputs.shape[-1]
        loss = F.cosine_embedding_loss(outputs.reshape(-1, C).float(), labels.reshape(-1, C),
                                       torch.ones_like(labels.reshape(-1, C)[:, 0]), reduction="mean")
    return fixture, {"loss": float(loss), "outputs": outputs, "labels": labels}, checks


def record_pcae(repo: Path, model, x: dict) -> tuple[dict, dict, dict]:
    from mimkit.weights.official import to_official_state_dict

    with official_code(repo), np_float(), contextlib.redirect_stdout(io.StringIO()):
        import models_mae

        kw = dict(img_size=IMG, patch_size=PATCH, in_chans=CHANS, embed_dim=PATCH * PATCH * CHANS, depth=3, num_heads=3,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4,
                  norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), drop_path=0.0)
        student = models_mae.PCAEViT(use_decoder=True, **kw).eval()
        teacher = models_mae.PCAEViT(use_decoder=False, **kw).eval()
    own = model.state_dict()
    student_sd = to_official_state_dict(Namespace(state_dict=lambda: {
        k: v for k, v in own.items() if k.startswith(("encoder.", "decoder."))}))
    teacher_sd = {k[len("target.branch."):]: v for k, v in own.items() if k.startswith("target.branch.")}
    checks = {"pos_embed_official_vs_mimkit": _table_diff(student.pos_embed, student_sd["pos_embed"]),
              "decoder_pos_embed_official_vs_mimkit": _table_diff(student.decoder_pos_embed,
                                                                  student_sd["decoder_pos_embed"]),
              "teacher_differs_from_student": not torch.equal(teacher_sd["blocks.0.attn.qkv.weight"],
                                                              student_sd["blocks.0.attn.qkv.weight"])}
    _load_strict(student, student_sd)
    _load_strict(teacher, teacher_sd)
    images = x["images"]
    with torch.no_grad():
        # engine_pretrain.py:
        torch.manual_seed(MASK_SEED)  # random_masking's torch.rand is the teacher forward's first draw
        teacher_latent, teacher_ids_keep, student_ids_keep = teacher(images, mask_ratio=0.75, drop_stage=3,
                                                                     random_drop=False, drop_case=0, keep_ratio=0.5)
        m = teacher_latent.mean(-1, keepdims=True)
        s = teacher_latent.var(-1, keepdims=True)
        teacher_latent = (teacher_latent - m) / (s + 1e-6) ** 0.5
        latent = student(images, student_ids_keep=student_ids_keep, teacher_ids_keep=teacher_ids_keep)
        loss = 1 - F.cosine_similarity(latent, teacher_latent, dim=-1).mean()
        torch.manual_seed(MASK_SEED)
        noise = torch.rand(B, L)
    perm = torch.argsort(noise, dim=1)
    keep = int(L * (1 - 0.75))
    assert torch.equal(perm[:, :keep], student_ids_keep), "the official mask is not the noise's"
    fixture = {"perm": perm.tolist(), "num_keep": keep}
    return fixture, {"loss": float(loss), "retained_ids": teacher_ids_keep.tolist(), "latent": latent,
                     "target_unit": F.normalize(teacher_latent.float(), dim=-1)}, checks


def record(name: str, repo: Path, tmp: Path) -> dict:
    """Run method ``name``'s official code from ``repo``; the fixture record (written by :func:`main`)."""
    x = inputs(name)
    if name == "cae_v2":
        teacher_sd = clip_state()
        path = tmp / "clip_teacher.pt"
        torch.save(teacher_sd, path)
        model = mimkit_model(name, str(path))
        fixture, official, checks = record_cae_v2(repo, model, x, teacher_sd)
    else:
        model = mimkit_model(name)
        fixture, official, checks = {"mae": record_mae, "cae": record_cae, "pcae": record_pcae}[name](repo, model, x)
    results = {k: v if isinstance(v, (float, list)) else summary(v) for k, v in official.items()}
    measured = compare(results, mimkit_outputs(name, model, fixture, x))
    return {
        "method": name,
        "official": {"repo": f"https://github.com/{REPOS[name]}", "commit": commit_of(repo), "files": FILES[name]},
        "command": "python scripts/record_official_fixtures.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__},
        "case": {"batch": B, "img_size": IMG, "patch_size": PATCH, "in_chans": CHANS, "weight_seed": WEIGHT_SEED,
                 "image_seed": IMAGE_SEED, "mask_seed": MASK_SEED, "token_seed": TOKEN_SEED},
        **fixture,
        "results": results,
        "checks": checks,
        "measured": measured,
    }


def dumps(rec: dict) -> str:
    """JSON with every list of numbers on one line (a mask row, the sampled values)."""
    text = json.dumps(rec, indent=1)
    return re.sub(r"\[\s+([-+\w.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mae", type=Path, help="a checkout of facebookresearch/mae")
    parser.add_argument("--cae", type=Path, help="a checkout of Atten4Vis/CAE (CAE and CAE v2)")
    parser.add_argument("--pcae", type=Path, help="a checkout of caddyless/PCAE")
    parser.add_argument("--only", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write tests/official/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repos = {"mae": args.mae, "cae": args.cae, "cae_v2": args.cae, "pcae": args.pcae}
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        if repos.get(name) is None:
            print(f"{name}: skipped (no --{name.split('_')[0]} checkout given)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rec = record(name, repos[name], Path(tmp))
        print(f"{name}: official loss {rec['results']['loss']:.6f}; checks {rec['checks']}; "
              f"mimkit vs official (max abs): {json.dumps(rec['measured'])}")
        if not args.dry_run:
            (OUT / f"{name}.json").write_text(dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
