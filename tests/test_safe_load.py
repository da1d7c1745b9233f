"""No received file runs code when mimkit loads it (mimkit.weights.safe, train.checkpoint).

A pickle whose ``__reduce__`` touches a marker file is shaped like every kind of file mimkit reads (a
mimkit checkpoint, an official MAE ``.pth``, a sharded checkpoint's ``trainer.pt`` and DCP
``.metadata``) and fed to every entry point: each refuses it in one line naming the file, the
offending globals and what to do instead (mimkit never unpickles such a file, not even with the removed
``MIMKIT_ALLOW_PICKLE=1`` set), and the marker is never written. Also: mimkit's file checksum (zip
comment) is checked before anything is deserialised; the one opt-in, ``MIMKIT_ALLOW_UNVERIFIED``."""

from __future__ import annotations

import io
import pathlib
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, needs_fmnist

from mimkit.config import ConfigError, load_config
from mimkit.train import checkpoint as ck
from mimkit.train.checkpoint import atomic_save, dcp_checkpoints, load_checkpoint
from mimkit.weights import checkpoint as wck
from mimkit.weights.safe import (
    ALLOW_UNVERIFIED,
    CheckpointError,
    FileRefusedError,
    append_checksum,
    read_tail,
    safe_load,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_RUN, "data.batch_size=32"]
ALLOW_PICKLE = "MIMKIT_ALLOW_PICKLE"  # an opt-in to full unpickling that mimkit no longer has: it must change nothing
NO_PICKLE = ("mimkit never unpickles such files: convert the weights to a plain state dict of tensors or to "
             "safetensors with code you trust")  # what a refusal of a pickle's globals says to do


class Boom:
    """Unpickling it touches ``marker`` (what a malicious pickle would do with any code)."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(autouse=True)
def _no_opt_ins(monkeypatch):
    monkeypatch.delenv(ALLOW_UNVERIFIED, raising=False)
    monkeypatch.delenv(ALLOW_PICKLE, raising=False)


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "MARKER-code-ran"
    yield m
    assert not m.exists(), "a received file ran code"


def cfg(out_dir, *extra, config="mae_fashion_mnist.yaml"):
    return load_config(ROOT / "configs" / config, [*TINY, f"train.out_dir={out_dir}", *extra])


def tiny_state() -> dict:
    from mimkit.config import to_dict
    from mimkit.train.loop import build_method

    c = cfg("unused")
    return {"model": build_method(c).state_dict(), "optimizer": {"state": {}, "param_groups": []}, "step": 1,
            "config": to_dict(c)}


def forge_checksum(path: Path) -> None:
    """Give a file a valid mimkit checksum (anyone can: a checksum is not a signature)."""
    with open(path, "r+b") as f:
        append_checksum(f)


def evil_checkpoint(path: Path, marker: Path, checksum: bool = False) -> Path:
    """A mimkit training checkpoint (model, optimizer, step, config, rng) whose RNG state runs code."""
    torch.save({**tiny_state(), "rng": [Boom(marker)]}, path)
    if checksum:
        forge_checksum(path)
    return path


def evil_official_mae(path: Path, marker: Path) -> Path:
    """An official MAE pretraining ``.pth`` (``{'model': ..., 'args': ...}``) whose ``args`` run code."""
    from mimkit.interop import to_official_state_dict
    from mimkit.train.loop import build_method

    torch.save({"model": to_official_state_dict(build_method(cfg("unused"))), "args": Boom(marker)}, path)
    return path


def assert_refused(text: str, path, *needles: str) -> None:
    """One line naming ``path`` and every needle (the opt-in, or the globals and :data:`NO_PICKLE`),
    never the removed pickle opt-in."""
    text = text.strip()
    assert "\n" not in text, text
    assert str(path) in text, text
    for needle in needles:
        assert needle in text, text
    assert ALLOW_PICKLE not in text and "full unpickling" not in text, text


def run_cli(argv, capsys) -> str:
    from mimkit.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mimkit: error: "), err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# the twelve entry points


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "forged-checksum"])
def test_model_init_refuses_a_code_running_mimkit_checkpoint(tmp_path, marker, checksum):
    from mimkit.train import pretrain

    evil = evil_checkpoint(tmp_path / "evil.pt", marker, checksum)
    with pytest.raises(FileRefusedError, match="^model.init=") as e:
        pretrain(cfg(tmp_path / "run", f"model.init={evil}"))
    assert_refused(str(e.value), evil, "pathlib", NO_PICKLE)  # the offending globals are named


def test_model_init_refuses_a_code_running_official_mae_file(tmp_path, marker):
    from mimkit.train import pretrain

    evil = evil_official_mae(tmp_path / "mae_pretrain.pth", marker)
    with pytest.raises(FileRefusedError, match="^model.init=") as e:
        pretrain(cfg(tmp_path / "run", f"model.init={evil}"))
    assert_refused(str(e.value), evil, "pathlib", NO_PICKLE)


@pytest.mark.parametrize("command", ["eval", "export", "visualize", "report"])
@pytest.mark.parametrize("kind", ["mimkit", "official"])
def test_cli_commands_refuse_code_running_files(tmp_path, marker, capsys, command, kind):
    evil = (evil_checkpoint(tmp_path / "checkpoint.pt", marker) if kind == "mimkit"
            else evil_official_mae(tmp_path / "mae.pth", marker))
    argv = {"eval": ["eval", "knn", evil], "export": ["export", evil, tmp_path / "e.safetensors"],
            "visualize": ["visualize", evil, "--out", tmp_path / "v.png"],
            "report": ["report", evil, "--protocols", "knn", "--out", tmp_path / "rep"]}[command]
    assert_refused(run_cli(argv, capsys), evil, "pathlib", NO_PICKLE)
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "v.png").exists()


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "forged-checksum"])
def test_explicit_resume_refuses_a_code_running_checkpoint(tmp_path, marker, checksum):
    from mimkit.train import pretrain

    evil = evil_checkpoint(tmp_path / "evil.pt", marker, checksum)
    with pytest.raises(CheckpointError) as e:
        pretrain(cfg(tmp_path / "run", f"train.resume={evil}"))
    # no checksum: refused before anything is unpickled; a forged one: the weights-only loader refuses
    assert_refused(str(e.value), evil, *(("pathlib", NO_PICKLE) if checksum else (ALLOW_UNVERIFIED,)))


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "forged-checksum"])
def test_auto_resume_refuses_a_code_running_checkpoint_in_the_run_directory(tmp_path, marker, checksum):
    from mimkit.train import pretrain

    run = tmp_path / "run"
    run.mkdir()
    evil_checkpoint(run / "checkpoint.pt", marker, checksum)
    with pytest.raises(CheckpointError) as e:
        pretrain(cfg(run))
    assert_refused(str(e.value), run / "checkpoint.pt", *(("pathlib", NO_PICKLE) if checksum else (ALLOW_UNVERIFIED,)))
    assert (run / "checkpoint.pt").is_file()  # left as it was


@pytest.mark.parametrize("kind", ["mimkit", "official"])
def test_cae_v2_teacher_path_refuses_a_code_running_file(tmp_path, marker, kind):
    from mimkit.train import pretrain

    evil = (evil_checkpoint(tmp_path / "teacher.pt", marker) if kind == "mimkit"
            else evil_official_mae(tmp_path / "teacher.pth", marker))
    extra = ["model.decoder.embed_dim=32", "model.decoder.depth=0", f"method.teacher_path={evil}",
             "method.teacher_vit=null"]
    with pytest.raises((CheckpointError, ConfigError)) as e:
        pretrain(cfg(tmp_path / "run", *extra, config="cae_v2_fashion_mnist.yaml"))
    assert_refused(str(e.value), evil, "pathlib", NO_PICKLE)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """A real sharded (train.strategy=fsdp, one process) checkpoint directory."""
    from mimkit.train import pretrain

    out = tmp_path_factory.mktemp("fsdp")
    pretrain(cfg(out, "train.max_steps=1", "train.strategy=fsdp"))
    assert [s for s, _ in dcp_checkpoints(out)] == [1]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".mimkit.lock"))
    return dcp_checkpoints(dst)[0][1]


def replace_metadata(step_dir: Path, marker: Path) -> None:
    """The DCP ``.metadata`` replaced by a code-running pickle of the same size (the sizes in the
    manifest match; only the digest tells)."""
    meta = step_dir / ".metadata"
    payload = pickle.dumps(Boom(marker), protocol=2)
    size = meta.stat().st_size
    assert len(payload) < size
    meta.write_bytes(payload + b"\0" * (size - len(payload)))  # pickle stops at STOP; the padding is never read


def replace_trainer(step_dir: Path, marker: Path, checksum: bool) -> None:
    state = load_checkpoint(step_dir / "trainer.pt")
    torch.save({**state, "rng": [Boom(marker)]}, step_dir / "trainer.pt")
    if checksum:
        forge_checksum(step_dir / "trainer.pt")


def reseal(step_dir: Path) -> None:
    """Rebuild the directory's manifest and trainer.pt checksum after its files were changed: what an
    attacker can do (a checksum is not a signature), so only the restricted reader stands in the way."""
    state = load_checkpoint(step_dir / "trainer.pt")
    torch.save({**state, "dcp_manifest": ck.dcp_manifest(step_dir)}, step_dir / "trainer.pt")
    forge_checksum(step_dir / "trainer.pt")


def one_line(text: str, path, *needles: str) -> None:
    text = text.strip()
    assert "\n" not in text and str(path) in text, text
    for n in needles:
        assert n in text, text


@needs_fmnist
def test_sharded_checkpoint_metadata_that_runs_code_is_refused_everywhere(tmp_path, marker, fsdp_run, capsys):
    from mimkit.train import pretrain

    run = tmp_path / "run"
    step_dir = copy_run(fsdp_run, run)
    manifest = load_checkpoint(step_dir / "trainer.pt")["dcp_manifest"]["files"]
    assert ".metadata" in manifest and any(n.endswith(".distcp") for n in manifest)
    replace_metadata(step_dir, marker)
    # 1. the manifest left as written: the digest tells, before DCP reads anything
    with pytest.raises(CheckpointError) as e:
        pretrain(cfg(run, "train.max_steps=2", "train.strategy=fsdp"))
    one_line(str(e.value), step_dir, ".metadata does not match the digest")
    with pytest.raises(CheckpointError) as e:
        pretrain(cfg(tmp_path / "other", "train.max_steps=2", "train.strategy=fsdp", f"train.resume={step_dir}"))
    one_line(str(e.value), step_dir, ".metadata does not match the digest")
    one_line(run_cli(["export", step_dir, tmp_path / "e.safetensors"], capsys), step_dir, "does not match the digest")
    # 2. a forged manifest and checksum: the restricted metadata unpickler refuses the pickle's global
    reseal(step_dir)
    with pytest.raises(CheckpointError) as e:
        pretrain(cfg(run, "train.max_steps=2", "train.strategy=fsdp"))
    assert_refused(str(e.value), step_dir, "is not plain DCP metadata", "getattr", NO_PICKLE)
    with pytest.raises(CheckpointError) as e:
        pretrain(cfg(tmp_path / "other2", "train.max_steps=2", "train.strategy=fsdp", f"train.resume={step_dir}"))
    assert_refused(str(e.value), step_dir, "getattr", NO_PICKLE)
    # export, visualize and model.init consolidate the directory through the same reader
    exported = run_cli(["export", step_dir, tmp_path / "e.safetensors"], capsys)
    assert_refused(exported, step_dir, "getattr", NO_PICKLE)
    assert_refused(run_cli(["visualize", step_dir, "--out", tmp_path / "v.png"], capsys), step_dir, "getattr", NO_PICKLE)
    with pytest.raises(CheckpointError) as e:
        pretrain(cfg(tmp_path / "init", f"model.init={step_dir}"))
    assert_refused(str(e.value), step_dir, "getattr", NO_PICKLE)
    with pytest.raises(FileRefusedError) as e:
        ck.consolidate_dcp(step_dir)
    refused = str(e.value)
    # the removed opt-in changes nothing: the same refusal, the same reader, no code runs, no warning
    with pytest.MonkeyPatch.context() as m:
        m.setenv(ALLOW_PICKLE, "1")
        with pytest.raises(FileRefusedError) as e:
            ck.consolidate_dcp(step_dir)
        assert str(e.value) == refused
        assert run_cli(["export", step_dir, tmp_path / "e.safetensors"], capsys) == exported
        with pytest.raises(CheckpointError) as e:
            pretrain(cfg(run, "train.max_steps=2", "train.strategy=fsdp"))
        assert_refused(str(e.value), step_dir, "getattr", NO_PICKLE)
    assert not marker.exists()
    assert "unpickl" not in capsys.readouterr().err.lower()
    assert not (tmp_path / "e.safetensors").exists()


@needs_fmnist
def test_sharded_checkpoint_byte_items_are_read_weights_only(tmp_path, marker, fsdp_run):
    """A shard's non-tensor item (e.g. the optimizer's param groups) replaced by a code-running pickle,
    manifest and checksum forged: the planner reads byte items weights only, so the code never runs."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    run = tmp_path / "run"
    step_dir = copy_run(fsdp_run, run)
    meta = wck._DCPMetadataUnpickler(open(step_dir / ".metadata", "rb")).load()
    keys = [k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    info = max((v for idx, v in meta.storage_data.items() if idx.fqn in keys), key=lambda v: v.length)
    shard = step_dir / info.relative_path
    data = bytearray(shard.read_bytes())
    buf = io.BytesIO()
    torch.save(Boom(marker), buf, _use_new_zipfile_serialization=False)  # the small legacy format
    payload = buf.getvalue()
    data[info.offset:info.offset + info.length] = payload.ljust(info.length, b"\0")[:info.length]
    assert len(payload) <= info.length, "the payload must fit the item it replaces"
    shard.write_bytes(bytes(data))
    reseal(step_dir)
    with pytest.raises(CheckpointError) as e:
        ck.consolidate_dcp(step_dir)
    assert_refused(str(e.value), step_dir, "weights-only allowlist", "optimizer.", NO_PICKLE)
    with pytest.MonkeyPatch.context() as m:  # the removed opt-in changes nothing
        m.setenv(ALLOW_PICKLE, "1")
        with pytest.raises(FileRefusedError) as e2:
            ck.consolidate_dcp(step_dir)
    assert str(e2.value) == str(e.value)


@needs_fmnist
@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "forged-checksum"])
def test_sharded_checkpoint_trainer_pt_that_runs_code_is_refused(tmp_path, marker, fsdp_run, capsys, checksum):
    from mimkit.train import pretrain

    run = tmp_path / "run"
    step_dir = copy_run(fsdp_run, run)
    replace_trainer(step_dir, marker, checksum)
    trainer = step_dir / "trainer.pt"
    needles = ("pathlib", NO_PICKLE) if checksum else (ALLOW_UNVERIFIED,)
    with pytest.raises(CheckpointError) as e:
        pretrain(cfg(run, "train.max_steps=2", "train.strategy=fsdp"))
    assert_refused(str(e.value), trainer, *needles)
    assert_refused(run_cli(["export", step_dir, tmp_path / "e.safetensors"], capsys), trainer, *needles)


# --------------------------------------------------------------------------------------------------
# the file checksum


def test_checksum_is_a_zip_comment_that_torch_and_zipfile_read_and_copies_keep(tmp_path):
    path = atomic_save({"model": {"w": torch.arange(10.0)}, "step": 3}, tmp_path / "c.pt")
    tail = read_tail(path)
    assert tail.kind == "record" and len(tail.digest) == 64
    with zipfile.ZipFile(path) as z:
        assert z.comment == b"mimkit-checksum blake2b-file-v2 " + tail.digest.encode()
        assert z.testzip() is None
    assert torch.load(path, weights_only=True)["step"] == 3
    # the digest is over the file exactly as torch.save wrote it
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.arange(10.0)}, "step": 3}, buf)
    import hashlib

    assert hashlib.blake2b(buf.getvalue(), digest_size=32).hexdigest() == tail.digest
    ck.atomic_copy(path, tmp_path / "checkpoint-00000003.pt")  # numbered copies: byte copies, still verified
    assert load_checkpoint(tmp_path / "checkpoint-00000003.pt")["step"] == 3


def test_any_changed_byte_is_refused_before_anything_is_unpickled(tmp_path, monkeypatch):
    good = atomic_save({"model": {"w": torch.randn(16)}, "optimizer": {}, "step": 1}, tmp_path / "good.pt")
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"

    def no_load(*a, **k):
        raise AssertionError("torch.load was called on a changed file")

    monkeypatch.setattr(torch, "load", no_load)
    for i in range(len(data)):  # every byte: header, pickle, tensor data, central directory, checksum record
        b = bytearray(data)
        b[i] ^= 0x01
        bad.write_bytes(bytes(b))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)
    monkeypatch.undo()
    assert load_checkpoint(good)["step"] == 1


@pytest.mark.parametrize("require_checksum", [True, False])
def test_one_changed_byte_in_the_algorithm_name_is_refused(tmp_path, require_checksum):
    path = atomic_save({"model": {"w": torch.ones(3)}, "step": 1}, tmp_path / "c.pt")
    data = path.read_bytes()
    i = data.rindex(b"blake2b-file-v2")
    path.write_bytes(data[:i] + b"blake2c" + data[i + 7:])
    with pytest.raises(FileRefusedError, match="malformed mimkit checksum") as e:
        load_checkpoint(path, require_checksum=require_checksum)
    assert_refused(str(e.value), path, ALLOW_UNVERIFIED)
    path.write_bytes(data[:-1] + b"G")  # bad hex
    with pytest.raises(FileRefusedError, match="malformed"):
        load_checkpoint(path, require_checksum=require_checksum)


def test_foreign_weight_files_load_without_a_checksum(tmp_path):
    """Official MAE checkpoints (with their ``args`` Namespace) and timm state dicts need no opt-in."""
    import argparse

    from mimkit.interop import read_verified

    sd = {"patch_embed.proj.weight": torch.zeros(4, 1, 2, 2)}
    torch.save({"model": sd, "optimizer": {}, "epoch": 3, "args": argparse.Namespace(lr=1.0, input_size=28)},
               tmp_path / "checkpoint-3.pth")
    obj = read_verified(tmp_path / "checkpoint-3.pth")
    assert obj["args"].input_size == 28 and torch.equal(obj["model"]["patch_embed.proj.weight"], sd["patch_embed.proj.weight"])
    torch.save(sd, tmp_path / "timm.pth")
    assert set(safe_load(tmp_path / "timm.pth")) == set(sd)


def test_a_mimkit_checkpoint_without_checksum_is_refused_where_foreign_files_are_accepted(tmp_path):
    from mimkit.interop import read_verified

    torch.save(tiny_state(), tmp_path / "checkpoint.pt")
    with pytest.raises(FileRefusedError) as e:  # a refusal, named as one (a CheckpointError, not InteropError)
        read_verified(tmp_path / "checkpoint.pt")
    assert_refused(str(e.value), tmp_path / "checkpoint.pt", ALLOW_UNVERIFIED)


# --------------------------------------------------------------------------------------------------
# the opt-in (and the removed one)


def legacy_state(src: Path) -> dict:
    """``src`` as an older mimkit wrote it: the content checksum inside the pickle, numpy's RNG state as
    a numpy array (saved with plain ``torch.save``: no file checksum)."""
    state = dict(load_checkpoint(src))
    for r in state["rng"]:
        name, key, *rest = r["numpy"]
        r["numpy"] = (name, key.numpy().astype(np.uint32), *rest)
    return ck.with_checksum(state)


@needs_fmnist
def test_unverified_opt_in_resumes_a_legacy_checkpoint_with_a_warning(tmp_path, monkeypatch, capsys):
    from mimkit.train import pretrain

    run = tmp_path / "run"
    pretrain(cfg(run, "train.max_steps=1"))
    for p in run.glob("checkpoint-*.pt"):
        p.unlink()  # no numbered copy to fall back to
    torch.save(legacy_state(run / "checkpoint.pt"), run / "checkpoint.pt")
    with pytest.raises(CheckpointError) as e:
        pretrain(cfg(run, "train.max_steps=2"))
    assert_refused(str(e.value), run / "checkpoint.pt", ALLOW_UNVERIFIED)
    monkeypatch.setenv(ALLOW_UNVERIFIED, "1")
    capsys.readouterr()
    pretrain(cfg(run, "train.max_steps=2"))
    err = capsys.readouterr().err
    assert f"loading it unverified because {ALLOW_UNVERIFIED}=1" in err and "resumed from" in err
    monkeypatch.delenv(ALLOW_UNVERIFIED)
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2  # written anew, with a checksum
    # the old content checksum is still checked under the opt-in: a damaged legacy file is refused
    state = legacy_state(run / "checkpoint.pt")
    state["step"] = 99
    torch.save(state, tmp_path / "old.pt")
    monkeypatch.setenv(ALLOW_UNVERIFIED, "1")
    with pytest.raises(FileRefusedError, match="content does not match the checksum"):
        load_checkpoint(tmp_path / "old.pt")


@pytest.mark.parametrize("kind", ["mimkit", "official"])
def test_the_removed_pickle_opt_in_changes_nothing(tmp_path, marker, monkeypatch, capsys, kind):
    """``MIMKIT_ALLOW_PICKLE=1`` once loaded such files with full unpickling; now the same file gets
    the same refusal with it set, and its payload never runs."""
    from mimkit.interop import read_verified
    from mimkit.weights import read_weights

    evil = (evil_checkpoint(tmp_path / "evil.pt", marker, checksum=True) if kind == "mimkit"
            else evil_official_mae(tmp_path / "mae.pth", marker))
    argv = ["export", evil, tmp_path / "e.safetensors"]

    def refusals() -> list[str]:
        out = []
        for load in (safe_load, read_verified, read_weights):
            with pytest.raises(FileRefusedError) as e:
                load(evil)
            out.append(str(e.value))
        return [*out, run_cli(argv, capsys)]

    without = refusals()
    for text in without:
        assert_refused(text, evil, "pathlib", NO_PICKLE)
    monkeypatch.setenv(ALLOW_PICKLE, "1")
    assert refusals() == without
    assert not marker.exists()  # also checked by the fixture
    assert "unpickl" not in capsys.readouterr().err.lower() and not (tmp_path / "e.safetensors").exists()


def test_nothing_in_src_unpickles_outside_the_restricted_unpicklers():
    """Every ``torch.load`` call in src/mimkit passes ``weights_only=True`` literally, nothing calls
    ``pickle.load``/``loads`` or a plain ``pickle.Unpickler``, and no code reads the removed opt-in."""
    import ast

    src = ROOT / "src" / "mimkit"
    offenders = []
    for path in src.rglob("*.py"):
        text = path.read_text()
        if ALLOW_PICKLE in text:
            offenders.append(f"{path.relative_to(src)}: mentions {ALLOW_PICKLE}")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            where = f"{path.relative_to(src)}:{node.lineno}: {func}"
            if func in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                offenders.append(where)
            elif func.endswith("torch.load"):
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(where + " without weights_only=True")
    assert not offenders, "\n".join(offenders)


def test_sharded_checkpoint_integrity_manifest(tmp_path, monkeypatch, capsys):
    d = ck.dcp_tmp_dir(tmp_path, 5)
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"m")
    (d / "__0_0.distcp").write_bytes(b"shard")
    final = ck.finalize_dcp(tmp_path, 5, {"step": 5}, keep=-1)
    state = ck.verify_dcp_dir(final)  # the manifest matches
    assert set(state["dcp_manifest"]["files"]) == {".metadata", "__0_0.distcp"}
    (final / "__1.metadata").write_bytes(b"x")  # a file the manifest does not list (DCP reads per-rank metadata)
    with pytest.raises(FileRefusedError, match=r"does not list \(__1.metadata\)"):
        ck.verify_dcp_dir(final)
    (final / "__1.metadata").unlink()
    (final / "__0_0.distcp").write_bytes(b"sharD")  # same size, other bytes
    with pytest.raises(FileRefusedError, match="__0_0.distcp does not match the digest"):
        ck.verify_dcp_dir(final)
    monkeypatch.setenv(ALLOW_UNVERIFIED, "1")  # a mismatch is refused whatever the opt-ins
    monkeypatch.setenv(ALLOW_PICKLE, "1")
    with pytest.raises(FileRefusedError, match="does not match"):
        ck.verify_dcp_dir(final)
    monkeypatch.delenv(ALLOW_UNVERIFIED)
    monkeypatch.delenv(ALLOW_PICKLE)
    ck.load_dcp_trainer_state(final)  # picking a directory checks only the sizes
    atomic_save({"step": 5}, final / "trainer.pt")  # an older mimkit's trainer.pt: no manifest
    with pytest.raises(FileRefusedError) as e:
        ck.verify_dcp_dir(final)
    assert_refused(str(e.value), final, ALLOW_UNVERIFIED)
    monkeypatch.setenv(ALLOW_UNVERIFIED, "1")
    assert ck.verify_dcp_dir(final)["step"] == 5
    assert "unverified" in capsys.readouterr().err


@needs_fmnist
def test_a_sharded_checkpoint_with_its_manifest_resumes_and_exports(tmp_path, fsdp_run, capsys):
    from mimkit.train import pretrain

    run = tmp_path / "run"
    step_dir = copy_run(fsdp_run, run)
    from mimkit.cli import main

    assert main(["export", str(step_dir), str(tmp_path / "e.safetensors")]) == 0
    capsys.readouterr()
    pretrain(cfg(run, "train.max_steps=2", "train.strategy=fsdp"))
    assert f"resumed from {step_dir} at step 1" in capsys.readouterr().err
    assert [s for s, _ in dcp_checkpoints(run)][-1] == 2
