"""An explicit ``train.resume`` older than the run directory's newest checkpoint is refused (it would
train on from there and overwrite the newer progress) unless ``train.resume_older=allow``."""

import json
from pathlib import Path

import pytest
from conftest import TINY_RUN, needs_fmnist

from mimkit.config import ConfigError, load_config
from mimkit.train import pretrain
from mimkit.train.checkpoint import load_checkpoint, numbered_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_RUN, "data.batch_size=32", "train.ckpt_every_steps=1", "train.keep_checkpoints=-1"]


def cfg(out, *extra):
    return load_config(ROOT / "configs/mae_fashion_mnist.yaml", [*TINY, f"train.out_dir={out}", *extra])


def steps_logged(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@needs_fmnist
def test_an_older_explicit_resume_point_is_refused_unless_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(cfg(out, "train.max_steps=3"))
    copies = dict(numbered_checkpoints(out))
    assert sorted(copies) == [1, 2, 3] and load_checkpoint(out / "checkpoint.pt")["step"] == 3
    before = (out / "checkpoint.pt").read_bytes()

    with pytest.raises(ConfigError) as e:
        pretrain(cfg(out, "train.max_steps=4", f"train.resume={copies[1]}"))
    msg = str(e.value)
    assert "\n" not in msg and "step 1" in msg and "step 3" in msg and "train.resume_older=allow" in msg
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing was overwritten
    assert steps_logged(out) == [1, 2, 3]

    # the newest point itself, given explicitly, is not going back
    pretrain(cfg(out, "train.max_steps=4", f"train.resume={copies[3]}"))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4

    # confirmed: goes back to step 2 and trains on from there, with a warning
    capsys.readouterr()
    pretrain(cfg(out, "train.max_steps=3", f"train.resume={copies[2]}", "train.resume_older=allow"))
    err = capsys.readouterr().err
    assert "going back from step 4" in err and "to step 2" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
    # the abandoned timeline's copy (step 4) is gone: auto-resume past a damaged checkpoint.pt cannot
    # jump back to it, and the run's own latest checkpoint is not "older" than anything
    assert [s for s, _ in numbered_checkpoints(out)] == [1, 2, 3]
    pretrain(cfg(out, "train.max_steps=4", f"train.resume={out / 'checkpoint.pt'}"))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4


def test_resume_older_takes_only_refuse_or_allow(tmp_path):
    from mimkit.config import validate

    with pytest.raises(ConfigError, match="train.resume_older"):
        validate(cfg(tmp_path / "x", "train.resume_older=yes"))
