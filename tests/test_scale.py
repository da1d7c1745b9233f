"""Scale-out on CPU with gloo: FSDP2 against DDP, DCP checkpoints across world sizes, strategy and
world-size errors, tar-shard streams (prepare, read, exact mid-epoch resume)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, needs_fmnist

from mimkit.config import ConfigError, load_config
from mimkit.train import Trainer
from mimkit.train.checkpoint import dcp_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_RUN


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*overrides: str, env: dict | None = None) -> None:
    """Two processes on this machine; ``--standalone`` puts torchrun's store on a free port (a fixed port
    held by anything else, another test suite included, would make both processes wait until timeout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests/scale_worker.py"), *TINY, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), **(env or {})}, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def cfg_for(out_dir, *extra):
    return load_config(ROOT / "configs/mae_fashion_mnist.yaml", [*TINY, f"train.out_dir={out_dir}", *extra])


@needs_fmnist
def test_fsdp_matches_ddp_and_dcp_resumes_on_another_world_size(tmp_path):
    """2-process FSDP2 (with activation checkpointing) = 2-process DDP to 1e-5 over two steps; its DCP
    checkpoint resumed on 1 process holds exactly the gathered 2-process state, and the 1-process
    continuation equals one started from that state by hand."""
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    every = ["train.ckpt_every_steps=1", "train.keep_checkpoints=-1"]
    _torchrun("train.strategy=fsdp", "train.activation_checkpointing=true", "data.batch_size=16",
              "train.max_steps=2", f"train.out_dir={fsdp}", *every, env={"MIMKIT_TEST_ASYNC_DCP": "1"})
    _torchrun("data.batch_size=16", "train.max_steps=2", f"train.out_dir={ddp}", *every)
    lf, ld = losses(fsdp), losses(ddp)
    assert len(lf) == len(ld) == 2
    assert lf == pytest.approx(ld, rel=1e-5, abs=1e-6)
    full = torch.load(fsdp / "full_state.pt", weights_only=True)
    ref = load_checkpoint(ddp / "checkpoint.pt")["model"]
    assert set(full["model"]) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(full["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # the consolidated export: timm-keyed safetensors of the encoder
    from safetensors.torch import load_file

    enc = load_file(fsdp / "encoder.safetensors")
    assert "blocks.0.attn.qkv.weight" in enc and "cls_token" in enc
    torch.testing.assert_close(enc["blocks.0.attn.qkv.weight"], full["model"]["encoder.blocks.0.attn.qkv.weight"])
    # step 1 was written asynchronously (training went on meanwhile) and holds step 1's weights
    assert [s for s, _ in dcp_checkpoints(fsdp)] == [1, 2]
    from mimkit.train.checkpoint import consolidate_dcp

    step1 = consolidate_dcp(dcp_checkpoints(fsdp)[0][1])
    ref1 = load_checkpoint(ddp / "checkpoint-00000001.pt")["model"]
    assert step1["step"] == 1
    for k, v in ref1.items():
        torch.testing.assert_close(step1["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(step1["model"]["encoder.blocks.0.attn.qkv.weight"], ref["encoder.blocks.0.attn.qkv.weight"])

    # resume the 2-process sharded run on 1 process (same global batch 32): exact state
    from torch.distributed.checkpoint.state_dict import get_state_dict

    t = Trainer(cfg_for(fsdp, "train.strategy=fsdp", "train.activation_checkpointing=true", "data.batch_size=32",
                        "train.max_steps=4"))
    assert t.step == 2
    model_sd, optim_sd = get_state_dict(t.model, t.optimizer)
    for k, v in full["model"].items():
        assert torch.equal(model_sd[k], v), k
    for fqn, st in full["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optim_sd["state"][fqn][name], st[name]), (fqn, name)
    t.train()
    resumed = losses(fsdp)[2:]
    assert len(resumed) == 2

    # the same continuation by hand: a fresh 1-process run given the gathered state
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from mimkit.train.loop import seed_everything

    by_hand = tmp_path / "by_hand"
    t2 = Trainer(cfg_for(by_hand, "train.activation_checkpointing=true", "data.batch_size=32", "train.max_steps=4"))
    set_state_dict(t2.model, t2.optimizer, model_state_dict=full["model"], optim_state_dict=full["optimizer"])
    t2.step = 2
    seed_everything(0 + 0 + 2)  # what a resume on another world size does (train.seed + rank + step)
    t2.train()
    assert losses(by_hand) == resumed

    # the 2-process DDP run resumes on 1 process too (single-file checkpoint, same global batch 32)
    t3 = Trainer(cfg_for(ddp, "data.batch_size=32", "train.max_steps=3"))
    assert t3.step == 2 and t3.resume_diff == {}
    t3.train()
    assert load_checkpoint(ddp / "checkpoint.pt")["extra"]["world_size"] == 1 and len(losses(ddp)) == 3


@needs_fmnist
def test_strategy_and_world_size_errors(tmp_path):
    from mimkit.train import pretrain

    pretrain(cfg_for(tmp_path, "data.batch_size=32", "train.max_steps=1"))  # a ddp checkpoint.pt
    with pytest.raises(ConfigError, match=r"train.strategy=ddp checkpoint .*set train.strategy=ddp to resume it"):
        Trainer(cfg_for(tmp_path, "data.batch_size=32", "train.max_steps=2", "train.strategy=fsdp"))
    assert (tmp_path / "checkpoint.pt").is_file()  # nothing was lost
    with pytest.raises(ConfigError, match=r"train.strategy") as e:
        Trainer(cfg_for(tmp_path, "train.strategy=zero3"))
    assert "is not one of ddp, fsdp" in str(e.value)
    fs = tmp_path / "fs"
    pretrain(cfg_for(fs, "data.batch_size=32", "train.max_steps=1", "train.strategy=fsdp"))
    assert [s for s, _ in dcp_checkpoints(fs)] == [1] and (fs / "encoder.safetensors").is_file()
    # `mimkit export` reads a DCP directory: the same timm-keyed encoder as the run's own export
    from safetensors.torch import load_file

    from mimkit.cli import main

    assert main(["export", str(dcp_checkpoints(fs)[0][1]), str(tmp_path / "e.safetensors")]) == 0
    a, b = load_file(tmp_path / "e.safetensors"), load_file(fs / "encoder.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(ConfigError, match=r"train.strategy=fsdp \(sharded DCP\) checkpoint .*set train.strategy=fsdp"):
        Trainer(cfg_for(fs, "data.batch_size=32", "train.max_steps=2"))
    # a different global batch is a changed optimisation: refused, with the way to keep it
    with pytest.raises(ConfigError, match=r"data.batch_size 32 -> 16"):
        Trainer(cfg_for(fs, "data.batch_size=16", "train.max_steps=2", "train.strategy=fsdp"))
    # a damaged newest directory falls back to the previous one; a damaged only one is a one-line error
    (dcp_checkpoints(fs)[0][1] / "trainer.pt").write_bytes(b"junk")
    from mimkit.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"trainer.pt is unreadable or corrupt"):
        Trainer(cfg_for(fs, "data.batch_size=32", "train.max_steps=2", "train.strategy=fsdp"))


def test_dcp_finalize_keeps_the_new_directory_after_a_resume_from_an_older_one(tmp_path):
    from mimkit.train.checkpoint import dcp_tmp_dir, finalize_dcp, remove_stale_dcp_dirs

    def write(step, final=True):
        d = dcp_tmp_dir(tmp_path, step)
        d.mkdir(parents=True)
        (d / ".metadata").write_bytes(b"m")
        if final:
            finalize_dcp(tmp_path, step, {"step": step}, keep=-1)
        return d

    write(50), write(100)
    (dcp_checkpoints(tmp_path)[-1][1] / "trainer.pt").write_bytes(b"junk")  # step 100 damaged: resumed from 50
    write(60, final=False)
    finalize_dcp(tmp_path, 60, {"step": 60}, keep=0)
    # the new checkpoint stays (not the damaged step 100, which resume=auto would go back to)
    assert [s for s, _ in dcp_checkpoints(tmp_path)] == [60]
    assert load_checkpoint(dcp_checkpoints(tmp_path)[0][1] / "trainer.pt")["step"] == 60
    write(70, final=False)
    finalize_dcp(tmp_path, 70, {"step": 70}, keep=1)
    assert [s for s, _ in dcp_checkpoints(tmp_path)] == [60, 70]
    # a writer killed between finalize_dcp's two renames of a step saved again: the old copy comes back
    final = dcp_checkpoints(tmp_path)[-1][1]
    final.rename(final.with_name(f".{final.name}.old-123"))
    write(70, final=False)
    remove_stale_dcp_dirs(tmp_path)
    assert [s for s, _ in dcp_checkpoints(tmp_path)] == [60, 70] and not dcp_tmp_dir(tmp_path, 70).exists()


# -- world-size change with the same global batch (DDP and FSDP) --------------------------------------


def test_strided_order_keeps_the_data_position_across_world_sizes():
    """After b batches on M ranks of B images, exactly the first b*B*M samples of the epoch's order were
    seen; N ranks of B*M/N images resume at batch b with exactly the rest (why a resume on another
    world size keeps its data position when the global batch is unchanged)."""
    from mimkit.data import InMemoryLoader

    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 2, 2).contiguous()

    def ids(loader, start=0, stop=None):
        out = []
        for i, (x, _) in enumerate(loader.iter_from(3, start)):
            if stop is not None and start + i >= stop:
                break
            out += (x[:, 0, 0, 0] * 255).round().long().tolist()
        return out

    kw = dict(mean=(0.0,), std=(1.0,), augment="none", seed=5)
    old = [InMemoryLoader(images, None, 4, rank=r, world_size=2, **kw) for r in range(2)]
    new = InMemoryLoader(images, None, 8, **kw)
    assert len(new) == len(old[0]) == 12
    seen = ids(old[0], 0, 5) + ids(old[1], 0, 5)
    rest = ids(new, 5)
    epoch = ids(new)
    assert sorted(seen) == sorted(epoch[:40]) and rest == epoch[40:]
    assert not set(seen) & set(rest) and len(seen) + len(rest) == 96


# -- tar shards ---------------------------------------------------------------------------------------


def _image_folder(root: Path, n: int = 48, size: int = 12, grey: bool = False) -> Path:
    """``n`` images in two classes; image ``i`` is filled with the value ``i`` (its identity)."""
    import numpy as np
    from PIL import Image

    for i in range(n):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        shape = (size, size + 2) if grey else (size, size + 2, 3)
        Image.fromarray(np.full(shape, i, np.uint8)).save(d / f"{i:03d}.png")
    return root


def _ids(batches) -> list[int]:
    return [v for x, _ in batches for v in (x[:, 0, 0, 0] * 255).round().long().tolist()]


def test_prepare_and_shard_stream_resumes_exactly(tmp_path):
    import tarfile

    from mimkit.cli import main
    from mimkit.data.shards import ShardLoader, is_shard_dir

    src = _image_folder(tmp_path / "src")
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(src), str(out), "--resize", "8", "--shard-size", "5", "--quiet"]) == 0
    assert is_shard_dir(out) and len(list(out.glob("shard-*.tar"))) == 10
    with tarfile.open(out / "shard-000000.tar") as tar:  # webdataset layout: <key>.npy + <key>.cls
        assert tar.getnames()[:4] == ["000000000.npy", "000000000.cls", "000000001.npy", "000000001.cls"]
    kw = dict(out_size=8, mean=(0.0,), std=(1.0,), augment="none", num_workers=0, shuffle_buffer=6, seed=3)
    ranks = [ShardLoader(out, 4, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5  # 5 shards of 5 per rank -> 25 samples -> 5 batches of 4
    for epoch in (0, 1):
        full = [_ids(ld.iter_from(epoch)) for ld in ranks]
        assert not set(full[0]) & set(full[1]) and all(len(f) == 20 for f in full)
        for r, ld in enumerate(ranks):
            for k in (1, 3):
                tail = _ids(ld.iter_from(epoch, k))
                assert tail == full[r][4 * k:]  # exactly the remaining samples, in the same order
    assert _ids(ranks[0].iter_from(0)) != _ids(ranks[0].iter_from(1))  # a new order every epoch
    # labels travel with the samples (class = image id parity)
    x, y = next(iter(ranks[0].iter_from(0)))
    assert ((x[:, 0, 0, 0] * 255).round().long() % 2).tolist() == y.tolist()

    # the original files (decoded and augmented per sample in a worker process) resume exactly too
    raw = tmp_path / "raw"
    assert main(["data", "prepare", str(src), str(raw), "--shard-size", "16", "--quiet"]) == 0
    ld = ShardLoader(raw, 4, out_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, num_workers=1, shuffle_buffer=8)
    try:
        full = list(ld.iter_from(2))
        tail = list(ld.iter_from(2, 4))
        assert len(full) == 12 and len(tail) == 8
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], tail))
    finally:
        ld.close()


def test_shard_errors_name_the_problem(tmp_path):
    from mimkit.data import DataError
    from mimkit.data.shards import ShardLoader, prepare_shards

    src = _image_folder(tmp_path / "src", n=12)
    out = tmp_path / "s"
    prepare_shards(src, out, shard_size=4, resize=6, progress=False)
    with pytest.raises(DataError, match="not an empty directory"):
        prepare_shards(src, out, shard_size=4, progress=False)
    kw = dict(out_size=6, mean=(0.0,), std=(1.0,), num_workers=0, augment="none")
    with pytest.raises(DataError, match=r"3 shard\(s\), fewer than the 4 processes.*--shard-size"):
        ShardLoader(out, 2, rank=0, world_size=4, **kw)
    # damage one sample's bytes (same size): a one-line DataError naming the shard, or skipped; shard 1
    # holds images 8, 10, 12, 14 (class0 files sort first), so image 10 stands in for the broken 8
    tar = out / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[512:600] = b"x" * 88  # the first member's data (.npy header)
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"corrupt sample in shard .*shard-000001.tar sample 0.*data.skip_corrupt"):
        for _ in ShardLoader(out, 2, shuffle=False, **kw):
            pass
    ld = ShardLoader(out, 2, shuffle=False, skip_corrupt=True, **kw)
    ids = _ids(ld)
    assert len(ids) == 12 and ids[4] == ids[5] == 10 and list(ld.skipped) == [f"{tar}#0"]
    tar.write_bytes(bytes(data[:-1024]))  # truncated
    with pytest.raises(DataError, match=r"shard-000001.tar has \d+ bytes, \d+ were written"):
        ShardLoader(out, 2, **kw)
    tar.unlink()
    with pytest.raises(DataError, match=r"shard .*shard-000001.tar is missing"):
        ShardLoader(out, 2, **kw)


@needs_fmnist
def test_pretraining_on_shards_resumes_mid_epoch_exactly(tmp_path):
    """A run stopped mid-epoch on a shard stream and resumed reproduces the uninterrupted losses."""
    from mimkit.data.shards import prepare_shards
    from mimkit.train import pretrain

    src = _image_folder(tmp_path / "src", n=64, size=28, grey=True)
    shards = tmp_path / "shards"
    prepare_shards(src, shards, shard_size=8, resize=28, mode="L", progress=False)
    common = [f"data.dataset={shards}", "data.in_memory=false", "data.num_workers=0", "data.batch_size=8",
              "data.limit=null", "data.shuffle_buffer=16", "train.ckpt_every_steps=100"]
    with pytest.raises(ConfigError, match="is a shard directory .*set data.in_memory=false"):
        Trainer(cfg_for(tmp_path / "x", *common[:1]))
    pretrain(cfg_for(tmp_path / "a", *common, "train.max_steps=6"))
    pretrain(cfg_for(tmp_path / "b", *common, "train.max_steps=3"))
    pretrain(cfg_for(tmp_path / "b", *common, "train.max_steps=6"))
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == 6 and la == lb


@needs_fmnist
def test_two_node_rendezvous_on_shards(tmp_path):
    """Two torchrun launchers (as on two machines: --nnodes 2, c10d rendezvous) train one run on a
    shard stream; the shards are dealt out to the two ranks."""
    from mimkit.data.shards import prepare_shards

    src = _image_folder(tmp_path / "src", n=64, size=28, grey=True)
    shards = tmp_path / "shards"
    prepare_shards(src, shards, shard_size=8, resize=28, mode="L", progress=False)
    out = tmp_path / "run"
    # The rendezvous store is hosted here, on a free port, and both launchers join it as clients
    # (is_host=0): on two real machines it is one launcher's, and the launcher that hosts it may exit while
    # the other is still leaving the rendezvous. Hosting it here keeps it up until both have left, so
    # each launcher's own exit status can be required to be 0.
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = []
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{store.port}", "--rdzv_id", "mimkit-test",
               "--rdzv_conf", "is_host=0",
               str(ROOT / "tests/scale_worker.py"), *TINY, f"data.dataset={shards}", "data.in_memory=false",
               "data.num_workers=0", "data.batch_size=8", "data.limit=null", "train.max_steps=3",
               f"train.out_dir={out}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                      cwd=ROOT))
    try:
        errs = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        del store
    for err, rc in errs:
        assert rc == 0, err[-3000:]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 3 and state["extra"]["world_size"] == 2 and len(state["rng"]) == 2
    assert len(losses(out)) == 3


@needs_fmnist
@pytest.mark.parametrize("mode", ["owned", "caller", "global"])
def test_trainer_tears_down_its_process_groups(mode, tmp_path):
    """The trainer ends the process groups it made, in order, on close(); a group the caller started
    is left working; a trainer kept alive as a module global is closed at interpreter exit. Each
    launcher must exit 0 (a rank aborting at shutdown makes torchrun exit 1)."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests/teardown_worker.py"), mode, str(report), *TINY, "data.batch_size=16",
           "train.max_steps=2", f"train.out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(report.read_text())
    # at interpreter exit (after mimkit's exit handler) no group is left: the careless script's trainer
    # was closed by mimkit, the others by close() or the caller
    assert seen["initialized_at_exit"] is False
    if mode == "global":
        assert seen["step"] == 2
        return
    assert seen["groups_made"] == 1 and seen["works_after_train"] is True
    assert "finished its run" in seen["second_train"]
    assert seen["initialized_after_close"] is (mode == "caller")
    assert seen["trainer_groups_after_close"] == 0 and seen["train_model_after_close"] is False
    assert "was closed" in seen["train_after_close"] and "was closed" in seen["save_after_close"]
    if mode == "caller":
        assert seen["caller_group_works"] is True


# -- activation checkpointing for every method -------------------------------------------------------


def _method_cases():
    from mimkit.methods import METHODS

    return list(METHODS)


@pytest.mark.parametrize("name", _method_cases())
def test_activation_checkpointing_keeps_every_method_exact(name, tmp_path):
    """Wrapping every block in a non-reentrant checkpoint recomputes the same activations: the loss
    and every gradient equal the unwrapped model's, and the state-dict keys do not change."""
    import copy

    from mimkit.interop import export_encoder
    from mimkit.methods import Progress
    from mimkit.nn import ViTConfig, ViTEncoder
    from mimkit.train.fsdp import apply_activation_checkpointing
    from mimkit.train.loop import build_method

    over = [*TINY, "model.decoder.embed_dim=32", "data.batch_size=4"]
    if name == "cae_v2":
        torch.manual_seed(1)
        enc = ViTEncoder(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2))
        over.append(f"method.teacher_path={export_encoder(enc, tmp_path / 't.safetensors')}")
    cfg = load_config(ROOT / "configs" / f"{name}_fashion_mnist.yaml", over)
    torch.manual_seed(0)
    plain = build_method(cfg)
    wrapped = copy.deepcopy(plain)
    n = apply_activation_checkpointing(wrapped)
    assert n >= cfg.model.encoder.depth
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    images = torch.randn(4, 1, 28, 28)
    prog = Progress(3, 100, 0.03, 1.0)
    out = []
    for m in (plain, wrapped):
        m.train()
        torch.manual_seed(7)
        loss = m(images, prog).loss
        loss.backward()
        out.append((loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    assert torch.equal(out[0][0], out[1][0])
    g0, g1 = out[0][1], {k.replace("._checkpoint_wrapped_module", ""): v for k, v in out[1][1].items()}
    assert set(g0) == set(g1) and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7, msg=k)


@needs_fmnist
def test_sharded_checkpoint_on_a_stop_signal_resumes_exactly(tmp_path):
    """train.strategy=fsdp: SIGUSR1 mid-run writes a DCP checkpoint at the step boundary and stops;
    rerunning resumes to the uninterrupted run's losses (the requeue path of the SLURM example)."""
    import signal

    from mimkit.train import pretrain
    from mimkit.train.loop import TrainingInterrupted

    common = ["train.strategy=fsdp", "data.batch_size=32", "train.max_steps=6", "train.ckpt_every_steps=2"]
    pretrain(cfg_for(tmp_path / "ref", *common))
    out = tmp_path / "run"
    t = Trainer(cfg_for(out, *common))
    real, calls = t.train_model, {"n": 0}

    def wrapped(images, progress):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(images, progress)

    t.train_model = wrapped
    with pytest.raises(TrainingInterrupted, match="stopped by SIGUSR1 at step 3") as e:
        t.train()
    assert e.value.checkpoint == out / "dcp" / "step-00000003"
    assert [s for s, _ in dcp_checkpoints(out)] == [3]  # step 2's directory was replaced (keep_checkpoints=0)
    pretrain(cfg_for(out, *common))
    assert losses(out) == losses(tmp_path / "ref")
