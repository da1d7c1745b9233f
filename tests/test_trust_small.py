"""Smaller ways to lose or fake work (issue 20, item 4): ``~`` in path settings, SIGHUP, an early
Ctrl-C, out-of-range seeds, and evaluation on fewer than two classes. Runs are tiny (Fashion-MNIST,
128 images, a 1-block ViT, or a folder of a few 16-28 px PNGs)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fashion_mnist_available
from PIL import Image

from mimkit.config import MAX_SEED, PATH_KEYS, Config, ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs/mae_fashion_mnist.yaml"
TINY = [
    "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2",
    "data.batch_size=16", "data.limit=128", "train.log_every_steps=1", "train.progress_bar=false",
    "train.tensorboard=false", "eval.knn_at_end=false", "eval.picture_at_end=false", "optim.warmup_epochs=1",
    "train.num_threads=1", "train.device=cpu",
]
needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not installed")


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _default_signals() -> None:
    # a command started in the background of a non-interactive shell (as a CI runner may start the
    # suite) inherits SIGINT ignored; the child gets the disposition a terminal's command has
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "mimkit.cli", *args], env=_env(), cwd=ROOT,
                            start_new_session=True, preexec_fn=_default_signals, **kw)


def _kill_group(proc):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = out / "metrics.jsonl"
        if m.exists() and sum('"loss"' in line for line in m.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (rc {proc.returncode})")
        time.sleep(0.02)
    raise AssertionError("the run did not start in time")


def _checkpoint_step(out: Path) -> int:
    from mimkit.train.checkpoint import load_checkpoint

    return int(load_checkpoint(out / "checkpoint.pt")["step"])


# ------------------------------------------------------------------------------------------------
# a. ~ and ~user in every path setting, from YAML and from overrides


def _string_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        if inner:
            yield from _string_fields(inner[0], f"{prefix}{f.name}.")
        elif tp is str or str in typing.get_args(tp):
            yield f"{prefix}{f.name}"


def test_path_keys_cover_every_path_setting_of_every_method():
    from mimkit.methods import METHODS

    keys = set(_string_fields(Config))
    for spec in METHODS.values():
        keys |= {"method." + k for k in _string_fields(spec.options_class)}
    pathlike = {k for k in keys if re.search(r"(path|dir|root|dataset|file|init$|resume$|tokenizer$|teacher$)",
                                              k.split(".", 1)[1])}
    assert pathlike <= set(PATH_KEYS), pathlike - set(PATH_KEYS)
    assert set(PATH_KEYS) <= keys  # no stale names


def test_tilde_is_expanded_in_yaml_and_overrides(tmp_path, monkeypatch):
    import getpass

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home")
    user = getpass.getuser()
    user_home = os.path.expanduser(f"~{user}")
    (tmp_path / "base.yaml").write_text("data:\n  eval_root: ~/base_root\n")
    (tmp_path / "c.yaml").write_text(
        "inherit: base.yaml\n"
        "model:\n  init: ~/weights/mae.pth\n"
        "data:\n  dataset: ~/imgs\n  root: '~'\n  eval_dataset: '~/eval imgs'\n"
        f"train:\n  out_dir: ~{user}/runs/x\n  resume: ~/runs/old/checkpoint.pt\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.init == f"{home}/weights/mae.pth"
    assert (cfg.data.dataset, cfg.data.root, cfg.data.eval_dataset, cfg.data.eval_root) == (
        f"{home}/imgs", home, f"{home}/eval imgs", f"{home}/base_root")
    assert cfg.train.out_dir == f"{user_home}/runs/x" and not cfg.train.out_dir.startswith("~")
    assert cfg.train.resume == f"{home}/runs/old/checkpoint.pt"
    # the same from overrides (quoted on a command line: the shell left ~ alone), method paths included
    cfg = load_config(tmp_path / "c.yaml", ["train.out_dir=~/runs/y", "data.dataset=~/other", "method.name=cae_v2",
                                            "method.teacher_path=~/t/checkpoint.pt"])
    assert (cfg.train.out_dir, cfg.data.dataset, cfg.method.teacher_path) == (
        f"{home}/runs/y", f"{home}/other", f"{home}/t/checkpoint.pt")
    cfg = load_config(None, ["method.name=cae", "method.codebook_path=~/cb.pt", "method.tokenizer=~/tok.jit"])
    assert (cfg.method.codebook_path, cfg.method.tokenizer) == (f"{home}/cb.pt", f"{home}/tok.jit")
    # keywords and non-leading ~ are left as they are; a config file path given with ~ is found
    cfg = load_config(None, ["method.name=cae", "method.tokenizer=pkg.mod:attr", "train.out_dir=runs/a~b"])
    assert (cfg.data.dataset, cfg.train.resume, cfg.method.tokenizer, cfg.train.out_dir) == (
        "fashion_mnist", "auto", "pkg.mod:attr", "runs/a~b")
    os.makedirs(home)
    (Path(home) / "h.yaml").write_text("train:\n  seed: 3\n")
    assert load_config("~/h.yaml").train.seed == 3


def test_unknown_user_in_a_path_is_a_one_line_error():
    cfg = load_config(None, ["train.out_dir=~no_such_user_mimkit/runs/x"])
    with pytest.raises(ConfigError, match=r"train\.out_dir=~no_such_user_mimkit/runs/x: no user "
                                          r"'no_such_user_mimkit' on this machine .*write the full path") as e:
        validate(cfg)
    assert "\n" not in str(e.value)


@needs_fmnist
def test_a_run_with_a_tilde_out_dir_writes_under_home_not_a_folder_named_tilde(tmp_path, monkeypatch):
    from mimkit.train import Trainer

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    t = Trainer(load_config(PRESET, [*TINY, "train.out_dir=~/runs/x"]))
    try:
        assert t.out_dir == tmp_path / "home/runs/x" and t.out_dir.is_dir()
    finally:
        t.close()
    assert not list(work.iterdir())  # no ./~ folder


# ------------------------------------------------------------------------------------------------
# b. SIGHUP saves and stops like SIGTERM: exit 75, a message naming SIGHUP


@needs_fmnist
def test_sighup_saves_a_checkpoint_and_exits_75(tmp_path):
    out = tmp_path / "run"
    proc = _popen(["pretrain", str(PRESET), *TINY, "train.epochs=4", f"train.out_dir={out}"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(out, 1, proc)
        os.killpg(proc.pid, signal.SIGSTOP)  # freeze it so the signal lands before the last step
        os.killpg(proc.pid, signal.SIGHUP)
        os.killpg(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=180)
    finally:
        _kill_group(proc)
    from mimkit.cli import EXIT_INTERRUPTED

    assert proc.returncode == EXIT_INTERRUPTED == 75, err[-2000:]
    step = _checkpoint_step(out)
    assert 1 <= step < 32
    assert "received SIGHUP: saving a checkpoint" in err
    assert f"mimkit: stopped by SIGHUP at step {step} of 32" in err and "Traceback" not in err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file, lock released


def test_sighup_to_the_process_group_with_dataloader_workers_saves_and_exits_75(tmp_path):
    """A closed terminal's shell signals the whole job (process group), DataLoader workers included."""
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(data / f"{i:03d}.png")
    (tmp_path / "empty.yaml").write_text("{}\n")
    out = tmp_path / "run"
    over = ["model.encoder.img_size=16", "model.encoder.patch_size=4", "model.encoder.in_chans=1", *TINY[:6],
            f"data.dataset={data}", "data.batch_size=8", "data.in_memory=false", "data.num_workers=2",
            "optim.warmup_epochs=1", "train.epochs=4", "train.log_every_steps=1", "train.progress_bar=false",
            "train.tensorboard=false", "eval.knn_at_end=false", "eval.picture_at_end=false", "train.num_threads=1",
            "train.device=cpu", f"train.out_dir={out}"]
    proc = _popen(["pretrain", str(tmp_path / "empty.yaml"), *over], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)
    try:
        _wait_for_steps(out, 2, proc)
        os.killpg(proc.pid, signal.SIGSTOP)
        os.killpg(proc.pid, signal.SIGHUP)
        os.killpg(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=180)
    finally:
        _kill_group(proc)
    assert proc.returncode == 75, err[-2000:]
    step = _checkpoint_step(out)
    assert 2 <= step < 20 and f"stopped by SIGHUP at step {step} of 20" in err and "Traceback" not in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == step


@needs_fmnist
def test_closing_the_terminal_saves_a_checkpoint_and_exits_75(tmp_path):
    """The run's terminal (a pseudo-terminal here) is closed: the kernel hangs it up and sends SIGHUP.
    Writing to the dead terminal fails with EIO, which must not break the last step before the save."""
    import fcntl
    import pty
    import termios

    out = tmp_path / "run"
    master, slave = pty.openpty()

    def controlling_tty():  # the child leads a new session whose controlling terminal is the pty
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "mimkit.cli", "pretrain", str(PRESET), *TINY, "train.epochs=4",
                             f"train.out_dir={out}"], stdin=slave, stdout=slave, stderr=slave, env=_env(), cwd=ROOT,
                            start_new_session=True, preexec_fn=controlling_tty)
    os.close(slave)
    os.set_blocking(master, False)
    seen = b""
    try:
        t0 = time.time()
        while time.time() - t0 < 240:  # drain the terminal while waiting for the first steps
            with contextlib.suppress(BlockingIOError, OSError):
                seen += os.read(master, 65536)
            m = out / "metrics.jsonl"
            if m.exists() and sum('"loss"' in line for line in m.read_text().splitlines()) >= 1:
                break
            assert proc.poll() is None, seen[-2000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGSTOP)
        os.close(master)  # the terminal goes away: hang-up, SIGHUP to its session
        master = None
        os.killpg(proc.pid, signal.SIGCONT)
        rc = proc.wait(timeout=180)
    finally:
        if master is not None:
            os.close(master)
        _kill_group(proc)
    assert rc == 75, seen[-2000:]
    step = _checkpoint_step(out)
    assert 1 <= step < 32
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == step  # every step up to the saved one, nothing lost


# ------------------------------------------------------------------------------------------------
# c. Ctrl-C before the loop's handlers: exit 130, one line, no traceback


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@needs_fmnist
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_ctrl_c_while_starting_exits_130_without_a_traceback(tmp_path):
    """A real SIGINT at a real early point: once the process has torch's library mapped (the imports are
    under way) it is frozen, checked to be before the run directory is claimed (so before the training
    loop installs its handlers), sent SIGINT and thawed: the signal lands in the imports, the config or
    the model build, never in the loop."""
    out = tmp_path / "run"
    proc = _popen(["pretrain", str(PRESET), *TINY, f"train.out_dir={out}"], stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():
            assert proc.poll() is None and time.time() - t0 < 120, "the run never imported torch"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGSTOP)
        while _proc_state(proc.pid) != "T":
            time.sleep(0.001)
        assert not out.exists()  # frozen before the trainer claimed the run directory
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    from mimkit.cli import EXIT_KEYBOARD

    assert proc.returncode == EXIT_KEYBOARD == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    lines = err.strip().splitlines()  # the suffix once the pretrain command runs (config, model build)
    assert len(lines) == 1 and re.fullmatch(r"mimkit: interrupted(; nothing was saved since the last checkpoint)?",
                                            lines[0]), err
    assert not out.exists()


@pytest.mark.parametrize("where", ["mimkit.config.load_config", "mimkit.eval.cli.options"])
def test_keyboard_interrupt_anywhere_outside_the_loop_is_one_line_and_130(monkeypatch, capsys, where, tmp_path):
    import importlib

    from mimkit.cli import main

    mod, name = where.rsplit(".", 1)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(mod), name, interrupted)
    argv = (["pretrain", str(PRESET), f"train.out_dir={tmp_path / 'run'}"] if "config" in where
            else ["eval", "knn", str(tmp_path / "ckpt.pt")])
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("mimkit: interrupted")


# ------------------------------------------------------------------------------------------------
# d. seeds


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**40)])
def test_out_of_range_seed_is_a_one_line_config_error(seed):
    cfg = load_config(None, [f"train.seed={seed}"])
    with pytest.raises(ConfigError, match=rf"train\.seed={seed} must be an integer in \[0, {MAX_SEED}\].*"
                                          r"e\.g\. train\.seed=0") as e:
        validate(cfg, check_environment=False)
    assert "\n" not in str(e.value)


def test_seed_range_edges_are_accepted_and_no_other_seed_key_goes_unchecked():
    from mimkit.methods import METHODS

    for seed in (0, MAX_SEED):
        validate(load_config(None, [f"train.seed={seed}"]), check_environment=False)

    def seeds(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            inner = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
            if inner:
                yield from seeds(inner[0], f"{prefix}{f.name}.")
            elif "seed" in f.name:
                yield prefix + f.name

    found = set(seeds(Config))
    for spec in METHODS.values():
        found |= {"method." + k for k in seeds(spec.options_class)}
    assert found == {"train.seed"}  # a new seed key needs its own range check in validate()


def test_cli_refuses_a_negative_seed_before_any_work(tmp_path, capsys):
    from mimkit.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", str(PRESET), "train.seed=-1", f"train.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimkit: error: train.seed=-1 must be an integer in [0, 4294967295]") and not out.exists()
    for argv in (["eval", "fewshot", "x.pt", "--seed", "-1"], ["report", "x.pt", "--seeds", "0,-3"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "a seed must be in [0, 4294967295]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# e. evaluation needs two classes in the training split


def _eval_ckpt(tmp_path):
    from mimkit.nn import ViTConfig, ViTEncoder

    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)).eval()
    cfg = {"model": {"encoder": dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)},
           "data": {"mean": [0.3], "std": [0.3]}}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"encoder." + k: v for k, v in enc.state_dict().items()}, "config": cfg, "step": 3,
                "epoch": 1.0}, path)
    return path


def _class_folder(root: Path, classes, n: int = 12) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            x = np.random.default_rng(100 * len(c) + i).integers(0, 40, (20, 20)).astype(np.uint8)
            x[:, 5 * (i % 4) : 5 * (i % 4) + 5] = 220
            Image.fromarray(x).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("protocol", ["knn", "linear", "fewshot"])
@pytest.mark.parametrize("layout", ["plain", "train_val"])
def test_eval_on_a_one_class_folder_is_refused(tmp_path, capsys, protocol, layout):
    from mimkit.cli import main

    if layout == "plain":
        data = _class_folder(tmp_path / "one", ["cats"])
        where = str(data)
    else:
        data = tmp_path / "one"
        _class_folder(data / "train", ["cats"])
        _class_folder(data / "val", ["cats"], n=4)
        where = str(data / "train")
    extra = ["--shots", "2", "--draws", "2"] if protocol == "fewshot" else []
    argv = ["eval", protocol, str(_eval_ckpt(tmp_path)), "--dataset", str(data), "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [ln for ln in err.splitlines() if not ln.startswith("normalisation: ")]  # the info line eval prints first
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"mimkit: error: {where}: the training split has 1 class ('cats'); ")
    assert "needs at least 2" in err and "one sub-folder of images per class, 2 or more" in err
    assert not (tmp_path / "out").exists()  # no number written


def test_eval_refuses_when_limit_train_keeps_one_class_and_the_api_refuses_too(tmp_path, capsys):
    from mimkit.cli import main
    from mimkit.errors import DataError
    from mimkit.eval.protocols import EvalOptions, evaluate

    data = _class_folder(tmp_path / "two", ["a", "b"], n=10)
    ckpt = _eval_ckpt(tmp_path)
    assert main(["eval", "knn", str(ckpt), "--dataset", str(data), "--device", "cpu", "--no-progress",
                 "--limit-train", "1"]) == 2
    err = capsys.readouterr().err
    assert "the training split has 1 class" in err and "raise --limit-train 1" in err
    one = _class_folder(tmp_path / "one", ["a"])
    from mimkit.nn import ViTConfig, ViTEncoder

    enc = ViTEncoder(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2))
    with pytest.raises(DataError, match="the training split has 1 class"):
        evaluate(enc, ["linear"], EvalOptions(dataset=str(one), progress=False))
    # two classes still evaluate, and the number is measured: _class_folder draws the same images for 'a'
    # and 'b' (its seed depends on the name's length), so each held-out image has an exact copy of the
    # other class in the bank and 1-NN is exactly 0 %, which no label leak or shuffled bank could give
    assert main(["eval", "knn", str(ckpt), "--dataset", str(data), "--device", "cpu", "--no-progress",
                 "--ks", "1,3", "--k", "3", "--pool", "mean", "--out", str(tmp_path / "knn")]) == 0
    assert "knn3_mean" in capsys.readouterr().out
    res = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert (res["setup"]["n_train"], res["setup"]["n_test"]) == (16, 4)
    assert res["metrics"]["knn1_mean"] == 0.0 and res["metrics"]["knn3top5_mean"] == 100.0  # top-5 of 2 classes


@pytest.mark.parametrize("rank", ["0", "1"])
def test_run_directory_is_printed_once_under_torchrun(monkeypatch, capsys, rank):
    """Every torchrun rank runs the CLI; only rank 0 prints the run directory (it used to print twice)."""
    import mimkit.config
    import mimkit.train
    from mimkit.cli import main

    monkeypatch.setattr(mimkit.config, "load_config", lambda path, overrides: None)
    monkeypatch.setattr(mimkit.train, "pretrain", lambda cfg: {"out_dir": "runs/x"})
    monkeypatch.setenv("RANK", rank)
    assert main(["pretrain", "configs/mae_fashion_mnist.yaml"]) == 0
    assert capsys.readouterr().out.count("run directory: runs/x") == (1 if rank == "0" else 0)


@pytest.mark.parametrize("argv", [["eval", "knn", "x.pt", "--k", "abc"], ["visualize"], ["eval", "linear", "x.pt",
                                                                                         "--nosuch", "1"]])
def test_a_flag_error_is_one_line_naming_the_help(capsys, argv):
    from mimkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "usage:" not in err and err.endswith("--help") and ": error: " in err
