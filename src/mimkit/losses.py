"""Loss functions with shape docstrings. All reductions follow MAE unless stated."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: per-patch mean squared error averaged over all masked patches of the batch.

    ``pred, target (S, L, P)``, ``mask (S, L)`` with 1 = masked -> scalar
    ``sum(mask * mean_c (pred - target)^2) / sum(mask)`` (not a per-image mean).
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def masked_reduce(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(mask * per_patch) / sum(mask)`` for any per-patch loss ``(S, L)``."""
    mask = mask.float()
    return (per_patch.float() * mask).sum() / mask.sum().clamp(min=1.0)


def per_patch_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "mse", huber_delta: float = 1.0) -> torch.Tensor:
    """Per-patch distance ``(..., P) x (..., P) -> (...)``: ``mse`` (mean of squares), ``l1`` (mean of
    absolute values), ``huber`` (elementwise Huber with ``huber_delta``, averaged), ``cosine``
    (``1 - cos``)."""
    a, b = a.float(), b.float()
    if kind == "mse":
        return (a - b).pow(2).mean(-1)
    if kind == "l1":
        return (a - b).abs().mean(-1)
    if kind == "huber":
        return F.huber_loss(a, b, reduction="none", delta=huber_delta).mean(-1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=-1)
    raise ValueError(f"unknown distance {kind!r}; choose mse, l1, huber or cosine")


def average_patch_similarity(x: torch.Tensor, include_diagonal: bool = True) -> torch.Tensor:
    """Collapse monitor "Sim": ``mean_b mean_{i,j} cos(x_bi, x_bj)`` for ``x (B, N, D)`` -> scalar.

    With the diagonal (Latent MIM's convention) this is ``mean_b ||mean_i x̂_bi||^2``; without it,
    ``(N * Sim - 1) / (N - 1)`` per image.
    """
    xn = F.normalize(x.float(), dim=-1)
    n = x.shape[1]
    sim = xn.mean(1).pow(2).sum(-1)  # (B,)
    if not include_diagonal:
        sim = (n * sim - 1) / max(n - 1, 1)
    return sim.mean()


def patch_disc(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.2, std_eps: float = 1e-4) -> torch.Tensor:
    """Latent MIM's PatchDisc (``infonce_patches``): InfoNCE among the target
    patches of one image, negatives are the other targets of the *same* image.

    ``pred, target (B, m, D)`` with row ``k`` of ``pred`` predicting row ``k`` of ``target`` -> scalar
    ``2 tau * mean_{b,k} CE(P_b Z_b^T / tau, k)``, where ``P`` = predictions standardized across the
    ``m`` tokens per channel (unbiased std + ``std_eps``) then L2-normalized, ``Z`` = L2-normalized
    targets (not standardized). Per-image terms averaged over images: independent of batch size.
    """
    p = pred.float()
    p = (p - p.mean(dim=1, keepdim=True)) / (p.std(dim=1, keepdim=True) + std_eps)
    p = F.normalize(p, dim=-1)
    z = F.normalize(target.float(), dim=-1)
    logits = p @ z.transpose(1, 2) / tau  # (B, m, m)
    b, m, _ = logits.shape
    labels = torch.arange(m, device=logits.device).expand(b, m)
    return 2 * tau * F.cross_entropy(logits.reshape(b * m, m), labels.reshape(-1))


def latent_regression(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", huber_delta: float = 1.0) -> torch.Tensor:
    """Regression in latent space for the loss ablation: ``mse`` / ``l1`` / ``huber`` per patch
    (:func:`per_patch_distance`, mean over channels), averaged over all ``(B, m)`` target patches."""
    return per_patch_distance(pred, target, kind, huber_delta).mean()


def similarity_regularizer(pred: torch.Tensor, visible: torch.Tensor, gamma: float) -> torch.Tensor:
    """Latent MIM's average-similarity regularizer ``R = (s(pred) - gamma)^2 + (s(visible) - gamma)^2``
    with ``s`` = :func:`average_patch_similarity` (within-image pairs, diagonal included, batch mean
    taken before squaring). ``pred (B, m, D)`` decoder predictions, ``visible (B, n, D)`` visible
    encoder outputs (cls excluded)."""
    return (average_patch_similarity(pred) - gamma) ** 2 + (average_patch_similarity(visible) - gamma) ** 2


CONSISTENCY_DISTS = ("mse", "l1", "cosine")
CONSISTENCY_MODES = ("pairwise_sym", "to_detached_mean")


def _pair_counts(mask: torch.Tensor) -> torch.Tensor:
    """``mask (B, K, L)`` -> ``(K, K)`` number of (image, position) pairs masked in both views."""
    m = mask.float()
    with torch.autocast(m.device.type, enabled=False):  # counts in fp32: bf16 would round them (8-bit mantissa)
        return torch.einsum("bil,bjl->ij", m, m)


def consistency_loss(
    pred: torch.Tensor, mask: torch.Tensor, dist: str = "mse", mode: str = "pairwise_sym",
    equal_pairs: bool | None = None,
) -> torch.Tensor:
    """Self-consistency between the K views' predictions of the same positions.

    Args:
        pred: ``(B, K, L, P)`` decoder outputs of the K views of each image.
        mask: ``(B, K, L)`` 1 = masked (predicted) in that view.
        dist: per-patch distance ``mse`` | ``l1`` | ``cosine`` (:func:`mimkit.losses.per_patch_distance`).
        mode: ``pairwise_sym`` or ``to_detached_mean`` (module docstring).
        equal_pairs: whether every pair of views masks the same number of (image, position) pairs, which
            allows the O(K) form of ``mse``; ``None`` reads it from ``mask`` (a host sync on a GPU). The
            caller knows it from its masking: two views, or a partition into equal parts. ``False`` takes
            the pairwise form even where the counts happen to be equal (the same value up to rounding).
    Returns:
        scalar; 0 when K < 2 or no position is masked in two views.
    """
    if dist not in CONSISTENCY_DISTS:
        raise ValueError(f"unknown consistency_dist {dist!r}; choose one of {', '.join(CONSISTENCY_DISTS)}")
    if mode not in CONSISTENCY_MODES:
        raise ValueError(f"unknown consistency_mode {mode!r}; choose one of {', '.join(CONSISTENCY_MODES)}")
    b, k, length, _ = pred.shape
    zero = pred.float().sum() * 0.0
    if k < 2:
        return zero
    m = mask.float()
    n_masked = m.sum(1)  # (B, L): views that predict each position
    if mode == "to_detached_mean":
        shared = (n_masked >= 2).float()  # positions predicted by >= 2 views
        mean = (pred.float() * m[..., None]).sum(1) / n_masked.clamp(min=1)[..., None]  # (B, L, P)
        d = per_patch_distance(pred, mean.detach()[:, None].expand_as(pred), dist)  # (B, K, L)
        return masked_reduce(d, m * shared[:, None])

    counts = _pair_counts(m)
    # the off-diagonal entries, row by row (as counts[~eye] gives them, without a data-dependent size)
    pair_counts = counts.flatten()[1:].view(k - 1, k + 1)[:, :-1].reshape(-1)
    equal = bool((pair_counts == pair_counts[0]).all()) if equal_pairs is None else equal_pairs
    if dist == "mse" and equal:
        # O(K): per position, sum over pairs {i<j} both masking it of |a_i - a_j|^2 / P
        #       = |M| * sum_{i in M} mean_c (a_i - mean_M)^2
        # (no position in two masks: pair_sum is 0 and the clamp below keeps it 0 without a read)
        if equal_pairs is None and float(pair_counts[0]) == 0.0:
            return zero
        p = pred.float()
        mean = (p * m[..., None]).sum(1, keepdim=True) / n_masked.clamp(min=1)[:, None, :, None]
        dev = ((p - mean).pow(2).mean(-1) * m).sum(1)  # (B, L)
        pair_sum = (n_masked * dev).sum()  # sum over unordered pairs and positions
        v = pair_sum / (pair_counts[0].clamp(min=1.0) * (k * (k - 1) / 2))
    else:
        terms = []
        for i in range(k):
            for j in range(i + 1, k):
                o = m[:, i] * m[:, j]
                terms.append(masked_reduce(per_patch_distance(pred[:, i], pred[:, j], dist), o))
        v = torch.stack(terms).mean()
    # value of the ordered stop-gradient form with its (half) gradient (the identity is spelled out in the EMAE module docstring)
    return 0.5 * (v + v.detach())


def homologous_contrastive(
    features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None, temperature: float = 0.25
) -> torch.Tensor:
    """MixedAE's homologous contrastive loss (HomoCon) inside each mixed sequence.

    ``features (N, T, D)`` patch features of ``N`` mixed sequences; ``labels (T,)`` or ``(N, T)`` the
    source image of each token; ``valid (N, T)`` bool or ``None`` (padding tokens are neither anchors
    nor keys). With ``s_ij = cos(z_i, z_j) / temperature``, for every anchor ``i`` with at least one
    positive ``P(i) = {j != i : label_j = label_i, valid}``::

        l_i = - 1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_{j != i, valid} exp(s_ij) )

    (the deck's sum over positives, self-pair excluded from numerator and denominator, negatives only
    from the same sequence; SupCon-"out" mean over positives [PROPOSAL]). Returns the mean of ``l_i``
    over all such anchors of all sequences -> scalar. Computed in fp32 (autocast off).
    """
    per_anchor_sum, n_pos, anchors = homologous_pair_terms(features, labels, valid, temperature)
    per_anchor = per_anchor_sum / n_pos.clamp(min=1)
    return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1.0)


def homologous_pair_terms(features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None,
                          temperature: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-anchor parts of :func:`homologous_contrastive` (same arguments), for any reduction:
    ``(sum over P(i) of -log p_ip  (N, T), |P(i)|  (N, T), anchor weights (N, T) float)`` -- an anchor is a
    valid token with at least one positive. fp32, autocast off."""
    n, t, _ = features.shape
    with torch.autocast(features.device.type, enabled=False):
        z = F.normalize(features.float(), dim=-1)
        sim = z @ z.transpose(1, 2) / temperature  # (N, T, T)
    lab = labels.expand(n, t)
    keys = ~torch.eye(t, dtype=torch.bool, device=features.device)[None]  # (1, T, T): j != i
    if valid is not None:
        keys = keys & valid[:, None, :]
    sim = sim.masked_fill(~keys, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=-1, keepdim=True)
    pos = (lab[:, :, None] == lab[:, None, :]) & keys  # (N, T, T)
    n_pos = pos.sum(-1)
    anchors = n_pos > 0
    if valid is not None:
        anchors = anchors & valid
    return -log_prob.masked_fill(~pos, 0.0).sum(-1), n_pos, anchors.float()
