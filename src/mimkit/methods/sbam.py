"""SBAM — "Salience-Based Adaptive Masking" (Choi et al., ECCV 2024).

SBAM changes only the masking, so it is MAE with ``method.masking.kind = sbam`` (salience from the
layer-0 tokens + U[0, 0.5) noise, the most salient tokens masked, adaptive ratio AMR, random masking
during the warm start): see :class:`mimkit.masking.SalienceMasking`. Any method that builds its
masking from :class:`mimkit.masking.MaskingOptions` and passes ``tokens=`` and ``progress=`` to the
generator gets SBAM the same way. This file only registers the name ``sbam`` with SBAM's defaults.

Defaults: r = 0.75 [CODE README], Δr = 0.1 and δ = 0.5 (not published; a third-party reuse's values),
``amr_mode = batch`` (official: one ratio per batch), salience from 25 % of the schedule
([PROPOSAL]; the official ViT-L run resumes a 400-epoch run from a 100-epoch warm-up checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mimkit.masking import MaskingOptions
from mimkit.methods.mae import MAE, MAEOptions


@dataclass
class SBAMOptions(MAEOptions):
    """MAE options whose masking defaults to SBAM's (``masking.kind = sbam``)."""

    name: str = "sbam"
    masking: MaskingOptions = field(default_factory=lambda: MaskingOptions(kind="sbam"))


class SBAM(MAE):
    """An :class:`~mimkit.methods.mae.MAE` whose options default to salience-based adaptive masking."""

    options_class = SBAMOptions
