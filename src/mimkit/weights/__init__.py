"""Weight files: the one reader of every format, and checkpoint writing/reading (floor 2).

* :func:`read_weights` (:mod:`mimkit.weights.read`) recognises every format mimkit accepts once and
  returns a :class:`Weights`; :func:`load_encoder` (:mod:`mimkit.weights.encoders`) builds an encoder
  from it; :func:`read_codebook` reads a CAE codebook.
* :mod:`mimkit.weights.checkpoint`: atomic, checksummed checkpoint files and sharded (DCP)
  directories, verified before they are deserialised; :mod:`mimkit.weights.safe`: weights-only
  ``torch.load`` and the file checksum.
* :mod:`mimkit.weights.official`: official checkpoints' key layouts.
"""

from pathlib import Path

from mimkit.errors import InteropError
from mimkit.nn.codebook import FIT_COMMAND, Codebook
from mimkit.weights.encoders import load_encoder
from mimkit.weights.read import (
    FORMATS,
    Weights,
    holds_weights,
    read_clip_visual,
    read_verified,
    read_weights,
    strip_wrappers,
)


def read_codebook(path: str | Path) -> Codebook:
    """A :class:`~mimkit.nn.codebook.Codebook` from a file written by its ``save`` (weights only);
    ``FileNotFoundError`` names the fit command."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codebook {path} not found; fit it with: "
                                f"{FIT_COMMAND.replace('runs/codebook_fmnist.pt', str(path))}")
    w = read_weights(path)
    if w.format != "codebook":
        raise InteropError(f"{path} is {w.description}, not a codebook; fit one with: {FIT_COMMAND}")
    return Codebook(w.state["centroids"], int(w.meta["patch_size"]))


__all__ = ["FORMATS", "Weights", "holds_weights", "load_encoder", "read_clip_visual", "read_codebook", "read_verified",
           "read_weights", "strip_wrappers"]
