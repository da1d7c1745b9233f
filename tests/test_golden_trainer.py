"""Golden curves through the real Trainer (tests/golden_trainer.py): schedule, gradient accumulation,
bf16 autocast and after_step timing of mimkit.train are unchanged. A change that moves them must say
why and rewrite tests/golden/trainer/ in the same commit (``python tests/golden_trainer.py --write``).

Tolerances, from measured variation (each curve run in separate processes, with 1 and 2 threads, and
with the kernels of a CPU without AVX-512 / bf16 instructions: ``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``ATEN_CPU_CAPABILITY=default``):

* lr and epoch: rel 1e-9. Python arithmetic on the step count, identical in every measurement.
* fp32 (``sched``, ``accum2``): rel 1e-4 on every logged value. Run to run bit-identical; threads and
  CPU kernels move them by at most 3e-6 (grad norm of Latent MIM), so 1e-4 is portable.
* bf16 on the platform that recorded the fixture (same torch build, ATen ISA, CPU flags, ISA
  variables: ``golden_trainer.platform()``): rel 1e-4 as fp32. bf16 on the CPU is deterministic
  (run to run and process to process bit-identical), and 1e-4 is below the bf16-fp32 gap of every
  curve (checked below), so a run whose autocast silently stays fp32 fails.
* bf16 on another platform: loss rel 3e-2, grad norm and method metrics rel 1e-1. Other CPU kernels
  round bf16 differently and 16 steps amplify it: measured up to 7.4e-3 on the loss (PCAE), 2.2e-2 on
  the grad norm (Latent MIM), 1.6e-2 on a metric (Latent MIM's ``loss_reg``). This only catches gross
  changes (a lost step, another schedule, bf16 master weights); the exact pin is the same-platform one.
"""

import json
import math

import pytest
from conftest import needs_fmnist
from golden_trainer import (
    GOLDEN,
    PRESETS,
    SERIES,
    STEPS,
    VARIANTS,
    WARMUP_STEPS,
    max_rel_diff,
    names,
    overrides_for,
    platform,
    run_curve,
    split_name,
)

EXACT_REL = 1e-9  # lr, epoch
FP32_REL = 1e-4
FP32_ABS = 1e-6
BF16_OTHER_PLATFORM_REL = {"loss": 3e-2, "grad_norm": 1e-1, "metrics": 1e-1}


def load(name: str) -> dict | None:
    path = GOLDEN / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def tolerances(rec: dict) -> tuple[dict, str]:
    """``{"loss", "grad_norm", "metrics"}`` -> rel tolerance for the fixture ``rec`` on this machine."""
    strict = {"loss": FP32_REL, "grad_norm": FP32_REL, "metrics": FP32_REL}
    if rec["variant"] != "bf16":
        return strict, "fp32"
    if rec["platform"] == platform():
        return strict, "bf16, recording platform"
    return BF16_OTHER_PLATFORM_REL, f"bf16, other platform (recorded on {rec['platform']}, here {platform()})"


def test_every_curve_has_a_fixture():
    missing = [n for n in names() if load(n) is None]
    assert not missing, f"no Trainer golden curve for {missing}: run python tests/golden_trainer.py --write {' '.join(missing)}"
    stale = sorted(p.stem for p in GOLDEN.glob("*.json") if p.stem not in names())
    assert not stale, f"fixtures of curves no longer listed in tests/golden_trainer.py: {stale}"
    for n in names():
        rec = load(n)
        method, variant = split_name(n)
        assert (rec["name"], rec["method"], rec["variant"], rec["preset"]) == (n, method, variant, PRESETS[method])
        assert rec["steps"] == list(range(1, STEPS + 1))
        assert all(len(rec[k]) == STEPS for k in SERIES)
        assert all(len(v) == STEPS for v in rec["metrics"].values())


def hand_schedule(method: str) -> list[float]:
    """MAE's schedule by hand at the fractional epoch of each step (8 steps an epoch, 2 epochs, warmup
    0.5 epoch): linear warmup (Latent MIM: from min_lr = 0.25 lr), then half-cosine to min_lr."""
    peak, low, start = {"mae": (1e-3, 0.0, 0.0), "pcae": (1e-3, 0.0, 0.0),
                        "latent_mim": (1.5e-3, 0.375e-3, 0.375e-3)}[method]
    out = []
    for step in range(STEPS):  # the lr is set before the step, from the epoch reached so far
        e = step / 8
        if e < 0.5:
            out.append(start + (peak - start) * e / 0.5)
        else:
            out.append(low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (e - 0.5) / 1.5)))
    return out


@pytest.mark.parametrize("method", list(PRESETS))
def test_fixtures_show_the_schedule_and_the_variants_differ(method):
    recs = {v: load(f"{method}_{v}") for v in VARIANTS}
    if any(r is None for r in recs.values()):
        pytest.skip("reported by test_every_curve_has_a_fixture")
    sched = recs["sched"]
    lr = sched["lr"]
    # warmup: the lr rises over steps 1..WARMUP_STEPS + 1, then falls to the end (cosine)
    assert all(a < b for a, b in zip(lr[:WARMUP_STEPS], lr[1 : WARMUP_STEPS + 1], strict=True)), lr
    assert all(a > b for a, b in zip(lr[WARMUP_STEPS:], lr[WARMUP_STEPS + 1 :], strict=False)), lr
    assert lr[-1] < 0.3 * lr[WARMUP_STEPS]
    assert lr == pytest.approx(hand_schedule(method), rel=EXACT_REL, abs=1e-15)
    # the run trains: the last steps' loss is below the first steps'
    assert sum(sched["loss"][-4:]) < sum(sched["loss"][:4])
    for variant, rec in recs.items():
        # every variant runs the same schedule over the same epochs: 8 optimizer steps an epoch, with
        # accum2's two micro-batches of 8 making one step
        assert rec["epoch"] == [s / 8 for s in range(1, STEPS + 1)], variant
        assert rec["lr"] == lr, variant
    # ... but not the same numbers: accumulation draws its own micro-batches and masks (differs by
    # 1e-2 and more), bf16 rounds (differs by more than the strict tolerance, so it pins autocast)
    acc = max_rel_diff(recs["accum2"]["loss"], sched["loss"])
    assert acc > 100 * FP32_REL, f"accum2 loss curve equals sched's (max rel. diff. {acc:.2e})"
    bf = max(max_rel_diff(recs["bf16"][k], sched[k]) for k in ("loss", "grad_norm"))
    assert bf > 10 * FP32_REL, f"bf16 curve equals the fp32 one (max rel. diff. {bf:.2e})"
    # EMA methods: the momentum follows the optimizer step (once per step, accum or not)
    if "ema_momentum" in sched["metrics"]:
        mom = sched["metrics"]["ema_momentum"]
        assert all(a < b for a, b in zip(mom, mom[1:], strict=False)), mom
        assert recs["accum2"]["metrics"]["ema_momentum"] == pytest.approx(mom, rel=EXACT_REL)


@needs_fmnist
@pytest.mark.parametrize("name", names())
def test_trainer_curve(name, tmp_path):
    rec = load(name)
    if rec is None:
        pytest.skip("reported by test_every_curve_has_a_fixture")
    assert rec["overrides"] == overrides_for(name), "overrides changed: re-record with python tests/golden_trainer.py --write"
    got = run_curve(name, tmp_path / "run")
    tol, why = tolerances(rec)
    assert got["steps"] == rec["steps"]
    for key in ("lr", "epoch"):
        assert got[key] == pytest.approx(rec[key], rel=EXACT_REL, abs=1e-15), f"{name}: {key}"
    for key in ("loss", "grad_norm"):
        assert got[key] == pytest.approx(rec[key], rel=tol[key], abs=FP32_ABS), (
            f"{name}: {key} moved ({why}), max rel. diff. {max_rel_diff(got[key], rec[key]):.2e}")
    missing = sorted(set(rec["metrics"]) - set(got["metrics"]))
    assert not missing, f"{name}: the trainer no longer logs {missing}"
    for key, values in rec["metrics"].items():
        assert got["metrics"][key] == pytest.approx(values, rel=tol["metrics"], abs=FP32_ABS), (
            f"{name}: metric {key} moved ({why}), max rel. diff. {max_rel_diff(got['metrics'][key], values):.2e}")
