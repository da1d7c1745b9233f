"""mimkit against numbers recorded from the official code (tests/official/<method>.json).

``scripts/record_official_fixtures.py`` ran the official MAE (facebookresearch/mae), CAE and CAE v2
(Atten4Vis/CAE) and PCAE (caddyless/PCAE) code at a tiny shape with weights drawn from fixed seeds, on fixed
inputs and masks, and recorded the official losses and sampled output values (each file names the command,
the official commit and the date). Here the same mimkit models are rebuilt from the same seeds
(``mimkit_model``, ``inputs``, ``plan_of`` of that script; nothing is fetched and no official code runs) and
must give the same numbers.

Tolerance: 1e-5 absolute on every loss and sampled value (all of them O(0.1) to O(10)). Both sides
run in fp32 on the CPU; what differs is only the order of floating-point operations (mimkit's attention
kernels, fused projections and gathers against the official explicit softmax and boolean indexing): the
differences measured when recording were at most 4.2e-7 (``measured`` in each file), about 1-4 ulp of the
values. 1e-5 leaves a factor of 20 for other CPUs and torch versions, while one wrong id in a mask already
moves the results by more than 1e-3 (:func:`test_the_tolerance_tells_a_wrong_mask`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    """``scripts/record_official_fixtures.py`` as the module ``record_official_fixtures`` (CAE's fixture
    tokenizer is named by that module path)."""
    name = "record_official_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


rof = _script()

TOL = 1e-5


def fixture(name: str) -> dict:
    path = ROOT / "tests" / "official" / f"{name}.json"
    assert path.is_file(), f"no fixture {path}: record it with scripts/record_official_fixtures.py (its docstring)"
    return json.loads(path.read_text())


def model_and_inputs(name: str, tmp_path: Path):
    """The fixture's mimkit model and inputs (CAE v2: its CLIP teacher written to a file mimkit reads)."""
    teacher = None
    if name == "cae_v2":
        teacher = tmp_path / "clip_teacher.pt"
        torch.save(rof.clip_state(), teacher)
    return rof.mimkit_model(name, None if teacher is None else str(teacher)), rof.inputs(name)


def differences(name: str, fx: dict, tmp_path: Path) -> dict[str, float]:
    """Largest absolute difference per recorded value (``rof.compare``: losses, the mean, mean absolute value
    and sampled values of each output, ids compared exactly)."""
    model, x = model_and_inputs(name, tmp_path)
    return rof.compare(fx["results"], rof.mimkit_outputs(name, model, fx, x))


@pytest.mark.parametrize("name", rof.METHODS)
def test_fixture_records_its_source(name):
    fx = fixture(name)
    assert fx["method"] == name and fx["official"]["repo"].endswith(rof.REPOS[name])
    assert len(fx["official"]["commit"]) == 40 and fx["command"].startswith("python scripts/record_official_fixtures.py")
    assert fx["date"] and fx["case"]["batch"] == rof.B and fx["case"]["weight_seed"] == rof.WEIGHT_SEED
    # the official code built the same position tables and took mimkit's weights through mimkit's mappings
    assert all(v < 1e-6 for k, v in fx["checks"].items() if k.endswith("_vs_mimkit"))
    assert fx["checks"].get("mapping_round_trip", True) is True
    if name == "pcae":
        assert fx["checks"]["teacher_differs_from_student"]  # the EMA teacher's own weights are used


@pytest.mark.parametrize("name", rof.METHODS)
def test_mimkit_equals_the_official_code(name, tmp_path):
    fx = fixture(name)
    diffs = differences(name, fx, tmp_path)
    assert set(diffs) == set(fx["results"])
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"{name}: mimkit differs from the official code by more than {TOL}: {bad}"


@pytest.mark.parametrize("name", rof.METHODS)
def test_the_tolerance_tells_a_wrong_mask(name, tmp_path):
    """One visible and one masked id swapped in every image: the comparison fails by far more than TOL."""
    fx = fixture(name)
    keep = fx["num_keep"]
    wrong = dict(fx, perm=[row[: keep - 1] + [row[keep]] + [row[keep - 1]] + row[keep + 1 :] for row in fx["perm"]])
    assert max(differences(name, wrong, tmp_path).values()) > 1e-3
