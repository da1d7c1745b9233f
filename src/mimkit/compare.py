"""Reference loss / kNN curves and ``mimkit compare``: is a run's loss inside the band of reference seeds?

A *reference* is a directory (e.g. ``docs/reference/fashion_mnist/mae_fashion_mnist/``) holding

* ``loss.csv``: ``step, epoch, mean, min, max, seed_<s>...``: the training loss of every seed at the
  logged steps (steps logged by all seeds);
* ``knn.csv``: ``step, epoch, metric, mean, min, max, seed_<s>...`` with ``metric`` ``top1_cls`` or
  ``top1_mean`` (kNN top-1 % during and at the end of training), when the runs evaluated kNN;
* ``meta.json``: the preset, the method, the overrides, the seeds, the command that made it and the
  resolved config of the first seed;
* ``curves.png``: the band (min..max of the seeds) and the mean.

:func:`build_reference` reduces run directories (``metrics.jsonl``, ``result.json``) to that layout;
:func:`compare_run` holds a run against a reference at the steps both logged. A step is *inside* when
``min - tol * |mean| <= loss <= max + tol * |mean|``; the run is inside the band when at least
``min_inside`` of its compared steps are. Defaults ``tol = 0.05``, ``min_inside = 0.75``: on the
shipped Fashion-MNIST MAE reference, each seed left out lies inside the band of the other two at 75-92 %
of the logged steps with that tolerance (25-42 % with none: a logged loss is one step's, noisy). Methods
whose loss level depends on the seed's teacher (PCAE, CAE v2) need a larger tolerance (see
``docs/reference/README.md``). Different optimisation settings (lr, batch, epochs, data
subset) change the curve: they are listed in the result so a comparison of unlike runs is not taken
at face value.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mimkit.errors import ConfigError

KNN_METRICS = ("top1_cls", "top1_mean")
# settings that do not change the loss curve and are not compared
_FREE_KEYS = ("train.seed", "train.out_dir", "train.device", "train.precision", "train.compile", "train.compile_mode",
              "train.resume", "train.resume_changes", "train.ckpt_every_steps", "train.ckpt_every_minutes", "train.keep_checkpoints",
              "train.progress_bar", "train.tensorboard", "train.num_threads", "train.max_nonfinite",
              "train.max_nonfinite_fraction", "train.dist_timeout_minutes", "train.log_every_steps", "data.root",
              "data.num_workers", "data.in_memory", "data.eval_root", "data.skip_corrupt", "model.init", "optim.fused")


# --------------------------------------------------------------------------------------------------
# reading runs


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The step records of ``run_dir/metrics.jsonl`` (events skipped; a step logged twice keeps its
    last record, as after a resume)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found: give a run directory written by `mimkit pretrain` (it holds "
                          "metrics.jsonl and config.yaml)")
    by_step: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {n} is not JSON ({e.msg}); the file is corrupt: restore it or "
                              "rerun the run") from e
        if "event" in rec or "step" not in rec:
            continue
        by_step.setdefault(int(rec["step"]), {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def loss_curve(records: list[dict]) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in records if r.get("loss") is not None}


def knn_curve(run_dir: str | Path, records: list[dict]) -> dict[str, dict[int, float]]:
    """kNN top-1 per metric and step: the in-training evaluations of ``metrics.jsonl`` and the final
    one of ``result.json`` (at the run's last step)."""
    out: dict[str, dict[int, float]] = {m: {} for m in KNN_METRICS}
    for r in records:
        for m in KNN_METRICS:
            if r.get(f"knn_{m}") is not None:
                out[m][int(r["step"])] = float(r[f"knn_{m}"])
    res_path = Path(run_dir) / "result.json"
    if res_path.is_file():
        res = json.loads(res_path.read_text())
        knn = res.get("knn") or {}
        for m in KNN_METRICS:
            if knn.get(m) is not None:
                out[m][int(res["step"])] = float(knn[m])
    return {m: v for m, v in out.items() if v}


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: give a run directory written by `mimkit pretrain`")
    return yaml.safe_load(path.read_text()) or {}


def _flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def config_differences(run_cfg: dict, ref_cfg: dict) -> dict[str, tuple]:
    """``{key: (reference, run)}`` of the settings that shape the loss curve and differ."""
    a, b = _flatten(ref_cfg), _flatten(run_cfg)
    diff = {}
    for k in sorted(set(a) | set(b)):
        if k in _FREE_KEYS or k.startswith("eval.") or k not in a or k not in b:
            continue
        if a[k] != b[k]:
            diff[k] = (a[k], b[k])
    return diff


# --------------------------------------------------------------------------------------------------
# building a reference


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _stats(values: list[float]) -> list[float]:
    return [sum(values) / len(values), min(values), max(values)]


def build_reference(run_dirs: dict[int, str | Path], out_dir: str | Path, meta: dict) -> Path:
    """Reduce the runs of one config (``{seed: run_dir}``) to a reference directory ``out_dir``
    (``loss.csv``, ``knn.csv``, ``meta.json``, ``curves.png``). Only steps every seed logged are kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = sorted(run_dirs)
    recs = {s: read_metrics(run_dirs[s]) for s in seeds}
    losses = {s: loss_curve(recs[s]) for s in seeds}
    epochs = {int(r["step"]): r.get("epoch") for r in recs[seeds[0]]}
    steps = sorted(set.intersection(*(set(v) for v in losses.values())))
    if not steps:
        raise ConfigError(f"the runs {[str(p) for p in run_dirs.values()]} share no logged step")
    rows = [[st, epochs.get(st), *_stats([losses[s][st] for s in seeds]), *[losses[s][st] for s in seeds]]
            for st in steps]
    _write_csv(out / "loss.csv", ["step", "epoch", "mean", "min", "max", *[f"seed_{s}" for s in seeds]], rows)
    knns = {s: knn_curve(run_dirs[s], recs[s]) for s in seeds}
    krows = []
    for m in KNN_METRICS:
        if not all(m in knns[s] for s in seeds):
            continue
        common = sorted(set.intersection(*(set(knns[s][m]) for s in seeds)))
        for st in common:
            vals = [knns[s][m][st] for s in seeds]
            ep = epochs.get(st)
            if ep is None:
                ep = json.loads((Path(run_dirs[seeds[0]]) / "result.json").read_text()).get("epochs")
            krows.append([st, ep, m, *_stats(vals), *vals])
    if krows:
        _write_csv(out / "knn.csv", ["step", "epoch", "metric", "mean", "min", "max", *[f"seed_{s}" for s in seeds]],
                   krows)
    meta = {**meta, "seeds": seeds}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    ref = load_reference(out)
    plot_comparison(ref, None, out / "curves.png", title=f"{meta.get('preset', out.name)}: {len(seeds)} seeds")
    return out


# --------------------------------------------------------------------------------------------------
# reading a reference


@dataclass
class Reference:
    path: Path
    meta: dict
    steps: list[int]
    epoch: dict[int, float | None]
    mean: dict[int, float]
    lo: dict[int, float]
    hi: dict[int, float]
    seeds: dict[str, dict[int, float]]
    knn: dict[str, dict[int, tuple[float, float, float]]] = field(default_factory=dict)  # metric -> step -> (mean, lo, hi)


def load_reference(path: str | Path) -> Reference:
    """Read a reference directory (see the module docstring)."""
    p = Path(path)
    for name in ("loss.csv", "meta.json"):
        if not (p / name).is_file():
            raise ConfigError(f"{p} is not a reference directory (no {name}); give a directory made by "
                              "scripts/reference_curves.py, e.g. docs/reference/fashion_mnist/mae_fashion_mnist")
    meta = json.loads((p / "meta.json").read_text())
    steps, epoch, mean, lo, hi, seeds = [], {}, {}, {}, {}, {}
    with open(p / "loss.csv", newline="") as f:
        for row in csv.DictReader(f):
            st = int(row["step"])
            steps.append(st)
            epoch[st] = float(row["epoch"]) if row.get("epoch") not in (None, "") else None
            mean[st], lo[st], hi[st] = float(row["mean"]), float(row["min"]), float(row["max"])
            for k, v in row.items():
                if k.startswith("seed_"):
                    seeds.setdefault(k, {})[st] = float(v)
    knn: dict = {}
    if (p / "knn.csv").is_file():
        with open(p / "knn.csv", newline="") as f:
            for row in csv.DictReader(f):
                knn.setdefault(row["metric"], {})[int(row["step"])] = (float(row["mean"]), float(row["min"]),
                                                                       float(row["max"]))
    return Reference(p, meta, steps, epoch, mean, lo, hi, seeds, knn)


def default_reference_roots() -> list[Path]:
    """Where references are looked for: ``./docs/reference`` and the source checkout's ``docs/reference``."""
    here = Path(__file__).resolve().parents[2] / "docs" / "reference"
    roots = [Path.cwd() / "docs" / "reference", here]
    out = []
    for r in roots:
        if r.is_dir() and r.resolve() not in [o.resolve() for o in out]:
            out.append(r)
    return out


def find_references(roots: list[Path] | None = None) -> list[Path]:
    roots = default_reference_roots() if roots is None else roots
    return sorted({m.parent.resolve() for r in roots for m in Path(r).rglob("meta.json") if (m.parent / "loss.csv").is_file()})


def match_reference(run_cfg: dict, roots: list[Path] | None = None) -> Path:
    """The reference of the run's preset: same method and data set, fewest differing settings."""
    refs = find_references(roots)
    if not refs:
        where = ", ".join(str(r) for r in (roots or default_reference_roots())) or "docs/reference (missing)"
        raise ConfigError(f"no reference curves found under {where}; give REFERENCE explicitly or run "
                          "scripts/reference_curves.py")
    method = (run_cfg.get("method") or {}).get("name")
    dataset = (run_cfg.get("data") or {}).get("dataset")
    best = None
    for r in refs:
        meta = json.loads((r / "meta.json").read_text())
        cfg = meta.get("config") or {}
        if (cfg.get("method") or {}).get("name") != method or (cfg.get("data") or {}).get("dataset") != dataset:
            continue
        n = len(config_differences(run_cfg, cfg))
        if best is None or n < best[0]:
            best = (n, r)
    if best is None:
        names = ", ".join(r.name for r in refs)
        raise ConfigError(f"no reference for method '{method}' on data set '{dataset}' (available: {names}); give "
                          "REFERENCE explicitly")
    return best[1]


# --------------------------------------------------------------------------------------------------
# comparing


@dataclass
class Comparison:
    reference: Path
    steps: list[int]
    run_loss: dict[int, float]
    inside: dict[int, bool]
    fraction_inside: float
    verdict: bool
    differences: dict[str, tuple]
    knn: dict[str, list[tuple[int, float, float, float, bool]]]  # metric -> (step, run, lo, hi, inside)
    tolerance: float
    min_inside: float

    def summary(self) -> str:
        n_in = sum(self.inside.values())
        lines = [f"reference: {self.reference}",
                 f"loss: {n_in} of {len(self.steps)} compared steps ({100 * self.fraction_inside:.0f} %) inside the "
                 f"band of the reference seeds (tolerance {100 * self.tolerance:g} % of the mean)"]
        outside = [s for s in self.steps if not self.inside[s]]
        if outside:
            ex = ", ".join(f"step {s}" for s in outside[:5]) + (" ..." if len(outside) > 5 else "")
            lines.append(f"  outside at {ex}")
        last = self.steps[-1]
        lines.append(f"  last compared step {last}: run {self.run_loss[last]:.4f}")
        for m, pts in self.knn.items():
            for st, v, lo, hi, ok in pts:
                lines.append(f"kNN {m} at step {st}: run {v:.2f} %, reference {lo:.2f}..{hi:.2f} % "
                             f"({'inside' if ok else 'outside'})")
        if self.differences:
            diff = ", ".join(f"{k} {json.dumps(a)} (reference) vs {json.dumps(b)}" for k, (a, b) in
                             list(self.differences.items())[:8])
            lines.append(f"note: the run's settings differ from the reference's: {diff}; the band holds only for "
                         "the reference's settings (see its meta.json for the command)")
        verdict = "INSIDE" if self.verdict else "OUTSIDE"
        lines.append(f"verdict: {verdict} the reference band (needs >= {100 * self.min_inside:g} % of steps inside)")
        return "\n".join(lines)


def compare_run(run_dir: str | Path, reference: str | Path | None = None, tolerance: float = 0.05,
                min_inside: float = 0.75, roots: list[Path] | None = None) -> Comparison:
    """Hold ``run_dir``'s loss (and kNN) against ``reference`` (default: the matching reference of the
    run's method and data set) at the steps both logged."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--tolerance {tolerance} must be >= 0 (a fraction of the reference mean, e.g. 0.05)")
    if not 0 < min_inside <= 1:
        raise ConfigError(f"--min-inside {min_inside} must be in (0, 1], e.g. 0.75")
    run_cfg = read_run_config(run_dir)
    records = read_metrics(run_dir)
    ref_path = Path(reference) if reference is not None else match_reference(run_cfg, roots)
    if reference is not None and not ref_path.is_dir():
        # a preset name: look it up under the reference roots
        refs = find_references(roots)
        hits = [r for r in refs if r.name == str(reference)]
        if not hits:
            names = ", ".join(sorted({r.name for r in refs})) or "none found"
            raise ConfigError(f"reference {reference} is neither a directory nor a known preset name "
                              f"(available: {names})")
        ref_path = hits[0]
    ref = load_reference(ref_path)
    run_loss = loss_curve(records)
    steps = [s for s in ref.steps if s in run_loss]
    if not steps:
        ref_steps = f"{ref.steps[0]}..{ref.steps[-1]}" if ref.steps else "none"
        run_steps = f"{min(run_loss)}..{max(run_loss)}" if run_loss else "none"
        raise ConfigError(f"the run logged no step the reference has (reference steps {ref_steps}, run steps "
                          f"{run_steps}); log with the reference's train.log_every_steps (see its meta.json)")
    inside = {}
    for s in steps:
        slack = tolerance * abs(ref.mean[s])
        v = run_loss[s]
        inside[s] = bool(math.isfinite(v) and ref.lo[s] - slack <= v <= ref.hi[s] + slack)
    frac = sum(inside.values()) / len(steps)
    knn_out: dict = {}
    run_knn = knn_curve(run_dir, records)
    for m, pts in ref.knn.items():
        for st, (mean, lo, hi) in sorted(pts.items()):
            if st in run_knn.get(m, {}):
                v = run_knn[m][st]
                slack = tolerance * abs(mean)
                knn_out.setdefault(m, []).append((st, v, lo, hi, lo - slack <= v <= hi + slack))
    return Comparison(ref.path, steps, run_loss, inside, frac, frac >= min_inside - 1e-12,
                      config_differences(run_cfg, ref.meta.get("config") or {}), knn_out, tolerance, min_inside)


def plot_comparison(ref: Reference, cmp: Comparison | None, out: str | Path, title: str | None = None) -> Path:
    """Loss band (min..max of the seeds), the seeds' mean, the run (when given); kNN panel when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_knn = bool(ref.knn)
    fig, axes = plt.subplots(1, 2 if has_knn else 1, figsize=(10 if has_knn else 5.5, 3.6), squeeze=False)
    ax = axes[0, 0]
    st = ref.steps
    ax.fill_between(st, [ref.lo[s] for s in st], [ref.hi[s] for s in st], color="tab:blue", alpha=0.25,
                    label=f"reference band ({len(ref.seeds)} seeds)")
    ax.plot(st, [ref.mean[s] for s in st], color="tab:blue", lw=1.2, label="reference mean")
    if cmp is not None:
        rs = sorted(cmp.run_loss)
        ax.plot(rs, [cmp.run_loss[s] for s in rs], color="tab:red", lw=1.2, label="this run")
        bad = [s for s in cmp.steps if not cmp.inside[s]]
        if bad:
            ax.scatter(bad, [cmp.run_loss[s] for s in bad], color="black", s=10, zorder=3, label="outside")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if has_knn:
        ax2 = axes[0, 1]
        colors = {"top1_cls": "tab:green", "top1_mean": "tab:purple"}
        for m, pts in ref.knn.items():
            ks = sorted(pts)
            ax2.fill_between(ks, [pts[k][1] for k in ks], [pts[k][2] for k in ks], color=colors.get(m), alpha=0.25)
            ax2.plot(ks, [pts[k][0] for k in ks], "o-", color=colors.get(m), ms=3, label=f"reference {m}")
            if cmp is not None and m in cmp.knn:
                ax2.plot([p[0] for p in cmp.knn[m]], [p[1] for p in cmp.knn[m]], "x--", color=colors.get(m),
                         label=f"run {m}")
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("kNN top-1 (%)")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    fig.suptitle(title or ref.meta.get("preset", ref.path.name), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
