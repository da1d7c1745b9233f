"""The method contract end to end: every registered method, with every masking kind it accepts, trains a
few steps through the real trainer, draws every picture it declares, and gives its encoder to kNN.

A new method or masking kind cannot land half-wired: registering it in ``METHODS`` (or adding a kind to
``capabilities.masking_kinds``) puts it in this test.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import needs_fmnist

from mimkit.config import load_config
from mimkit.methods import METHODS, PICTURES, Capabilities, Method
from mimkit.train import pretrain
from mimkit.train.checkpoint import load_checkpoint
from mimkit.train.loop import build_method

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=32", "model.decoder.depth=1", "model.decoder.num_heads=2",
    "data.batch_size=32", "data.limit=128", "train.max_steps=3", "train.epochs=1", "train.precision=fp32",
    "train.log_every_steps=1", "train.progress_bar=false", "train.tensorboard=false", "optim.warmup_epochs=0.5",
    "eval.knn_at_end=true", "eval.knn_train_limit=128", "eval.knn_test_limit=128", "eval.picture_at_end=true",
]


def _preset(name: str) -> Path:
    path = ROOT / "configs" / f"{name}_fashion_mnist.yaml"
    assert path.is_file(), f"method {name} has no Fashion-MNIST preset configs/{name}_fashion_mnist.yaml"
    return path


def _offline(name: str) -> list[str]:
    """What method ``name`` declares it needs to train offline at tiny shapes (no tokenizer or teacher file)."""
    return METHODS[name].preset_overrides(smoke=True)


def _cases():
    cases = []
    for name in METHODS:
        try:
            cfg = load_config(_preset(name), [*TINY, *_offline(name)])
            kinds = build_method(cfg).capabilities.masking_kinds
        except Exception:  # a method that does not build is reported by test_method_builds_and_declares_its_contract
            kinds = ("preset",)
        cases += [(name, k) for k in kinds]
    return cases


@pytest.mark.parametrize("name", list(METHODS))
def test_method_builds_and_declares_its_contract(name, tmp_path):
    cls = METHODS[name]
    assert issubclass(cls, Method) and dataclasses.is_dataclass(cls.options_class)
    assert cls.options_class().name == name
    cfg = load_config(_preset(name), [*TINY, *_offline(name)])
    model = build_method(cfg)
    caps = model.capabilities
    assert isinstance(caps, Capabilities) and caps.pictures and set(caps.pictures) <= set(PICTURES)
    assert caps.masking_kinds
    if hasattr(cfg.method, "masking"):
        assert cfg.method.masking.kind in caps.masking_kinds


@needs_fmnist
@pytest.mark.parametrize("name,kind", _cases())
def test_every_method_and_masking_kind_trains_draws_and_evaluates(name, kind, tmp_path):
    over = [*TINY, f"train.out_dir={tmp_path / 'run'}", *_offline(name)]
    cfg = load_config(_preset(name), over)
    if kind != "preset" and hasattr(cfg.method, "masking"):
        over.append(f"method.masking.kind={kind}")
        if kind in ("random_views", "partition"):
            over.append("method.masking.num_views=2")
    result = pretrain(load_config(_preset(name), over))
    run = tmp_path / "run"
    assert result["step"] == 3
    # the end-of-run picture (reconstruction for pixel methods, else the first declared kind)
    assert Path(result["picture"]).is_file() and Path(result["picture"]).stat().st_size > 1000
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    knn = result["knn"]
    assert 10.0 <= knn["top1_cls"] <= 100.0 and knn["n_train"] == 128 and knn["n_test"] == 128  # above chance level is not required at 3 steps

    # every picture the method declares, from the checkpoint as `mimkit visualize` loads it
    from mimkit.cli import _load_method
    from mimkit.data import load_fashion_mnist
    from mimkit.viz import draw_picture

    model, mean, std = _load_method(str(run / "checkpoint.pt"))
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["config"]["method"]["name"] == name
    images, _ = load_fashion_mnist(split="test")
    for pic in model.capabilities.pictures:
        path = draw_picture(pic, model, images[:4], mean, std, tmp_path / f"{pic}.png", seed=0)
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 1000
    undeclared = [p for p in PICTURES if p not in model.capabilities.pictures]
    for pic in undeclared[:1]:
        with pytest.raises(ValueError, match="does not draw"):
            draw_picture(pic, model, images[:2], mean, std, tmp_path / "no.png")
