"""The fast path of the training step, checked on CPU: no host reads between log steps, exact skipping
of non-finite steps without them, compiled steps equal to eager ones without per-step recompiles.
Speed itself is measured by ``mimkit bench`` / ``benchmarks/``, never asserted here."""

import json
from pathlib import Path

import pytest
import torch
from conftest import needs_fmnist

from mimkit.config import load_config
from mimkit.methods import Progress
from mimkit.train import NonFiniteLossError, Trainer
from mimkit.train.checkpoint import load_checkpoint
from mimkit.train.loop import build_method
from mimkit.train.step import AfterStepGuard, NonFiniteTracker, count_host_reads

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2",
]
RUN = [
    *TINY, "data.batch_size=32", "data.limit=384", "train.num_threads=1", "train.progress_bar=false", "train.tensorboard=false",
    "eval.knn_at_end=false", "eval.picture_at_end=false", "optim.warmup_epochs=1", "train.ckpt_every_steps=1000",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (a second one mostly waits); restored afterwards, since the
    trainer's train.num_threads sets the process-wide count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg_for(preset, out_dir, *extra):
    return load_config(ROOT / "configs" / f"{preset}.yaml", [*RUN, f"train.out_dir={out_dir}", *extra])


def records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def reads_per_step(trainer):
    """Run ``trainer`` and return the host reads made during each step (forward k to forward k+1)."""
    real = trainer.train_model
    marks = []

    with count_host_reads() as counts:
        def wrapped(images, progress):
            marks.append(sum(counts.values()))
            return real(images, progress)

        trainer.train_model = wrapped
        trainer.train()
        marks.append(sum(counts.values()))  # includes the final save: only the last step's delta sees it
    return [b - a for a, b in zip(marks, marks[1:])]


@needs_fmnist
@pytest.mark.parametrize("preset", ["mae_fashion_mnist", "latent_mim_fashion_mnist", "emae_fashion_mnist",
                                    "mixedae_fashion_mnist", "pcae_fashion_mnist"])
def test_no_host_reads_between_log_steps(tmp_path, preset):
    """A step reads nothing back from the device between log steps (EMAE and MixedAE: their view tables
    are built on the host and copied without a sync, EMAE's loss is told whether its views overlap
    equally). Not covered: CAE's block masking (its rejection loop checks for completion every
    ``check_every`` rounds) and SBAM's adaptive phase (its visible count sets the shapes)."""
    t = Trainer(cfg_for(preset, tmp_path, "train.max_steps=8", "train.log_every_steps=4"))
    assert t.optimizer.defaults["fused"]  # the default on CPU too
    per_step = reads_per_step(t)
    assert len(per_step) == 8
    # steps 0-2 and 4-6 read nothing; step 3 (a log step) reads the logged values, so the shim counts
    assert per_step[:3] == [0, 0, 0] and per_step[4:7] == [0, 0, 0], per_step
    assert per_step[3] > 0
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [4, 8]


@needs_fmnist
def test_unfused_optimizer_reads_the_flag_every_step(tmp_path):
    # the documented synchronous path (also fp16 with a grad scaler): the shim sees it, so it can fail
    t = Trainer(cfg_for("mae_fashion_mnist", tmp_path, "train.max_steps=4", "train.log_every_steps=4",
                        "optim.fused=false"))
    per_step = reads_per_step(t)
    assert all(n > 0 for n in per_step[:3])


def _poison_and_watch(trainer, bad_calls):
    """NaN loss on the listed (1-based) forward calls. Returns ``snaps``: ``{call: [state before its
    optimizer step, state at the start of the next forward]}`` (parameters, method tensors such as the EMA
    teacher, AdamW moments and step counts); the second entry is taken after ``after_step`` and its guard."""
    real = trainer.train_model
    n = {"calls": 0}
    snaps: dict = {}

    def state():
        return ({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                [t.clone() for s in trainer.optimizer.state.values() for t in s.values()])

    def wrapped(images, progress):
        if n["calls"] in snaps:
            snaps[n["calls"]].append(state())
        n["calls"] += 1
        out = real(images, progress)
        if n["calls"] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    step = trainer.optimizer.step

    def watched_step(*a, **k):
        snaps[n["calls"]] = [state()]
        return step(*a, **k)

    trainer.train_model = wrapped
    trainer.optimizer.step = watched_step
    return snaps


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0].values(), b[0].values())) and all(
        torch.equal(x, y) for x, y in zip(a[1], b[1]))


@needs_fmnist
@pytest.mark.parametrize("preset", ["mae_fashion_mnist", "latent_mim_fashion_mnist"])
def test_skipped_step_changes_nothing_and_is_counted_at_the_log_step(tmp_path, preset):
    t = Trainer(cfg_for(preset, tmp_path, "train.max_steps=4", "train.log_every_steps=4",
                        "train.max_nonfinite_fraction=1"))
    snaps = _poison_and_watch(t, {2})  # step 1
    result = t.train()
    # the skipped step left parameters, EMA teacher (Latent MIM) and AdamW moments/step counts unchanged
    assert _equal(snaps[2][0], snaps[2][1])
    assert not _equal(snaps[3][0], snaps[3][1])  # a good step does change them
    recs = records(tmp_path)
    assert [r["step"] for r in recs if r.get("event") == "nonfinite_skip"] == [2]
    assert result["nonfinite"] == 1 and load_checkpoint(tmp_path / "checkpoint.pt")["extra"]["nonfinite"] == 1
    assert [(r["step"], r["nonfinite"]) for r in recs if "loss" in r] == [(4, 1)]


@needs_fmnist
@pytest.mark.parametrize("fused", ["true", "false"])
def test_too_many_nonfinite_steps_stop_at_the_next_read(tmp_path, fused):
    t = Trainer(cfg_for("mae_fashion_mnist", tmp_path, "train.max_steps=12", "train.log_every_steps=4",
                        "train.max_nonfinite=1", f"optim.fused={fused}"))
    snaps = _poison_and_watch(t, {2, 3})
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses .last at step 2.*train.max_nonfinite=1"):
        t.train()
    recs = records(tmp_path)
    assert recs[-1]["event"] == "failed" and recs[-1]["step"] == 3
    # the synchronous path stops at once (1 step done), the sync-free one at the log step (4 done)
    assert len(snaps) == (1 if fused == "false" else 4)


@needs_fmnist
def test_periodic_checkpoint_reads_the_pending_flags_first(tmp_path):
    t = Trainer(cfg_for("mae_fashion_mnist", tmp_path, "train.max_steps=6", "train.log_every_steps=100",
                        "train.ckpt_every_steps=3", "train.max_nonfinite_fraction=1"))
    _poison_and_watch(t, {2})
    t.train()
    # the checkpoint at step 3 was written between log steps and still holds the skip
    assert [r["step"] for r in records(tmp_path) if r.get("event") == "nonfinite_skip"] == [2]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["extra"]["nonfinite"] == 1


@needs_fmnist
def test_grad_scaler_path_skips_a_nonfinite_step_and_backs_the_scale_off(tmp_path):
    # fp16 runs use a GradScaler (the synchronous path); a CPU scaler stands in for the CUDA one
    t = Trainer(cfg_for("mae_fashion_mnist", tmp_path, "train.max_steps=3", "train.log_every_steps=100",
                        "train.max_nonfinite_fraction=1"))
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    snaps = _poison_and_watch(t, {2})
    result = t.train()
    assert result["nonfinite"] == 1 and 2 not in snaps  # no optimizer step for the skipped one
    assert t.scaler.get_scale() == 2.0**9  # backed off once, as for an overflow GradScaler finds itself
    assert load_checkpoint(tmp_path / "checkpoint.pt")["scaler"]["scale"] == 2.0**9


def test_tracker_and_guard_units():
    tr = NonFiniteTracker(3, torch.device("cpu"))
    for s, v in enumerate([0.0, 1.0, 0.0]):
        tr.record(s, torch.tensor(v), lr=0.1 * s)
    with pytest.raises(RuntimeError, match="full"):
        tr.record(3, torch.tensor(0.0), 0.0)
    assert tr.read() == [(1, 0.1)] and len(tr) == 0 and tr.read() == []

    cfg = load_config(ROOT / "configs/latent_mim_fashion_mnist.yaml", TINY)
    m = build_method(cfg)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], fused=True)
    guard = AfterStepGuard(m, opt)
    assert guard.active and guard.tensors  # the EMA branch
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(1.0)  # online weights move away from the teacher: an EMA step changes it
    before = [t.clone() for t in guard.tensors]
    prog = Progress(1, 10, 0.1, 1.0)
    guard(prog, torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, guard.tensors))
    guard(prog, torch.tensor(0.0))
    assert not all(torch.equal(a, b) for a, b in zip(before, guard.tensors))
    mae = build_method(load_config(ROOT / "configs/mae_fashion_mnist.yaml", TINY))
    assert not AfterStepGuard(mae, torch.optim.AdamW(mae.parameters())).active  # no after_step: no copies


# ------------------------------------------------------------------------------------------------
# torch.compile. CI compiles with backend="aot_eager" (AOTAutograd traces forward and backward, as
# inductor's input; no C++ code generation, which takes minutes on 2 cores); the inductor path itself
# is exercised by `mimkit bench` on the GPU suite.


def _images(cfg, n=8, seed=0):
    enc = cfg.model.encoder
    return torch.randn(n, enc.in_chans, enc.img_size, enc.img_size, generator=torch.Generator().manual_seed(seed))


def test_compiled_step_equals_eager():
    cfg = load_config(ROOT / "configs/mae_fashion_mnist.yaml", TINY)
    torch.manual_seed(0)
    eager = build_method(cfg)
    compiled_model = build_method(cfg)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = _images(cfg)
    prog = Progress(0, 10, 0.0, 1.0)  # a changing Progress recompiles once (test below); not needed here
    for step in range(2):
        losses, grads = [], []
        for model, run in ((eager, eager), (compiled_model, compiled)):
            model.zero_grad()
            out = run(x, prog, generator=torch.Generator().manual_seed(step))
            out.loss.backward()
            losses.append(out.loss.detach())
            grads.append([p.grad for p in model.parameters() if p.grad is not None])
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        assert len(grads[0]) == len(grads[1])
        for a, b in zip(grads[0], grads[1]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset", ["sbam_fashion_mnist", "emae_fashion_mnist", "latent_mim_fashion_mnist",
                                    "pcae_fashion_mnist", "mae_fashion_mnist", "cae_fashion_mnist",
                                    "mixedae_fashion_mnist"])
def test_compile_does_not_recompile_every_step(preset):
    """Variable shapes (SBAM's adaptive lengths, EMAE's views, Latent MIM's target/visible sizes), the
    changing Progress and PCAE's FLOP counts (counted once outside the graph, then looked up) settle
    after a few graphs; later steps reuse them (counted with a backend that records each graph it is
    given and runs it eagerly). The recompile limit is raised so that a frame recompiled every step keeps
    adding graphs instead of falling back to eager at torch's limit (8), which would look settled."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", [*TINY, "model.encoder.depth=1"])
    torch.manual_seed(0)
    model = build_method(cfg)
    model.train()
    run = torch.compile(model, backend=counting_backend)  # as the trainer compiles (automatic dynamic)
    total = 10
    seen = []
    with torch._dynamo.config.patch(recompile_limit=64):
        for step in range(total):
            # progress through the run, so schedules (SBAM's random-masking phase) switch on the way
            prog = Progress(step, total, step / total, 1.0)
            out = run(_images(cfg, seed=step), prog)  # as the trainer calls it (no generator: torch's RNG)
            out.loss.backward()
            seen.append(len(graphs))
    settled = seen[-4:]
    assert settled[0] == settled[-1], f"{preset} compiled new graphs late in the run: {seen}"
    # graphs in all (graph breaks split a step; recompiles add versions): MAE, EMAE and MixedAE trace
    # their whole step as one graph (EMAE's and MixedAE's index tables come from host values, not from
    # data-dependent ops); Latent MIM and PCAE recompile once for the step they read, PCAE also once
    # after counting its teacher FLOPs; CAE's block-masking loop and SBAM's adaptive lengths break
    most = {"mae_fashion_mnist": 1, "emae_fashion_mnist": 1, "mixedae_fashion_mnist": 1,
            "latent_mim_fashion_mnist": 2, "pcae_fashion_mnist": 4, "cae_fashion_mnist": 5, "sbam_fashion_mnist": 11}
    assert seen[-1] <= most[preset], f"{preset}: {seen[-1]} graphs, expected at most {most[preset]}: {seen}"
    torch._dynamo.reset()


def test_bench_refuses_unknown_methods_in_one_line(capsys):
    from mimkit.cli import main

    assert main(["bench", "--smoke", "--methods", "mae,maee"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--methods: unknown maee; choose from mae,emae" in err


def test_bench_without_fashion_mnist_notes_the_row_instead_of_failing(monkeypatch):
    import mimkit.data.fashion_mnist as fm
    from mimkit.bench import Plan, fmnist_row
    from mimkit.errors import DataError

    def missing(root=None):
        raise DataError("Fashion-MNIST not found")

    monkeypatch.setattr(fm, "find_fashion_mnist", missing)
    plan = Plan(device=torch.device("cpu"), smoke=True, batch=8, steps=2, warmup=1, precision="fp32", compile=False,
                methods=("mae",), jpegs=8, jpeg_dir=None, workers=0, fmnist_batch=16, budget_s=None, peer=False,
                out=None)
    assert fmnist_row(plan, None) is None
    assert plan.notes == [n for n in plan.notes if "Fashion-MNIST row skipped: the data set is not installed" in n] != []


@needs_fmnist
def test_gpu_suite_smoke_runs_every_row_on_cpu(tmp_path):
    """`bash benchmarks/gpu_suite.sh --smoke` (what CI runs): every row of the GPU suite at tiny shapes,
    a JSON file and the same markdown table; every method, the Hugging Face peer and both folder input
    paths have a positive throughput, and no row failed."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path / "bench"), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(root / "benchmarks/gpu_suite.sh"), "--smoke"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert not [r for r in data["rows"] if r["kind"] == "error"]
    from mimkit.methods import METHODS

    for m in METHODS:
        assert any(n.startswith(f"{m} (model only") and rows[n]["img_per_s"] > 0 for n in rows), m
    assert any("ViTMAEForPreTraining" in n and rows[n]["img_per_s"] > 0 for n in rows)
    assert any("shards" in n and rows[n]["img_per_s"] > 0 for n in rows)
    assert any("PIL workers" in n and rows[n]["img_per_s"] > 0 for n in rows)
    assert any("Fashion-MNIST" in n and rows[n]["img_per_s"] > 0 for n in rows)
    assert (tmp_path / "bench" / "bench.md").read_text().strip() in res.stdout


@needs_fmnist
def test_nonfinite_gradients_of_a_finite_loss_skip_the_step(tmp_path):
    """A finite loss whose backward overflows (here: the gradient of sqrt at 0, times 0 = NaN in every
    gradient) is skipped like a non-finite loss on the sync-free path: nothing changes, it is counted."""
    t = Trainer(cfg_for("mae_fashion_mnist", tmp_path, "train.max_steps=4", "train.log_every_steps=4",
                        "train.max_nonfinite_fraction=1"))
    real = t.train_model
    calls = {"n": 0}

    def wrapped(images, progress):
        calls["n"] += 1
        out = real(images, progress)
        if calls["n"] == 2:
            out.loss = out.loss + torch.sqrt(out.loss * 0)  # forward: + sqrt(0) = 0; backward: inf * 0 = NaN
            assert torch.isfinite(out.loss)
        return out

    t.train_model = wrapped
    before = {}
    step = t.optimizer.step

    def watched_step(*a, **k):
        before[calls["n"]] = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
        r = step(*a, **k)
        after = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
        before[calls["n"]] = all(torch.equal(before[calls["n"]][k], after[k]) for k in after)
        return r

    t.optimizer.step = watched_step
    result = t.train()
    assert before[2] is True and before[3] is False  # the poisoned step changed nothing, the next one did
    assert result["nonfinite"] == 1
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_bench_runs_every_eager_method_row_before_the_compiled_end_to_end_rows(monkeypatch):
    """With compilation on (the GPU default) the eager row of every method, seconds each, comes right
    after the peer and before the end-to-end rows, whose compilations (30-80 s each on an H200) used up
    a 240 s budget before any eager row in the earlier order; a budget that stops after N rows keeps
    the first N of this order."""
    import mimkit.bench as bench

    order = []

    def model_row(plan, name, ceiling, compiled):
        order.append(f"model {name} {'compiled' if compiled else 'eager'}")
        return {"kind": "model", "name": name, "img_per_s": 1.0, "gflop_per_img": 1.0, "method": name,
                "mode": "compiled" if compiled else "eager"}

    def thunk(label):
        def go(*a, **k):
            order.append(label)
            return {"kind": "e2e", "name": label, "img_per_s": 1.0}
        return go

    monkeypatch.setattr(bench, "model_row", model_row)
    monkeypatch.setattr(bench, "matmul_ceiling", lambda *a, **k: 1e12)
    monkeypatch.setattr(bench, "hf_peer_row", thunk("peer"))
    monkeypatch.setattr(bench, "fmnist_row", thunk("fmnist"))
    monkeypatch.setattr(bench, "e2e_rows", lambda plan, c, f: [("e2e shards", thunk("e2e shards")),
                                                                ("e2e pil", thunk("e2e pil"))])
    methods = bench.method_names()
    plan = bench.Plan(device=torch.device("cpu"), smoke=True, batch=2, steps=1, warmup=0, precision="fp32",
                      compile=True, methods=methods, jpegs=1, jpeg_dir=None, workers=0, fmnist_batch=2,
                      budget_s=None, peer=True, out=None)
    result = bench.run(plan)
    others = [m for m in methods if m != "mae"]
    assert order == ["model mae compiled", "peer", *[f"model {m} eager" for m in methods], "e2e shards",
                     "e2e pil", "fmnist", *[f"model {m} compiled" for m in others]]
    assert not result["skipped"]
    # every method's FLOP ratio is there from the eager rows
    assert all(f"{m} (eager): FLOP-predicted img/s / measured" in result["ratios"] for m in others)

    # a budget that runs out after 3 + len(methods) rows keeps exactly the first ones of this order
    full, order[:] = list(order), []
    calls = {"n": 0}

    def left(self):
        calls["n"] += 1
        return 1.0 if calls["n"] <= 3 + len(methods) else 0.0

    monkeypatch.setattr(bench.Plan, "left", left)
    plan = bench.Plan(device=torch.device("cpu"), smoke=True, batch=2, steps=1, warmup=0, precision="fp32",
                      compile=True, methods=methods, jpegs=1, jpeg_dir=None, workers=0, fmnist_batch=2,
                      budget_s=1.0, peer=True, out=None)
    result = bench.run(plan)
    kept = 2 + len(methods)  # the ceiling row calls no thunk: mae compiled, peer, every eager row
    assert order == full[:kept]
    assert result["skipped"][0] == "e2e shards" and len(result["skipped"]) == len(full) - kept

    # eager only (--no-compile): every method's row before the end-to-end rows; --no-e2e: no trainer rows
    monkeypatch.setattr(bench.Plan, "left", lambda self: 1.0)
    for e2e in (True, False):
        order[:] = []
        plan = bench.Plan(device=torch.device("cpu"), smoke=True, batch=2, steps=1, warmup=0, precision="fp32",
                          compile=False, methods=methods, jpegs=1, jpeg_dir=None, workers=0, fmnist_batch=2,
                          budget_s=None, peer=True, out=None, e2e=e2e)
        result = bench.run(plan)
        rows = ["model mae eager", "peer", *[f"model {m} eager" for m in others]]
        assert order == rows + (["e2e shards", "e2e pil", "fmnist"] if e2e else [])
        assert all(f"{m} (eager): FLOP-predicted img/s / measured" in result["ratios"] for m in others)


def test_bench_compile_mode_reaches_compiled_rows_and_marks_their_steps(compile_spy):
    """``mimkit bench --compile-mode reduce-overhead``: the compiled rows get the mode and mark every step
    (warm-up included) as a new CUDA-graph iteration, as the trainer does; eager rows mark nothing; the
    table's first line names the mode. CPU: the eager backend stands in for inductor."""
    from mimkit import bench

    modes, marks = compile_spy
    plan = bench.Plan(device=torch.device("cpu"), smoke=True, batch=2, steps=2, warmup=1, precision="fp32",
                      compile=True, methods=("mae",), jpegs=1, jpeg_dir=None, workers=0, fmnist_batch=2,
                      budget_s=None, peer=False, out=None, compile_mode="reduce-overhead")
    row = bench.model_row(plan, "mae", None, True)
    graphs = (None, {"triton.cudagraphs": True, "triton.cudagraph_skip_dynamic_graphs": True})
    assert row["img_per_s"] > 0 and modes == [graphs] and len(marks) == 3
    bench.model_row(plan, "mae", None, False)
    assert modes == [graphs] and len(marks) == 3
    plan.compile_mode = "max-autotune-no-cudagraphs"  # compiled, but no graphs: no marks
    bench.model_row(plan, "mae", None, True)
    assert modes == [graphs, ("max-autotune-no-cudagraphs", None)] and len(marks) == 3
    env = {"device": "cpu", "device_name": "x", "torch": "t", "precision": "fp32", "compile": True,
           "compile_mode": "reduce-overhead", "batch": 2, "smoke": True}
    head = bench.markdown({"env": env, "rows": [], "skipped": [], "notes": [], "wall_s": 1.0}).splitlines()[0]
    assert "compile True (reduce-overhead), batch 2" in head


def test_profile_tools_categorize_kernels_and_split_flops(monkeypatch):
    """benchmarks/_common.py's kernel categories on kernel names of the H200 profile (cuDNN attention before
    matmul: its names carry "wgmma"; fused layer norms before other Triton kernels), a CPU profile's
    per-step numbers without the annotations, and profile_step.split_flops adding up to count_flops."""
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("_common", None)
    from _common import kernel_category, kernel_profile
    from profile_step import split_flops

    from mimkit.flops import count_flops

    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64") == "attention"
    assert kernel_category("nvjet_sm90_tst_64x64_64x13_1x2_h_bz_splitK_NTT") == "matmul"
    assert kernel_category("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>") == "matmul"
    assert kernel_category("triton_per_fused__to_copy_add_native_layer_norm_backward_view_36") == "layer norm"
    assert kernel_category("triton_poi_fused_gelu_gelu_backward_view_33") == "fused element-wise (triton)"
    assert kernel_category("triton_tem_fused_mm_4") == "matmul"  # max-autotune's GEMM templates
    assert kernel_category("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<Adam>") \
        == "optimizer / grad norm"
    assert kernel_category("Memcpy HtoD (Pageable -> Device)") == "copy / fill"
    assert kernel_category("aten::gelu") == "other" and kernel_category("aten::bmm") == "attention"

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with torch.profiler.record_function("ProfilerStep#0"), torch.profiler.record_function("Optimizer.step#X"):
                (a @ b).relu()
    kp = kernel_profile(prof, 3, cuda=False)
    assert set(kp["by_category_ms_per_step"]) == {"matmul", "other"}
    assert kp["aten_ops_per_step"] >= 2 and kp["kernel_ms_per_step"] > 0
    assert abs(sum(kp["by_category_ms_per_step"].values()) - kp["kernel_ms_per_step"]) < 1e-3
    assert not any(t.startswith(("ProfilerStep", "Optimizer")) for t in kp["top (name, calls/step, ms/step, category)"])

    cfg = load_config(ROOT / "configs/mae_fashion_mnist.yaml", TINY)
    model = build_method(cfg)
    x = _images(cfg, n=4)

    def fwd_bwd():
        model(x, Progress(0, 10, 0.0, 1.0), generator=torch.Generator().manual_seed(0)).loss.backward()

    split = split_flops(fwd_bwd)  # attention: SDPA or, on this CPU path, the explicit batched products
    assert min(split["matmul"], split["attention"], split["convolution"]) > 0 and split["other"] == 0
    assert sum(split.values()) == count_flops(fwd_bwd, grad=True)
    e, n = cfg.model.encoder, 4
    tokens = 1 + round((1 - cfg.method.masking.ratio) * (e.img_size // e.patch_size) ** 2)
    # forward + backward = 3x the forward's products; the encoder's attention alone is 4 n^2 D per block
    assert split["attention"] >= 3 * n * e.depth * 4 * tokens**2 * e.embed_dim


def test_jpeg_path_times_every_stage_and_refuses_a_pass_too_short(tmp_path, monkeypatch, capsys):
    """benchmarks/jpeg_path.py on CPU at tiny sizes: every stage has a positive rate, the loader rows time
    the batches after those in flight (2 per worker), and a pass with too few batches for that is refused
    in one line instead of timing the prefetched ones."""
    import json
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("_common", None)
    import jpeg_path

    args = ["--device", "cpu", "--files", "56", "--batch", "8", "--loader-batch", "4", "--batches", "2",
            "--workers", "1", "--dir", str(tmp_path), "--out", str(tmp_path)]
    assert jpeg_path.main(args) == 0
    res = json.loads((tmp_path / "jpeg_path.json").read_text())
    rows = res["rows"]
    assert len(rows) == 5 and all(r["img_per_s"] > 0 for r in rows.values())
    read = next(v for k, v in rows.items() if k.startswith("read"))
    assert read["batches_timed"] == 56 // 4 - 1 - 2  # 14 batches, 2 in flight, the intervals after them
    gpu = next(v for k, v in rows.items() if k.startswith("gpu loader"))
    assert gpu["batches_timed"] == 56 // 8 - 1 - 3  # 7 batches; 1 being read + 2 decoded ahead
    capsys.readouterr()
    with pytest.raises(SystemExit, match="leave 1 to time after 2 in flight; raise --files"):
        jpeg_path.main([*args[:3], "16", *args[4:]])  # the folder of 56 is rewritten with 16 files, not topped up
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 16
