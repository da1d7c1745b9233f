"""Evaluation uses the input the weights were trained on, and the run's kNN is ``mimkit eval knn``'s.

* every checkpoint records the normalisation the run trained with, its image size and channels
  (``input``); exports carry it (safetensors ``mimkit_input``; Hugging Face ``image_mean`` /
  ``image_std``); :func:`mimkit.weights.read_weights` returns it as ``Weights.input``;
* ``mimkit eval`` normalises with it and says so; a ``--mean`` / ``--std`` that differs is a warning
  naming both; a checkpoint without the record keeps the old default and says that it has none;
* a run's ``knn.json`` equals ``mimkit eval knn`` with the flags it records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import needs_fmnist

from mimkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2",
    "train.log_every_steps=1", "train.progress_bar=false", "train.tensorboard=false", "eval.picture_at_end=false",
    "optim.warmup_epochs=0", "train.num_threads=1", "train.epochs=1",
]
FMNIST_EVAL_DEFAULT = ((0.2860,), (0.3530,))  # what mimkit eval assumed for every grey-scale checkpoint


def _grey_folder(root: Path, n: int = 12, size: int = 28, seed: int = 0) -> Path:
    """Two classes of grey PNGs: bright squares on dark (``a``) and dark on bright (``b``)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c, (bg, fg) in (("a", (20, 200)), ("b", (200, 20))):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = torch.full((size, size), bg, dtype=torch.int32) + torch.randint(0, 30, (size, size), generator=g)
            o = 4 + i % 8
            img[o : o + 10, o : o + 10] = fg
            Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy(), mode="L").save(root / c / f"{i}.png")
    return root


def _rgb_folder(root: Path, n: int = 4) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (40 * i, 100, 200 if c == "a" else 10)).save(root / c / f"{i}.png")
    return root


def _parser():
    from mimkit.cli import build_parser

    return build_parser()


def _run_cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory) -> Path:
    """A grey-scale folder run with ``data.mean=null`` (the README walkthrough): it trains with 0.5 / 0.5."""
    from mimkit.train import pretrain

    base = tmp_path_factory.mktemp("grey")
    train = _grey_folder(base / "images")
    test = _grey_folder(base / "images_test", n=4, seed=1)
    out = base / "run"
    cfg = load_config(ROOT / "configs/mae_fashion_mnist.yaml", [
        *TINY, f"data.dataset={train}", f"data.eval_dataset={test}", "data.mean=null", "data.std=null",
        "data.batch_size=8", "train.max_steps=2", "train.precision=fp32", f"train.out_dir={out}",
        "eval.knn_at_end=true"])
    pretrain(cfg)
    return out


# -- what the trainer uses is what the checkpoint records -------------------------------------------------------
@pytest.mark.parametrize("case", ["grey_null", "rgb_null", "grey_mean_only", "grey_set",
                                  pytest.param("fashion_preset", marks=needs_fmnist),
                                  pytest.param("fashion_null", marks=needs_fmnist)])
def test_recorded_input_is_what_the_loader_normalises_with(case, tmp_path):
    from mimkit.train.checkpointer import training_input
    from mimkit.train.data import build_train_data
    from mimkit.train.distributed import DistInfo

    over = {
        "grey_null": [f"data.dataset={_grey_folder(tmp_path / 'g', n=2)}", "data.mean=null", "data.std=null"],
        "grey_mean_only": [f"data.dataset={_grey_folder(tmp_path / 'g', n=2)}", "data.mean=[0.4]", "data.std=null"],
        "grey_set": [f"data.dataset={_grey_folder(tmp_path / 'g', n=2)}", "data.mean=[0.1]", "data.std=[0.2]"],
        "rgb_null": [f"data.dataset={_rgb_folder(tmp_path / 'c')}", "model.encoder.in_chans=3", "data.mean=null",
                     "data.std=null", "model.encoder.img_size=32"],
        "fashion_preset": ["data.limit=64"],
        "fashion_null": ["data.limit=64", "data.mean=null", "data.std=null"],
    }[case]
    cfg = load_config(ROOT / "configs/mae_fashion_mnist.yaml", [*TINY, "data.batch_size=2", *over])
    data = build_train_data(cfg, DistInfo())
    rec = training_input(cfg)
    assert (tuple(rec["mean"]), tuple(rec["std"])) == (tuple(data.mean), tuple(data.std))
    assert rec["in_chans"] == data.in_chans and rec["img_size"] == [cfg.model.encoder.img_size] * 2
    expected = {"grey_null": ((0.5,), (0.5,)), "grey_mean_only": ((0.4,), (0.5,)), "grey_set": ((0.1,), (0.2,)),
                "rgb_null": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                "fashion_preset": ((0.2860,), (0.3530,)), "fashion_null": ((0.2860,), (0.3530,))}[case]
    assert rec["mean"] == pytest.approx(list(expected[0])) and rec["std"] == pytest.approx(list(expected[1]))


def test_checkpoint_records_the_training_input_and_read_weights_returns_it(grey_run):
    from mimkit.train.checkpoint import load_checkpoint
    from mimkit.weights import read_weights

    state = load_checkpoint(grey_run / "checkpoint.pt")
    assert state["config"]["data"]["mean"] is None  # the config does not say; the record does
    rec = state["input"]
    assert (rec["mean"], rec["std"], rec["img_size"], rec["in_chans"]) == ([0.5], [0.5], [28, 28], 1)
    assert "data.mean / data.std unset" in rec["origin"] and "grey-scale default 0.5" in rec["origin"]
    w = read_weights(grey_run / "checkpoint.pt")
    assert w.input == rec
    assert read_weights(grey_run).input == rec  # the run directory reads its checkpoint.pt
    # the run's kNN used it too
    knn = json.loads((grey_run / "knn.json").read_text())
    assert (knn["protocol"]["mean"], knn["protocol"]["std"]) == ([0.5], [0.5])


def _by_hand(enc, images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    with torch.no_grad():
        return enc.forward_features((images.float() / 255 - mean) / std)[:, 0]


def test_grey_run_is_evaluated_with_its_training_normalisation(grey_run, capsys):
    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.eval.protocols import EvalContext, EvalOptions

    ckpt = load_checkpoint_encoder(grey_run / "checkpoint.pt")
    folder = str(grey_run.parent / "images")
    ctx = EvalContext(ckpt, EvalOptions(dataset=folder, device="cpu", progress=False))
    assert (ctx.mean, ctx.std) == ((0.5,), (0.5,))
    assert ctx.norm_source.startswith("recorded in the checkpoint: the training normalisation")
    images = ctx.data("test")[0]
    feats = ctx.features("test", "cls")
    assert torch.allclose(feats, _by_hand(ckpt.encoder, images, 0.5, 0.5), atol=1e-5)
    assert not torch.allclose(feats, _by_hand(ckpt.encoder, images, 0.2860, 0.3530), atol=1e-3)
    assert "warning" not in capsys.readouterr().err


def test_mimkit_eval_prints_the_normalisation_and_where_it_comes_from(grey_run, tmp_path, capsys):
    out = tmp_path / "ev"
    assert _run_cli(["eval", "knn", str(grey_run / "checkpoint.pt"), "--dataset", str(grey_run.parent / "images"),
                     "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert ("normalisation: mean 0.5, std 0.5 (recorded in the checkpoint: the training normalisation, data.mean / "
            "data.std unset: the data set's default (grey-scale default 0.5 / 0.5))") in err
    setup = json.loads((out / "knn.json").read_text())["setup"]
    assert (setup["mean"], setup["std"]) == ([0.5], [0.5]) and setup["norm_source"].startswith("recorded in")
    # flags that differ: used, with a warning naming both
    assert _run_cli(["eval", "knn", str(grey_run / "checkpoint.pt"), "--dataset", str(grey_run.parent / "images"),
                     "--device", "cpu", "--no-progress", "--mean", "0.286", "--std", "0.353"]) == 0
    err = capsys.readouterr().err
    assert ("warning: --mean 0.286 and --std 0.353 differ from the normalisation recorded in the checkpoint (mean 0.5, "
            "std 0.5)") in err and "normalisation: mean 0.286, std 0.353 (flag)" in err


def test_flags_that_differ_from_the_record_are_a_warning_naming_both(grey_run, capsys):
    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.eval.protocols import EvalContext, EvalOptions

    ckpt = load_checkpoint_encoder(grey_run / "checkpoint.pt")
    ctx = EvalContext(ckpt, EvalOptions(mean=(0.286,), std=(0.353,)))
    assert (ctx.mean, ctx.std, ctx.norm_source) == ((0.286,), (0.353,), "flag")
    err = capsys.readouterr().err
    assert ("warning: --mean 0.286 and --std 0.353 differ from the normalisation recorded in the checkpoint "
            "(mean 0.5, std 0.5); evaluating with --mean 0.286 --std 0.353 as given") in err
    ctx = EvalContext(ckpt, EvalOptions(std=(0.25,)))  # one flag: named alone, the other value kept
    assert (ctx.mean, ctx.std) == ((0.5,), (0.25,))
    assert ctx.norm_source.startswith("flag + recorded in the checkpoint")
    assert "--std 0.25 differs from the normalisation recorded in the checkpoint (std 0.5)" in capsys.readouterr().err
    EvalContext(ckpt, EvalOptions(mean=(0.5,), std=(0.5,)))  # the recorded values: no warning
    assert "warning" not in capsys.readouterr().err


def test_a_checkpoint_without_the_record_keeps_the_old_default_and_says_so(grey_run, tmp_path):
    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.eval.protocols import EvalContext, EvalOptions
    from mimkit.train.checkpoint import atomic_save, load_checkpoint

    state = load_checkpoint(grey_run / "checkpoint.pt")
    del state["input"]
    old = tmp_path / "old.pt"
    atomic_save(state, old)
    ckpt = load_checkpoint_encoder(old)
    assert ckpt.input is None
    ctx = EvalContext(ckpt, EvalOptions())
    assert (ctx.mean, ctx.std) == FMNIST_EVAL_DEFAULT
    assert ctx.norm_source == ("default (Fashion-MNIST); the checkpoint records no input normalisation (written "
                               "before mimkit recorded it)")
    # an in-memory encoder: the default, nothing said about a file
    assert EvalContext(ckpt.encoder, EvalOptions()).norm_source == "default (Fashion-MNIST)"


def test_export_records_the_input_and_eval_reads_it_back(grey_run, tmp_path, capsys):
    from safetensors import safe_open

    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.eval.protocols import EvalContext, EvalOptions
    from mimkit.weights import read_weights

    st = tmp_path / "enc.safetensors"
    assert _run_cli(["export", str(grey_run / "checkpoint.pt"), str(st)]) == 0
    with safe_open(str(st), "pt") as f:
        meta = json.loads(f.metadata()["mimkit_input"])
    assert (meta["mean"], meta["std"], meta["img_size"], meta["in_chans"]) == ([0.5], [0.5], [28, 28], 1)
    w = read_weights(st)
    assert w.format == "mimkit-export" and w.input == meta
    ctx = EvalContext(load_checkpoint_encoder(st), EvalOptions())
    assert (ctx.mean, ctx.std) == ((0.5,), (0.5,))
    assert ctx.norm_source.startswith("recorded in the export's metadata: the training normalisation")
    # an export without the record (written before it): the default, said so
    from mimkit.interop import export_encoder

    bare = export_encoder(load_checkpoint_encoder(st).encoder, tmp_path / "bare.safetensors")
    ctx = EvalContext(load_checkpoint_encoder(bare), EvalOptions())
    assert ctx.norm_source.startswith("default (Fashion-MNIST); the export's metadata records no input normalisation")


def test_hf_export_records_image_mean_and_std(grey_run, tmp_path):
    pytest.importorskip("transformers")
    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.eval.protocols import EvalContext, EvalOptions
    from mimkit.weights import read_weights

    out = tmp_path / "hf"
    assert _run_cli(["export", str(grey_run / "checkpoint.pt"), str(out), "--format", "hf"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["image_mean"], cfg["image_std"], cfg["image_size"], cfg["num_channels"]) == ([0.5], [0.5], 28, 1)
    w = read_weights(out)
    assert w.format == "hf" and (w.input["mean"], w.input["std"], w.input["img_size"], w.input["in_chans"]) == (
        [0.5], [0.5], [28, 28], 1)
    from transformers import ViTMAEConfig

    assert ViTMAEConfig.from_pretrained(str(out)).image_mean == [0.5]  # transformers keeps the field
    ctx = EvalContext(load_checkpoint_encoder(out), EvalOptions())
    assert (ctx.mean, ctx.std) == ((0.5,), (0.5,))
    assert ctx.norm_source.startswith("recorded in the Hugging Face config")


def test_read_weights_ignores_a_malformed_record():
    from mimkit.weights.read import input_record

    assert input_record({"mean": [0.5]}) is None
    assert input_record({"mean": [0.5, 0.4], "std": [0.1, 0.2, 0.3]}) is None
    assert input_record({"mean": [0.5], "std": [0.0]}) is None
    assert input_record("not json") is None
    assert input_record('{"mean": [0.5], "std": [0.25], "img_size": 32}') == {"mean": [0.5], "std": [0.25],
                                                                              "img_size": [32, 32]}


# -- one kNN per encoder ---------------------------------------------------------------------------------------
@needs_fmnist
def test_run_knn_equals_mimkit_eval_knn_on_its_checkpoint(tmp_path, capsys):
    """A bf16-trained run on 256 images: its kNN (seeded subsets of 400 / 200 Fashion-MNIST images, fp32 features
    on the CPU) equals `mimkit eval knn` with the flags knn.json records, to the last digit."""
    from mimkit.train import pretrain

    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/mae_fashion_mnist.yaml", [
        *TINY, "data.limit=256", "data.batch_size=32", "train.max_steps=2", "train.precision=bf16",
        f"train.out_dir={run}", "eval.knn_at_end=true", "eval.knn_train_limit=400", "eval.knn_test_limit=200",
        "eval.batch_size=128"])
    result = pretrain(cfg)
    knn = json.loads((run / "knn.json").read_text())
    assert knn["top1_cls"] == result["knn"]["top1_cls"] and (knn["n_train"], knn["n_test"]) == (400, 200)
    p = knn["protocol"]
    assert p["amp"] == "off (fp32)" and p["train_precision"] == "bfloat16" and p["device"] == "cpu"
    assert (p["mean"], p["std"], p["ks"], p["pools"], p["batch_size"]) == (
        [0.286], [0.353], [10, 20, 100, 200], ["cls", "mean"], 128)
    assert knn["eval_command"] == ("mimkit eval knn CHECKPOINT --limit-train 400 --limit-test 200 --k 20 "
                                   "--temperature 0.07 --pool cls,mean --batch-size 128 --device cpu --amp off")
    ev = tmp_path / "ev"
    argv = knn["eval_command"].split()[1:]
    argv[argv.index("CHECKPOINT")] = str(run / "checkpoint.pt")
    assert _run_cli([*argv, "--no-progress", "--out", str(ev)]) == 0
    res = json.loads((ev / "knn.json").read_text())
    assert res["metrics"]["knn20_cls"] == knn["top1_cls"] and res["metrics"]["knn20_mean"] == knn["top1_mean"]
    s = res["setup"]
    assert (s["n_train"], s["n_test"], s["amp"], s["mean"], s["std"]) == (400, 200, p["amp"], p["mean"], p["std"])
    # the default flags too (batch 256, --amp auto = fp32 on the CPU): the same images, the same number
    assert _run_cli(["eval", "knn", str(run / "checkpoint.pt"), "--limit-train", "400", "--limit-test", "200",
                     "--device", "cpu", "--no-progress", "--out", str(ev)]) == 0
    res = json.loads((ev / "knn.json").read_text())
    assert res["metrics"]["knn20_cls"] == pytest.approx(knn["top1_cls"], abs=0.51)  # at most one image of 200
    assert res["metrics"]["knn20_mean"] == pytest.approx(knn["top1_mean"], abs=0.51)


@needs_fmnist
def test_knn_bank_defaults_to_the_run_data_size(tmp_path):
    from mimkit.train import pretrain

    run = tmp_path / "run"
    pretrain(load_config(ROOT / "configs/mae_fashion_mnist.yaml", [
        *TINY, "data.limit=128", "data.batch_size=64", "train.max_steps=1", "train.precision=fp32",
        f"train.out_dir={run}", "eval.knn_at_end=true", "eval.knn_test_limit=64"]))
    knn = json.loads((run / "knn.json").read_text())
    assert (knn["n_train"], knn["n_test"]) == (128, 64)
    assert "--limit-train 128 --limit-test 64" in knn["eval_command"]


def test_folder_run_knn_records_that_mimkit_eval_decodes_itself(grey_run):
    knn = json.loads((grey_run / "knn.json").read_text())
    assert knn["eval_command"] is None and "folder data" in knn["eval_note"]
    assert knn["protocol"]["subset"].startswith("seeded random subset (seed 0)")


def test_visualize_uses_the_recorded_normalisation(grey_run):
    """`mimkit visualize` un-normalises with what the run trained with (0.5 / 0.5 here), not the
    Fashion-MNIST default its config's null mean would otherwise fall back to."""
    from mimkit.cli import _load_method

    _, mean, std = _load_method(str(grey_run / "checkpoint.pt"))
    assert mean == (0.5,) and std == (0.5,)
