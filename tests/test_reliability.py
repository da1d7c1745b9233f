"""Fault injection: full disks, concurrent runs, changed resumes, corrupt checkpoints, signals,
non-finite steps, bad images, bad configs, a stopped rank (the reliability issue, point by point).

A real full file system is a small tmpfs mounted for the test (CI runs as root); where mounting is
not permitted the same checks run against a stand-in (``torch.save`` raising the ``RuntimeError`` it
raises on a full disk, and a patched free-space probe). Runs are tiny (Fashion-MNIST, 128 images, a
1-block ViT, or a 40-image folder of 16x16 PNGs)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fashion_mnist_available
from PIL import Image

import mimkit.train.checkpoint as ck
import mimkit.weights.checkpoint as wck
from mimkit.config import ConfigError, load_config, validate
from mimkit.data.folder import _open_image
from mimkit.errors import DataError
from mimkit.train import NonFiniteLossError, Trainer, pretrain
from mimkit.train.checkpoint import CheckpointError, DiskFullError, RunLockedError, atomic_save, load_checkpoint
from mimkit.train.loop import EXIT_INTERRUPTED, TrainingInterrupted, config_changes

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs/mae_fashion_mnist.yaml"
THREADS = torch.get_num_threads()
TINY = [
    "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2",
    "data.batch_size=16", "data.limit=128", "train.log_every_steps=1", "train.progress_bar=false",
    "train.tensorboard=false", "eval.knn_at_end=false", "eval.picture_at_end=false", "optim.warmup_epochs=1",
    f"train.num_threads={THREADS}", "train.epochs=1", "train.device=cpu",  # CPU: bit-identical kernels
]
needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not installed")


def tiny_cfg(out_dir, *extra):
    return load_config(PRESET, [*TINY, f"train.out_dir={out_dir}", *extra])


def records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir):
    return [r["loss"] for r in records(out_dir) if "loss" in r]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mimkit.cli", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)


def _poison(trainer, calls_to_poison, action=None):
    """Wrap the training model: the listed forward calls (1-based) return a NaN loss, or run
    ``action(call)`` first."""
    real = trainer.train_model
    n = {"calls": 0}

    def wrapped(images, progress):
        n["calls"] += 1
        if action is not None:
            action(n["calls"])
        out = real(images, progress)
        if n["calls"] in calls_to_poison:
            out.loss = out.loss * float("nan")
        return out

    trainer.train_model = wrapped
    return n


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run (1 epoch of 8 batches of 16) to compare resumed runs with."""
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path_factory.mktemp("reference")
    pretrain(tiny_cfg(out))
    return losses(out)


# ------------------------------------------------------------------------------------------------
# 7. config validation: before any file is written or any data read, one line naming the fix

BAD = [
    ("data.batch_size=0", "data.batch_size"),
    ("method.masking.ratio=1.0", "method.masking.ratio"),
    ("method.masking.ratio=0.0", "method.masking.ratio"),
    ("method.masking.num_keep=49", "method.masking.num_keep"),
    ("model.encoder.patch_size=0", "model.encoder.patch_size"),
    ("model.encoder.patch_size=5", "model.encoder.patch_size"),
    ("model.encoder.num_heads=3", "model.encoder.num_heads"),
    ("optim.accum_iter=0", "optim.accum_iter"),
    ("train.ckpt_every_steps=0", "train.ckpt_every_steps"),
    ("train.ckpt_every_minutes=0", "train.ckpt_every_minutes"),
    ("model.encoder.depth=0", "model.encoder.depth"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=-1", "train.epochs"),
    ("train.max_steps=-1", "train.max_steps"),
    ("data.crop_scale=[1.5,0.1]", "data.crop_scale"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("data.std=[0]", "data.std"),
    ("data.limit=0", "data.limit"),
    ("data.limit=-5", "data.limit"),
    ("data.limit=8", "fewer images than one optimizer step"),
    ("optim.base_lr=0", "optim.base_lr"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("train.resume_changes=maybe", "train.resume_changes"),
    ("train.dist_timeout_minutes=0", "train.dist_timeout_minutes"),
    ("train.max_nonfinite_fraction=2", "train.max_nonfinite_fraction"),
    ("data.augment=rotate", "data.augment"),
    ("train.device=tpu", "train.device"),
]
BAD.append(("train.precision=fp16", "fp16"))  # train.device=cpu
if not torch.cuda.is_available():
    BAD.append(("train.device=cuda", "no CUDA device"))


@pytest.mark.parametrize("override,named", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, override, named, monkeypatch):
    import mimkit.train.loop as loop

    def no_data(*a, **k):
        raise AssertionError("data was loaded for an invalid config")

    monkeypatch.setattr(loop, "build_train_data", no_data)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        pretrain(tiny_cfg(out, override))
    msg = str(e.value)
    assert named in msg and "\n" not in msg and ";" in msg, msg  # the problem; the fix after ';'
    assert not out.exists()


def test_out_dir_that_is_a_file_and_several_problems_at_once(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        validate(tiny_cfg(f))
    with pytest.raises(ConfigError) as e:
        validate(tiny_cfg(tmp_path / "r", "data.batch_size=0", "optim.accum_iter=0"))
    assert "data.batch_size" in str(e.value) and "optim.accum_iter" in str(e.value)
    validate(tiny_cfg(tmp_path / "r"))  # the tiny config itself is fine
    for name in ("cae", "emae", "sbam", "latent_mim", "mae"):  # every preset passes
        validate(load_config(ROOT / f"configs/{name}_fashion_mnist.yaml"), check_environment=False)


def test_cli_config_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    from mimkit.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", str(PRESET), *TINY, f"train.out_dir={out}", "data.batch_size=0", "train.epochs=0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mimkit: error: ") and "train.epochs" in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# 1. checkpoints: atomic, cleaned up, space checked first, checksummed, fallback, pruning, time saves


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (a real file system that fills up), or None where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        proc = None
    if proc is None or proc.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


def _fill(directory: Path, leave: int = 0) -> Path:
    """Fill the file system of ``directory`` up to ``leave`` free bytes."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        while True:
            free = ck.free_bytes(directory)
            chunk = min(1 << 20, free - leave)
            if chunk <= 0:
                break
            try:
                f.write(b"\0" * chunk)
                f.flush()
            except OSError:
                break
    return filler


def _stand_in_full_disk(monkeypatch, free=1000):
    def full_save(obj, f):
        f.write(b"partial data")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(ck.torch, "save", full_save)
    _set_free(monkeypatch, free)


def _set_free(monkeypatch, free: int) -> None:
    """A stand-in free-space figure for the writer (mimkit.weights.checkpoint) and the run directory's
    checks (mimkit.train.checkpoint) alike."""
    for mod in (ck, wck):
        monkeypatch.setattr(mod, "free_bytes", lambda d: free)


def test_write_failures_remove_the_temp_file_and_keep_the_old_checkpoint(tmp_path, monkeypatch, small_fs):
    big = {"w": torch.arange(300_000, dtype=torch.float32)}  # 1.2 MB
    if small_fs is not None:  # a real full disk: torch.save fails half way through
        path = small_fs / "checkpoint.pt"
        atomic_save({"step": 1}, path)
        _fill(small_fs, leave=300_000)
        before = ck.free_bytes(small_fs)
        with monkeypatch.context() as m, pytest.raises(DiskFullError, match="disk full while writing checkpoint.*"
                                                                            "partial file was removed"):
            m.setattr(wck, "check_space", lambda *a: None)  # the space vanished after the check
            atomic_save(big, path)
        assert ck.free_bytes(small_fs) == before  # the partial file does not keep the disk full
        assert sorted(p.name for p in small_fs.iterdir()) == ["checkpoint.pt", "filler"]
        assert load_checkpoint(path)["step"] == 1
    local = tmp_path / "local"
    path = local / "checkpoint.pt"
    atomic_save({"step": 1}, path)
    with monkeypatch.context() as m:  # the stand-in: what torch.save raises on a full disk
        _stand_in_full_disk(m, free=10**9)
        m.setattr(wck, "check_space", lambda *a: None)
        _set_free(m, 1000)
        with pytest.raises(DiskFullError, match="disk full"):
            atomic_save(big, path)
    with monkeypatch.context() as m:  # the space check refuses before touching anything
        _set_free(m, 1000)
        with pytest.raises(DiskFullError, match="not enough space.*nothing was changed"):
            atomic_save(big, path)

    def interrupted(obj, f):
        f.write(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(ck.torch, "save", interrupted)
        atomic_save(big, path)
    assert [p.name for p in local.iterdir()] == ["checkpoint.pt"]
    assert load_checkpoint(path)["step"] == 1


@needs_fmnist
def test_full_disk_runs_fail_in_one_line_and_leave_nothing_behind(tmp_path, monkeypatch, small_fs, capsys):
    if small_fs is None:  # stand-in: a disk with 1000 bytes free
        _set_free(monkeypatch, 1000)
        base = tmp_path
    else:
        base = small_fs
    # a fresh run on a full disk: refused before the data is read; no config.yaml, no empty run dir
    if small_fs is not None:
        filler = _fill(base)
    with pytest.raises(CheckpointError, match="disk full|not enough space") as e:
        pretrain(tiny_cfg(base / "fresh"))
    assert "\n" not in str(e.value)
    assert not (base / "fresh").exists()
    # a run whose checkpoint no longer fits: refused at start, its checkpoint untouched
    if small_fs is not None:
        filler.unlink()
    else:
        monkeypatch.undo()
    pretrain(tiny_cfg(base / "run", "train.max_steps=2"))
    before = (base / "run/checkpoint.pt").read_bytes()
    if small_fs is not None:
        _fill(base, leave=200_000)
    else:
        _set_free(monkeypatch, 200_000)
    with pytest.raises(DiskFullError, match="not enough space.*previous checkpoint is intact"):
        pretrain(tiny_cfg(base / "run", "train.max_steps=4"))
    assert (base / "run/checkpoint.pt").read_bytes() == before
    assert not [p for p in (base / "run").iterdir() if p.name.startswith(".")]  # no temp file, no lock
    print("full-disk test ran on", "a real tmpfs" if small_fs is not None else "the stand-in", file=sys.stderr)


def _flip_bytes(path: Path, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of the largest tensor record of a torch zip checkpoint, where
    the zip reader and the unpickler do not notice."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        hdr = f.read(30)
        name_len, extra_len = struct.unpack("<HH", hdr[26:30])
        off = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(off)
        data = f.read(n)
        f.seek(off)
        f.write(bytes(b ^ 0xFF for b in data))


@needs_fmnist
def test_corrupt_checkpoint_is_detected_and_falls_back_to_the_newest_good_copy(tmp_path, reference, capsys):
    out = tmp_path / "run"
    keep = ["train.ckpt_every_steps=2", "train.keep_checkpoints=2"]
    pretrain(tiny_cfg(out, "train.max_steps=5", *keep))
    assert sorted(p.name for p in out.glob("checkpoint*.pt")) == [
        "checkpoint-00000004.pt", "checkpoint-00000005.pt", "checkpoint.pt"]
    latest = out / "checkpoint.pt"
    _flip_bytes(latest)
    state = torch.load(latest, weights_only=True)  # torch itself does not notice
    assert state["step"] == 5
    with pytest.raises(CheckpointError, match="checkpoint.pt is corrupt.*checksum"):
        load_checkpoint(latest)
    capsys.readouterr()
    pretrain(tiny_cfg(out, "train.max_steps=6", *keep))
    err = capsys.readouterr().err
    assert "checksum" in err and "resuming from the newest good numbered copy checkpoint-00000005.pt (step 5)" in err
    assert losses(out) == reference[:6]  # the fallback resumed exactly
    assert [r["event"] for r in records(out) if "event" in r] == ["resume_fallback"]
    # a missing checkpoint.pt also falls back (numbered copies: 5 and 6)
    latest.unlink()
    pretrain(tiny_cfg(out, "train.max_steps=7", *keep))
    assert "checkpoint.pt is missing; resuming from the newest good numbered copy checkpoint-00000006.pt" in \
        capsys.readouterr().err
    assert losses(out) == reference[:7]
    # every copy bad: one error naming checkpoint.pt
    for p in out.glob("checkpoint*.pt"):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoint.pt is unreadable or corrupt.*numbered copies are unusable"):
        pretrain(tiny_cfg(out, "train.max_steps=8"))


def test_pruning_is_by_step_number(tmp_path):
    for step in (9, 10, 100, 99999, 100000000):
        (tmp_path / f"checkpoint-{step}.pt").write_bytes(b"x")
    (tmp_path / "checkpoint-best.pt").write_bytes(b"x")  # not a numbered copy: left alone
    gone = ck.prune(tmp_path, 2)
    assert sorted(p.name for p in gone) == ["checkpoint-10.pt", "checkpoint-100.pt", "checkpoint-9.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-100000000.pt", "checkpoint-99999.pt", "checkpoint-best.pt"]


@needs_fmnist
def test_time_based_saves_and_stale_temp_files_are_removed(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.tmp-4242").write_bytes(b"\0" * 100_000)  # a killed save's leftover
    (out / ".checkpoint-00000002.pt.tmp-77").write_bytes(b"\0" * 1000)
    pretrain(tiny_cfg(out, "train.max_steps=3", "train.ckpt_every_minutes=1e-9", "train.keep_checkpoints=-1"))
    assert "removed 2 temporary file(s)" in capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint-00000001.pt", "checkpoint-00000002.pt", "checkpoint-00000003.pt", "checkpoint.pt",
                     "config.yaml", "metrics.jsonl", "result.json"]


# ------------------------------------------------------------------------------------------------
# 2. signals: save at the next step boundary, distinct exit code, exact resume


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("the run did not start in time")


def test_sigterm_saves_exits_75_and_resumes_bit_identically(tmp_path):
    """`mimkit pretrain` streaming a folder through 2 DataLoader workers; SIGTERM goes to the whole
    process group (as SLURM signals every process of a job step); the workers must not break the
    main process's last step."""
    data = _folder(tmp_path / "imgs")
    ref = tmp_path / "ref"
    pretrain(folder_cfg(ref, data, "train.epochs=4"))  # 20 steps, workers or not: the same batches
    (tmp_path / "empty.yaml").write_text("{}\n")
    out = tmp_path / "run"
    over = folder_overrides(out, data, "train.epochs=4", "data.num_workers=2")
    proc = subprocess.Popen([sys.executable, "-m", "mimkit.cli", "pretrain", str(tmp_path / "empty.yaml"), *over],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
                            start_new_session=True)
    try:
        _wait_for_steps(out, 3, proc)
        os.killpg(proc.pid, signal.SIGSTOP)  # freeze it mid-run so the signal lands before the last step
        os.killpg(proc.pid, signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 3 <= step < 20 and f"stopped by SIGTERM at step {step}" in err and "Traceback" not in err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file, lock released
    assert len(losses(out)) == step
    result = pretrain(folder_cfg(out, data, "train.epochs=4", "data.num_workers=2"))
    assert result["step"] == 20 and losses(out) == losses(ref)  # bit-identical


@needs_fmnist
@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGINT"])
def test_sigusr1_and_sigint_save_at_the_step_boundary(tmp_path, reference, sig):
    out = tmp_path / "run"
    before = signal.getsignal(getattr(signal, sig))  # SIG_DFL / Python's, or SIG_IGN when started in a background job
    t = Trainer(tiny_cfg(out))
    _poison(t, (), action=lambda call: os.kill(os.getpid(), getattr(signal, sig)) if call == 5 else None)
    with pytest.raises(TrainingInterrupted, match=f"stopped by {sig} at step 5") as e:
        t.train()
    assert e.value.step == 5 and load_checkpoint(out / "checkpoint.pt")["step"] == 5
    assert signal.getsignal(getattr(signal, sig)) == before  # restored
    if sig == "SIGUSR1":
        pretrain(tiny_cfg(out))
        assert losses(out) == reference


# ------------------------------------------------------------------------------------------------
# 3. run-directory lock


def _fork(target, *args):
    """Run ``target(*args)`` in a forked child (no interpreter start-up); returns the process."""
    import multiprocessing as mp

    proc = mp.get_context("fork").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _hold_lock(out, ready):
    ck.RunLock(out).acquire()
    ready.set()
    time.sleep(120)


@needs_fmnist
def test_second_run_on_a_live_directory_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    import multiprocessing as mp

    from mimkit.cli import main

    out = tmp_path / "run"
    first = Trainer(tiny_cfg(out))
    try:  # in this process
        with pytest.raises(RunLockedError, match=re.escape(f"in use by another run (PID {os.getpid()} on host "
                                                           f"{socket.gethostname()}")):
            Trainer(tiny_cfg(out))
    finally:
        first.close()
    ready = mp.get_context("fork").Event()
    owner = _fork(_hold_lock, out, ready)  # another process owns the directory
    try:
        assert ready.wait(60)
        capsys.readouterr()
        assert main(["pretrain", str(PRESET), *TINY, f"train.out_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"PID {owner.pid} on host {socket.gethostname()}" in err and len(err.splitlines()) == 1, err
    finally:
        os.kill(owner.pid, signal.SIGKILL)  # killed: its lock is stale
        owner.join()
    pretrain(tiny_cfg(out, "train.max_steps=2"))
    assert f"taking over the stale lock of PID {owner.pid}" in capsys.readouterr().err
    assert not (out / ck.LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------
# 4. resume safety


@needs_fmnist
def test_resume_with_changed_optimisation_is_refused_unless_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(tiny_cfg(out, "train.max_steps=2"))
    config_before = (out / "config.yaml").read_text()
    for change, key in [("optim.base_lr=1e-3", "optim.base_lr"), ("method.masking.ratio=0.5", "method.masking.ratio"),
                        ("train.seed=1", "train.seed"), ("train.epochs=3", "train.epochs"),
                        ("data.batch_size=32", "data.batch_size"), ("data.limit=256", "data.limit")]:
        with pytest.raises(ConfigError, match=f"{key} .*-> .*train.resume_changes=allow"):
            pretrain(tiny_cfg(out, "train.max_steps=3", change))
        assert (out / "config.yaml").read_text() == config_before  # a refused resume writes nothing
    assert "world_size" in config_changes({}, {}, 2, 1)
    # free settings resume silently
    pretrain(tiny_cfg(out, "train.max_steps=3", "data.num_workers=0", "train.ckpt_every_steps=50"))
    pretrain(tiny_cfg(out, "train.max_steps=4", "optim.base_lr=1e-3", "train.resume_changes=allow"))
    events = [r for r in records(out) if "event" in r]
    assert events == [{"step": 3, "event": "resume_changes", "changes": {"optim.base_lr": [0.0015, 0.001]}}]
    assert "base_lr: 0.001" in (out / "config.yaml").read_text()


@needs_fmnist
def test_a_run_without_grad_scaler_resumes_with_one(tmp_path, monkeypatch):
    # train.precision is free on resume: fp32 -> fp16 (GPU) meets an empty scaler state; a CPU scaler
    # stands in for the CUDA one
    out = tmp_path / "run"
    pretrain(tiny_cfg(out, "train.max_steps=1"))
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real("cpu", init_scale=2.0**10))
    t = Trainer(tiny_cfg(out, "train.max_steps=2"))
    assert t.step == 1 and t.scaler.is_enabled() and t.scaler.get_scale() == 2.0**10
    t.close()


# ------------------------------------------------------------------------------------------------
# 5. non-finite steps


@needs_fmnist
def test_skipped_steps_are_recorded_and_a_mostly_skipped_run_fails(tmp_path):
    out = tmp_path / "run"
    t = Trainer(tiny_cfg(out, "train.epochs=2", "train.max_steps=10"))
    _poison(t, set(range(2, 11)))  # 9 of 10 steps
    with pytest.raises(NonFiniteLossError, match="9 of 10 steps .*train.max_nonfinite_fraction=0.1.*no result.json"):
        t.train()
    recs = records(out)
    assert [r["step"] for r in recs if r.get("event") == "nonfinite_skip"] == list(range(2, 11))
    assert recs[-1]["event"] == "failed" and len(losses(out)) == 1
    assert not (out / "result.json").exists() and load_checkpoint(out / "checkpoint.pt")["step"] == 10


@needs_fmnist
def test_abort_message_names_only_existing_checkpoints(tmp_path):
    out = tmp_path / "run"
    t = Trainer(tiny_cfg(out, "train.max_nonfinite=0"))
    _poison(t, {1})
    with pytest.raises(NonFiniteLossError) as e:
        t.train()
    assert "No checkpoint was written yet" in str(e.value) and "checkpoint.pt" not in str(e.value)
    assert not (out / "checkpoint.pt").exists()


@needs_fmnist
def test_abort_message_names_the_last_sharded_checkpoint(tmp_path):
    out = tmp_path / "run"
    t = Trainer(tiny_cfg(out, "train.max_nonfinite=0", "train.strategy=fsdp", "train.ckpt_every_steps=1",
                         "train.log_every_steps=100"))
    _poison(t, {3})
    with pytest.raises(NonFiniteLossError) as e:
        t.train()
    assert f"The last good checkpoint is {out / 'dcp' / 'step-00000002'} (step 2)" in str(e.value)


@needs_fmnist
def test_a_pending_asynchronous_sharded_save_is_completed_before_a_nonfinite_stop(tmp_path, monkeypatch):
    # GPU sharded runs write periodic checkpoints with dcp.async_save; stand it in with a finished future
    from concurrent.futures import Future

    import torch.distributed.checkpoint as dcp

    def fake_async_save(state, checkpoint_id, process_group=None):
        dcp.save(state, checkpoint_id=checkpoint_id)
        fut = Future()
        fut.set_result(None)
        return fut

    monkeypatch.setattr(dcp, "async_save", fake_async_save)
    out = tmp_path / "run"
    t = Trainer(tiny_cfg(out, "train.max_nonfinite=0", "train.strategy=fsdp", "train.ckpt_every_steps=2",
                         "train.log_every_steps=100"))
    t.checkpointer.async_group = object()  # makes periodic saves asynchronous
    _poison(t, {3})
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint is .*step-00000002 \(step 2\)"):
        t.train()
    assert [s for s, _ in ck.dcp_checkpoints(out)] == [2]


# ------------------------------------------------------------------------------------------------
# 6. data: 16-bit images, skip reports, limit everywhere, a bad file met mid-run


def _folder(root: Path, n: int = 40, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def folder_cfg(out_dir, data_dir, *extra):
    return load_config(None, folder_overrides(out_dir, data_dir, *extra))


def folder_overrides(out_dir, data_dir, *extra):
    return [
        "model.encoder.img_size=16", "model.encoder.patch_size=4", "model.encoder.in_chans=1",
        "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
        "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2",
        f"data.dataset={data_dir}", "data.batch_size=8", "data.in_memory=false", "data.num_workers=0",
        "optim.warmup_epochs=1", "train.epochs=1", "train.log_every_steps=1", "train.progress_bar=false",
        "train.tensorboard=false", "eval.knn_at_end=false", "eval.picture_at_end=false", f"train.out_dir={out_dir}",
        f"train.num_threads={THREADS}", "train.device=cpu", *extra]


def test_16_bit_and_float_images_are_scaled_not_saturated(tmp_path):
    a = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert np.asarray(_open_image(tmp_path / "g16.png", "L")).tolist() == [[0, 1, 128, 255]]
    assert np.asarray(_open_image(tmp_path / "g16.png", "RGB"))[0, 2].tolist() == [128, 128, 128]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(_open_image(tmp_path / "f.tif", "L")).tolist() == [[0, 128, 255]]
    Image.new("CMYK", (2, 2), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert _open_image(tmp_path / "c.jpg", "L").mode == "L"


def test_skip_corrupt_is_reported_and_limit_applies_when_streaming(tmp_path, capsys):
    data = _folder(tmp_path / "imgs")
    (data / "005.png").write_bytes(b"not a png")
    (data / "017.png").write_bytes(b"")
    out = tmp_path / "run"
    result = pretrain(folder_cfg(out, data, "data.skip_corrupt=true"))
    assert result["skipped_files"] == {"count": 2, "files": [str(data / "005.png"), str(data / "017.png")]}
    assert json.loads((out / "result.json").read_text())["skipped_files"]["count"] == 2
    assert "data.skip_corrupt: skipped 2 corrupt file(s)" in capsys.readouterr().err
    # the same in memory
    result = pretrain(folder_cfg(tmp_path / "mem", data, "data.skip_corrupt=true", "data.in_memory=true"))
    assert result["skipped_files"]["count"] == 2
    # data.limit on the streaming and in-memory paths: 16 images = 2 batches of 8
    clean = _folder(tmp_path / "clean")
    for mem in ("false", "true"):
        t = Trainer(folder_cfg(tmp_path / f"lim{mem}", clean, "data.limit=16", f"data.in_memory={mem}"))
        assert t.batches_per_epoch == 2, mem
        t.close()


def test_streaming_run_saves_before_reporting_a_bad_file_and_resumes_exactly(tmp_path):
    data = _folder(tmp_path / "imgs")
    ref = tmp_path / "ref"
    pretrain(folder_cfg(ref, data, "data.num_workers=1"))
    out = tmp_path / "run"
    t = Trainer(folder_cfg(out, data, "data.num_workers=1"))
    order = t.data.loader.indices(0).tolist()
    victim = data / f"{order[2 * 8 + 3]:03d}.png"  # met in step 2 (0-based), from a worker process
    good = victim.read_bytes()
    victim.write_bytes(b"broken")
    with pytest.raises(DataError) as e:
        t.train()
    msg = str(e.value)
    assert str(victim) in msg and "saved its state at step 2" in msg and "\n" not in msg
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    victim.write_bytes(good)
    pretrain(folder_cfg(out, data, "data.num_workers=1"))
    assert losses(out) == losses(ref)


# ------------------------------------------------------------------------------------------------
# 7b. distributed timeout as a setting

def _stopped_rank(rank, port, result):
    import torch.distributed as dist

    from mimkit.train.distributed import init_distributed

    # the ranks are clients of the store the test holds (as under torchrun's agent): no port to race for
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", TORCHELASTIC_USE_AGENT_STORE="True")
    init_distributed("cpu", timeout_minutes=0.05)  # 3 s
    if rank == 1:
        time.sleep(120)  # a stopped rank
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(1))
        result.put("completed")
    except Exception as e:
        result.put(f"failed after {time.time() - t0:.1f} s: {type(e).__name__}")


def test_a_stopped_rank_makes_the_others_fail_after_the_timeout():
    import multiprocessing as mp

    import torch.distributed as dist

    # the store is bound here, on a port the OS picks, and held for the whole test: a port found free and
    # released before the ranks bind it could be taken by another process meanwhile
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = store.port
    result = mp.get_context("fork").Queue()
    procs = [_fork(_stopped_rank, rank, port, result) for rank in (0, 1)]
    try:
        out = result.get(timeout=90)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.join()
    assert out.startswith("failed after"), out
    assert float(out.split()[2]) < 30  # the 3 s timeout, not gloo's 30 minutes


def test_file_system_errors_are_one_line(monkeypatch, capsys):
    import mimkit.cli as cli

    def boom(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")

    parser = cli.build_parser()
    args = parser.parse_args(["pretrain", "x.yaml"])
    args.func = boom
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_known_args": lambda self, a: (args, [])})())
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimkit: error: No space left on device (runs/x/metrics.jsonl)") and "\n" not in err
