"""Metric sinks: a JSONL file, TensorBoard, and a progress bar (loss, lr, img/s, ETA); :class:`StepLog`
puts them together for a run's logged steps."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class MetricLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and scalars to TensorBoard.

    On resume the JSONL file is truncated to the steps before the resumed step (atomically: temp file
    + rename), so the file always reads as one uninterrupted run. Besides the per-step records,
    :meth:`event` writes records with an ``"event"`` key for what is not a normal step: a skipped
    non-finite step (``nonfinite_skip``), an accepted resume with changed settings
    (``resume_changes``), a resume from an older numbered checkpoint (``resume_fallback``), a failed
    run (``failed``). Readers that want losses take the records with a ``loss`` key."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            try:
                tmp.write_text("".join(k + "\n" for k in kept))
                os.replace(tmp, self.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:  # tensorboard is a declared dependency; keep training if it is broken
                print("warning: tensorboard is not importable; metrics go to metrics.jsonl only", file=sys.stderr)

    def _append(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self._append({"step": step, **record})
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def event(self, step: int, name: str, **fields) -> None:
        """An ``{"step", "event": name, ...}`` record (no ``loss`` key)."""
        if not self.enabled:
            return
        self._append({"step": step, "event": name, **fields})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def make_progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar on the main process (``None`` elsewhere or when disabled)."""
    if not enabled:
        return None
    from tqdm import tqdm

    # redirected output (logs, CI) gets a line every 30 s instead of a redraw every second
    interval = 1.0 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=interval)


class StepLog:
    """What a run shows while it trains: the metric sinks (:attr:`logger`), the progress bar
    (:attr:`bar`, ``None`` off the main process) and the throughput since the last logged step."""

    def __init__(self, logger: MetricLogger, bar, images_per_step: int):
        self.logger, self.bar, self.images_per_step = logger, bar, images_per_step
        self.t_last = time.perf_counter()
        self.steps_since = 0  # optimizer steps since the last logged one

    def record(self, step: int, epoch: float, loss: float, lr: float, grad_norm: float | None, nonfinite: int,
               metrics: dict) -> None:
        """One logged step: ``metrics.jsonl`` / TensorBoard (with ``img_per_s``) and the bar's postfix."""
        now = time.perf_counter()
        ips = self.steps_since * self.images_per_step / max(now - self.t_last, 1e-9)
        self.t_last, self.steps_since = now, 0
        self.logger.log(step, {"epoch": epoch, "loss": loss, "lr": lr, "img_per_s": ips, "grad_norm": grad_norm,
                               "nonfinite": nonfinite, **metrics})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}", refresh=False)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
