"""``mimkit report``: chosen protocols on one or more checkpoints -> one markdown table + JSON, and
curves over training for runs with periodic checkpoints: accuracy, and Latent MIM's collapse monitors
Sim and effective rank (when ``diagnostics`` is among the protocols), with error bars where a number
is a mean over seeds or draws.

``report.md`` carries the setup beside the table: data set and split sizes, resize rule, features
(pool / layer / final norm), and each protocol's settings (k and T, lr, batch, epochs, seeds).

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


def _px(size) -> str:
    """``28`` for a square input, ``28x40`` for ``[28, 40]``."""
    return f"{size[0]}x{size[1]}" if isinstance(size, list | tuple) else str(size)


def format_value(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if name.startswith("sim"):
        return f"{value:.3f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def format_epoch(epoch) -> str:
    """``3`` for whole epochs, ``0.33`` otherwise (no raw float tails)."""
    if epoch is None:
        return "–"
    e = float(epoch)
    return f"{e:.0f}" if abs(e - round(e)) < 1e-6 else f"{e:.2f}"


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
            cells.append(format_epoch(r.get("epoch")))
        cells += [d.get(c, "–") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _series(rs: list[dict], metric: str, x_key: str):
    xs = [r.get(x_key) or 0 for r in rs]
    ys = [r["metrics"].get(metric, float("nan")) for r in rs]
    err = [r["metrics"].get(metric + "_std", 0.0) or 0.0 for r in rs]
    return xs, ys, err


def curve_panels(rows: list[dict]) -> tuple[str, dict[str, list[dict]], list[tuple[str, str, list[str]]]]:
    """``(x_key, runs, panels)`` of :func:`plot_curves`: the runs with >= 2 checkpoints (sorted by
    ``x_key``, ``epoch`` when every row has one, else ``step``) and one panel per quantity
    ``(title, y label, metric names)``: top-1 accuracies, top-5 accuracies, Sim, effective rank (a
    panel only when some run measured it)."""
    runs: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("run"):
            runs.setdefault(r["run"], []).append(r)
    runs = {k: v for k, v in runs.items() if len(v) >= 2}
    use_epoch = all(r.get("epoch") is not None for v in runs.values() for r in v)
    x_key = "epoch" if use_epoch else "step"
    runs = {k: sorted(v, key=lambda r: r.get(x_key) or 0) for k, v in runs.items()}
    names = list(dict.fromkeys(k for v in runs.values() for k in v[-1]["metrics"] if not k.endswith("_std")))
    sims = [m for m in names if m.startswith("sim")]
    eranks = [m for m in names if m.startswith("erank")]
    acc = [m for m in names if m not in sims and m not in eranks]
    top5 = [m for m in acc if "top5" in m]
    top1 = [m for m in acc if m not in top5]
    panels = [(title, ylabel, ms) for title, ylabel, ms in (
        ("top-1 accuracy during pretraining", "top-1 (%)", top1),
        ("top-5 accuracy during pretraining", "top-5 (%)", top5),
        ("patch similarity (Sim)", "Sim", sims),
        ("effective rank of the features", "effective rank", eranks)) if ms]
    return x_key, runs, panels


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_curves(rows: list[dict], path: str | Path) -> Path | None:
    """Curves over training for every run with >= 2 checkpoints, one axis per quantity, stacked (top-1,
    top-5, Sim, effective rank; :func:`curve_panels`), each titled; a metric keeps its colour on every axis, a
    run its line style and marker, and the legend sits beside the axes, not over the lines. PNG at
    ``path``; ``None`` when no run has two checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, runs, panels = curve_panels(rows)
    if not runs or not panels:
        return None
    metrics = list(dict.fromkeys(m for _, _, ms in panels for m in ms))
    cmap = plt.get_cmap("tab10" if len(metrics) <= 10 else "tab20")
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(metrics)}
    fig, axes = plt.subplots(len(panels), 1, figsize=(9.0, 3.4 * len(panels)), squeeze=False, layout="constrained")
    for ax, (title, ylabel, names) in zip(axes[:, 0], panels):
        for j, (run, rs) in enumerate(runs.items()):
            style = dict(linestyle=_LINESTYLES[j % len(_LINESTYLES)], marker=_MARKERS[j % len(_MARKERS)])
            for m in names:
                xs, ys, err = _series(rs, m, x_key)
                label = m if len(runs) == 1 else f"{Path(run).name}: {m}"
                if any(err):
                    ax.errorbar(xs, ys, yerr=err, capsize=3, color=colour[m], label=label, **style)
                else:
                    ax.plot(xs, ys, color=colour[m], label=label, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _protocol_setup(proto: str, res: dict, query: str = "test") -> str:
    """One line of a protocol's settings from its result; ``query`` names the evaluated split."""
    if proto == "knn":
        return f"k = {', '.join(map(str, res.get('ks', [res.get('k')])))} (headline k = {res.get('k')}), T = " \
               f"{res.get('temperature')}; LOO 1-NN on the {query} set"
    if proto == "linear":
        d = next(iter(res.get("pools", {}).values()), {})
        c = d.get("config", {})
        return (f"{c.get('optimizer')} lr {d.get('lr', float('nan')):.4g}, batch {c.get('batch_size')}, "
                f"{c.get('epochs')} epochs ({c.get('warmup_epochs'):g} warm-up), "
                f"{'augmented' if res.get('augment') else 'cached features'}, BN statistics "
                f"{'recomputed on the train features' if c.get('recompute_bn') else 'running averages'}")
    if proto == "attentive":
        c = res.get("config", {})
        return (f"SGD nesterov lr {res.get('lr', float('nan')):.4g}, batch {res.get('batch_size')}, {c.get('epochs')} "
                f"epochs ({c.get('warmup_epochs'):g} warm-up), {res.get('steps')} steps")
    if proto == "finetune":
        c = res.get("config", {})
        return (f"AdamW lr {res.get('lr', float('nan')):.4g}, batch {c.get('batch_size')}, {c.get('epochs')} epochs, "
                f"layer decay {c.get('layer_decay')}, mixup {c.get('mixup')}/cutmix {c.get('cutmix')}, "
                f"RandAugment {c.get('rand_augment') or 'off'}, erasing {c.get('reprob')}; best epoch "
                f"{res.get('best_epoch')}")
    if proto == "fewshot":
        d = next(iter(res.get("pools", {}).values()), {})
        return f"{d.get('shots')} shots x {d.get('draws')} draws, logistic regression; mean ± std over draws"
    if proto == "diagnostics":
        return (f"Sim on {query} patch tokens without the final norm; effective rank of the pooled {query} "
                "features")
    return ""


def setup_markdown(rows: list[dict], protocols: Sequence[str], seeds: Sequence[int] | None = None) -> str:
    """The setup block printed beside the table."""
    if not rows:
        return ""
    st = rows[0]["setup"]
    tr, te = st["train_data"], st["test_data"]
    query = "validation" if str(te.get("split", "")).startswith("validation") else "test"
    lines = ["", "**Setup**", "",
             f"- data: train {tr.get('dataset')} ({st['n_train']} images), {query} {te.get('dataset')}"
             f"{' (' + te['folder'] + ')' if te.get('folder') else ''} ({st['n_test']} images), "
             f"{st['num_classes']} classes; {tr.get('resize', '')}"
             + (f"; {te['split_rule']}" if te.get("split_rule") else ""),
             f"- encoder input {_px(st['img_size'])} px, {st['in_chans']} channel(s), mean {st['mean']} / "
             f"std {st['std']} "
             f"({st['norm_source']}); features: block {'last' if st['block'] is None else st['block']}, final "
             f"LayerNorm {'on' if st['final_norm'] else 'off'}; autocast {st.get('amp')}",
             f"- seeds: {', '.join(map(str, seeds)) if seeds else st.get('seed')}"
             + (" (mean ± std over seeds)" if seeds and len(seeds) > 1 else "")]
    for proto in protocols:
        res = rows[0]["results"].get(proto)
        if res:
            lines.append(f"- {proto}: {_protocol_setup(proto, res, query)}")
    lines.append("- columns: `<metric>_<pool>`; `-b<i>` = block i, `-noLN` = without the final LayerNorm")
    return "\n".join(lines) + "\n"


def run_report(
    checkpoints: Sequence[str | Path],
    protocols: Sequence[str],
    opts,
    out_dir: str | Path | None = None,
    protocol_kwargs: dict[str, dict] | None = None,
    load: Callable | None = None,
    log: Callable[[str], None] = print,
    check: Callable | None = None,
    seeds: Sequence[int] | None = None,
) -> dict:
    """Evaluate every checkpoint with every protocol; write ``report.json``, ``report.md`` (``report.val.*``
    with ``opts.val_split``) and
    ``training_curves.png`` (when a run has periodic checkpoints) under ``out_dir``. ``seeds``: the
    trained probes (linear, attentive, finetune) run once per seed and report mean ± std. ``notes`` in
    the result says what was written and why a plot is missing."""
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
        if check is not None:
            check(ctx)
        metrics, results = {}, {}
        for proto in protocols:
            log(f"[report] {name}: {proto}")
            kw = protocol_kwargs.get(proto, {})
            if seeds and proto in SEEDED and len(seeds) > 1:
                res = _over_seeds(PROTOCOLS[proto], ctx, kw, seeds)
            else:
                if seeds and proto in SEEDED and "cfg" in kw and kw["cfg"] is not None:
                    from dataclasses import replace as _replace

                    kw = {**kw, "cfg": _replace(kw["cfg"], seed=seeds[0])}
                res = PROTOCOLS[proto](ctx, **kw)
            metrics.update(res["metrics"])
            results[proto] = res
        rows.append({"name": name, "path": str(path), "run": run, "step": ckpt.step, "epoch": ckpt.epoch,
                     "metrics": metrics, "setup": ctx.describe(), "results": results})
        del ctx, ckpt
    table = markdown_table(rows)
    setup = setup_markdown(rows, protocols, seeds)
    report = {"protocols": list(protocols), "options": options_dict(opts), "rows": rows, "table": table,
              "setup": setup, "notes": []}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot = plot_curves(rows, out / "training_curves.png")
        report["plot"] = str(plot) if plot else None
        if plot is None:
            report["notes"].append(
                "no training-curve plot: it needs a run directory with at least two periodic checkpoints "
                "(pretrain with train.keep_checkpoints=N (and train.ckpt_every_steps) so the run keeps checkpoint-<step>.pt files, then pass the run directory)")
        tag = ".val" if getattr(opts, "val_split", None) is not None else ""  # never over the test numbers
        write_json(out / f"report{tag}.json", report)
        (out / f"report{tag}.md").write_text(table + setup)
        report["notes"].append(f"wrote {out / f'report{tag}.md'}, {out / f'report{tag}.json'}"
                               + (f", {plot}" if plot else ""))
    return report


SEEDED = ("linear", "attentive", "finetune")


def _over_seeds(fn, ctx, kw: dict, seeds: Sequence[int]) -> dict:
    """Run a trained protocol once per seed; metrics become the mean with ``_std`` (sample std)."""
    from dataclasses import replace

    import numpy as np

    runs = []
    for seed in seeds:
        cfg = kw.get("cfg")
        runs.append(fn(ctx, **{**kw, "cfg": replace(cfg, seed=seed) if cfg is not None else None})
                    if cfg is not None else fn(ctx, **kw))
    metrics = {}
    for m in runs[0]["metrics"]:
        vals = np.array([r["metrics"][m] for r in runs], dtype=float)
        metrics[m] = float(vals.mean())
        metrics[m + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    return {**runs[0], "metrics": metrics, "seeds": list(seeds), "per_seed": [r["metrics"] for r in runs]}


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
