"""Errors raised by :mod:`mimkit.data`."""

from __future__ import annotations


class DataError(RuntimeError):
    """A data set, file or image could not be found, read or trusted.

    Every message names the offending path (or the places searched) and says how to fix it
    (install the Debian package, re-download, delete the file, pass ``skip_corrupt=True``, ...).
    """
