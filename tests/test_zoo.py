"""``mimkit zoo``: planning, training in children, evaluation on one split, reuse, failures and the table."""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from mimkit.errors import ConfigError
from mimkit.zoo import headline_metrics, loaded, plan_runs, split_arguments
from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
MAE, PCAE, CAE_V2 = (ROOT / "configs" / f"{m}_fashion_mnist.yaml" for m in ("mae", "pcae", "cae_v2"))
TINY = [o for o in TINY_RUN if not o.startswith(("eval.", "train.epochs"))] + ["data.batch_size=64", "train.epochs=2"]
EVAL = ["--protocols", "knn", "--limit-train", "300", "--limit-test", "120", "--no-progress", "--threads", "1"]


def _zoo(out: Path, *items: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mimkit.cli", "zoo", str(MAE), "--seeds", "0,1", "--out", str(out), *EVAL,
           *extra, *items, *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


# -- planning (no work) ---------------------------------------------------------------------------
def test_plan_is_seed_major_with_scoped_and_expanded_overrides(tmp_path):
    runs = plan_runs([MAE, PCAE], [3, 5], tmp_path, ["train.epochs=1", "pcae_fashion_mnist:optim.base_lr=2e-3",
                                                      "mae_fashion_mnist:train.log_every_steps={seed}"])
    assert [(r.name, r.seed) for r in runs] == [("mae_fashion_mnist", 3), ("pcae_fashion_mnist", 3),
                                               ("mae_fashion_mnist", 5), ("pcae_fashion_mnist", 5)]
    mae3, pcae3, mae5, _ = runs
    assert mae3.out_dir == tmp_path / "runs" / "mae_fashion_mnist" / "seed3"
    assert mae3.overrides[-2:] == [f"train.out_dir={mae3.out_dir}", "train.seed=3"]  # the zoo's keys come last
    assert "train.log_every_steps=3" in mae3.overrides and "train.log_every_steps=5" in mae5.overrides
    assert "optim.base_lr=2e-3" in pcae3.overrides and not any("base_lr" in o for o in mae3.overrides)
    assert all("train.epochs=1" in r.overrides and "eval.knn_at_end=false" in r.overrides for r in runs)


@pytest.mark.parametrize("overrides,configs,seeds,match", [
    (["train.seed=4"], None, [0], r"the zoo sets train.seed for every run"),
    (["mae_fashion_mnist:train.out_dir=x"], None, [0], r"the zoo sets train.out_dir"),
    (["vit:optim.lr=1"], None, [0], r"names 'vit', which is not one of the configs \(mae_fashion_mnist\)"),
    (["model.encoder.depthh=2"], None, [0], r"mae_fashion_mnist.yaml: .*depthh"),
    ([], [MAE, MAE], [0], r"two configs named mae_fashion_mnist"),
    ([], [MAE], [0, 0], r"--seeds 0,0 repeats a seed"),
    ([], [Path("nope.yaml")], [0], r"config file\(s\) not found: nope.yaml"),
])
def test_plan_refuses_bad_input_before_any_work(tmp_path, overrides, configs, seeds, match):
    with pytest.raises(ConfigError, match=match) as e:
        plan_runs(configs or [MAE], seeds, tmp_path, overrides)
    assert "\n" not in str(e.value) and not (tmp_path / "runs").exists()


def test_a_validation_zoo_refuses_runs_that_measure_on_the_test_split(tmp_path):
    plan_runs([MAE], [0], tmp_path, [], val_split=0.1)  # the zoo's own defaults measure nothing
    for ov in ("eval.knn_at_end=true", "eval.knn_every_epochs=1", "eval.picture_at_end=true"):
        with pytest.raises(ConfigError, match=f"--val-split 0.1 .*{ov.split('=')[0]} would measure on it"):
            plan_runs([MAE], [0], tmp_path, [ov], val_split=0.1)
        plan_runs([MAE], [0], tmp_path, [ov])  # without --val-split it is the user's choice


def test_arguments_split_into_configs_and_overrides():
    assert split_arguments(["a.yaml", "train.epochs=1", "b.yml", "x:optim.lr=1e-3"]) == (
        [Path("a.yaml"), Path("b.yml")], ["train.epochs=1", "x:optim.lr=1e-3"])


def test_dataset_folder_trains_on_its_train_split(tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    runs = plan_runs([MAE], [0], tmp_path / "z", [], dataset=str(tmp_path / "data"))
    assert f"data.dataset={tmp_path / 'data' / 'train'}" in runs[0].overrides
    with pytest.raises(ConfigError, match="not a folder"):
        plan_runs([MAE], [0], tmp_path / "z", [], dataset=str(tmp_path / "missing"))


def test_loaded_uses_the_cpu_other_processes_used(monkeypatch):
    assert not loaded({"other_cpu_cores": [0.05], "threads": 2, "load": [[3.0, 3.0]]})  # measured beats loadavg
    assert loaded({"other_cpu_cores": [0.05, 0.9], "threads": 1})  # any attempt beside another job
    monkeypatch.setattr("os.cpu_count", lambda: 4)  # no /proc/stat reading: the load average before the run
    assert loaded({"other_cpu_cores": [None], "threads": 2, "load": [[2.6, 1.0]]})  # > 4 - 2 + 0.5
    assert not loaded({"other_cpu_cores": [None], "threads": 2, "load": [[2.4, 4.0]]})


def test_train_times_from_two_machines_are_flagged_not_silently_averaged(tmp_path):
    """A zoo continued on another CPU (records kept in git): a row whose timed runs come from two
    machines says so in its time cell; a row timed on one machine does not."""
    from mimkit.zoo import ZooRun, markdown, summarise

    def run(name, seed, machine, train_s):
        rec = {"attempts": 1, "other_cpu_cores": [0.01], "train_s": train_s, "img_per_s": 1000.0, "peak_rss_mb": 900.0,
               "machine": machine, "precision": "bf16"}
        return ZooRun(MAE, name, seed, tmp_path / name / str(seed), train=rec,
                      evals={"knn": {"k": 20, "metrics": {"knn20_cls": 80.0 + seed}, "options": {"amp": "bf16"}}})

    runs = [run("a", 0, "cpu A", 100.0), run("a", 1, "cpu B", 300.0), run("b", 0, "cpu A", 100.0),
            run("b", 1, "cpu A", 110.0)]
    columns, rows = summarise(runs, ["knn"])
    assert [r["time_machines"] for r in rows] == [2, 1]
    assert rows[0]["train_s"] == pytest.approx((200.0, statistics.stdev([100.0, 300.0])))
    md = markdown(columns, rows).splitlines()
    a, b = (next(ln for ln in md if ln.startswith(f"| {n} |")) for n in "ab")
    assert "200 ± 141 (2 machines: see runs.csv)" in a and "machines" not in b and "105 ± 7 |" in b


def test_headline_metrics_pick_the_headline_k_and_top1():
    knn = {"k": 20, "metrics": {"knn10_cls": 1, "knn20_cls": 2, "knn20top5_cls": 3, "loo1nn_cls": 4}}
    assert headline_metrics("knn", knn) == ["knn20_cls"]
    ft = {"metrics": {"finetune_mean": 1, "finetune_best_mean": 2}}
    assert headline_metrics("finetune", ft) == ["finetune_mean"]


# -- a whole zoo ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """MAE and PCAE x seeds 0, 1 at tiny shapes (knn on 300/120 images), plus CAE v2 without its teacher
    file: a run that fails, on both seeds."""
    out = tmp_path_factory.mktemp("zoo")
    # seed 1 of MAE was interrupted before: two of its steps are done and checkpointed (no zoo record)
    pre = subprocess.run([sys.executable, "-m", "mimkit.cli", "pretrain", str(MAE), *TINY, "train.max_steps=2",
                          f"train.out_dir={out}/runs/mae_fashion_mnist/seed1", "train.seed=1",
                          "eval.knn_at_end=false", "eval.picture_at_end=false"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert pre.returncode == 0, pre.stderr[-2000:]
    proc = _zoo(out, str(PCAE), str(CAE_V2), "cae_v2_fashion_mnist:method.teacher_path={out}/no_teacher.pt")
    return out, proc


def _own_copy(zoo, tmp_path: Path) -> Path:
    """A copy of the module's zoo for a test that runs more zoos over it: the shared one stays as the
    fixture made it, whatever order the tests run in (a run's own out_dir is not a training setting,
    so the copy's runs are reused as the original's)."""
    import shutil

    return Path(shutil.copytree(zoo[0], tmp_path / "zoo"))


def test_zoo_trains_evaluates_and_tables_every_run(zoo):
    out, proc = zoo
    assert proc.returncode == 1, proc.stderr[-3000:]  # one config failed on both seeds: the zoo went on
    err = proc.stderr
    assert "[zoo 1/6] mae_fashion_mnist seed 0: training" in err and "[zoo 6/6] cae_v2_fashion_mnist seed 1" in err
    assert err.count("cae_v2_fashion_mnist seed") >= 2 and err.count(": FAILED: ") == 2
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["config"], r["seed"], r["status"][:6]) for r in rows] == [
        ("mae_fashion_mnist", "0", "done"), ("pcae_fashion_mnist", "0", "done"), ("cae_v2_fashion_mnist", "0", "failed"),
        ("mae_fashion_mnist", "1", "done"), ("pcae_fashion_mnist", "1", "done"), ("cae_v2_fashion_mnist", "1", "failed")]
    assert "no_teacher.pt" in rows[2]["status"]
    # the table is the mean and sample std of the per-run numbers that each run's eval/knn.json holds
    table = {r["config"]: r for r in csv.DictReader((out / "zoo.csv").open())}
    for name in ("mae_fashion_mnist", "pcae_fashion_mnist"):
        vals = [json.loads((out / "runs" / name / f"seed{s}" / "eval" / "knn.json").read_text())["metrics"]["knn20_cls"]
                for s in (0, 1)]
        assert float(table[name]["knn20_cls_mean"]) == pytest.approx(statistics.fmean(vals))
        assert float(table[name]["knn20_cls_std"]) == pytest.approx(statistics.stdev(vals))
        assert vals[0] != vals[1]  # two seeds, two encoders
        assert table[name]["n_seeds"] == "2"
    assert table["cae_v2_fashion_mnist"]["n_seeds"] == "0"
    md = (out / "zoo.md").read_text()
    assert "| mae_fashion_mnist | 0,1 |" in md and "**Failed runs**" in md and "**Setup**" in md
    assert "knn: k = 10, 20, 100, 200 (headline k = 20)" in md and "(120 images)" in md
    assert (out / "zoo.png").stat().st_size > 5000
    stdout_table = proc.stdout
    assert "| pcae_fashion_mnist | 0,1 |" in stdout_table


def test_zoo_resumed_the_interrupted_run(zoo):
    out, _ = zoo
    run = out / "runs" / "mae_fashion_mnist" / "seed1"
    rec = json.loads((run / "zoo_train.json").read_text())
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rec["step"] == 8 and steps == list(range(1, 9))  # 2 steps from before + 6 resumed, none twice
    assert rec["attempts"] == 1 and rec["peak_rss_mb"] > 100 and rec["train_s"] > 0


def test_every_run_is_evaluated_on_the_split_mimkit_eval_uses(zoo, tmp_path):
    out, _ = zoo
    run = out / "runs" / "pcae_fashion_mnist" / "seed1"
    ev = tmp_path / "by_hand"
    proc = subprocess.run([sys.executable, "-m", "mimkit.cli", "eval", "knn", str(run), *EVAL[2:], "--out", str(ev)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_hand = json.loads((ev / "knn.json").read_text())["metrics"]
    zoo_res = json.loads((run / "eval" / "knn.json").read_text())["metrics"]
    assert by_hand == pytest.approx(zoo_res)


def test_a_second_zoo_reuses_runs_and_recomputes_only_changed_evaluations(zoo, tmp_path):
    out = _own_copy(zoo, tmp_path)
    knn = out / "runs" / "mae_fashion_mnist" / "seed0" / "eval" / "knn.json"
    attempts = {p: p.read_text() for p in (out / "runs").glob("*/seed*/zoo_attempts.jsonl")}
    mtime = knn.stat().st_mtime_ns
    proc = _zoo(out, str(PCAE))  # the same split: nothing to do
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("trained before (reused)") == 4 and "evaluating" not in proc.stderr
    assert knn.stat().st_mtime_ns == mtime
    assert {p: p.read_text() for p in attempts} == attempts  # no child trained again
    proc = _zoo(out, str(PCAE), extra=("--limit-test", "100"))  # another split: evaluated again, not trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("evaluating: knn") == 4 and proc.stderr.count("trained before (reused)") == 4
    assert json.loads(knn.read_text())["setup"]["n_test"] == 100
    proc = _zoo(out, str(PCAE), "optim.weight_decay=0.01")  # other training settings: not this zoo's runs
    assert proc.returncode == 1 and "trained before (reused)" not in proc.stderr, proc.stderr[-3000:]
    assert len(re.findall(r"holds a finished run trained with other settings \(optim\.weight_decay 0\.05 -> 0\.01\)",
                          proc.stderr)) == 4
    assert {p: p.read_text() for p in attempts} == attempts  # nothing was trained over them


def test_records_kept_without_weights_are_reused_and_a_missing_protocol_is_listed_not_failed(zoo, tmp_path):
    """A zoo kept in git without checkpoints (benchmarks/results/): its runs are reused as finished,
    their kept evaluations too (also one written while --amp still counted, and under another --amp),
    and a protocol they never had is listed as not evaluated -- its cells say over how many seeds --
    instead of failing the run or dropping its other numbers."""
    from mimkit.zoo import _same_fingerprint

    out = _own_copy(zoo, tmp_path)
    gone = out / "runs" / "mae_fashion_mnist" / "seed1"
    weights = list(gone.glob("*.pt"))
    assert weights
    for f in weights:
        f.unlink()
    knn = gone / "eval" / "knn.json"
    rec = json.loads(knn.read_text())
    fp = json.loads(rec["zoo_fingerprint"])
    assert "amp" not in fp["options"]
    fp["options"]["amp"] = "bf16"  # as the zoo wrote it before the evaluation's autocast stopped counting
    rec["zoo_fingerprint"] = json.dumps(fp, sort_keys=True)
    knn.write_text(json.dumps(rec))
    before = knn.read_text()
    proc = _zoo(out, str(PCAE), extra=("--protocols", "knn,linear", "--amp", "off"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert err.count("trained before (reused)") == 4 and "FAILED" not in err
    assert "evaluating: knn" not in err and err.count("evaluating: linear") == 3
    said = [ln for ln in err.splitlines() if "not evaluated" in ln]
    assert len(said) == 1 and "linear" in said[0] and str(gone) in said[0], said
    assert knn.read_text() == before
    rows = {(r["config"], r["seed"]): r for r in csv.DictReader((out / "runs.csv").open())}
    lin = next(c for c in rows[("mae_fashion_mnist", "0")] if c.startswith("linear") and c.endswith("_cls"))
    kept = rows[("mae_fashion_mnist", "1")]
    assert kept["status"] == "done" and kept["not_evaluated"] == "linear" and kept[lin] == ""
    assert float(kept["knn20_cls"]) == json.loads(before)["metrics"]["knn20_cls"]
    # each result's own options say how it ran: the kept kNN under the fixture's default, seed 0's new linear off
    assert kept["eval_amp"] == "auto" and rows[("mae_fashion_mnist", "0")]["eval_amp"] == "auto,off"
    assert all(r["precision"] == "fp32" and "cores" in r["machine"] for r in rows.values() if r["status"] == "done")
    table = {r["config"]: r for r in csv.DictReader((out / "zoo.csv").open())}
    mae0 = float(rows[("mae_fashion_mnist", "0")][lin])
    assert table["mae_fashion_mnist"]["n_seeds"] == "2" and float(table["mae_fashion_mnist"][f"{lin}_mean"]) == mae0
    mixed = "fp32 (eval auto/off) x1; fp32 (eval auto) x1"  # training precision and each run's evaluation autocast
    assert table["mae_fashion_mnist"]["not_evaluated"] == "linear seed 1" and table["mae_fashion_mnist"]["precision"] == mixed
    assert table["pcae_fashion_mnist"]["precision"] == "fp32 (eval auto/off)"
    md = (out / "zoo.md").read_text()
    mae_row = next(ln for ln in md.splitlines() if ln.startswith("| mae_fashion_mnist |"))
    assert f"{mae0:.2f} ± 0.00 (n=1)" in mae_row and mae_row.endswith(f"| {mixed} |")
    assert "(n=" not in next(ln for ln in md.splitlines() if ln.startswith("| pcae_fashion_mnist |"))
    assert "**Not evaluated** (runs kept without their weights" in md and "- mae_fashion_mnist: linear seed 1" in md
    # malformed kept fingerprints are never taken for a match
    for bad in (None, "", "{not json", json.dumps({"protocol": "knn"}), json.dumps({"options": 3})):
        assert not _same_fingerprint(bad, rec["zoo_fingerprint"])


def test_report_only_tables_the_kept_records_and_computes_nothing(zoo, tmp_path):
    """--report-only: the merged table of a half-done zoo (e.g. records from several machines) -- the
    finished runs and their kept evaluations as the full zoo would table them, a seed not there yet
    listed as not run, a protocol never computed listed as not evaluated; no child trains, nothing is
    evaluated, nothing failed."""
    out = _own_copy(zoo, tmp_path)
    attempts = {p: p.read_text() for p in (out / "runs").glob("*/seed*/zoo_attempts.jsonl")}
    before = {r["config"]: r for r in csv.DictReader((out / "zoo.csv").open())}
    proc = _zoo(out, str(PCAE), extra=("--seeds", "0,1,2", "--protocols", "knn,linear", "--report-only"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "evaluating" not in err and "training (" not in err and "FAILED" not in err
    assert err.count("trained before (reused)") == 4 and err.count("not run yet (--report-only)") == 2
    assert {p: p.read_text() for p in attempts} == attempts
    assert not (out / "runs" / "mae_fashion_mnist" / "seed2").exists()
    table = {r["config"]: r for r in csv.DictReader((out / "zoo.csv").open())}
    for name in ("mae_fashion_mnist", "pcae_fashion_mnist"):
        assert table[name]["n_seeds"] == "2"
        assert float(table[name]["knn20_cls_mean"]) == float(before[name]["knn20_cls_mean"])
        assert float(table[name]["knn20_cls_std"]) == float(before[name]["knn20_cls_std"])
        assert table[name]["not_evaluated"] == "linear seed 0; linear seed 1"
    rows = [(r["config"], r["seed"], r["status"]) for r in csv.DictReader((out / "runs.csv").open())]
    assert ("mae_fashion_mnist", "2", "not run") in rows and ("pcae_fashion_mnist", "1", "done") in rows
    md = (out / "zoo.md").read_text()
    assert "**Not run yet**" in md and "- mae_fashion_mnist: seed 2" in md and "- pcae_fashion_mnist: seed 2" in md
    assert "| mae_fashion_mnist | 0,1 |" in md and "- pcae_fashion_mnist: linear seed 1" in md
    assert json.loads((out / "zoo.json").read_text())["runs"][2]["train"] is not None
    # a kept run of other settings is not this zoo's run: failed, exit 1, and still nothing trained
    proc = _zoo(out, str(PCAE), "optim.weight_decay=0.01", extra=("--report-only",))
    assert proc.returncode == 1 and "training (" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("holds a finished run trained with other settings") == 4
    assert {p: p.read_text() for p in attempts} == attempts
    # a directory with no record of these runs (a mistyped --out): one line, nothing written
    proc = _zoo(tmp_path / "typo", extra=("--report-only",))
    assert proc.returncode != 0 and "holds no finished run" in proc.stderr and "check --out" in proc.stderr
    assert not (tmp_path / "typo").exists()


def test_a_validation_zoo_keeps_its_numbers_apart_from_the_test_ones(zoo, tmp_path):
    """--val-split: every run evaluated on images held out of the training split, kept in
    <protocol>.val.json (the test numbers untouched) and equal to mimkit eval with the same flag."""
    out = _own_copy(zoo, tmp_path)
    knn = out / "runs" / "mae_fashion_mnist" / "seed0" / "eval" / "knn.json"
    before = knn.read_text()
    tables = {p: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = _zoo(out, str(PCAE), extra=("--val-split", "0.2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("evaluating: knn") == 4 and proc.stderr.count("trained before (reused)") == 4
    assert knn.read_text() == before
    val = json.loads((knn.parent / "knn.val.json").read_text())
    assert val["setup"]["test_data"]["split"].startswith("validation") and val["setup"]["n_test"] == 120
    assert {p: p.read_bytes() for p in tables} == tables  # the test tables are untouched
    md = (out / "zoo.val.md").read_text()
    assert md.startswith("# mimkit zoo (validation: --val-split 0.2; the test split is not read)")
    assert "validation fashion_mnist (120 images)" in md and "12000 of the 60000 training images held out" in md
    assert "LOO 1-NN on the validation set" in md and "test set" not in md
    assert json.loads((out / "zoo.val.json").read_text())["split"] == "validation"
    assert (out / "runs.val.csv").is_file() and (out / "zoo.val.csv").is_file() and (out / "zoo.val.png").is_file()
    run = knn.parent.parent
    proc = subprocess.run([sys.executable, "-m", "mimkit.cli", "eval", "knn", str(run), *EVAL[2:], "--val-split", "0.2",
                           "--out", str(run / "by_hand_val")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "by_hand_val" / "knn.val.json").read_text())["metrics"] == pytest.approx(val["metrics"])
    assert (run / "by_hand_val" / "knn.val.md").read_text().startswith("validation split")
    proc = _zoo(out, str(PCAE), extra=("--val-split", "0.2"))  # a second time: all reused
    assert proc.returncode == 0 and "evaluating" not in proc.stderr, proc.stderr[-3000:]


def test_a_run_that_uses_another_runs_output_waits_for_it(tmp_path, monkeypatch):
    """CAE v2's teacher from the zoo's own MAE run: MAE must come first, and when MAE's run failed the CAE
    v2 run fails without training (it would otherwise take a half-trained teacher)."""
    import mimkit.zoo as zoo

    teacher = "cae_v2_fashion_mnist:method.teacher_path={out}/runs/mae_fashion_mnist/seed{seed}/checkpoint.pt"
    with pytest.raises(ConfigError, match="list mae_fashion_mnist's config before cae_v2_fashion_mnist's"):
        plan_runs([CAE_V2, MAE], [0], tmp_path, [teacher])
    runs = plan_runs([MAE, CAE_V2, PCAE], [0], tmp_path, [teacher])
    assert [r.depends for r in runs] == [[], ["mae_fashion_mnist"], []]
    assert f"method.teacher_path={tmp_path}/runs/mae_fashion_mnist/seed0/checkpoint.pt" in runs[1].overrides
    trained = []

    def fake_train(run, log, threads):
        trained.append(run.name)
        if run.name == "mae_fashion_mnist":
            raise RuntimeError("mimkit pretrain exited 2: mimkit: error: the loss is NaN")
        return {"train_s": 1.0, "attempts": 1, "reused": False, "peak_rss_mb": 1.0}

    monkeypatch.setattr(zoo, "train_run", fake_train)
    monkeypatch.setattr(zoo, "evaluate_run", lambda *a, **k: {})
    zoo.run_zoo(runs, ["knn"], _opts(), {}, tmp_path, log=lambda m: None)
    assert trained == ["mae_fashion_mnist", "pcae_fashion_mnist"]  # CAE v2 never started
    assert runs[1].error == "it needs the finished mae_fashion_mnist seed 0 run, which failed"
    assert runs[2].error is None and (tmp_path / "zoo.md").is_file()
    # MAE finished, but its run was kept without weights (benchmarks/results/): CAE v2 is refused before training
    trained.clear()
    runs = plan_runs([MAE, CAE_V2], [0], tmp_path, [teacher])
    (tmp_path / "runs" / "mae_fashion_mnist" / "seed0").mkdir(parents=True)
    monkeypatch.setattr(zoo, "train_run", lambda run, log, threads: trained.append(run.name) or
                        {"train_s": 1.0, "attempts": 1, "reused": True, "peak_rss_mb": 1.0})
    zoo.run_zoo(runs, ["knn"], _opts(), {}, tmp_path, log=lambda m: None)
    assert trained == ["mae_fashion_mnist"] and runs[0].error is None
    assert runs[1].error.startswith("it needs the weights of the mae_fashion_mnist seed 0 run, which was kept without")
    # ... but a CAE v2 run that finished before is only reused: it needs no teacher any more
    (tmp_path / "runs" / "cae_v2_fashion_mnist" / "seed0").mkdir(parents=True)
    (tmp_path / "runs" / "cae_v2_fashion_mnist" / "seed0" / "zoo_train.json").write_text("{}")
    trained.clear()
    runs = plan_runs([MAE, CAE_V2], [0], tmp_path, [teacher])
    zoo.run_zoo(runs, ["knn"], _opts(), {}, tmp_path, log=lambda m: None)
    assert trained == ["mae_fashion_mnist", "cae_v2_fashion_mnist"] and runs[1].error is None
    (tmp_path / "runs" / "cae_v2_fashion_mnist" / "seed0" / "zoo_train.json").unlink()
    (tmp_path / "runs" / "mae_fashion_mnist" / "seed0" / "checkpoint.pt").write_bytes(b"x")  # weights there: it trains
    trained.clear()
    runs = plan_runs([MAE, CAE_V2], [0], tmp_path, [teacher])
    zoo.run_zoo(runs, ["knn"], _opts(), {}, tmp_path, log=lambda m: None)
    assert trained == ["mae_fashion_mnist", "cae_v2_fashion_mnist"] and runs[1].error is None


def test_a_kept_run_is_the_same_run_under_another_out_path_but_not_with_other_settings(tmp_path):
    """A zoo kept in git and continued from another checkout (or --out spelt otherwise): paths inside the
    zoo that wrote a run (CAE v2's teacher) are compared as paths inside this one. A teacher elsewhere,
    or a short trial run (train.max_steps), is another run."""
    import yaml

    from mimkit.config import load_config, to_dict
    from mimkit.zoo import _changed_settings

    teacher = "cae_v2_fashion_mnist:method.teacher_path={out}/runs/mae_fashion_mnist/seed{seed}/checkpoint.pt"
    first = plan_runs([MAE, CAE_V2], [1], tmp_path / "a" / "zoo", [teacher])[1]
    kept = to_dict(load_config(first.config, first.overrides))
    assert kept["method"]["teacher_path"] == f"{tmp_path}/a/zoo/runs/mae_fashion_mnist/seed1/checkpoint.pt"

    def continued(out: Path, *extra: str):
        run = plan_runs([MAE, CAE_V2], [1], out, [teacher, *extra])[1]
        run.out_dir.mkdir(parents=True)
        (run.out_dir / "config.yaml").write_text(yaml.safe_dump(kept))
        return _changed_settings(run)

    assert continued(tmp_path / "b" / "elsewhere") == {}
    assert continued(tmp_path / "c", "train.max_steps=20") == {"train.max_steps": (None, 20)}
    other = continued(tmp_path / "d", "cae_v2_fashion_mnist:method.teacher_path=/somewhere/teacher.pt")
    assert list(other) == ["method.teacher_path"] and other["method.teacher_path"][1] == "/somewhere/teacher.pt"


@pytest.mark.parametrize("code", [75, 130, 2])
def test_a_stopped_child_stops_the_zoo_and_a_failed_one_does_not(tmp_path, monkeypatch, code):
    """A child stopped by a signal (its checkpoint saved; mimkit.cli exits 75, or 130 on Ctrl-C) is not a
    failed run: the zoo stops there and trains nothing more, and the same command continues. A child
    that exits with an error (2) is a failed run: the zoo records it and goes on to the next run."""
    import mimkit.zoo as zoo
    from mimkit.cli import EXIT_INTERRUPTED, EXIT_KEYBOARD

    assert {EXIT_INTERRUPTED, EXIT_KEYBOARD} == {75, 130}
    real_popen = subprocess.Popen
    started = []

    def child(cmd, **kw):  # the real train_run around a child that exits as a stopped/failed pretrain does
        started.append(cmd[cmd.index("pretrain") + 1])
        return real_popen([sys.executable, "-c", f"import sys; sys.stderr.write('mimkit: error: boom\\n'); "
                           f"sys.exit({code})"], **kw)

    monkeypatch.setattr(zoo.subprocess, "Popen", child)
    monkeypatch.setattr(zoo, "evaluate_run", lambda *a, **k: {})
    runs = plan_runs([MAE, PCAE], [0], tmp_path, [])
    if code == 2:
        zoo.run_zoo(runs, ["knn"], _opts(), {}, tmp_path, log=lambda m: None)
        assert started == [str(MAE), str(PCAE)]  # the zoo went on after the failed run
        assert runs[0].error.startswith("mimkit pretrain exited 2: mimkit: error: boom")
    else:
        with pytest.raises(zoo.ZooInterrupted, match="mae_fashion_mnist seed 0 was interrupted; its checkpoint is "
                                                     "saved: run the same mimkit zoo command to continue"):
            zoo.run_zoo(runs, ["knn"], _opts(), {}, tmp_path, log=lambda m: None)
        assert started == [str(MAE)] and runs[0].error is None  # stopped, not failed; PCAE never started
    assert (tmp_path / "runs.csv").is_file()  # the table so far is written either way


def test_sigterm_to_the_zoo_reaches_the_training_child_and_nothing_is_left_running(tmp_path):
    """``kill ZOO_PID`` while a child trains: the child gets SIGTERM too, saves its checkpoint and exits,
    the zoo exits 130 naming how to continue, no process of the run is left, and the same command
    resumes the run from that checkpoint."""
    import os
    import signal
    import time

    run = tmp_path / "runs" / "mae_fashion_mnist" / "seed0"
    cmd = [sys.executable, "-m", "mimkit.cli", "zoo", str(MAE), "--seeds", "0", "--out", str(tmp_path), *EVAL,
           *TINY, "train.epochs=30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    zoo = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and '"loss"' not in ((run / "metrics.jsonl").read_text()
                                                            if (run / "metrics.jsonl").is_file() else ""):
        assert zoo.poll() is None, zoo.communicate()[1][-2000:]
        time.sleep(0.2)
    zoo.send_signal(signal.SIGTERM)  # to the zoo alone, not its process group
    _, err = zoo.communicate(timeout=240)
    assert zoo.returncode == 130, err[-3000:]
    assert "stopped by SIGTERM" in err and "was interrupted; its checkpoint is saved" in err
    left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a training child outlived the zoo"
    ckpt_step = torch_step(run / "checkpoint.pt")
    assert 0 < ckpt_step < 120
    again = subprocess.run(cmd[:-1] + ["train.epochs=2"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 1 and "train.epochs" in again.stderr  # other settings are never trained over
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"resumed from {run / 'checkpoint.pt'} at step {ckpt_step}" in again.stderr


def torch_step(path: Path) -> int:
    from mimkit.weights.checkpoint import load_checkpoint

    return int(load_checkpoint(path)["step"])


def _opts():
    from mimkit.eval.protocols import EvalOptions

    return EvalOptions(dataset="fashion_mnist", device="cpu", progress=False)


def test_items_after_flags_reach_the_zoo_and_unknown_flags_do_not(capsys):
    from mimkit.cli import build_parser, main

    args, extra = build_parser().parse_known_args(["zoo", str(MAE), "--seeds", "0", "train.epochs=1"])
    assert args.items == [str(MAE)] and extra == ["train.epochs=1"] and args.trailing_items == "items"
    with pytest.raises(SystemExit) as e:
        main(["zoo", str(MAE), "--seeds", "0", "--bogus", "train.epochs=1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in err and "\n" not in err
    with pytest.raises(SystemExit):  # other commands keep refusing stray words
        main(["export", "a.pt", "b.safetensors", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is read from Linux's /proc")
def test_a_childs_peak_memory_is_its_own_not_the_big_zoo_that_started_it():
    """wait4's ru_maxrss of a child started by a 600 MB process says >= 600 MB on Linux (exec keeps the
    replaced image's high-water mark); the zoo records the child's own peak: 120-300 MB for a child that
    holds 120 MB (+ the interpreter) at its peak, then frees it before it exits."""
    from mimkit.zoo import ChildPeakRss

    ballast = bytearray(600 * 2**20)
    ballast[:: 4096] = b"\1" * len(range(0, len(ballast), 4096))  # touched: resident in this process
    child = ("import time; b = bytearray(120 * 2**20); b[::4096] = b'\\1' * len(range(0, len(b), 4096)); "
             "time.sleep(1.0); del b; time.sleep(0.5)")
    proc = subprocess.Popen([sys.executable, "-c", child])
    rss = ChildPeakRss(proc.pid, every=0.05)
    proc_rc = proc.wait(timeout=60)
    peak = rss.stop()
    assert proc_rc == 0 and peak is not None
    assert 120 < peak < 300, peak  # the child's 120 MB (+ the interpreter), not the parent's 600
    other = subprocess.Popen([sys.executable, "-c", "pass"])
    _, _, usage = os.wait4(other.pid, 0)
    assert usage.ru_maxrss / 1024 > 600  # what the zoo recorded before: the parent's size
    del ballast


@pytest.mark.parametrize("prec,amp", [("fp32", "off"), ("bf16", "bf16"), (None, None), ("fp16", None)])
def test_the_published_zoo_script_picks_its_precision_by_the_cpu(prec, amp, tmp_path):
    """benchmarks/zoo_fashion_mnist.sh: bf16 where the CPU has bf16 instructions (else fp32, where bf16 is
    emulated and ~20x slower), PREC to choose, training and evaluation always in the same precision, and
    an unknown PREC refused before anything runs. MIMKIT=echo shows the command it would run."""
    from mimkit.train.precision import cpu_has_bf16

    env = {k: v for k, v in os.environ.items() if k != "PREC"}
    env.update(MIMKIT="echo", OUT=str(tmp_path / "z"), PYTHON=sys.executable, **({"PREC": prec} if prec else {}))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "zoo_fashion_mnist.sh"), "--seeds", "0"], env=env,
                          capture_output=True, text=True, timeout=60)
    if prec == "fp16":
        assert proc.returncode == 2 and "PREC=fp16: choose bf16 or fp32" in proc.stderr and not proc.stdout
        return
    assert proc.returncode == 0, proc.stderr
    if prec is None:
        import torch

        gpu = subprocess.run("nvidia-smi -L", shell=True, capture_output=True).returncode == 0 and (
            torch.cuda.is_available())
        prec, amp = ("bf16", "bf16") if cpu_has_bf16() or gpu else ("fp32", "off")
    words = proc.stdout.split()
    assert words[:1] == ["zoo"] and words[-2:] == ["--seeds", "0"]
    assert words[words.index("--amp") + 1] == amp and f"train.precision={prec}" in words
    assert words[words.index("--out") + 1] == str(tmp_path / "z") and f"precision {prec}" in proc.stderr
