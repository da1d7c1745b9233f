"""Every error type mimkit raises on purpose (the ground floor: nothing here imports mimkit).

Each is a one-line message that names the problem (the key, file or value) and the fix. The
command line catches :class:`MimkitError` and prints the message without a traceback (exit status
2). The built-in base each one also derives from is kept for callers that catch those
(``ValueError`` for bad settings and weight files, ``RuntimeError`` for data and checkpoints).

==================== ======================================================================
error                raised when
==================== ======================================================================
ConfigError          a config file, override or option is unknown, missing or impossible
DataError            a data set, file or image cannot be found, read or trusted
InteropError         a weight file cannot be understood (format, shapes, heads)
CheckpointError      a checkpoint cannot be written or read
FileRefusedError     a file was not loaded for safety or integrity (checksum, pickle globals)
DiskFullError        not enough space for a checkpoint; nothing was changed
RunLockedError       another live run owns the run directory
NonFiniteLossError   the loss stayed NaN/inf beyond ``train.max_nonfinite``
==================== ======================================================================
"""

from __future__ import annotations


class MimkitError(Exception):
    """Base of every error below; its message is meant to be shown as is, in one line."""


class ConfigError(MimkitError, ValueError):
    """A config file or override is invalid; the message says which key and how to fix it."""


class DataError(MimkitError, RuntimeError):
    """A data set, file or image could not be found, read or trusted.

    Every message names the offending path (or the places searched) and says how to fix it
    (install the Debian package, re-download, delete the file, pass ``skip_corrupt=True``, ...).
    """


class InteropError(MimkitError, ValueError):
    """A weight file could not be understood; the message names the file and the fix."""


class CheckpointError(MimkitError, RuntimeError):
    """A checkpoint could not be written or read; the message says which file and what to do."""


class FileRefusedError(CheckpointError):
    """A file was not loaded for safety or integrity: its checksum is missing, malformed or does not
    match, or it needs globals outside the allowlist. The message names the file, the problem and
    the opt-in (when there is one)."""


class DiskFullError(CheckpointError):
    """Not enough space for a checkpoint; nothing was changed."""


class RunLockedError(CheckpointError):
    """Another live run owns the run directory."""


class NonFiniteLossError(MimkitError, RuntimeError):
    """The loss was NaN or infinite for more consecutive steps than ``train.max_nonfinite`` allows."""
