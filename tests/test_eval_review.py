"""Bad eval inputs found in review: each is a one-line ConfigError naming the problem and the fix."""

from __future__ import annotations

import argparse

import pytest
import torch

from mimkit.config import ConfigError
from mimkit.eval.protocols import EvalContext, EvalOptions
from tests.test_eval_trust import _ckpt, _parser, tiny_encoder


@pytest.mark.parametrize("block", [2, 99, -3])
def test_block_outside_the_encoder_is_an_error(block):
    with pytest.raises(ConfigError, match=rf"--block {block}: the encoder has 2 blocks.*0\.\.1"):
        EvalContext(tiny_encoder(), EvalOptions(block=block))


def test_block_inside_the_encoder_is_accepted(tmp_path):
    """0, 1, -1, -2 are accepted, and the features are then that block's output (through the final norm),
    the blocks run by hand here: -1 is the last block (the default features), -2 the first."""
    from tests.test_eval_trust import mismatched_folder

    root = mismatched_folder(tmp_path, val_classes=(0, 1, 2), n=2)
    enc = tiny_encoder()
    assert len(enc.blocks) == 2
    feats = {}
    for block in (0, 1, -1, -2, None):
        ctx = EvalContext(enc, EvalOptions(block=block, dataset=str(root), mean=(0.5,), std=(0.25,), progress=False))
        images = ctx.data("train")[0]
        with torch.no_grad():
            h = enc.with_cls(enc.patch_tokens((images.float() / 255 - 0.5) / 0.25))
            for blk in enc.blocks[: 2 if block is None else block % 2 + 1]:
                h = blk(h)
            ref = enc.norm(h)
        torch.testing.assert_close(ctx.features("train", "cls"), ref[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ctx.features("train", "mean"), ref[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
        feats[block] = ctx.features("train", "cls")
    assert torch.equal(feats[-1], feats[1]) and torch.equal(feats[-1], feats[None]) and torch.equal(feats[-2], feats[0])
    assert not torch.allclose(feats[0], feats[1], atol=1e-2)


@pytest.mark.parametrize("flag,kw", [("--mean", dict(mean=(0.1, 0.2), std=(0.3,))),
                                     ("--std", dict(mean=(0.1,), std=(0.3, 0.3, 0.3)))])
def test_normalisation_with_the_wrong_channel_count_is_an_error(flag, kw):
    with pytest.raises(ConfigError, match=rf"{flag} .* values; the encoder takes 1 input channel"):
        EvalContext(tiny_encoder(), EvalOptions(**kw))


def test_one_normalisation_value_is_repeated_for_every_channel(tmp_path):
    """A 3-channel encoder given one --mean / --std value: every channel is normalised with it (the
    features equal the encoder run by hand on (x/255 - 0.5)/0.25, and a run given the value 3 times)."""
    import numpy as np

    from mimkit.nn import ViTConfig, ViTEncoder
    from tests.test_eval_trust import TINY, _save_png

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            for i in range(3):  # colour images whose three channels differ
                _save_png(tmp_path / "rgb" / split / f"c{c}" / f"{i}.png", rng.integers(0, 256, (28, 28, 3), np.uint8))
    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(**{**TINY, "in_chans": 3})).eval()
    feats = {}
    for mean, std in (((0.5,), (0.25,)), ((0.5,) * 3, (0.25,) * 3)):
        ctx = EvalContext(enc, EvalOptions(dataset=str(tmp_path / "rgb"), mean=mean, std=std, progress=False))
        feats[len(mean)] = ctx.features("train", "cls")
    images = ctx.data("train")[0]
    assert images.shape == (6, 3, 28, 28) and not torch.equal(images[:, 0], images[:, 1])
    with torch.no_grad():
        h = enc.with_cls(enc.patch_tokens((images.float() / 255 - 0.5) / 0.25))
        for blk in enc.blocks:
            h = blk(h)
        ref = enc.norm(h)[:, 0]
    torch.testing.assert_close(feats[1], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(feats[1], feats[3])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_one_line_error(tmp_path):
    args = _parser().parse_args(["eval", "knn", str(_ckpt(tmp_path)), "--device", "cuda", "--no-progress"])
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available.*--device cpu"):
        args.func(args)


def test_help_shows_each_default_once():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    ev = next(a for a in sub.choices["eval"]._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in [*ev.choices.items(), ("report", sub.choices["report"])]:
        fmt = p._get_formatter()
        for a in p._actions:
            if a.help:
                text = fmt._get_help_string(a)
                assert text.count("(default:") <= 1, (name, a.option_strings, text)


def test_mean_flag_alone_is_used_with_the_checkpoint_std(tmp_path):
    from mimkit.eval.data import load_checkpoint_encoder

    ckpt = load_checkpoint_encoder(str(_ckpt(tmp_path)))  # config: mean 0.3, std 0.3
    ctx = EvalContext(ckpt, EvalOptions(mean=(0.5,)))
    assert (ctx.mean, ctx.std) == ((0.5,), (0.3,))
    assert ctx.norm_source == "flag + checkpoint config"
    ctx = EvalContext(ckpt, EvalOptions(std=(0.2,)))
    assert (ctx.mean, ctx.std) == ((0.3,), (0.2,))


def test_fewshot_with_fewer_images_than_shots_is_a_config_error(tmp_path):
    from mimkit.eval.protocols import run_fewshot
    from tests.test_eval_trust import mismatched_folder

    root = mismatched_folder(tmp_path, val_classes=(0, 1, 2), n=6)
    ctx = EvalContext(tiny_encoder(), EvalOptions(dataset=str(root), progress=False))
    with pytest.raises(ConfigError, match=r"--shots 10: class 'c0' has only 6 training images; pass --shots 6"):
        run_fewshot(ctx, shots=10, draws=2)
    assert run_fewshot(ctx, shots=6, draws=2)["pools"]["mean"]["shots"] == 6


def test_eval_takes_a_run_directory_and_names_an_empty_one(tmp_path):
    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.interop import InteropError

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(InteropError, match="is a directory without checkpoint.pt"):
        load_checkpoint_encoder(run)
    _ckpt(tmp_path).rename(run / "checkpoint.pt")
    got = load_checkpoint_encoder(run)
    assert got.path.endswith("checkpoint.pt") and got.step == 3


@pytest.mark.parametrize("argv,needle", [
    (["eval", "linear", "x.pt", "--epochs", "0"], "argument --epochs: 0: must be at least 1"),
    (["eval", "finetune", "x.pt", "--epochs", "-1"], "argument --epochs: -1: must be at least 1"),
    (["eval", "knn", "x.pt", "--temperature", "0"], "argument --temperature: 0: must be a number above 0"),
    (["eval", "linear", "x.pt", "--lr", "-1"], "argument --lr: -1: must be a number above 0"),
    (["eval", "attentive", "x.pt", "--blr", "nan"], "argument --blr: nan: must be a number above 0"),
    (["eval", "fewshot", "x.pt", "--C", "0"], "argument --C: 0: must be a number above 0"),
    (["report", "x.pt", "--epochs", "0"], "argument --epochs: 0: must be at least 1"),
])
def test_cli_rejects_impossible_numbers(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]
