"""What each method owns behind the contract (``mimkit.methods.base``): its pictures' data
(``picture_data``), its offline / smoke preset overrides, the target copies weight import re-initialises
(``target_copies``), and the evaluation attributes of the encoder it exports. Nothing outside
``methods/`` names a method or reads a method's own attributes: pictures and the bench go through the
contract only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from mimkit.config import load_config
from mimkit.init_from import apply_init
from mimkit.interop import export_encoder
from mimkit.methods import (
    METHODS,
    PICTURES,
    CAEv2,
    CAEv2Options,
    LatentMIM,
    Method,
    PictureData,
    Progress,
    TargetCopy,
)
from mimkit.methods.latent_mim import ProjectorOptions
from mimkit.methods.pcae import PCAE
from mimkit.nn import ViTConfig, ViTEncoder
from mimkit.train.loop import build_method

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mimkit"
TINY = ["model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
        "model.decoder.embed_dim=32", "model.decoder.depth=1", "model.decoder.num_heads=2"]


# -- nothing outside methods/ names a method or reads its internals ----------------------------------
def _method_name_pattern() -> re.Pattern:
    names = {n for n in METHODS} | {cls.__name__ for cls in METHODS.values()}
    alt = "|".join(sorted((re.escape(n) for n in names), key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9])({alt})(?![A-Za-z0-9])", re.IGNORECASE)


# what pictures may read of a method and of its encoder: the contract (and nn.Module's own)
MODEL_READS = {"capabilities", "picture_data", "reconstruct", "encoder", "parameters", "training", "eval", "train"}
ENCODER_READS = {"patch_size", "grid_size", "in_chans", "num_patches"}


def viz_offenders(name: str, text: str) -> list[str]:
    """Lines of a ``viz`` file that name a method (anywhere, docs included), probe the model with
    ``getattr``/``hasattr``, read a non-contract attribute of the model or its encoder, or import a
    method's module."""
    names = _method_name_pattern()
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        why = []
        if m := names.search(line):
            why.append(f"names method {m.group(1)!r}")
        if re.search(r"\b(getattr|hasattr)\(", line):
            why.append("probes attributes")
        why += [f"reads model.{a}" for a in re.findall(r"\bmodel\.(\w+)", line) if a not in MODEL_READS]
        why += [f"reads encoder.{a}" for a in re.findall(r"\bencoder\.(\w+)", line) if a not in ENCODER_READS]
        if re.search(r"(from|import) mimkit\.methods\.\w+", line):
            why.append("imports a method's module")
        out += [f"{name}:{i}: {w}: {line.strip()}" for w in why]
    return out


def bench_offenders(text: str) -> list[str]:
    """Code of ``bench.py`` (identifiers and strings, docstrings aside) that names a method other than
    through its one ``REFERENCE`` constant, keeps a per-method table, or probes attributes."""
    names = _method_name_pattern()
    tree = ast.parse(text)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "REFERENCE" for t in node.targets):
            skip |= {id(n) for n in ast.walk(node)}
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))  # docstrings
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            skip.add(id(node.value))  # attribute docstrings
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        words = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.append(node.value)
        elif isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            words.append(node.name)
        elif isinstance(node, ast.arg):
            words.append(node.arg)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            out.append(f"bench.py:{node.lineno}: probes attributes with {node.func.id}")
        elif isinstance(node, ast.Dict) and any(
                isinstance(k, ast.Constant) and isinstance(k.value, str) and k.value in METHODS for k in node.keys):
            out.append(f"bench.py:{node.lineno}: a per-method table")
        for w in words:
            if m := names.search(w):
                out.append(f"bench.py:{getattr(node, 'lineno', '?')}: names method {m.group(1)!r} in {w!r}")
    return out


def test_scanners_catch_what_they_are_for():
    """The scans below flag the leaks this test file is about (so a clean result means something)."""
    assert viz_offenders("x.py", "g = model.group_size")
    assert viz_offenders("x.py", 'gen = getattr(model, "masking", None)')
    assert viz_offenders("x.py", "model.encode_teacher(images, ids)")
    assert viz_offenders("x.py", '"""MixedAE picture"""')
    assert viz_offenders("x.py", "x = model.encoder.blocks[0]")
    assert viz_offenders("x.py", "from mimkit.methods.pcae import PCAE")
    assert not viz_offenders("x.py", 'data = model.picture_data("views", x, g); p = model.encoder.patch_size')
    assert bench_offenders('EXTRA = {"cae": ["method.target=pixel"]}\n')
    assert bench_offenders('cfg = method_config("latent_mim", True)\n')
    assert bench_offenders('p = CONFIGS / "mae_fashion_mnist.yaml"\n')
    assert not bench_offenders('REFERENCE = "mae"\np = CONFIGS / f"{REFERENCE}_fashion_mnist.yaml"\n')


def test_viz_names_no_method_and_reads_only_the_contract():
    offenders = []
    for path in sorted((SRC / "viz").glob("*.py")):
        offenders += viz_offenders(f"viz/{path.name}", path.read_text())
    assert not offenders, "pictures go through model.picture_data:\n" + "\n".join(offenders)


def test_bench_names_no_method_but_its_reference():
    offenders = bench_offenders((SRC / "bench.py").read_text())
    assert not offenders, "the bench iterates over METHODS with each method's overrides:\n" + "\n".join(offenders)


def test_init_from_finds_copies_through_the_contract_only():
    text = (SRC / "init_from.py").read_text()
    assert "target_copies()" in text
    assert not re.search(r"getattr\(\s*model|\.branch\b|\"target\.", text), "init_from reads a method's attributes"


# -- offline and smoke presets ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_every_smoke_preset_trains_one_step(name):
    """Each method's ViT-B preset at the bench's tiny shapes with the overrides it declares (no file):
    one training step (forward, backward, optimizer step, ``after_step``) moves the encoder."""
    from mimkit.bench import method_config

    cls = METHODS[name]
    assert all("=" in o for o in (*cls.offline_overrides, *cls.smoke_overrides))
    cfg = method_config(name, smoke=True)
    torch.manual_seed(0)
    model = build_method(cfg).train()
    enc = cfg.model.encoder
    x = torch.randn(8, enc.in_chans, enc.img_size, enc.img_size)
    before = model.encoder.blocks[0].attn.qkv.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(x, Progress(5, 10, 0.5, 1.0), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    opt.step()
    model.after_step(Progress(6, 10, 0.6, 1.0))
    assert not torch.equal(model.encoder.blocks[0].attn.qkv.weight, before)


@pytest.mark.parametrize("name", list(METHODS))
def test_offline_overrides_build_the_fashion_mnist_preset_without_files(name):
    cfg = load_config(ROOT / "configs" / f"{name}_fashion_mnist.yaml", [*TINY, *METHODS[name].preset_overrides()])
    model = build_method(cfg).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(4, 1, 28, 28), generator=torch.Generator().manual_seed(0)).loss)


def test_preset_overrides_join_offline_then_smoke():
    assert CAEv2.preset_overrides() == list(CAEv2.offline_overrides)
    assert CAEv2.preset_overrides(smoke=True) == [*CAEv2.offline_overrides, *CAEv2.smoke_overrides]
    assert Method.preset_overrides(smoke=True) == []


# -- pictures: the method gives the data ------------------------------------------------------------
def _preset_model(name: str) -> Method:
    cfg = load_config(ROOT / "configs" / f"{name}_fashion_mnist.yaml", [*TINY, *METHODS[name].preset_overrides(True)])
    torch.manual_seed(0)
    return build_method(cfg).eval()


@pytest.mark.parametrize("name", list(METHODS))
def test_picture_data_of_every_declared_kind(name):
    from mimkit.viz import DRAWERS

    assert set(DRAWERS) == set(PICTURES)
    model = _preset_model(name)
    x = torch.randn(8, 1, 28, 28)
    length = model.encoder.num_patches
    for kind in model.capabilities.pictures:
        with torch.no_grad():
            data = model.picture_data(kind, x, torch.Generator().manual_seed(0))
        assert isinstance(data, PictureData) and data.plan.mask.shape == (len(data.images) * data.plan.num_views,
                                                                           length), kind
        if kind in ("reconstruction", "mixing"):
            assert data.reconstruction.pred.shape[:2] == (len(data.images), length)
        if kind == "salience":
            assert data.maps["salience"].shape == (len(data.images), length)
        if kind == "mixing":
            g = len(data.images)
            assert data.maps["mixed"].shape == (1, 1, 28, 28) and data.maps["owner"].shape == (g, length)
            assert set(data.maps["owner"][0].tolist()) == set(range(g))
        if kind == "teacher_drops":
            assert len(data.stages) >= 2 and all(ids.shape[0] == len(data.images) for _, ids in data.stages)
            assert data.stages[0][1].shape[1] == int(data.plan.mask[0].sum())  # the teacher sees the masked
        if kind == "regressor":
            cos = data.maps["cos"]
            assert torch.isnan(cos[data.plan.mask == 0]).all() and data.title
    undeclared = [k for k in PICTURES if k not in model.capabilities.pictures]
    if undeclared:
        with pytest.raises(ValueError, match="does not draw"):
            model.picture_data(undeclared[0], x)


# -- target copies (EMA teachers) ------------------------------------------------------------------
def _tiny(cls, **kw):
    torch.manual_seed(0)
    return cls(tiny_model_config(), cls.options_class(**kw))


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_target_copies_are_declared_by_the_methods_that_have_them():
    for name, cls in METHODS.items():
        model = _preset_model(name)
        copies = model.target_copies()
        if cls in (LatentMIM, PCAE):  # the presets' Latent MIM target is ema
            assert len(copies) == 1 and isinstance(copies[0], TargetCopy), name
            c = copies[0]
            assert c.branch is model.target.branch and c.online is model.target.online
            assert any(k.startswith(c.prefix + ".") for k in model.state_dict())
        else:  # MAE-likes, MixedAE: pixel targets; CAE: stop-gradient arm; CAE v2: a frozen teacher
            assert copies == (), name
    for target in ("naive", "stopgrad"):
        assert _tiny(LatentMIM, target=target, projector=ProjectorOptions(kind="none")).target_copies() == ()
    assert len(_tiny(LatentMIM, target="separate", projector=ProjectorOptions(kind="none")).target_copies()) == 1


def test_sync_copies_the_online_weights_into_exactly_the_branch():
    model = _tiny(PCAE)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    (c,) = model.target_copies()
    decoder = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    assert not _equal(c.branch, model.encoder)
    c.sync()
    assert _equal(c.branch, model.encoder)
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in decoder.items())


def test_init_from_reinitialises_the_ema_branch_from_the_loaded_encoder(tmp_path):
    torch.manual_seed(3)
    src = ViTEncoder(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2))
    path = export_encoder(src, tmp_path / "enc.safetensors")
    model = _tiny(PCAE)
    report = apply_init(model, path)
    assert report.copied == {"target.branch": report.copied["target.branch"]}
    assert _equal(model.encoder, src) and _equal(model.target.branch, src)
    assert not any(k.startswith("target.branch.") for k in report.new)
    # a shallower copy (Latent MIM's target_depth) takes the blocks it has
    lm = _tiny(LatentMIM, target_depth=1, projector=ProjectorOptions(kind="none"))
    apply_init(lm, path)
    enc_copy = lm.target.branch["encoder"]
    assert len(enc_copy.blocks) == 1
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in enc_copy.state_dict().items())


def test_init_from_leaves_a_frozen_teacher_alone(tmp_path):
    torch.manual_seed(3)
    src = ViTEncoder(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2))
    path = export_encoder(src, tmp_path / "enc.safetensors")
    teacher = ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    model = _tiny(CAEv2, teacher_random_init=True, teacher_vit=teacher)
    assert isinstance(model.options, CAEv2Options)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    report = apply_init(model, path)
    assert _equal(model.encoder, src) and not report.copied
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in before.items())
    assert not _equal(model.teacher.encoder, src)


# -- the encoder's evaluation attributes ---------------------------------------------------------------
@pytest.mark.parametrize("img_size,in_chans", [(28, 1), ((16, 24), 3)])
def test_vit_encoder_has_the_evaluation_attributes_of_a_timm_vit(img_size, in_chans):
    from mimkit.interop import timm_model_for
    from mimkit.nn.adapters import TimmEncoder

    cfg = ViTConfig(img_size=img_size, patch_size=4, in_chans=in_chans, embed_dim=32, depth=2, num_heads=4)
    ours = ViTEncoder(cfg)
    model = timm_model_for(cfg)
    theirs = TimmEncoder(model)
    assert ours.num_prefix_tokens == model.num_prefix_tokens == theirs.num_prefix_tokens == 1
    assert ours.has_class_token is model.has_class_token is theirs.has_class_token is True
    assert ours.pool_norm is None and theirs.pool_norm is None
    for attr in ("embed_dim", "num_heads", "patch_size", "in_chans", "img_hw", "grid_size"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert "pool_norm" not in dict(ours.named_modules())  # an attribute, not a module: the state dict is timm's
    assert set(ours.state_dict()) == set(model.state_dict())


def test_one_prefix_token_reads_every_teacher_encoder():
    from mimkit.nn.clip import ClipImageTower
    from mimkit.targets import FrozenTeacher

    tower = ClipImageTower(28, 4, 64, 1, 16)
    x = torch.randn(2, 3, 28, 28)
    assert FrozenTeacher(tower)(x).shape == (2, 50, 16)
    vit = ViTEncoder(ViTConfig(img_size=28, patch_size=4, in_chans=3, embed_dim=32, depth=1, num_heads=2))
    assert FrozenTeacher(vit)(x).shape == (2, 50, 32)
