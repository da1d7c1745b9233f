"""EMAE — "Efficient Masked Autoencoders with Self-Consistency" (Li et al., TPAMI 2024).

MAE with K parallel views per image. The K visible parts form a partition of the image (every token
is visible in exactly one view, [SLIDES] Algorithm 1) and all views go through the encoder and
decoder in one pass, stacked in the batch (sequence ``s = b * K + k``). Shapes for B images::

    tokens = encoder.patch_tokens(images)                (B, L, D)      once per image
    plan   = PartitionMasking(K)(B, L)                   (B*K, n) ids   rotated permutations
    pred   = decoder(encoder(gather(tokens, ids)))       (B*K, L, P)    one forward pass
    target = norm_pix(patchify(images))                  (B, L, P)      once per image
    L_whole = mean_k MAE_loss(pred_k, target, m_k)                     MAE's reduction per view
    L_cons  = consistency(pred, m)                                      positions masked in both views
    loss    = L_whole + λ L_cons

Which source each choice follows:

* K disjoint covering equal parts, K views in one pass, ``L_whole + L_cons`` with weights 1, 1: [SLIDES].
* ``L_whole`` **averaged** over views (not summed) so that K = 1 is exactly MAE and λ keeps its
  meaning across K: [PROPOSAL].
* Consistency on the decoder outputs (normalized-pixel space), only at positions masked in both views
  of a pair (o_ij = m_i * m_j), per pair normalized by the pair's overlap count: [PROPOSAL]
  (the paper's distance and stop-gradient were not recovered).
* Default ``consistency_dist = mse``, ``consistency_mode = pairwise_sym``: the ordered-pair
  stop-gradient form,
  ``L_cons = 1/(K(K-1)) sum_{i!=j} sum o_ij d(pred_i, sg(pred_j)) / sum o_ij`` — value *and* gradient.
  It is computed as the symmetric no-stop-gradient pairwise mean ``v`` (same value, twice the
  gradient, the identity below) returned as ``(v + v.detach()) / 2``. For ``mse`` with equal overlap
  counts for every pair (true for the equal-size partition) it uses the O(K) identity
  ``sum_{i<j in M} |a_i - a_j|^2 = |M| sum_{i in M} |a_i - mean_M a|^2`` per position; otherwise it
  loops over the K(K-1)/2 pairs.
* ``to_detached_mean`` [PROPOSAL]: every prediction of a position masked in >= 2 views is pulled
  towards the detached mean of those predictions (one-directional, so stop-gradient matters).
* Masking alternatives (EMAE's ablation arms) through ``method.masking.kind``: ``random_views``
  ("pure random", K independent masks) and ``complementary`` (two views) — [PROPOSAL] readings of the
  deck's table.

Cost: ≈ K × MAE per image (encoder and decoder on K·B sequences). Quote images/iter and
sequences/iter separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mimkit.losses import CONSISTENCY_DISTS, CONSISTENCY_MODES, consistency_loss, masked_mse
from mimkit.masking import MaskingOptions, MaskPlan
from mimkit.methods.base import ModelConfig
from mimkit.methods.mae import MAE, MAEOptions


@dataclass
class EMAEOptions(MAEOptions):
    """EMAE knobs. ``masking.num_views`` is K (4 in the paper; 7 and 14 in its ablations).

    ``consistency_weight`` λ (1 in the deck; 0 turns the term off), ``consistency_dist`` (mse | l1 |
    cosine), ``consistency_mode`` (pairwise_sym | to_detached_mean), see the module docstring.
    """

    name: str = "emae"
    masking: MaskingOptions = field(default_factory=lambda: MaskingOptions(kind="partition", num_views=4))
    consistency_weight: float = 1.0
    consistency_dist: str = "mse"
    consistency_mode: str = "pairwise_sym"


class EMAE(MAE):
    """MAE with K parallel views and self-consistency; ``encoder``/``decoder`` are MAE's."""

    options_class = EMAEOptions

    def __init__(self, model: ModelConfig | None = None, options: EMAEOptions | None = None):
        options = options or EMAEOptions()
        if options.consistency_dist not in CONSISTENCY_DISTS:
            raise ValueError(f"consistency_dist must be one of {CONSISTENCY_DISTS}, got {options.consistency_dist!r}")
        if options.consistency_mode not in CONSISTENCY_MODES:
            raise ValueError(f"consistency_mode must be one of {CONSISTENCY_MODES}, got {options.consistency_mode!r}")
        super().__init__(model, options)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, plan: MaskPlan) -> tuple[torch.Tensor, dict]:
        """``pred (B*K, L, P)``, ``target (B, L, P)`` (once per image), ``plan.mask (B*K, L)``."""
        k = plan.num_views
        s, length, p = pred.shape
        if k == 1:  # exactly MAE
            whole = masked_mse(pred, target, plan.mask)
            return whole, {"loss_whole": whole.detach()}
        b = s // k
        pv = pred.view(b, k, length, p)
        mv = plan.mask.view(b, k, length)
        whole = torch.stack([masked_mse(pv[:, v], target, mv[:, v]) for v in range(k)]).mean()
        metrics = {"loss_whole": whole.detach()}
        opts = self.options
        loss = whole
        if opts.consistency_weight != 0.0:
            # every pair of views overlaps equally with two views, or with a partition into equal parts
            # (a partition plan: its source table covers the k views, no padding): known from the plan,
            # so the loss need not read it from the mask (a host sync)
            equal = k == 2 or (plan.source is not None and plan.group_size == k and plan.keep_valid is None)
            cons = consistency_loss(pv, mv, opts.consistency_dist, opts.consistency_mode, equal_pairs=equal)
            loss = whole + opts.consistency_weight * cons
            metrics["loss_consistency"] = cons.detach()
        return loss, metrics
