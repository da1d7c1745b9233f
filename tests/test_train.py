import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_fmnist

from mimkit.config import load_config
from mimkit.train import NonFiniteLossError, Trainer, pretrain
from mimkit.train.checkpoint import CheckpointError, atomic_save, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2",
    "data.batch_size=64", "data.limit=512", "train.log_every_steps=1", "train.progress_bar=false",
    "train.tensorboard=false", "eval.knn_at_end=false", "eval.picture_at_end=false", "optim.warmup_epochs=1",
]

pytestmark = needs_fmnist


def tiny_cfg(out_dir, *extra):
    return load_config(ROOT / "configs/mae_fashion_mnist.yaml", [*TINY, f"train.out_dir={out_dir}", *extra])


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_pretraining_loss_falls(tmp_path):
    pretrain(tiny_cfg(tmp_path, "train.epochs=4", "data.augment=rrc_flip"))
    ls = losses(tmp_path)
    assert len(ls) == 32
    assert sum(ls[-4:]) / 4 < 0.8 * sum(ls[:4]) / 4
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 32 and "decoder.pred.weight" in state["model"] and state["config"]["train"]["epochs"] == 4
    assert (tmp_path / "config.yaml").is_file()


def test_resumed_run_continues_with_identical_losses(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain(tiny_cfg(full, "train.epochs=2", "data.augment=rrc_flip"))
    pretrain(tiny_cfg(part, "train.epochs=2", "data.augment=rrc_flip", "train.max_steps=5"))
    assert load_checkpoint(part / "checkpoint.pt")["step"] == 5
    result = pretrain(tiny_cfg(part, "train.epochs=2", "data.augment=rrc_flip"))
    assert result["step"] == 16
    assert losses(part) == losses(full)  # bit-identical
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def _knn_by_hand(enc, cfg, n_train: int, n_test: int) -> dict:
    """kNN top-1 (%) of ``enc`` as the trainer should measure it (``mimkit eval knn --limit-train n_train
    --limit-test n_test``'s images): a seeded random subset (seed 0) of ``n_train`` / ``n_test`` images of the
    Fashion-MNIST train / test split, scaled by the run's mean/std, DINO's vote (k = 20, T = 0.07) over the 10
    classes, for the cls token and the mean of the patch tokens."""
    from mimkit.data import load_fashion_mnist
    from mimkit.train.data import build_train_data
    from mimkit.train.distributed import DistInfo
    from tests.test_eval_trust import reference_knn

    data = build_train_data(cfg, DistInfo())
    m, s = data.mean[0], data.std[0]
    (xtr, ytr), (xte, yte) = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    itr = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))[:n_train].sort().values
    ite = torch.randperm(len(yte), generator=torch.Generator().manual_seed(0))[:n_test].sort().values
    with torch.no_grad():
        tr = enc.forward_features((xtr[itr].float() / 255 - m) / s)
        te = enc.forward_features((xte[ite].float() / 255 - m) / s)
    labels, test_labels = ytr[itr].numpy(), yte[ite].numpy()
    out = {}
    for pool, a, b in (("cls", tr[:, 0], te[:, 0]), ("mean", tr[:, 1:].mean(1), te[:, 1:].mean(1))):
        out[pool] = 100 * float((reference_knn(a, labels, b, 20, 0.07, 10).argmax(1) == test_labels).mean())
    return out


def test_periodic_knn_during_pretraining(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.epochs=2", "eval.knn_every_epochs=1", "eval.knn_train_limit=256",
                   "eval.knn_test_limit=128", "train.ckpt_every_steps=8", "train.keep_checkpoints=-1")
    result = pretrain(cfg)
    hist = result["knn_history"]
    assert [h["epoch"] for h in hist] == [1.0]
    assert (hist[0]["n_train"], hist[0]["n_test"], hist[0]["k"]) == (256, 128, 20)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [rec["knn_top1_cls"] for rec in logged if "knn_top1_cls" in rec] == [hist[0]["top1_cls"]]
    # the values by hand from the encoder saved at that step (epoch 1 = step 8)
    from mimkit.interop import load_encoder

    by_hand = _knn_by_hand(load_encoder(tmp_path / "checkpoint-00000008.pt"), cfg, 256, 128)
    assert hist[0]["top1_cls"] == pytest.approx(by_hand["cls"])
    assert hist[0]["top1_mean"] == pytest.approx(by_hand["mean"])
    assert hist[0]["top1_cls"] > 30.0  # far above the 10 % of chance: labels and images line up


def test_gradient_accumulation_matches_lr_scaling(tmp_path):
    cfg = tiny_cfg(tmp_path, "optim.accum_iter=2", "train.epochs=1", "optim.base_lr=1e-3")
    t = Trainer(cfg)
    assert t.eff_batch == 128 and abs(t.peak_lr - 1e-3 * 128 / 256) < 1e-15
    assert t.steps_per_epoch == 4 and t.total_steps == 4
    t.train()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4


def test_non_finite_losses_are_skipped_counted_and_stop_the_run(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.epochs=1", "train.max_nonfinite=1", "train.ckpt_every_steps=2")
    t = Trainer(cfg)
    real = t.train_model
    calls = {"n": 0}

    def poisoned(images, progress):
        out = real(images, progress)
        calls["n"] += 1
        if calls["n"] in (3, 5):
            out.loss = out.loss * float("nan")
        return out

    t.train_model = poisoned
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses.*last good checkpoint"):
        t.train()
    # step 2 (3rd forward) was skipped, step 3 trained, the periodic save at step 4 holds one skip;
    # the 2nd bad loss (step 4) exceeded max_nonfinite=1 and stopped the run without touching it
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and state["extra"]["nonfinite"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_checkpoint_errors_are_clear_and_never_lose_the_last_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)
    import mimkit.train.checkpoint as ck

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="disk full.*previous checkpoint is intact"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    cfg = tiny_cfg(tmp_path, "train.epochs=1")
    with pytest.raises(CheckpointError, match=str(path)):
        Trainer(cfg)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    # --standalone: torchrun's store on a free port (a fixed port held by anything else would leave both
    # ranks waiting until the timeout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mimkit.cli", "pretrain", str(ROOT / "configs/mae_fashion_mnist.yaml"), *TINY,
           "data.batch_size=32", "train.epochs=1", f"train.out_dir={out}", "eval.knn_at_end=true",
           "eval.knn_train_limit=256", "eval.knn_test_limit=128", "train.num_threads=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(out / "checkpoint.pt")
    # 512 images / (2 ranks x 32) = 8 steps per epoch; the effective batch is 64
    assert state["step"] == 8 and len(state["rng"]) == 2 and state["extra"]["world_size"] == 2
    assert len(losses(out)) == 8
    assert "kNN top-1" in proc.stdout


def test_cli_pretrain_visualize_export_eval(tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "mimkit.cli"]
    proc = subprocess.run([*base, "pretrain", str(ROOT / "configs/mae_fashion_mnist.yaml"), *TINY, "train.epochs=1",
                           f"train.out_dir={run}", "eval.knn_at_end=true", "eval.picture_at_end=true",
                           "eval.knn_train_limit=512", "eval.knn_test_limit=256"],
                          capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kNN top-1" in proc.stdout and (run / "reconstruction.png").stat().st_size > 1000
    knn = json.loads((run / "knn.json").read_text())
    assert (knn["n_train"], knn["n_test"]) == (512, 256)
    png = tmp_path / "v.png"
    proc = subprocess.run([*base, "visualize", str(run / "checkpoint.pt"), "--out", str(png), "--n", "3"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.stat().st_size > 1000
    views = tmp_path / "views.png"
    proc = subprocess.run([*base, "visualize", str(run / "checkpoint.pt"), "--kind", "views", "--out", str(views),
                           "--n", "2"], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0 and views.stat().st_size > 1000, proc.stderr[-3000:]
    # an MAE with random masking declares no salience picture: one-line error naming the kinds it draws
    proc = subprocess.run([*base, "visualize", str(run / "checkpoint.pt"), "--kind", "salience", "--out",
                           str(tmp_path / "s.png")], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2 and "reconstruction or --kind views" in proc.stderr and not (tmp_path / "s.png").exists()
    st = tmp_path / "enc.safetensors"
    proc = subprocess.run([*base, "export", str(run / "checkpoint.pt"), str(st)], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mimkit.interop import load_encoder

    enc = load_encoder(st)
    ck_enc = load_encoder(run / "checkpoint.pt")
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(enc.forward_features(x), ck_enc.forward_features(x))
    # the end-of-run kNN, by hand from the final encoder
    by_hand = _knn_by_hand(ck_enc, tiny_cfg(run, "train.epochs=1"), 512, 256)
    assert knn["top1_cls"] == pytest.approx(by_hand["cls"]) and knn["top1_mean"] == pytest.approx(by_hand["mean"])
    assert knn["top1_cls"] > 30.0  # far above the 10 % of chance: labels and images line up
    ev = tmp_path / "eval"
    proc = subprocess.run([*base, "eval", "knn", str(run / "checkpoint.pt"), "--limit-train", "512", "--limit-test",
                           "256", "--out", str(ev)], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((ev / "knn.json").read_text())
    # the same 512/256 images as the end-of-run kNN (eval's default batch and precision may move one image)
    assert res["metrics"]["knn20_cls"] == pytest.approx(knn["top1_cls"], abs=100 / 256 + 1e-9)
    assert res["metrics"]["knn20_mean"] == pytest.approx(knn["top1_mean"], abs=100 / 256 + 1e-9)
    assert (res["setup"]["n_train"], res["setup"]["n_test"]) == (512, 256) and (ev / "knn.md").is_file()
    proc = subprocess.run([*base, "pretrain", str(ROOT / "configs/mae_fashion_mnist.yaml"), "optim.base_lrr=1"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2 and "Did you mean 'base_lr'" in proc.stderr


def test_compile_auto_rule_and_values():
    """``train.compile``: auto compiles on a GPU for long runs only, never on CPU; true/false force it;
    anything else is a one-line config error."""
    from mimkit.config import ConfigError, load_config, validate
    from mimkit.train.precision import COMPILE_MIN_STEPS, resolve_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu, 10**6)[0] is False
    assert resolve_compile("auto", cuda, COMPILE_MIN_STEPS)[0] is True
    on, why = resolve_compile("auto", cuda, COMPILE_MIN_STEPS - 1)
    assert on is False and f"{COMPILE_MIN_STEPS - 1} steps left" in why
    assert resolve_compile(True, cpu, 1) == (True, "train.compile=true")
    assert resolve_compile(False, cuda, 10**6)[0] is False
    cfg = ROOT / "configs" / "mae_fashion_mnist.yaml"
    assert load_config(cfg).train.compile == "auto"
    assert load_config(cfg, ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match=r"train.compile.*is not one of auto, true, false"):
        validate(load_config(cfg, ["train.compile=sometimes"]), check_environment=False)


def test_compile_mode_values_and_cuda_graph_limits():
    """``train.compile_mode``: the four torch.compile modes; the CUDA-graph ones are refused in one line with
    micro-batches or several processes (unless compile is off, where the mode does nothing)."""
    from mimkit.config import ConfigError, load_config, validate

    cfg = ROOT / "configs" / "mae_fashion_mnist.yaml"
    assert load_config(cfg).train.compile_mode == "default"
    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        validate(load_config(cfg, [f"train.compile_mode={mode}"]), world_size=1, check_environment=False)
    with pytest.raises(ConfigError, match=r"train.compile_mode=fast.*is not one of default, reduce-overhead"):
        validate(load_config(cfg, ["train.compile_mode=fast"]), check_environment=False)
    with pytest.raises(ConfigError, match=r"reduce-overhead.*not tested with optim.accum_iter=2.*optim.accum_iter=1") as e:
        validate(load_config(cfg, ["train.compile_mode=reduce-overhead", "optim.accum_iter=2"]), world_size=1,
                 check_environment=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"max-autotune.*with 2 processes"):
        validate(load_config(cfg, ["train.compile_mode=max-autotune"]), world_size=2, check_environment=False)
    # no CUDA graphs: allowed with micro-batches and several processes
    validate(load_config(cfg, ["train.compile_mode=max-autotune-no-cudagraphs", "optim.accum_iter=2"]), world_size=2,
             check_environment=False)
    validate(load_config(cfg, ["train.compile_mode=reduce-overhead", "optim.accum_iter=2", "train.compile=false"]),
             world_size=2, check_environment=False)
    from mimkit.train.precision import compile_kwargs

    assert compile_kwargs("default") == {}
    assert compile_kwargs("max-autotune-no-cudagraphs") == {"mode": "max-autotune-no-cudagraphs"}
    opts = compile_kwargs("max-autotune")["options"]
    assert opts["max_autotune"] and opts["triton.cudagraphs"] and opts["triton.cudagraph_skip_dynamic_graphs"]
    for mode in ("reduce-overhead", "max-autotune"):  # torch checks the option names when it wraps the module
        torch.compile(torch.nn.Linear(2, 2), **compile_kwargs(mode))
    with pytest.raises(Exception, match="no_such_option"):
        torch.compile(torch.nn.Linear(2, 2), options={"no_such_option": True})


def test_cuda_graph_compile_mode_marks_every_step_and_keeps_the_losses(tmp_path, compile_spy):
    """``train.compile=true train.compile_mode=reduce-overhead``: torch.compile gets the mode, every step is
    marked as a new CUDA-graph iteration before its forward (so a replay may reuse the previous step's
    outputs), and the losses equal an eager run's (CPU: the eager backend stands in for inductor)."""
    modes, marks = compile_spy
    steps = ["train.max_steps=4", "train.epochs=1"]
    pretrain(tiny_cfg(tmp_path / "eager", *steps))
    assert modes == [] and marks == []
    pretrain(tiny_cfg(tmp_path / "graphs", *steps, "train.compile=true", "train.compile_mode=reduce-overhead"))
    # reduce-overhead's inductor options, and graphs with dynamic inputs left without CUDA graphs
    graphs = (None, {"triton.cudagraphs": True, "triton.cudagraph_skip_dynamic_graphs": True})
    assert modes == [graphs] and len(marks) == 4
    torch.testing.assert_close(losses(tmp_path / "graphs"), losses(tmp_path / "eager"), rtol=1e-5, atol=1e-6)
    marks.clear()
    pretrain(tiny_cfg(tmp_path / "default", *steps, "train.compile=true"))  # the default mode: no marks
    assert modes == [graphs, (None, None)] and marks == []
