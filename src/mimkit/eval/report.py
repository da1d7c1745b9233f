"""``mimkit report``: chosen protocols on one or more checkpoints -> one markdown table + JSON, and a
plot of accuracy against epoch for runs with periodic checkpoints.

A checkpoint argument may be a file or a run directory. A directory contributes every periodic
checkpoint in it (``checkpoint-*.pt``/``.pth``, ``ckpt_step*.pt``, ``ckpt_*.pt``, ``*.safetensors``),
sorted by the step/epoch in the name; if it has none, its latest ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

PERIODIC_PATTERNS = ("checkpoint-*.pt", "checkpoint-*.pth", "ckpt_step*.pt", "ckpt_step*.pth", "ckpt_*.pt",
                     "*.safetensors")
LATEST_NAMES = ("checkpoint.pt", "checkpoint.pth", "last.pt", "model.safetensors")


def _name_number(path: Path) -> float:
    nums = re.findall(r"\d+(?:\.\d+)?", path.stem)
    return float(nums[-1]) if nums else math.inf


def expand_checkpoints(paths: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """Files to evaluate as ``(path, run)``; ``run`` names the directory they came from (None for a
    file given directly)."""
    out: list[tuple[Path, str | None]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found: set[Path] = set()
            for pat in PERIODIC_PATTERNS:
                found.update(f for f in p.glob(pat) if f.is_file())
            files = sorted(found, key=lambda f: (_name_number(f), f.name))
            if not files:
                files = [p / n for n in LATEST_NAMES if (p / n).is_file()][:1]
            if not files:
                raise FileNotFoundError(f"{p}: no checkpoint files (checkpoint-*.pt, ckpt_step*.pt, checkpoint.pt)")
            out.extend((f, str(p)) for f in files)
        elif p.is_file():
            out.append((p, None))
        else:
            raise FileNotFoundError(f"checkpoint not found: {p}")
    return out


def format_value(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if name.startswith("sim"):
        return f"{value:.3f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def display_metrics(metrics: dict) -> dict[str, str]:
    """Column -> text; ``X`` and ``X_std`` merge into ``"mean ± std"``."""
    cols = {}
    for k, v in metrics.items():
        if k.endswith("_std") and k[: -len("_std")] in metrics:
            continue
        text = format_value(k, v)
        if f"{k}_std" in metrics:
            text = f"{text} ± {format_value(k, metrics[k + '_std'])}"
        cols[k] = text
    return cols


def markdown_table(rows: list[dict], label_key: str = "name") -> str:
    """``rows``: ``{"name", "epoch", "metrics"}`` -> a GitHub markdown table (union of metric columns)."""
    disp = [display_metrics(r["metrics"]) for r in rows]
    cols: list[str] = []
    for d in disp:
        cols += [c for c in d if c not in cols]
    has_epoch = any(r.get("epoch") is not None for r in rows)
    head = ["checkpoint"] + (["epoch"] if has_epoch else []) + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r, d in zip(rows, disp):
        cells = [str(r[label_key])]
        if has_epoch:
            cells.append("–" if r.get("epoch") is None else f"{r['epoch']:g}")
        cells += [d.get(c, "–") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], path: str | Path) -> Path | None:
    """Accuracy metrics against epoch (or step) for every run with ≥ 2 checkpoints; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("run"):
            runs.setdefault(r["run"], []).append(r)
    runs = {k: v for k, v in runs.items() if len(v) >= 2}
    if not runs:
        return None
    use_epoch = all(r.get("epoch") is not None for v in runs.values() for r in v)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, rs in runs.items():
        rs = sorted(rs, key=lambda r: (r.get("epoch") if use_epoch else r.get("step")) or 0)
        xs = [(r.get("epoch") if use_epoch else r.get("step")) or 0 for r in rs]
        names = [k for k in rs[-1]["metrics"] if not k.endswith("_std") and not k.startswith(("sim", "erank"))]
        for m in names:
            ys = [r["metrics"].get(m, float("nan")) for r in rs]
            label = m if len(runs) == 1 else f"{Path(run).name}: {m}"
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("epoch" if use_epoch else "step")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy during pretraining")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_report(
    checkpoints: Sequence[str | Path],
    protocols: Sequence[str],
    opts,
    out_dir: str | Path | None = None,
    protocol_kwargs: dict[str, dict] | None = None,
    load: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate every checkpoint with every protocol; write ``report.json``, ``report.md`` and
    ``accuracy_vs_epoch.png`` (when a run has periodic checkpoints) under ``out_dir``."""
    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.eval.protocols import PROTOCOLS, EvalContext, options_dict

    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    load = load or load_checkpoint_encoder
    protocol_kwargs = protocol_kwargs or {}
    files = expand_checkpoints(checkpoints)
    names = _short_names([f for f, _ in files])
    rows = []
    for (path, run), name in zip(files, names):
        ckpt = load(path, device=opts.device)
        ctx = EvalContext(ckpt, opts)
        metrics, results = {}, {}
        for proto in protocols:
            log(f"[report] {name}: {proto}")
            res = PROTOCOLS[proto](ctx, **protocol_kwargs.get(proto, {}))
            metrics.update(res["metrics"])
            results[proto] = res
        rows.append({"name": name, "path": str(path), "run": run, "step": ckpt.step, "epoch": ckpt.epoch,
                     "metrics": metrics, "setup": ctx.describe(), "results": results})
        del ctx, ckpt
    table = markdown_table(rows)
    report = {"protocols": list(protocols), "options": options_dict(opts), "rows": rows, "table": table}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot = plot_curves(rows, out / "accuracy_vs_epoch.png")
        report["plot"] = str(plot) if plot else None
        write_json(out / "report.json", report)
        (out / "report.md").write_text(table)
    return report


def sanitize(obj):
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, tensors -> lists, paths -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [sanitize(v) for v in obj]
    if isinstance(obj, int | str | bool) or obj is None:
        return obj
    return sanitize(_json_default(obj)) if not isinstance(obj, str) else obj


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(sanitize(obj), indent=2))


def _short_names(paths: list[Path]) -> list[str]:
    """File names, prefixed with the parent folder when names collide."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" for p in paths]


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, torch.dtype):
            return str(o)
    except ImportError:  # pragma: no cover
        pass
    return str(o)
