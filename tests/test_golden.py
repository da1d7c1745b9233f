"""Golden loss curves (tests/golden_curves.py): every preset's first steps on a fixed batch are
unchanged. A refactor that moves them must explain it and rewrite tests/golden/ in the same commit.
These pin the methods' numerics (hand loop); the trainer's schedule, accumulation, precision and
after_step timing are pinned by tests/test_golden_trainer.py."""

import json

import pytest
from golden_curves import GOLDEN, overrides_for, presets, run_preset


def test_every_preset_has_a_golden_curve():
    missing = [n for n in presets() if not (GOLDEN / f"{n}.json").is_file()]
    assert not missing, f"no golden curve for {missing}: run python tests/golden_curves.py --write {' '.join(missing)}"


@pytest.mark.parametrize("name", presets())
def test_golden_curve(name):
    path = GOLDEN / f"{name}.json"
    if not path.is_file():
        pytest.skip("reported by test_every_preset_has_a_golden_curve")
    rec = json.loads(path.read_text())
    assert rec["overrides"] == overrides_for(name)
    losses = run_preset(name, rec["steps"], rec["batch"])
    assert losses == pytest.approx(rec["losses"], rel=1e-4, abs=1e-6)
