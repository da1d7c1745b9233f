"""Reference curves (``docs/reference/``) and ``mimkit compare``."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from mimkit.cli import main
from mimkit.compare import build_reference, compare_run, load_reference, match_reference
from mimkit.config import ConfigError, load_config, to_dict

sys.path.insert(0, str(Path(__file__).parent))
from golden_curves import ROOT  # noqa: E402

REF_ROOT = ROOT / "docs" / "reference"


def fake_run(path: Path, losses: dict[int, float], method="mae", knn=None, overrides=(), final_step=None) -> Path:
    """A run directory as `mimkit pretrain` writes it (config.yaml, metrics.jsonl, result.json)."""
    path.mkdir(parents=True)
    cfg = load_config(ROOT / "configs" / f"{method}_fashion_mnist.yaml", list(overrides))
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    lines = [json.dumps({"step": s, "epoch": s / 10, "loss": v, "lr": 1e-3}) for s, v in losses.items()]
    lines.insert(1, json.dumps({"step": 2, "event": "resume_changes", "changes": {}}))  # events are skipped
    for s, acc in (knn or {}).items():
        if s != final_step:
            lines.append(json.dumps({"step": s, "knn_top1_cls": acc, "knn_top1_mean": acc - 5}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    last = final_step or max(losses)
    res = {"step": last, "epochs": last / 10}
    if knn and final_step in knn:
        res["knn"] = {"top1_cls": knn[final_step], "top1_mean": knn[final_step] - 5}
    (path / "result.json").write_text(json.dumps(res))
    return path


def make_reference(tmp_path: Path, method="mae") -> Path:
    runs = {}
    for seed, shift in ((0, 0.0), (1, 0.1), (2, -0.1)):
        losses = {s: 2.0 - 0.1 * s + shift for s in range(2, 22, 2)}
        runs[seed] = fake_run(tmp_path / f"{method}_runs" / f"seed{seed}", losses, method,
                              knn={10: 60 + seed, 20: 70 + 2 * seed}, final_step=20)
    cfg = load_config(ROOT / "configs" / f"{method}_fashion_mnist.yaml")
    return build_reference(runs, tmp_path / "ref" / f"{method}_fashion_mnist",
                           {"preset": f"{method}_fashion_mnist", "command": "test", "config": to_dict(cfg)})


def test_reference_files_hold_band_and_seeds(tmp_path):
    ref_dir = make_reference(tmp_path)
    rows = list(csv.DictReader(open(ref_dir / "loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(2, 22, 2))
    r = rows[2]  # step 6: seeds 1.4, 1.5, 1.3
    assert float(r["seed_0"]) == pytest.approx(1.4) and float(r["seed_1"]) == pytest.approx(1.5)
    assert (float(r["mean"]), float(r["min"]), float(r["max"])) == pytest.approx((1.4, 1.3, 1.5))
    knn = list(csv.DictReader(open(ref_dir / "knn.csv")))
    final = [k for k in knn if k["step"] == "20" and k["metric"] == "top1_cls"][0]  # from result.json
    assert (float(final["min"]), float(final["max"])) == (70.0, 74.0)
    assert (ref_dir / "curves.png").stat().st_size > 1000
    assert json.loads((ref_dir / "meta.json").read_text())["seeds"] == [0, 1, 2]


def test_inside_and_outside_the_band(tmp_path):
    ref_dir = make_reference(tmp_path)
    good = fake_run(tmp_path / "good", {s: 2.0 - 0.1 * s + 0.05 for s in range(1, 23)}, knn={20: 71.0}, final_step=20)
    cmp = compare_run(good, ref_dir)
    assert cmp.verdict and cmp.fraction_inside == 1.0 and cmp.steps == list(range(2, 22, 2))
    assert cmp.knn["top1_cls"] == [(20, 71.0, 70.0, 74.0, True)]
    high = fake_run(tmp_path / "high", {s: (2.0 - 0.1 * s) * 1.3 for s in range(2, 22, 2)})
    cmp = compare_run(high, ref_dir)
    assert not cmp.verdict and cmp.fraction_inside < 0.5
    assert "OUTSIDE" in cmp.summary()
    assert compare_run(high, ref_dir, tolerance=0.5).verdict  # a wide enough tolerance takes it in
    # one bad step of ten: inside with the default 75 %, outside when every step must be
    spike = {s: 2.0 - 0.1 * s for s in range(2, 22, 2)} | {8: 5.0}
    run = fake_run(tmp_path / "spike", spike)
    assert compare_run(run, ref_dir).verdict and not compare_run(run, ref_dir, min_inside=1.0).verdict


def test_reference_is_found_by_method_and_differences_are_named(tmp_path):
    make_reference(tmp_path, "mae")
    make_reference(tmp_path, "emae")
    roots = [tmp_path / "ref"]
    run = fake_run(tmp_path / "run", {s: 1.0 for s in range(2, 22, 2)}, "emae", overrides=["optim.base_lr=3e-3"])
    cmp = compare_run(run, roots=roots)
    assert cmp.reference.name == "emae_fashion_mnist"
    assert compare_run(run, "mae_fashion_mnist", roots=roots).reference.name == "mae_fashion_mnist"  # by name
    assert cmp.differences == {"optim.base_lr": (1.5e-3, 3e-3)}
    assert "optim.base_lr 0.0015 (reference) vs 0.003" in cmp.summary()
    other = fake_run(tmp_path / "cae", {2: 1.0}, "cae")
    with pytest.raises(ConfigError, match="no reference for method 'cae'"):
        match_reference(yaml.safe_load((other / "config.yaml").read_text()), roots)


def test_errors_are_one_line(tmp_path):
    ref_dir = make_reference(tmp_path)
    late = fake_run(tmp_path / "late", {101: 1.0, 103: 1.0})
    with pytest.raises(ConfigError, match="logged no step the reference has"):
        compare_run(late, ref_dir)
    with pytest.raises(ConfigError, match="config.yaml not found: give a run directory"):
        compare_run(tmp_path / "nothing", ref_dir)
    with pytest.raises(ConfigError, match="not a reference directory"):
        load_reference(tmp_path)
    run = fake_run(tmp_path / "ok", {s: 2.0 for s in range(2, 22, 2)})
    with pytest.raises(ConfigError, match=r"foo is neither a directory nor a known preset name "
                                          r"\(available: mae_fashion_mnist\)"):
        compare_run(run, "foo", roots=[tmp_path / "ref"])


def test_cli_exit_status_and_picture(tmp_path, capsys):
    ref_dir = make_reference(tmp_path)
    good = fake_run(tmp_path / "good", {s: 2.0 - 0.1 * s for s in range(2, 22, 2)})
    assert main(["compare", str(good), str(ref_dir)]) == 0
    assert "verdict: INSIDE" in capsys.readouterr().out and (good / "compare.png").is_file()
    bad = fake_run(tmp_path / "bad", {s: 9.0 for s in range(2, 22, 2)})
    assert main(["compare", str(bad), str(ref_dir), "--out", str(tmp_path / "c.png")]) == 1
    assert (tmp_path / "c.png").is_file()
    assert main(["compare", str(tmp_path / "missing"), str(ref_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimkit: error:") and err.count("\n") == 1


def test_shipped_references_cover_every_fashion_mnist_preset():
    presets = sorted(p.stem for p in (ROOT / "configs").glob("*_fashion_mnist.yaml"))
    for preset in presets:
        ref = load_reference(REF_ROOT / "fashion_mnist" / preset)
        assert len(ref.seeds) >= 3 and ref.knn, preset
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml", ref.meta["overrides"])
        assert match_reference(to_dict(cfg), [REF_ROOT]).name == preset
        # the band is the seeds' min..max and the mean their average, at every step; kNN at every epoch end
        for st in ref.steps:
            vals = [c[st] for c in ref.seeds.values()]
            assert (ref.lo[st], ref.hi[st]) == (min(vals), max(vals)) and abs(ref.mean[st] - sum(vals) / 3) < 1e-9
        assert sorted(ref.knn["top1_cls"]) == [16, 32, 48] and ref.steps[-1] == 48, preset
