"""``mimkit zoo``: train several configs over several seeds, evaluate every encoder the same way, one table.

::

    mimkit zoo configs/mae_fashion_mnist.yaml configs/pcae_fashion_mnist.yaml --seeds 0,1,2 \\
        --protocols knn,linear,attentive --out zoo/
    mimkit zoo configs/*_fashion_mnist.yaml --seeds 0 train.epochs=1          # key=value: every run
    mimkit zoo configs/mae_fashion_mnist.yaml configs/cae_v2_fashion_mnist.yaml --seeds 0,1 \\
        'cae_v2_fashion_mnist:method.teacher_path={out}/runs/mae_fashion_mnist/seed{seed}/checkpoint.pt'

What it does, run by run (seed-major: every config's seed 0 first, so an interrupted zoo already has a
one-seed table), showing ``[zoo i/N] config seed s: ...``:

1. **Train** ``mimkit pretrain CONFIG`` in a child process with ``train.out_dir=OUT/runs/<config>/seed<s>``
   and ``train.seed=<s>`` (plus ``eval.knn_at_end=false eval.picture_at_end=false``: the zoo evaluates
   itself), then the ``key=value`` overrides. A run that finished before is reused (``zoo_train.json``)
   when its ``config.yaml`` has the same training settings (else it is reported as failed, not reused);
   one that was interrupted resumes from its last checkpoint (``train.resume=auto``). Recorded per run:
   wall time of the child (all attempts summed; ``attempts`` says how many), the trainer's median
   img/s over its logging windows after the first, the child's peak resident memory (its own ``VmHWM``,
   read while it runs, see :class:`ChildPeakRss`; on a
   GPU also ``torch.cuda.max_memory_allocated`` of the last attempt, from its ``result.json``), and the 1-minute load
   average before and after each attempt with the CPU other processes used meanwhile (``/proc/stat``
   busy time minus the child's own): a time taken while others used more than 0.2 cores is not a
   measurement (such runs are left out of the time columns, ``loaded`` in ``runs.csv``).
2. **Evaluate** the run's final checkpoint with each protocol (``mimkit eval`` with the same flags for
   every run, so every encoder sees the same split, limits and probe seed). Each result is kept in
   ``.../eval/<protocol>.json`` (``<protocol>.val.json`` with ``--val-split``) with the options it was
   computed with, and reused only when they match (how it was computed -- ``--amp``, batch size, device,
   caches -- does not count: :data:`EXECUTION_OPTIONS`).

Keeping a zoo without its weights: the records (``zoo_train.json``, ``config.yaml``, ``metrics.jsonl``,
``eval/*.json``) are a few kB per run and are all the table needs; a zoo spread over machines keeps them
(e.g. in git, as ``benchmarks/results/zoo_fmnist/`` does) and drops the checkpoints. Such a run is
reused as finished; a protocol it was never evaluated with is listed as not evaluated (its cells say
over how many seeds they are, ``(n=2)``) instead of failing the run. The table has a ``precision``
column (each run's ``train.precision``; ``runs.csv`` adds the evaluation's autocast and the machine).
``--report-only`` trains and evaluates nothing: it writes the table of what the directory holds (runs
not there yet listed as not run), e.g. the merged table of a zoo that is half done.

Choosing settings: ``--val-split 10000`` evaluates on 10,000 images held out of the training split
(stratified, the same images whatever ``--seed``) instead of the test split, which is then never read
(no run may turn on a kNN or picture during pretraining); its tables are ``zoo.val.md``, ``zoo.val.csv``,
``runs.val.csv``, ``zoo.val.json``, ``zoo.val.png`` beside the test ones. Pretraining still sees every
training image (it uses no labels), so the held-out images are not unseen as the test images are. Compare variants with one ``--out`` per variant, e.g. ``mimkit zoo
configs/pcae_fashion_mnist.yaml --seeds 0 --val-split 10000 --out tune/lr3e-3 optim.lr=3e-3``.

Then ``OUT/zoo.md`` (mean ± sample std over seeds per config, the setup beside it), ``OUT/zoo.csv``
(one line per config), ``OUT/runs.csv`` (one line per run), ``OUT/zoo.json`` and ``OUT/zoo.png`` (bars
with error bars, one panel per headline metric).

Overrides: ``key=value`` applies to every run; ``NAME:key=value`` only to the runs of the config whose
file stem is ``NAME``. In values ``{seed}`` is the run's seed and ``{out}`` the zoo's ``--out``; a
value naming another config's run (``{out}/runs/OTHER/seed{seed}/...``) makes the run wait for that
one: ``OTHER`` must be listed first, and the run fails (without training) when ``OTHER`` did not finish.
``--dataset PATH`` trains on ``PATH/train`` (or ``PATH`` when it has no ``train`` folder) and evaluates
on ``PATH`` (``mimkit eval``'s folder rules); ``fashion_mnist`` is the default. A run that fails is
listed as failed and the zoo goes on; the exit status is then 1. Ctrl-C or SIGTERM stops the zoo (a
training child saves its checkpoint; SIGTERM is passed on to it); the same command continues.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from mimkit.errors import ConfigError

TRAIN_RECORD = "zoo_train.json"
ATTEMPTS = "zoo_attempts.jsonl"
ZOO_DEFAULTS = ("eval.knn_at_end=false", "eval.picture_at_end=false")
"""Overrides put before the user's: the zoo evaluates every encoder itself."""
ZOO_KEYS = ("train.out_dir", "train.seed")
"""Keys the zoo sets per run (refused as overrides)."""
EXIT_INTERRUPTED_CODES = (75, 130, -2, -15)
"""Exit statuses of a child that was stopped, not broken: ``mimkit.cli``'s EXIT_INTERRUPTED (a stop
signal; the checkpoint is saved) and EXIT_KEYBOARD, or killed by SIGINT / SIGTERM."""
DEPENDENCY = re.compile(r"\{out\}/runs/([A-Za-z0-9_.-]+)/seed\{seed\}")
"""An override that points into another config's run of the same seed (CAE v2's teacher = the zoo's MAE)."""


class ZooInterrupted(Exception):
    """A child training run stopped on Ctrl-C / a signal: the zoo stops (the same command continues)."""


_CHILD: subprocess.Popen | None = None
"""The training child running now (SIGTERM to the zoo is passed on to it)."""
_TERMINATED = False
"""SIGTERM arrived: the zoo stops after the child it went to has saved and exited."""


def _on_sigterm(signum, frame) -> None:
    """SIGTERM to the zoo (``kill``, a scheduler's stop): a training child gets it too, saves its
    checkpoint and exits (the zoo then stops as for Ctrl-C); during an evaluation the zoo stops at once
    (that evaluation is redone next time). Nothing is left running."""
    global _TERMINATED
    _TERMINATED = True
    child = _CHILD
    if child is None:
        raise KeyboardInterrupt
    try:
        os.kill(child.pid, signal.SIGTERM)  # not send_signal: it would reap the child before wait4 does
    except ProcessLookupError:
        pass


@dataclass
class ZooRun:
    config: Path
    name: str
    seed: int
    out_dir: Path
    overrides: list[str] = field(default_factory=list)
    depends: list[str] = field(default_factory=list)
    train: dict | None = None
    evals: dict = field(default_factory=dict)
    error: str | None = None
    missing: list[str] = field(default_factory=list)
    """Protocols a finished run kept without its weights could not be evaluated with."""


# -- planning -----------------------------------------------------------------------------------------
def split_arguments(items: list[str]) -> tuple[list[Path], list[str]]:
    """``CONFIG.yaml`` files and ``[NAME:]key=value`` overrides, in any order."""
    configs, overrides = [], []
    for item in items:
        if "=" in item and not item.endswith((".yaml", ".yml")):
            overrides.append(item)
        else:
            configs.append(Path(item).expanduser())
    return configs, overrides


def plan_runs(configs: list[Path], seeds: list[int], out: Path, overrides: list[str],
              dataset: str = "fashion_mnist", val_split: float | None = None) -> list[ZooRun]:
    """Every (config, seed) pair, seed-major, with its resolved overrides; every config validated here
    (a ConfigError naming the file) before any run starts. With ``val_split`` no run may measure on the
    test split while it trains (``eval.knn_at_end``, ``eval.knn_every_epochs``, ``eval.picture_at_end``)."""
    from mimkit.config import load_config

    if not configs:
        raise ConfigError("give at least one config file, e.g. mimkit zoo configs/mae_fashion_mnist.yaml")
    missing = [str(c) for c in configs if not c.is_file()]
    if missing:
        raise ConfigError(f"config file(s) not found: {', '.join(missing)}")
    names = [c.stem for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two configs named {dup[0]}: the zoo names runs by file stem; rename one")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))} repeats a seed")
    scoped: dict[str, list[str]] = {n: [] for n in names}
    common = []
    for ov in overrides:
        key_part = ov.split("=", 1)[0]
        if ":" in key_part:
            name, rest = ov.split(":", 1)
            if name not in scoped:
                raise ConfigError(f"override {ov!r} names {name!r}, which is not one of the configs "
                                  f"({', '.join(names)})")
            scoped[name].append(rest)
            key_part = rest.split("=", 1)[0]
        else:
            common.append(ov)
        if key_part.strip() in ZOO_KEYS:
            raise ConfigError(f"override {ov!r}: the zoo sets {key_part.strip()} for every run "
                              f"({out}/runs/<config>/seed<s>, the seed from --seeds); drop it")
    data = dataset_overrides(dataset)
    depends: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        deps = list(dict.fromkeys(d for ov in (*common, *scoped[name]) for d in DEPENDENCY.findall(ov)))
        for d in deps:
            if d not in names or names.index(d) >= i:
                where = "is not one of the configs" if d not in names else f"comes after {name}"
                raise ConfigError(f"{name}'s overrides use the run of {d} ({{out}}/runs/{d}/seed{{seed}}), which "
                                  f"{where}: list {d}'s config before {name}'s")
        depends[name] = deps
    runs = []
    for seed in seeds:
        for cfg_path, name in zip(configs, names, strict=True):
            run_dir = out / "runs" / name / f"seed{seed}"
            ovs = [*ZOO_DEFAULTS, *data, *common, *scoped[name], f"train.out_dir={run_dir}", f"train.seed={seed}"]
            ovs = [o.replace("{seed}", str(seed)).replace("{out}", str(out)) for o in ovs]
            try:
                cfg = load_config(cfg_path, ovs)
            except (ConfigError, ValueError, TypeError) as e:
                raise ConfigError(f"{cfg_path}: {' '.join(str(e).split())}") from None
            ev = cfg.eval
            on = [k for k, v in (("eval.knn_at_end", ev.knn_at_end), ("eval.knn_every_epochs", ev.knn_every_epochs > 0),
                                 ("eval.picture_at_end", ev.picture_at_end)) if v]
            if val_split is not None and on:
                raise ConfigError(f"{cfg_path}: --val-split {val_split:g} chooses settings without the test split, "
                                  f"but {', '.join(on)} would measure on it during pretraining; drop that override")
            runs.append(ZooRun(cfg_path, name, seed, run_dir, ovs, depends=depends[name]))
    return runs


def dataset_overrides(dataset: str) -> list[str]:
    """The pretraining data for ``--dataset``: ``PATH/train`` when it exists, else ``PATH``."""
    if dataset in ("fashion_mnist", "fashion-mnist", "fmnist"):
        return []
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--dataset {dataset}: not a folder; give fashion_mnist or an image folder")
    train = root / "train"
    return [f"data.dataset={train if train.is_dir() else root}"]


# -- training -----------------------------------------------------------------------------------------
def _load_1min() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _busy_cpu_s() -> float | None:
    """Seconds of CPU time every core of the machine has spent busy since boot (``/proc/stat``; None
    where there is none)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _median_img_per_s(run_dir: Path) -> float | None:
    """The trainer's median ``img_per_s`` over its logged windows after the first (warm-up)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec.get("img_per_s"), (int, float)):
            vals.append(float(rec["img_per_s"]))
    vals = vals[1:] if len(vals) > 1 else vals
    return statistics.median(vals) if vals else None


def train_run(run: ZooRun, log=print, threads: int | None = None) -> dict:
    """Train one run in a child ``mimkit pretrain`` (reused when finished before); returns its record."""
    record_path = run.out_dir / TRAIN_RECORD
    if record_path.is_file():
        rec = json.loads(record_path.read_text())
        changed = _changed_settings(run)
        if changed:  # a finished run of other settings is not this run: never reuse it silently
            shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:4])
            raise RuntimeError(f"{run.out_dir} holds a finished run trained with other settings ({shown}"
                               f"{', ...' if len(changed) > 4 else ''}); give the zoo another --out, or delete "
                               "that directory to train it again")
        return {**rec, "reused": True}
    run.out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "mimkit.cli", "pretrain", str(run.config), *run.overrides]
    if threads:
        cmd.append(f"train.num_threads={threads}")
    before, busy0 = _load_1min(), _busy_cpu_s()
    t0 = time.perf_counter()
    global _CHILD
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    _CHILD = proc
    rss = ChildPeakRss(proc.pid)
    try:
        tail = _forward_stderr(proc, run.out_dir / "zoo_train.log")
        peak_mb = rss.stop()
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save, then stop
        tail = _forward_stderr(proc, run.out_dir / "zoo_train.log")
        peak_mb = rss.stop()
        _, status, usage = os.wait4(proc.pid, 0)
        status = 130 << 8
    finally:
        rss.stop()
        _CHILD = None
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    busy1 = _busy_cpu_s()
    # CPU the rest of the machine used meanwhile, in cores: the machine's busy time minus the child's own
    other = None if busy0 is None or busy1 is None else max(
        0.0, (busy1 - busy0 - usage.ru_utime - usage.ru_stime) / max(wall, 1e-9))
    attempt = {"wall_s": round(wall, 2), "exit": proc.returncode, "load_before": before, "load_after": _load_1min(),
               "other_cpu_cores": None if other is None else round(other, 3),
               "peak_rss_mb": round(usage.ru_maxrss / 1024 if peak_mb is None else peak_mb, 1), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    with (run.out_dir / ATTEMPTS).open("a") as f:
        f.write(json.dumps(attempt) + "\n")
    if proc.returncode in EXIT_INTERRUPTED_CODES:
        raise ZooInterrupted(f"{run.name} seed {run.seed} was interrupted; its checkpoint is saved: run the same "
                             "mimkit zoo command to continue")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
        said = next((ln for ln in reversed(lines) if ln.startswith("mimkit:")), lines[-1] if lines else "")
        raise RuntimeError(f"mimkit pretrain exited {proc.returncode}: {said[:500]} (log: "
                           f"{run.out_dir / 'zoo_train.log'})")
    attempts = [json.loads(x) for x in (run.out_dir / ATTEMPTS).read_text().splitlines() if x.strip()]
    result = json.loads((run.out_dir / "result.json").read_text()) if (run.out_dir / "result.json").is_file() else {}
    rec = {"config": str(run.config), "seed": run.seed, "overrides": run.overrides, "step": result.get("step"),
           "epochs": result.get("epochs"), "nonfinite": result.get("nonfinite"),
           "train_s": round(sum(a["wall_s"] for a in attempts), 2), "attempts": len(attempts),
           "img_per_s": _median_img_per_s(run.out_dir), "peak_rss_mb": max(a["peak_rss_mb"] for a in attempts),
           "gpu_peak_gb": result.get("gpu_peak_gb"),
           "load": [[a["load_before"], a["load_after"]] for a in attempts],
           "other_cpu_cores": [a.get("other_cpu_cores") for a in attempts], "threads": threads or _threads_of(run),
           "precision": None, "machine": machine(gpu=result.get("gpu_peak_gb") is not None)}
    rec["precision"] = run_precision(replace(run, train=rec))
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2))
    os.replace(tmp, record_path)
    return {**rec, "reused": False}


class ChildPeakRss:
    """A child process's own peak resident memory in MB: ``VmHWM`` of ``/proc/<pid>/status``, read every
    ``every`` seconds while it runs (the high-water mark only grows, so the last reading is the peak up
    to then; the child's last ``every`` seconds can be missed).

    Not ``wait4``'s ``ru_maxrss``: on Linux, ``exec`` keeps the high-water mark of the image it replaced,
    and that image is the parent's (fork/vfork), so every child of a zoo that holds evaluation features
    would report at least the zoo's own size. Where ``/proc`` is missing (not Linux) :meth:`stop`
    returns None and the caller uses ``ru_maxrss`` (which there is the child's own)."""

    def __init__(self, pid: int, every: float = 0.2):
        self._path, self._every, self.peak_kb = Path(f"/proc/{pid}/status"), every, None
        self._stop = threading.Event()
        self._read()  # Popen returned: the child has already exec'd, so this is its own image
        self._thread = threading.Thread(target=self._poll, name="zoo-peak-rss", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            text = self._path.read_text()
        except OSError:  # no /proc, or the child is gone
            return
        for line in text.splitlines():
            if line.startswith("VmHWM:"):  # a zombie has no Vm* lines: nothing to read after its exit
                kb = int(line.split()[1])
                self.peak_kb = kb if self.peak_kb is None else max(self.peak_kb, kb)
                return

    def _poll(self) -> None:
        while not self._stop.wait(self._every):
            self._read()

    def stop(self) -> float | None:
        """Stop reading (before the child is reaped, so that its pid cannot be reused meanwhile); a second
        call reads nothing more."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._read()
        return None if self.peak_kb is None else self.peak_kb / 1024


def _changed_settings(run: ZooRun) -> dict:
    """The settings that alter training (the resume guard's: model, method, data, optim, seed, epochs; and
    ``train.max_steps``: a short trial run kept is not the full run) in which the run directory's
    ``config.yaml`` differs from what this zoo would train. Paths inside the zoo that wrote the run (CAE
    v2's teacher, ``{out}/runs/mae_.../checkpoint.pt``) are compared as paths inside this one: a zoo kept
    in git and continued from another checkout, or with ``--out`` spelt otherwise, is the same zoo."""
    import yaml

    from mimkit.config import load_config, to_dict
    from mimkit.train.resume import config_changes

    saved = run.out_dir / "config.yaml"
    if not saved.is_file():
        return {}
    old = yaml.safe_load(saved.read_text()) or {}
    new = to_dict(load_config(run.config, run.overrides))
    old_dir = (old.get("train") or {}).get("out_dir")
    if isinstance(old_dir, str) and len(Path(old_dir).parents) > 2:  # OUT/runs/<config>/seed<s>
        old = _rebase(old, str(Path(old_dir).parents[2]), str(run.out_dir.parents[2]))
    diff = config_changes(old, new)
    if "max_steps" in (old.get("train") or {}) and old["train"]["max_steps"] != new["train"]["max_steps"]:
        diff["train.max_steps"] = (old["train"]["max_steps"], new["train"]["max_steps"])
    return diff


def _rebase(value, old_root: str, new_root: str):
    """``value`` (a config, nested) with every string path under ``old_root`` moved under ``new_root``."""
    if isinstance(value, dict):
        return {k: _rebase(v, old_root, new_root) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, old_root, new_root) for v in value]
    if isinstance(value, str) and (value == old_root or value.startswith(old_root.rstrip("/") + "/")):
        return new_root + value[len(old_root):]
    return value


def _forward_stderr(proc: subprocess.Popen, log_path: Path, keep: int = 8192) -> str:
    """Copy the child's stderr to ours as it comes (progress bars keep their carriage returns) and to
    ``log_path``; returns its last ``keep`` characters (the one-line error of a failed run)."""
    tail = b""
    fd = proc.stderr.fileno()
    with log_path.open("ab") as log:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            log.write(chunk)
            try:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            except (AttributeError, OSError, ValueError):  # no byte stream (a captured stderr) or closed
                try:
                    sys.stderr.write(chunk.decode(errors="replace"))
                except (OSError, ValueError):
                    pass
            tail = (tail + chunk)[-keep:]
    return tail.decode(errors="replace")


def machine(gpu: bool = False) -> str:
    """What a run trained on, for its record: the CPU's model name, its cores and whether it has bf16
    instructions (bf16 autocast is emulated, ~20x slower, on one without), and with ``gpu`` the GPU."""
    import platform

    import torch

    from mimkit.train.precision import cpu_has_bf16

    name = platform.machine()
    try:
        name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), name)
    except OSError:
        pass
    text = f"{name}, {os.cpu_count()} cores, {'bf16 instructions' if cpu_has_bf16() else 'no bf16 instructions'}"
    return text + (f", {torch.cuda.get_device_name(0)}" if gpu and torch.cuda.is_available() else "")


def run_precision(run: ZooRun) -> str | None:
    """``train.precision`` the run trained with, ``auto`` resolved (bf16 on a GPU, fp32 on CPU): its record
    says (records from before it did: the kept ``config.yaml``, on a GPU when the record has a GPU peak),
    else what this zoo would train here."""
    import torch
    import yaml

    from mimkit.config import load_config

    rec = run.train or {}
    if rec.get("precision"):
        return rec["precision"]
    saved = run.out_dir / "config.yaml"
    if saved.is_file():
        train = (yaml.safe_load(saved.read_text()) or {}).get("train") or {}
    else:
        cfg = load_config(run.config, run.overrides).train
        train = {"precision": cfg.precision, "device": cfg.device}
    precision, device = train.get("precision"), str(train.get("device", "auto"))
    if precision == "auto":
        if rec:
            gpu = rec.get("gpu_peak_gb") is not None
        else:
            gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        return "bf16" if gpu else "fp32"
    return precision


def precision_label(run: ZooRun) -> str:
    """``bf16 (eval bf16)``: the training precision and the evaluations' ``--amp``."""
    amps = sorted({str(res.get("options", {}).get("amp")) for res in run.evals.values()})
    return f"{run_precision(run) or '?'}" + (f" (eval {'/'.join(amps)})" if amps else "")


def _threads_of(run: ZooRun) -> int:
    """Threads the child's torch used: train.num_threads, else OMP_NUM_THREADS, else the cores."""
    from mimkit.config import load_config

    n = load_config(run.config, run.overrides).train.num_threads
    return int(n or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


OTHER_CPU_LIMIT = 0.2
"""Cores' worth of CPU that other processes may use during a run whose time is reported."""


def loaded(rec: dict) -> bool:
    """Whether other processes used more than :data:`OTHER_CPU_LIMIT` cores on average during any attempt
    (``/proc/stat`` busy time minus the child's own CPU time): its time is not a measurement. Where that
    is not available, whether the 1-minute load average before an attempt exceeded the cores the run
    left free (+0.5)."""
    others = [o for o in rec.get("other_cpu_cores") or [] if o is not None]
    if others:
        return max(others) > OTHER_CPU_LIMIT
    cores = os.cpu_count() or 1
    free = cores - (rec.get("threads") or cores) + 0.5
    return any(before is not None and before > free for before, _ in rec.get("load") or [])


# -- evaluation ---------------------------------------------------------------------------------------
EXECUTION_OPTIONS = ("progress", "device", "cache_dir", "token_cache", "max_cache_gb", "batch_size", "amp")
"""Evaluation options that say how a result is computed, not what: a kept result computed with others
is reused. ``amp`` among them: evaluating one encoder in bf16 instead of fp32 moved its kNN by <= 0.09
points (BENCHMARKS.md, the zoo's precision check), and a zoo continued on a CPU without bf16
instructions must keep the evaluations of its bf16 runs. Each result records the options it ran with."""


def _fingerprint(protocol: str, opts_dict: dict, kwargs: dict) -> str:
    from mimkit.eval.report import sanitize

    keep = {k: v for k, v in opts_dict.items() if k not in EXECUTION_OPTIONS}
    return json.dumps(sanitize({"protocol": protocol, "options": keep, "kwargs": kwargs}), sort_keys=True,
                      default=str)


def _same_fingerprint(kept: object, fp: str) -> bool:
    """Whether a kept result's fingerprint is ``fp`` once execution options are dropped from it (records
    written before ``amp`` became one still carry it)."""
    if not isinstance(kept, str):
        return False
    try:
        old = json.loads(kept)
        old["options"] = {k: v for k, v in old["options"].items() if k not in EXECUTION_OPTIONS}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return False
    return json.dumps(old, sort_keys=True) == fp


def evaluate_run(run: ZooRun, protocols: list[str], opts, protocol_kwargs: dict, log=print,
                 compute: bool = True) -> dict:
    """Every protocol on the run's final checkpoint; results kept per protocol and reused when computed
    with the same options. ``compute=False`` (``--report-only``) only collects the kept ones; the others
    are listed in ``run.missing``."""
    from mimkit.eval.data import load_checkpoint_encoder, norm_line
    from mimkit.eval.protocols import PROTOCOLS, EvalContext, options_dict
    from mimkit.eval.report import write_json
    from mimkit.weights import holds_weights

    out = run.out_dir / "eval"
    results, todo = {}, []
    for proto in protocols:
        fp = _fingerprint(proto, options_dict(opts), protocol_kwargs.get(proto, {}))
        path = out / f"{proto}{'.val' if opts.val_split is not None else ''}.json"  # validation apart from test
        if path.is_file():
            try:
                prev = json.loads(path.read_text())
            except json.JSONDecodeError:
                prev = {}
            if _same_fingerprint(prev.get("zoo_fingerprint"), fp):
                results[proto] = prev
                continue
        todo.append((proto, fp, path))
    if not todo:
        return results
    if not compute:
        run.missing = [proto for proto, _, _ in todo]
        log(f"    not evaluated: {', '.join(run.missing)} (--report-only computes nothing)")
        return results
    if not holds_weights(run.out_dir):  # records kept without weights (benchmarks/results/): nothing to evaluate
        run.missing = [proto for proto, _, _ in todo]
        log(f"    not evaluated: {', '.join(run.missing)} (the run's weights are not in {run.out_dir}: its records were "
            "kept without them; delete that directory to train the run again)")
        return results
    ckpt = load_checkpoint_encoder(run.out_dir, device=opts.device)
    ctx = EvalContext(ckpt, opts)
    log(f"    {norm_line(ctx.mean, ctx.std, ctx.norm_source)}")
    ctx.check_classes()
    for proto, fp, path in todo:
        log(f"    evaluating: {proto}")
        t0 = time.perf_counter()
        res = PROTOCOLS[proto](ctx, **protocol_kwargs.get(proto, {}))
        res = {**res, "setup": ctx.describe(), "options": options_dict(opts), "eval_s": round(time.perf_counter() - t0, 2),
               "zoo_fingerprint": fp}
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, res)
        results[proto] = json.loads(path.read_text())
    return results


# -- the table ----------------------------------------------------------------------------------------
def headline_metrics(protocol: str, res: dict) -> list[str]:
    """The metrics a zoo table shows for a protocol: kNN at its headline k, the probes' top-1 (no top-5,
    leave-one-out, best-epoch or spread columns)."""
    metrics = res.get("metrics", {})
    if protocol == "knn":
        k = res.get("k")
        return [m for m in metrics if m.startswith(f"knn{k}_")]
    return [m for m in metrics if not m.endswith("_std") and "top5" not in m and "best" not in m
            and not m.startswith("loo")]


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(runs: list[ZooRun], protocols: list[str]) -> tuple[list[str], list[dict]]:
    """``(metric columns, one row per config)``: mean, std and n over the seeds that finished."""
    columns: list[str] = []
    for run in runs:
        for proto in protocols:
            res = run.evals.get(proto)
            if res:
                columns += [m for m in headline_metrics(proto, res) if m not in columns]
    rows = []
    for name in dict.fromkeys(r.name for r in runs):
        group = [r for r in runs if r.name == name]
        done = [r for r in group if r.error is None and r.train is not None]
        row = {"config": name, "seeds": [r.seed for r in done], "failed": [f"seed {r.seed}: {r.error}" for r in group
                                                                          if r.error is not None]}
        for m in columns:
            row[m] = _mean_std([_metric(r, m) for r in done])
            row[f"{m}_n"] = sum(v is not None and math.isfinite(v) for v in (_metric(r, m) for r in done))
        precisions = [precision_label(r) for r in done]
        row["precision"] = "; ".join(f"{p} x{precisions.count(p)}" if len(set(precisions)) > 1 else p
                                     for p in dict.fromkeys(precisions))
        row["missing"] = [f"{p} seed {r.seed}" for r in done for p in r.missing]
        row["not_run"] = [r.seed for r in group if r.train is None and r.error is None]
        timed = [r.train for r in done if r.train.get("attempts") == 1 and not loaded(r.train)]
        row["train_s"] = _mean_std([t["train_s"] for t in timed])
        row["img_per_s"] = _mean_std([t["img_per_s"] for t in timed if t.get("img_per_s")])
        row["timed_runs"] = len(timed)
        row["time_machines"] = len({t.get("machine") for t in timed})  # times from other CPUs do not average
        row["peak_rss_mb"] = max((r.train["peak_rss_mb"] for r in done), default=float("nan"))
        gpu = [r.train.get("gpu_peak_gb") for r in done if r.train.get("gpu_peak_gb") is not None]
        row["gpu_peak_gb"] = max(gpu) if gpu else None
        row["epochs"] = done[0].train.get("epochs") if done else None
        rows.append(row)
    return columns, rows


def _metric(run: ZooRun, metric: str) -> float | None:
    for res in run.evals.values():
        v = res.get("metrics", {}).get(metric)
        if v is not None:
            return float(v)
    return None


def _pm(ms: tuple[float, float], digits: int = 2) -> str:
    m, s = ms
    return "—" if not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(columns: list[str], rows: list[dict]) -> str:
    """The table; a cell over fewer seeds than its row's says how many (``(n=2)``: a protocol missing on a
    run kept without its weights), and the training precision is a column of its own."""
    head = ["config", "seeds", *columns, "train s", "img/s", "peak RSS MB", "precision"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        seeds = ",".join(map(str, r["seeds"])) or "—"
        timed = "" if r["timed_runs"] == len(r["seeds"]) else f" ({r['timed_runs']} timed)"
        if r.get("time_machines", 1) > 1:  # a zoo continued on another machine: the spread is the machines'
            timed += f" ({r['time_machines']} machines: see runs.csv)"
        cells = [r["config"], seeds,
                 *(_pm(r[m]) + (f" (n={r[m + '_n']})" if 0 < r[m + "_n"] < len(r["seeds"]) else "") for m in columns),
                 _pm(r["train_s"], 0) + timed, _pm(r["img_per_s"], 0),
                 "—" if not math.isfinite(r["peak_rss_mb"]) else f"{r['peak_rss_mb']:.0f}", r["precision"] or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [f"- {r['config']} {f}" for r in rows for f in r["failed"]]
    missing = [f"- {r['config']}: {m}" for r in rows for m in r["missing"]]
    not_run = [f"- {r['config']}: seed{'s' if len(r['not_run']) > 1 else ''} {', '.join(map(str, r['not_run']))}"
               for r in rows if r.get("not_run")]
    return ("\n".join(lines) + "\n" + ("\n**Failed runs**\n\n" + "\n".join(failed) + "\n" if failed else "")
            + ("\n**Not evaluated** (runs kept without their weights, or --report-only)\n\n"
               + "\n".join(missing) + "\n" if missing else "")
            + ("\n**Not run yet** (no finished record in the zoo's directory)\n\n" + "\n".join(not_run) + "\n"
               if not_run else ""))


def write_csvs(out: Path, columns: list[str], rows: list[dict], runs: list[ZooRun], tag: str = "") -> None:
    with (out / f"zoo{tag}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "n_seeds", *(f"{m}_{s}" for m in columns for s in ("mean", "std")),
                    "train_s_mean", "train_s_std", "timed_runs", "img_per_s_mean", "peak_rss_mb", "gpu_peak_gb",
                    "precision", "not_evaluated"])
        for r in rows:
            w.writerow([r["config"], len(r["seeds"]), *(v for m in columns for v in r[m]), *r["train_s"],
                        r["timed_runs"], r["img_per_s"][0], r["peak_rss_mb"], r["gpu_peak_gb"], r["precision"],
                        "; ".join(r["missing"])])
    with (out / f"runs{tag}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "seed", "status", *columns, "train_s", "attempts", "loaded", "img_per_s", "peak_rss_mb",
                    "load_before_after", "other_cpu_cores", "run_dir", "precision", "eval_amp", "machine",
                    "not_evaluated"])
        for run in runs:
            t = run.train or {}
            amps = sorted({str(res.get("options", {}).get("amp")) for res in run.evals.values()})
            w.writerow([run.name, run.seed, "failed: " + run.error if run.error else ("done" if run.train else "not run"),
                        *(_metric(run, m) for m in columns), t.get("train_s"), t.get("attempts"),
                        loaded(t) if t else None, t.get("img_per_s"), t.get("peak_rss_mb"),
                        json.dumps(t.get("load")), json.dumps(t.get("other_cpu_cores")), str(run.out_dir),
                        run_precision(run) if t else None, ",".join(amps) or None,
                        t.get("machine"), ",".join(run.missing)])


def plot(out: Path, columns: list[str], rows: list[dict], tag: str = "", split: str = "test") -> Path | None:
    """One panel per headline metric: a bar per config with the std over seeds as error bar."""
    rows = [r for r in rows if r["seeds"]]
    if not columns or not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(max(4.0, 0.55 * len(rows) + 1.5) * len(columns), 4.2),
                             squeeze=False)
    names = [r["config"].removesuffix("_fashion_mnist") for r in rows]
    for ax, m in zip(axes[0], columns, strict=True):
        means = [r[m][0] for r in rows]
        stds = [r[m][1] for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color="#4C72B0")
        finite = [v for v in means if math.isfinite(v)]
        if finite:
            lo = min(v - s for v, s in zip(means, stds, strict=True) if math.isfinite(v))
            ax.set_ylim(max(0.0, lo - 5), min(100.0, max(finite) + 3) if max(finite) <= 100 else None)
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.set_ylabel("%")
    seeds = sorted({len(r["seeds"]) for r in rows})
    fig.suptitle(f"mimkit zoo ({split} split): mean ± std over {'/'.join(map(str, seeds))} seed(s)", fontsize=10)
    fig.tight_layout()
    path = out / f"zoo{tag}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def setup_lines(runs: list[ZooRun], protocols: list[str], opts) -> str:
    import platform

    import torch

    from mimkit.eval.report import setup_markdown

    lines = ["", "**Setup**", "",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
             f"{', CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else ', CPU'}; "
             f"seeds {sorted({r.seed for r in runs})} (pretraining and its data order); probe/split seed {opts.seed}",
             "- each config: `mimkit pretrain CONFIG " + " ".join(runs[0].overrides[:len(ZOO_DEFAULTS)])
             + " train.out_dir=... train.seed=S` plus:"]
    for name in dict.fromkeys(r.name for r in runs):
        r = next(x for x in runs if x.name == name)
        extra = [o for o in r.overrides[len(ZOO_DEFAULTS):] if not o.startswith(("train.out_dir=", "train.seed="))]
        lines.append(f"  - {name} ({r.config}){': ' + ' '.join(extra) if extra else ''}")
    lines.append("- train s: wall time of `mimkit pretrain` (start-up included), mean ± std over the runs that "
                 f"finished in one attempt while other processes used under {OTHER_CPU_LIMIT} cores (/proc/stat); "
                 "img/s: the trainer's median over its logging windows after the first, same runs; peak RSS: the "
                 "training process's; the load averages are in runs.csv")
    evaluated = next((r for r in runs if r.evals), None)
    if evaluated is not None:
        first = evaluated.evals[next(iter(evaluated.evals))]
        block = setup_markdown([{"setup": first["setup"], "results": evaluated.evals}], protocols)
        lines += [ln for ln in block.splitlines() if ln.startswith("- ") and not ln.startswith("- seeds:")]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, runs: list[ZooRun], protocols: list[str], opts) -> dict:
    """``zoo.md``, ``zoo.csv``, ``runs.csv``, ``zoo.json``, ``zoo.png`` (``zoo.val.md``, ... with
    ``--val-split``: validation numbers never overwrite test ones)."""
    columns, rows = summarise(runs, protocols)
    table = markdown(columns, rows)
    setup = setup_lines(runs, protocols, opts)
    out.mkdir(parents=True, exist_ok=True)
    val = opts.val_split is not None
    tag = ".val" if val else ""
    title = "# mimkit zoo" + (f" (validation: --val-split {opts.val_split:g}; the test split is not read)"
                              if val else "")
    (out / f"zoo{tag}.md").write_text(title + "\n\n" + table + setup)
    write_csvs(out, columns, rows, runs, tag)
    png = plot(out, columns, rows, tag, "validation" if val else "test")
    from mimkit.eval.report import write_json

    write_json(out / f"zoo{tag}.json", {"split": "validation" if val else "test", "val_split": opts.val_split,
                                        "protocols": protocols, "columns": columns, "rows": rows,
                                  "runs": [{"config": str(r.config), "name": r.name, "seed": r.seed,
                                            "out_dir": str(r.out_dir), "train": r.train, "error": r.error,
                                            "metrics": {m: _metric(r, m) for m in columns}} for r in runs]})
    return {"table": table, "setup": setup, "plot": str(png) if png else None, "rows": rows, "columns": columns}


# -- the command --------------------------------------------------------------------------------------
def run_zoo(runs: list[ZooRun], protocols: list[str], opts, protocol_kwargs: dict, out: Path, log=print,
            threads: int | None = None, report_only: bool = False) -> dict:
    """Train and evaluate every run, writing the table after each. ``report_only``: train and evaluate
    nothing -- the table of the records the zoo's directory holds (finished runs of the same settings and
    their kept evaluations), the rest listed as not run / not evaluated (e.g. a zoo spread over
    machines, half done)."""
    from mimkit.weights import holds_weights

    n = len(runs)
    for i, run in enumerate(runs, 1):
        tag = f"[zoo {i}/{n}] {run.name} seed {run.seed}"
        if report_only and not (run.out_dir / TRAIN_RECORD).is_file():
            log(f"{tag}: not run yet (--report-only)")
            continue
        try:
            for dep in ([] if report_only else run.depends):  # e.g. CAE v2's teacher: the MAE run of the same seed, finished (and its
                # weights there, unless this run finished before and is only reused)
                done = next(r for r in runs if r.name == dep and r.seed == run.seed)
                if done.train is None or done.error is not None:
                    raise RuntimeError(f"it needs the finished {dep} seed {run.seed} run, which "
                                       f"{'failed' if done.error else 'did not finish'}")
                if not holds_weights(done.out_dir) and not (run.out_dir / TRAIN_RECORD).is_file():
                    raise RuntimeError(f"it needs the weights of the {dep} seed {run.seed} run, which was kept "
                                       f"without them ({done.out_dir}); delete that directory and run the zoo again: "
                                       f"{dep} trains first")
            if not report_only:
                log(f"{tag}: training ({run.out_dir})")
            run.train = train_run(run, log, threads)
            if _TERMINATED:  # the child had finished as SIGTERM came: kept, and the zoo stops here
                raise ZooInterrupted(f"stopped by SIGTERM after training {run.name} seed {run.seed}; run the same "
                                     "mimkit zoo command to continue")
            t = run.train
            log(f"{tag}: {'trained before (reused)' if t['reused'] else 'trained'} in {t['train_s']:.0f} s"
                + (f", {t['img_per_s']:.0f} img/s" if t.get("img_per_s") else ""))
            run.evals = evaluate_run(run, protocols, opts, protocol_kwargs, log, compute=not report_only)
            shown = {m: run.evals[p]["metrics"][m] for p in protocols if p in run.evals
                     for m in headline_metrics(p, run.evals[p])}
            log(f"{tag}: " + ", ".join(f"{m} {v:.2f}" for m, v in shown.items()))
        except ZooInterrupted:
            if not report_only:
                write_outputs(out, runs, protocols, opts)
            raise
        except KeyboardInterrupt:
            if not report_only:  # a half-read report would overwrite a whole one: nothing to save
                write_outputs(out, runs, protocols, opts)
            raise ZooInterrupted(f"interrupted during {run.name} seed {run.seed}; run the same mimkit zoo command "
                                 "to continue (finished runs and evaluations are reused)") from None
        except Exception as e:  # noqa: BLE001 - one failed run is reported and the zoo goes on
            run.error = " ".join(str(e).split()) or type(e).__name__
            log(f"{tag}: FAILED: {run.error}")
        if not report_only:
            write_outputs(out, runs, protocols, opts)  # the table so far, after every run
    return write_outputs(out, runs, protocols, opts)


def _seeds(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds as integers, e.g. 0,1,2") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more seeds >= 0, e.g. 0,1,2")
    return vals


def add_parser(sub) -> None:
    from mimkit.eval.cli import REPORT_PROTOCOLS, add_data_args, add_protocol_args, protocol_list

    p = sub.add_parser("zoo", help="train configs x seeds, evaluate every encoder the same way, one table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="+", metavar="CONFIG_OR_OVERRIDE",
                   help="config files and [NAME:]key=value overrides ({seed}, {out} expanded)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="pretraining seeds (default 0,1,2)")
    p.add_argument("--protocols", type=protocol_list, default="knn,linear,attentive",
                   help=f"comma-separated from {', '.join(REPORT_PROTOCOLS)} (default knn,linear,attentive)")
    p.add_argument("--train-threads", type=int, default=None,
                   help="torch threads of each training child (default: the config's train.num_threads, else "
                        "torch's)")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: write the table of the finished runs and kept evaluations "
                        "in --out (the rest listed as not run / not evaluated)")
    add_data_args(p)
    p.set_defaults(out="zoo")
    add_protocol_args(p, None)
    p.set_defaults(func=main, trailing_items="items")


def main(args: argparse.Namespace) -> int:
    from mimkit.eval.cli import SUBCOMMANDS, ReportArgs, expand_paths, options, protocol_kwargs

    expand_paths(args)
    configs, overrides = split_arguments(args.items)
    out = Path(args.out).expanduser()
    runs = plan_runs(configs, args.seeds, out, overrides, args.dataset, args.val_split)
    if args.report_only and not any((r.out_dir / TRAIN_RECORD).is_file() for r in runs):
        raise ConfigError(f"--report-only: {out} holds no finished run of these configs and seeds "
                          f"(no {out}/runs/<config>/seed<s>/{TRAIN_RECORD}); check --out")
    protocols = [p for p in args.protocols.split(",") if p]
    opts = options(args)
    kwargs = {p: protocol_kwargs(p, ReportArgs(args, p)) for p in protocols if p in SUBCOMMANDS}
    print(f"[zoo] {len(runs)} runs ({len({r.name for r in runs})} configs x {len(args.seeds)} seeds), protocols "
          f"{', '.join(protocols)}; results in {out}", file=sys.stderr)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    global _TERMINATED
    _TERMINATED = False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = run_zoo(runs, protocols, opts, kwargs, out, log, args.train_threads, args.report_only)
    except ZooInterrupted as e:
        log(f"mimkit zoo: {e}")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stdout.write(result["table"])
    tag = ".val" if opts.val_split is not None else ""
    log(f"[zoo] wrote {out / f'zoo{tag}.md'}, {out / f'zoo{tag}.csv'}, {out / f'runs{tag}.csv'}, {out / f'zoo{tag}.json'}"
        + (f", {result['plot']}" if result["plot"] else ""))
    return 1 if any(r.error for r in runs) else 0  # --report-only: a run not there yet is no failure


__all__ = ["ZooRun", "plan_runs", "run_zoo", "train_run", "evaluate_run", "summarise", "headline_metrics",
           "add_parser", "main", "split_arguments", "dataset_overrides", "loaded"]
