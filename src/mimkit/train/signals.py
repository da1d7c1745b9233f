"""Stop signals of a training run.

Owns: which signals stop a run (:data:`STOP_SIGNALS`), the handlers a run installs while it trains
and puts back afterwards, and the first signal received (:class:`StopSignals`); the exception a
stopped run raises after saving (:class:`TrainingInterrupted`) and the command line's exit status for
it (:data:`EXIT_INTERRUPTED`). A handler only records the signal: the loop agrees on it across the
ranks at the next step boundary, saves a checkpoint there and raises. A second SIGINT stops at once
(``KeyboardInterrupt``, nothing saved).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

EXIT_INTERRUPTED = 75
"""Exit status of ``mimkit pretrain`` stopped by SIGTERM/SIGINT/SIGUSR1/SIGHUP after saving a checkpoint
(``EX_TEMPFAIL``: rerun the same command to resume; a requeue script tests for it)."""

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")  # SIGHUP: the terminal was closed (or ssh dropped)


class TrainingInterrupted(Exception):
    """A stop signal arrived; a checkpoint was saved at the step boundary (``signal_name``, ``step``,
    ``checkpoint``). Rerunning the same config resumes exactly there."""

    def __init__(self, message: str, signal_name: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    @classmethod
    def at_step(cls, signal_name: str, step: int, stop: int, checkpoint: Path, why: str = "") -> TrainingInterrupted:
        """The exception of a run stopped at ``step`` of ``stop`` with ``checkpoint`` saved there."""
        return cls(f"stopped by {signal_name} at step {step} of {stop}{why}; {checkpoint} holds that step. Rerun the "
                   "same command to resume", signal_name, step, checkpoint)


class StopSignals:
    """The stop-signal handlers of one run and the first stop signal it received (:attr:`received`).

    ``announce``: print a line when a signal arrives (the main process)."""

    def __init__(self, announce: bool):
        self.announce = announce
        self.received: int | None = None
        self._old_handlers: dict = {}

    @property
    def name(self) -> str | None:
        """The received signal's name (``"SIGTERM"``), ``None`` when none was."""
        return signal.Signals(self.received).name if self.received is not None else None

    def install(self) -> None:
        """Forget an earlier signal and record the next one instead of dying of it (main thread only:
        Python runs handlers there; elsewhere this is a no-op)."""
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            with contextlib.suppress(ValueError, OSError):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        """Put back the handlers found by :meth:`install` (a signal now acts as it did before)."""
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, old)
        self._old_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once
            return
        self.received = signum
        if signum == getattr(signal, "SIGHUP", None):
            _detach_hung_up_terminal()
        if self.announce:
            name = signal.Signals(signum).name
            with contextlib.suppress(OSError):
                os.write(2, f"\nreceived {name}: saving a checkpoint at the end of this step, then stopping "
                            "(Ctrl-C again stops at once without saving)\n".encode())


def _detach_hung_up_terminal() -> None:
    """The terminal was closed: writing to it now fails (EIO) and would break the step before the save,
    so output that went to the dead terminal goes to /dev/null (a log file or pipe stays)."""
    import errno
    import termios

    for fd in (1, 2):
        try:
            termios.tcgetattr(fd)
        except termios.error as e:
            if e.args and e.args[0] == errno.EIO:  # a hung-up terminal (a pipe or file: ENOTTY)
                with contextlib.suppress(OSError):
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, fd)
                    os.close(null)
        except (OSError, ValueError):
            pass
