"""Pieces of a training step that keep the host and the device apart.

On a GPU every ``.item()``, ``.tolist()``, ``.cpu()`` or ``bool(tensor)`` makes the Python thread wait
until the device has finished all queued work, so the next step cannot be queued while this one
runs. The trainer therefore reads device values only every ``train.log_every_steps`` steps and at
checkpoints; between those the step is queued without waiting:

* Non-finite losses: the finite flag stays on the device. The fused AdamW kernel takes it as
  ``found_inf`` and leaves parameters, moments and its step counter untouched when it is set (the
  mechanism :class:`torch.amp.GradScaler` uses); :class:`NonFiniteTracker` keeps one flag per step
  of the logging window and the trainer reads them at the next log step or checkpoint.
* Method state changed after the step (EMA teachers in ``after_step``) or after its micro-batches
  (``after_micro_batch``: PCAE's per-iteration teacher): :class:`AfterStepGuard` restores it with a
  device-side select when the step was skipped (and restores a step's micro-batch changes when the step
  is skipped on the host or abandoned).
* Host-side flags (stop signal, data error, checkpoint due): one process needs no agreement; with
  several processes :class:`HostFlags` sums them with one all-reduce on a CPU (gloo) process group,
  which costs tens of microseconds and never waits for the GPU.

:class:`NonFiniteSteps` owns the run's count of skipped steps and its limits (``train.max_nonfinite``,
``train.max_nonfinite_fraction``), whichever path found them; :class:`Accumulator` runs the forward and
backward passes of one step's micro-batches and calls the method's ``after_micro_batch`` after each.

:func:`count_host_reads` counts the calls that would wait for the device (a test and debugging aid;
on CUDA ``torch.cuda.set_sync_debug_mode("warn")`` reports the same from inside torch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mimkit.errors import DataError, NonFiniteLossError
from mimkit.train.distributed import DistInfo


def fused_adamw_supported(device: torch.device) -> bool:
    """True when torch has a fused AdamW kernel for ``device`` (CUDA, and CPU since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # pragma: no cover - very old torch
        return device.type == "cuda"


def build_adamw(params, lr: float, betas, eps: float, fused: bool | None, device: torch.device) -> torch.optim.AdamW:
    """AdamW; ``fused=None`` picks the fused kernel wherever torch has one (about 5x faster than the
    foreach path on CPU for the standard workload's 3.1 M parameters, and the only path that skips a
    non-finite step without a host sync)."""
    if fused is None:
        fused = fused_adamw_supported(device)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, fused=bool(fused))


class NonFiniteTracker:
    """Per-step non-finite flags kept on the device until :meth:`read`.

    ``record(step, bad, lr)`` stores ``bad`` (a 0-d or 1-element float tensor on the device, 1 = the
    step was skipped) in a ring of ``capacity`` slots without reading it; :meth:`read` returns
    ``[(step, lr), ...]`` of the skipped steps since the last read (one host sync)."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity = max(1, int(capacity))
        self.flags = torch.zeros(self.capacity, device=device)
        self.pending: list[tuple[int, float]] = []  # (step, lr) per slot in use

    def record(self, step: int, bad: torch.Tensor, lr: float) -> None:
        if len(self.pending) == self.capacity:
            raise RuntimeError("NonFiniteTracker is full; read() it at least every `capacity` steps")
        self.flags[len(self.pending)].copy_(bad.reshape(()))
        self.pending.append((step, lr))

    def __len__(self) -> int:
        return len(self.pending)

    def read(self) -> list[tuple[int, float]]:
        if not self.pending:
            return []
        values = self.flags[: len(self.pending)].tolist()
        bad = [p for p, v in zip(self.pending, values) if v > 0.5]
        self.pending = []
        return bad


class NonFiniteSteps:
    """The run's skipped non-finite steps: :attr:`count` (kept in checkpoints), a warning (main process)
    and a ``nonfinite_skip`` event per skipped step, and the limits: more than ``max_count`` skipped
    steps stop the run at once, a share above ``max_fraction`` fails it at its end
    (:class:`~mimkit.errors.NonFiniteLossError`, naming the last good checkpoint). On the sync-free
    path the per-step flags wait in :attr:`tracker` until :meth:`flush`."""

    FIX = "Lower the learning rate, use precision=bf16/fp32 instead of fp16, or set optim.clip_grad"

    def __init__(self, max_count: int, max_fraction: float, steps_per_epoch: int, is_main: bool, count: int = 0):
        self.max_count, self.max_fraction = max_count, max_fraction
        self.steps_per_epoch, self.is_main = steps_per_epoch, is_main
        self.count = count
        self.tracker: NonFiniteTracker | None = None

    def skip(self, step: int, lr: float, logger, last_good: Callable[[], str], what: str = "loss",
             before_failing: Callable[[], None] | None = None) -> None:
        """Count step ``step`` (0-based, taken at ``lr``) as skipped; past ``max_count`` record the failure,
        close ``logger`` and raise (after ``before_failing()``)."""
        self.count += 1
        if self.is_main:
            print(f"warning: non-finite {what} at step {step}; step skipped ({self.count}/{self.max_count})",
                  file=sys.stderr)
        if self.count > self.max_count:
            if before_failing is not None:
                before_failing()
            logger.event(step + 1, "failed", reason="max_nonfinite", nonfinite=self.count, lr=lr)
            logger.close()
            raise NonFiniteLossError(
                f"{self.count} non-finite losses (last at step {step}, lr {lr:.3g}), more than "
                f"train.max_nonfinite={self.max_count}; stopping. {last_good()}. {self.FIX}.")
        logger.event(step + 1, "nonfinite_skip", epoch=round((step + 1) / self.steps_per_epoch, 4), lr=lr,
                     nonfinite=self.count)

    def flush(self, logger, last_good: Callable[[], str], before_failing: Callable[[], None] | None = None) -> set[int]:
        """Read the tracker's window (one host sync) and :meth:`skip` its skipped steps; returns them."""
        if self.tracker is None:
            return set()
        bad_steps = self.tracker.read()
        for step, lr in bad_steps:
            self.skip(step, lr, logger, last_good, "loss or gradients", before_failing)
        return {s for s, _ in bad_steps}

    def check_share(self, steps: int, logger, final_checkpoint) -> None:
        """At the end of a run of ``steps`` steps: fail when more than ``max_fraction`` were skipped."""
        if steps and self.count / steps > self.max_fraction:
            logger.event(steps, "failed", reason="max_nonfinite_fraction", nonfinite=self.count, steps=steps)
            logger.close()
            raise NonFiniteLossError(
                f"{self.count} of {steps} steps ({100 * self.count / steps:.0f} %) had non-finite losses and were "
                f"skipped, more than train.max_nonfinite_fraction={self.max_fraction}; the run failed and wrote no "
                f"result.json ({final_checkpoint} holds its final state). {self.FIX}")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP (DTensor) tensor, as a view; any other tensor unchanged."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class AfterStepGuard:
    """Undo what ``method.after_step`` (and ``method.after_micro_batch``) did to the method's tensors when
    the step was skipped.

    Only methods that override ``after_step`` or ``after_micro_batch`` (EMA teachers: Latent MIM, PCAE)
    pay for it: their floating tensors outside the optimizer (frozen parameters, buffers) are copied
    before the call and selected back afterwards with ``torch.where(bad, old, new)``, on the device. For
    a method that overrides ``after_micro_batch`` the trainer calls :meth:`begin` before the step's
    micro-batches, so the copy is taken there and the select undoes their changes too; :meth:`restore`
    puts that copy back when the step is skipped on the host or abandoned (the state of the step
    boundary is what a checkpoint then holds)."""

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer):
        from mimkit.methods import Method

        self.method = method
        self.micro = type(method).after_micro_batch is not Method.after_micro_batch
        self.active = self.micro or type(method).after_step is not Method.after_step
        self.begun = False
        self.tensors: list[torch.Tensor] = []
        if self.active:
            owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
            seen: set[int] = set()
            for t in [*method.parameters(), *method.buffers()]:
                if id(t) in owned or id(t) in seen or not t.is_floating_point():
                    continue
                seen.add(id(t))
                self.tensors.append(t)
            self.active = bool(self.tensors)
        self.saved: list[torch.Tensor] = [torch.empty_like(_local(t)) for t in self.tensors]

    def _save(self) -> None:
        with torch.no_grad():
            # FSDP shards these tensors (DTensors, for which _foreach_copy_ has no sharding rule):
            # guard each rank's local shard, a view of the same storage
            local = [_local(t) for t in self.tensors]
            if not self.saved or self.saved[0].shape != local[0].shape:
                self.saved = [torch.empty_like(t) for t in local]
            torch._foreach_copy_(self.saved, local)

    def begin(self) -> None:
        """At the start of a step, before its micro-batches: copy the tensors when the method changes them
        in ``after_micro_batch`` (nothing otherwise)."""
        self.begun = False
        if self.active and self.micro:
            self._save()
            self.begun = True

    def restore(self) -> None:
        """Put back the copy :meth:`begin` took (a step skipped on the host or abandoned); nothing when
        :meth:`begin` took none."""
        if self.begun:
            with torch.no_grad():
                torch._foreach_copy_([_local(t) for t in self.tensors], self.saved)
            self.begun = False

    def __call__(self, progress, bad: torch.Tensor | None) -> None:
        """Run ``after_step(progress)``; ``bad``: device flag of a skipped step (None = known good). A skipped
        step gets back the tensors of :meth:`begin` when it took a copy, else of just before the call."""
        begun, self.begun = self.begun, False
        if not self.active or bad is None:
            self.method.after_step(progress)
            return
        with torch.no_grad():
            if not begun:
                self._save()
            self.method.after_step(progress)
            skip = bad.reshape(()) > 0.5
            for t, old in zip(self.tensors, self.saved):
                t = _local(t)
                t.copy_(torch.where(skip, old, t))


class HostFlags:
    """Agreement of the ranks on host-side flags, without touching the GPU.

    One process: the flags as they are. Several: one all-reduce (sum) of a small CPU tensor on a gloo
    group (the default group when it is gloo, else a gloo group made once for this). A rank that met a
    data error or a stop signal thus makes every rank stop at the same step boundary, at the cost of
    a CPU round trip per step instead of a GPU sync."""

    def __init__(self, info: DistInfo, group=None):
        """``group``: the gloo group to reduce on; ``None``: the default group, which must then be gloo
        when there are several processes (the trainer makes the gloo group once and destroys it)."""
        self.info = info
        self.group = group
        if info.enabled and group is None:
            import torch.distributed as dist

            if dist.get_backend() != "gloo":
                raise ValueError("HostFlags needs a gloo group when the default process group is not gloo")

    def reduce(self, *flags: bool) -> list[int]:
        if not self.info.enabled:
            return [int(bool(f)) for f in flags]
        import torch.distributed as dist

        t = torch.tensor([float(bool(f)) for f in flags])
        dist.all_reduce(t, group=self.group)
        return [int(v) for v in t.tolist()]  # a CPU tensor: no device sync


@contextlib.contextmanager
def count_host_reads() -> Iterator[dict[str, int]]:
    """Count calls that copy a tensor's value to the host (``item``, ``tolist``, ``cpu``, ``numpy``,
    ``bool``/``float``/``int`` of a tensor) while the block runs, and ``torch.tensor(values, device=...)``
    (host values copied to the device with a wait on a GPU: use :func:`mimkit.masking.to_device`);
    yields ``{name: count}``.

    Counted for tensors on every device (on CPU they cost nothing, but on a GPU each would wait for
    the device), so a CPU test can show that a step reads nothing back."""
    counts: dict[str, int] = {}
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
    originals = {n: getattr(torch.Tensor, n) for n in names}
    original_tensor = torch.tensor

    def wrap(name, fn):
        def counted(self, *a, **k):
            counts[name] = counts.get(name, 0) + 1
            return fn(self, *a, **k)

        return counted

    def tensor(*a, **k):
        if k.get("device") is not None:
            counts["tensor(device=)"] = counts.get("tensor(device=)", 0) + 1
        return original_tensor(*a, **k)

    try:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, wrap(n, fn))
        torch.tensor = tensor
        yield counts
    finally:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, fn)
        torch.tensor = original_tensor


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


@dataclass
class StepBatches:
    """The accumulated micro-batches of one step, and why the step must be abandoned (if it must)."""

    loss: torch.Tensor  # 0-d, on the device
    metrics: dict  # device tensors, averaged over the micro-batches
    host_metrics: dict  # metrics a method returns as Python numbers
    data_error: DataError | None = None
    lost: BaseException | None = None  # the loader broke while a stop signal was pending


class Accumulator:
    """Forward and backward of one step's ``accum`` micro-batches from ``batches``: each ``loss / accum``
    back-propagated through ``precision``'s autocast and grad scaler, the gradient sync (``no_sync``)
    only on the last, then ``after_micro_batch(progress)`` (the method's hook,
    :meth:`mimkit.methods.Method.after_micro_batch`) with ``progress.micro_batch`` = the micro-batch's
    index, before the next micro-batch's forward. A data error, or a loader that breaks while
    ``signal_pending()``, ends the reading; with several processes the rank goes on with zero batches of
    ``batch_shape`` (hook included, so the ranks' method state stays equal) to keep the ranks'
    collectives in step until they agree to abandon the step."""

    def __init__(self, batches: Iterator, accum: int, info: DistInfo, batch_shape: tuple, precision,
                 signal_pending: Callable[[], bool], after_micro_batch: Callable | None = None):
        self.batches, self.accum, self.info, self.batch_shape = batches, accum, info, batch_shape
        self.precision, self.signal_pending = precision, signal_pending
        self.after_micro_batch = after_micro_batch

    def __call__(self, train_model, progress) -> StepBatches:
        accum, enabled = self.accum, self.info.enabled
        m = StepBatches(torch.zeros((), device=self.info.device), {}, {})
        for i in range(accum):
            if m.data_error is None and m.lost is None:
                try:
                    images, _ = next(self.batches)
                except DataError as e:
                    m.data_error = e
                except Exception as e:
                    if not self.signal_pending():
                        raise
                    m.lost = e  # e.g. a DataLoader worker ended by the same signal
            if m.data_error is not None or m.lost is not None:
                if not enabled:
                    break
                images = torch.zeros(self.batch_shape, device=self.info.device)  # keeps the ranks in step
            sync = i == accum - 1 or not enabled
            with train_model.no_sync() if (not sync and enabled) else contextlib.nullcontext():
                with self.precision.autocast():
                    out = train_model(images, progress)
                self.precision.scaler.scale(out.loss / accum).backward()
            if self.after_micro_batch is not None:
                self.after_micro_batch(progress if progress is None else
                                       dataclasses.replace(progress, micro_batch=i, micro_batches=accum))
            m.loss += out.loss.detach().float() / accum
            for k, v in out.metrics.items():
                if isinstance(v, torch.Tensor):
                    m.metrics[k] = m.metrics.get(k, 0) + v.detach().float() / accum
                else:
                    m.host_metrics[k] = m.host_metrics.get(k, 0.0) + float(v) / accum
        return m
