"""Mask generators. Every generator returns one :class:`MaskPlan`.

All masking reduces to "a score per token -> argsort -> permutation -> slices" (methods_b §1.2):
the first ``n_keep`` ids of a sequence's permutation are visible, the rest are masked. Views (EMAE)
are flattened into the batch axis: sequence ``s = b * num_views + v`` belongs to image ``b``.

Conventions (shared by every method):

* ``ids_keep (S, n_keep)``: visible token ids, in permutation order (not sorted).
* ``ids_restore (S, L)``: ``argsort(perm)``; gathering ``[kept tokens, mask tokens]`` with it
  restores grid order (MAE's decoder un-shuffle).
* ``mask (S, L)``: float, ``1`` = masked (a prediction target), ``0`` = visible.
* ``keep_valid (S, n_keep)``: bool, ``False`` marks padding when sequences keep different numbers of
  tokens (SBAM/AMR per-sample mode); ``None`` when all lengths are equal.
* ``scores``: a per-token score kept for pictures and diagnostics: the ranked noise ``(B, L)`` (or
  ``(S, L)`` when every view has its own noise), SBAM's salience before noise ``(B, L)``; ``groups``: optional per-sequence group ids (MixedAE mixing groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class MaskPlan:
    """Which tokens each encoder sequence sees and which are prediction targets (see module doc)."""

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor
    num_views: int = 1
    keep_valid: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return self.ids_keep.shape[0]

    @property
    def batch_size(self) -> int:
        return self.num_seqs // self.num_views

    @property
    def n_keep(self) -> int:
        return self.ids_keep.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[1]

    @property
    def perm(self) -> torch.Tensor:
        """``(S, L)`` the permutation: visible ids first, then masked ids."""
        return torch.argsort(self.ids_restore, dim=1)

    def ids_masked(self) -> torch.Tensor:
        """``(S, L - n_keep)`` ids after the kept block, in permutation order."""
        return self.perm[:, self.n_keep :]

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat a per-image tensor ``(B, ...)`` for every view -> ``(B * V, ...)``."""
        if self.num_views == 1:
            return x
        return x.repeat_interleave(self.num_views, dim=0)

    def to(self, device: torch.device | str) -> MaskPlan:
        def mv(t):
            return None if t is None else t.to(device)

        return MaskPlan(
            mv(self.ids_keep), mv(self.ids_restore), mv(self.mask), self.num_views,
            mv(self.keep_valid), mv(self.scores), mv(self.groups),
        )

    @classmethod
    def from_permutation(
        cls,
        perm: torch.Tensor,
        n_keep: int,
        num_views: int = 1,
        keep_lengths: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> MaskPlan:
        """Build a plan from ``perm (S, L)`` (visible first).

        ``keep_lengths (S,)``: per-sequence visible counts ``<= n_keep``; positions of the kept
        block past a sequence's length become padding and those tokens count as masked.
        """
        s, length = perm.shape
        if not 0 < n_keep <= length:
            raise ValueError(f"n_keep must be in [1, {length}], got {n_keep}")
        ids_restore = torch.argsort(perm, dim=1)
        ids_keep = perm[:, :n_keep]
        rank = torch.arange(length, device=perm.device).expand(s, length)
        if keep_lengths is None:
            keep_valid = None
            masked_in_order = rank >= n_keep
        else:
            keep_lengths = keep_lengths.to(perm.device)
            masked_in_order = rank >= keep_lengths[:, None]
            keep_valid = ~masked_in_order[:, :n_keep]
            if bool(keep_valid.all()):
                keep_valid = None
        mask = torch.gather(masked_in_order.float(), 1, ids_restore)
        return cls(ids_keep, ids_restore, mask, num_views, keep_valid, scores)


def num_keep(num_tokens: int, mask_ratio: float) -> int:
    """MAE's ``int(L * (1 - ratio))`` (floor, pitfall 2.9.4), at least 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1 - mask_ratio)))


def _uniform(shape, device, generator) -> torch.Tensor:
    return torch.rand(shape, device=device, generator=generator)


class RandomMasking:
    """MAE's random masking: argsort of uniform noise, keep the first ``int(L(1-r))``.

    Every generator is called as ``gen(batch_size, num_tokens, device, generator=..., noise=...,
    **context)``; ``context`` may carry ``tokens (B, L, D)``, ``progress`` and ``grid`` for
    generators that need them (salience-based masking, schedules, block masking) and is ignored
    by the others.

    Pass ``noise (B, L)`` to reproduce a given masking exactly (as the official ``random_masking``
    would with the same noise).
    """

    def __init__(self, mask_ratio: float = 0.75):
        self.mask_ratio = mask_ratio

    def __call__(
        self,
        batch_size: int,
        num_tokens: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        **context,
    ) -> MaskPlan:
        if noise is None:
            noise = _uniform((batch_size, num_tokens), device, generator)
        elif noise.shape != (batch_size, num_tokens):
            raise ValueError(f"noise must have shape {(batch_size, num_tokens)}, got {tuple(noise.shape)}")
        perm = torch.argsort(noise, dim=1)
        return MaskPlan.from_permutation(perm, num_keep(num_tokens, self.mask_ratio), scores=noise)


def plan_from_mask(mask: torch.Tensor, generator: torch.Generator | None = None) -> MaskPlan:
    """Plan from an explicit boolean/0-1 mask ``(B, L)`` (1 = masked) with equal counts per row.

    Visible ids are kept in raster order (CAE's convention for boolean masks), masked ids follow in
    raster order.
    """
    m = mask.bool()
    counts = m.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError("every image must mask the same number of tokens; got counts " f"{counts.tolist()}")
    length = m.shape[1]
    # stable sort of (masked flag, position): visible tokens first in raster order
    key = m.long() * length + torch.arange(length, device=m.device)
    perm = torch.argsort(key, dim=1)
    n_keep = length - int(counts[0]) if counts.numel() else length
    return MaskPlan.from_permutation(perm, n_keep)


class BlockMasking:
    """BEiT/CAE block-wise masking with an exact masked count.

    Rectangles of area in ``[min_num_patches, remaining]`` and aspect ratio log-uniform in
    ``[min_aspect, 1/min_aspect]`` are added until ``num_masked = round(L * mask_ratio)`` patches are
    covered (BEiT's ``MaskingGenerator``; rectangles that would add nothing or overshoot are
    rejected). As in CAE's generator, the count is then made exact: missing patches are added at
    random, surplus ones removed at random. Vectorised over the batch: each round proposes one
    rectangle for every image.
    """

    def __init__(
        self,
        mask_ratio: float = 0.5,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_rounds: int = 200,
    ):
        self.mask_ratio = mask_ratio
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.max_rounds = max_rounds

    def boolean_mask(
        self,
        batch_size: int,
        grid: tuple[int, int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(B, L)`` bool with exactly ``round(L * mask_ratio)`` True per row."""
        gh, gw = grid
        length = gh * gw
        target = int(round(length * self.mask_ratio))
        max_area = self.max_num_patches or target
        m = torch.zeros(batch_size, gh, gw, dtype=torch.bool, device=device)
        rows = torch.arange(gh, device=device)[None, :, None]
        cols = torch.arange(gw, device=device)[None, None, :]
        for _ in range(self.max_rounds):
            count = m.flatten(1).sum(1)
            remaining = target - count
            if not bool((remaining >= self.min_num_patches).any()):
                break
            hi = remaining.clamp(max=max_area).float()
            area = self.min_num_patches + _uniform((batch_size,), device, generator) * (hi - self.min_num_patches).clamp(min=0)
            log_ar = self.log_aspect[0] + _uniform((batch_size,), device, generator) * (self.log_aspect[1] - self.log_aspect[0])
            ar = torch.exp(log_ar)
            h = torch.round(torch.sqrt(area * ar)).long().clamp(min=1)
            w = torch.round(torch.sqrt(area / ar)).long().clamp(min=1)
            ok = (h < gh) & (w < gw)
            top = (_uniform((batch_size,), device, generator) * (gh - h + 1).clamp(min=1)).long()
            left = (_uniform((batch_size,), device, generator) * (gw - w + 1).clamp(min=1)).long()
            rect = (
                (rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
                & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None])
            )
            new = (rect & ~m).flatten(1).sum(1)
            accept = ok & (new > 0) & (new <= remaining) & (remaining >= self.min_num_patches)
            m = m | (rect & accept[:, None, None])
        # exact count (CAE): rank by (in a block) + noise, take the top `target`
        score = m.flatten(1).float() + _uniform((batch_size, length), device, generator) * 0.5
        top_ids = torch.topk(score, target, dim=1).indices
        exact = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
        exact.scatter_(1, top_ids, True)
        return exact

    def __call__(
        self,
        batch_size: int,
        num_tokens: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
        **context,
    ) -> MaskPlan:
        if grid is None:
            side = int(round(num_tokens**0.5))
            if side * side != num_tokens:
                raise ValueError("block masking needs grid=(h, w) for a non-square token grid")
            grid = (side, side)
        return plan_from_mask(self.boolean_mask(batch_size, grid, device, generator))


# --------------------------------------------------------------------------------------------------
# Several views per image (EMAE, methods_b §4): views are flattened into the batch, s = b * V + v.


def _rotated_views(perm: torch.Tensor, starts: list[int], sizes: list[int], scores=None) -> MaskPlan:
    """View ``v`` sees ``perm[:, starts[v] : starts[v] + sizes[v]]`` (methods_b §1.2 rotated trick).

    ``perm (B, L)`` is rolled by ``-starts[v]`` for every view, so MAE's unchanged gather of the first
    ``n_keep`` ids and its decoder un-shuffle serve each view. Unequal ``sizes`` are padded to the
    largest one through ``keep_lengths`` (key-padding mask in the encoder, mask tokens in the decoder).
    Returns a plan with ``S = B * V`` sequences.
    """
    b, length = perm.shape
    v = len(starts)
    offs = torch.arange(length, device=perm.device)
    idx = (torch.tensor(starts, device=perm.device)[:, None] + offs[None, :]) % length  # (V, L)
    views = perm[:, idx].reshape(b * v, length)  # (B, V, L) -> (B*V, L)
    n_keep = max(sizes)
    lengths = None
    if min(sizes) != n_keep:
        lengths = torch.tensor(sizes, device=perm.device).repeat(b)
    return MaskPlan.from_permutation(views, n_keep, num_views=v, keep_lengths=lengths, scores=scores)


def partition_sizes(num_tokens: int, num_parts: int) -> list[int]:
    """Sizes of a partition of ``L`` tokens into ``K`` parts: ``L/K`` each when ``K | L``, otherwise
    ``floor``/``ceil`` sizes (the larger parts first), differing by at most one."""
    if not 1 <= num_parts <= num_tokens:
        raise ValueError(f"num_views must be in [1, {num_tokens}], got {num_parts}")
    bounds = [(k * num_tokens) // num_parts for k in range(num_parts + 1)]
    sizes = [bounds[k + 1] - bounds[k] for k in range(num_parts)]
    return sorted(sizes, reverse=True)


def _check_noise(noise, shape) -> None:
    if noise is not None and tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")


class PartitionMasking:
    """EMAE's parallel masks (methods_b §4.1, [SLIDES] Algorithm 1): the ``L`` tokens of an image are
    split into ``K`` disjoint random parts that cover the image; view ``k`` sees part ``k`` only, so
    each view masks ``(K-1)/K`` of the image and every token is visible in exactly one view.

    One noise vector per image: ``perm = argsort(noise)``, part ``k`` = a consecutive block of
    ``perm``. When ``K`` does not divide ``L`` (e.g. 49 Fashion-MNIST patches, K = 4) the parts differ
    in size by one and the shorter views are padded ([PROPOSAL]; the paper requires ``K | L``; set
    ``strict=True`` to refuse). ``noise (B, L)``. Returns ``B * K`` sequences.
    """

    def __init__(self, num_views: int = 4, strict: bool = False):
        self.num_views = num_views
        self.strict = strict

    def __call__(self, batch_size, num_tokens, device="cpu", generator=None, noise=None, **context) -> MaskPlan:
        if self.strict and num_tokens % self.num_views:
            raise ValueError(f"num_views {self.num_views} does not divide the {num_tokens} tokens")
        _check_noise(noise, (batch_size, num_tokens))
        if noise is None:
            noise = _uniform((batch_size, num_tokens), device, generator)
        perm = torch.argsort(noise, dim=1)
        sizes = partition_sizes(num_tokens, self.num_views)
        starts = [sum(sizes[:k]) for k in range(self.num_views)]
        return _rotated_views(perm, starts, sizes, scores=noise)


class RandomViewsMasking:
    """EMAE's "pure random" ablation arm ([PROPOSAL] reading of the deck, methods_b §4.6): ``K``
    independent MAE masks per image at ``mask_ratio``, same compute as the partition but no coverage
    guarantee. ``noise (B, K, L)`` or ``(B*K, L)``. Returns ``B * K`` sequences."""

    def __init__(self, num_views: int = 4, mask_ratio: float = 0.75):
        self.num_views = num_views
        self.mask_ratio = mask_ratio

    def __call__(self, batch_size, num_tokens, device="cpu", generator=None, noise=None, **context) -> MaskPlan:
        s = batch_size * self.num_views
        if noise is None:
            noise = _uniform((s, num_tokens), device, generator)
        elif noise.ndim == 3:
            _check_noise(noise, (batch_size, self.num_views, num_tokens))
            noise = noise.reshape(s, num_tokens)
        _check_noise(noise, (s, num_tokens))
        perm = torch.argsort(noise, dim=1)
        return MaskPlan.from_permutation(
            perm, num_keep(num_tokens, self.mask_ratio), num_views=self.num_views, scores=noise
        )


class ComplementaryMasking:
    """EMAE's "complementary" ablation arm ([PROPOSAL] reading, methods_b §4.6): two views per image,
    view 0 is an MAE mask at ``mask_ratio`` (25 % visible at 0.75) and view 1 sees exactly the tokens
    view 0 masks (75 % visible). View 0 is padded to view 1's length. ``noise (B, L)``."""

    def __init__(self, mask_ratio: float = 0.75):
        self.mask_ratio = mask_ratio

    def __call__(self, batch_size, num_tokens, device="cpu", generator=None, noise=None, **context) -> MaskPlan:
        _check_noise(noise, (batch_size, num_tokens))
        if noise is None:
            noise = _uniform((batch_size, num_tokens), device, generator)
        perm = torch.argsort(noise, dim=1)
        n0 = num_keep(num_tokens, self.mask_ratio)
        if n0 >= num_tokens:
            raise ValueError("complementary masking needs at least one masked token in view 0")
        return _rotated_views(perm, [0, n0], [n0, num_tokens - n0], scores=noise)


# --------------------------------------------------------------------------------------------------
# Salience-based masking with an adaptive ratio (SBAM / AMR, methods_b §5)


@torch.no_grad()
def token_salience(tokens: torch.Tensor, temperature: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """SBAM's token salience (methods_b §5.1, [CODE] ``saliency_guided_masking``).

    ``tokens (B, L, D)`` layer-0 embeddings (patch embedding + position, cls excluded) ->
    ``(B, L)`` in ``[0, 1]``: ``A = X X^T / temperature`` (no ``1/sqrt(D)``: official), row softmax,
    column sums (attention each token *receives*), min-max per image (``eps`` added to the range;
    the official code has none). fp32, no gradient.
    """
    x = tokens.detach().float()
    with torch.autocast(x.device.type, enabled=False):  # the L x L product stays fp32 under AMP
        affinity = torch.bmm(x, x.transpose(1, 2))
        if temperature != 1.0:
            affinity = affinity / temperature
        s = affinity.softmax(dim=-1).sum(dim=1)
    lo = s.amin(dim=1, keepdim=True)
    hi = s.amax(dim=1, keepdim=True)
    return (s - lo) / (hi - lo + eps)


def adaptive_keep_counts(
    salience: torch.Tensor, ratio: float, delta_ratio: float, threshold: float, per_sample: bool
) -> torch.Tensor:
    """AMR (methods_b §5.3): ``R = r - Δr + 2Δr * mean(1[S > δ])`` -> visible counts.

    ``salience (B, L)``; the mean is over tokens *and the batch* unless ``per_sample`` (then one ratio
    per image). Returns ``(B,)`` int64 counts ``n = floor(L (1 - R))`` clamped so the realized ratio
    ``1 - n / L`` stays inside ``[r - Δr, r + Δr]`` (when that interval holds an integer count) and
    ``1 <= n <= L - 1``.
    """
    b, length = salience.shape
    frac = (salience > threshold).double().mean(dim=1)
    if not per_sample:
        frac = frac.mean().expand(b)
    r = ratio - delta_ratio + 2 * delta_ratio * frac
    r = r.clamp(0.0, 1.0)
    n = torch.floor(length * (1 - r) + 1e-9)
    lo = math.ceil(length * (1 - ratio - delta_ratio) - 1e-9)  # realized ratio <= r + Δr
    hi = math.floor(length * (1 - ratio + delta_ratio) + 1e-9)  # realized ratio >= r - Δr
    if lo <= hi:
        n = n.clamp(lo, hi)
    return n.clamp(1, max(1, length - 1)).long()


class SalienceMasking:
    """SBAM: mask the most salient tokens, with an adaptive ratio (methods_b §5).

    ``score = S + noise_scale * U[0, 1)`` with ``S`` = :func:`token_salience` of ``tokens`` (the
    official noise is ``U[0, 0.5)``); ``argsort(score)`` ascending, keep the first ``n`` (low-salience
    tokens stay visible, the high-salience ones become targets).

    ``amr_mode``: ``off`` (``n = int(L (1 - r))``), ``batch`` (official [CODE]: one ratio per batch),
    ``sample`` ([PROPOSAL]: one ratio per image, shorter sequences padded; the plan's ``keep_valid``
    becomes the encoder's key-padding mask and padded slots count as masked in the loss).

    Warm start ([CODE] README resumes from a 100-epoch "warmup checkpoint"; [PROPOSAL] random MAE
    masking before it): while ``progress.fraction < start`` the plan is MAE's random masking at ``r``.
    Without ``progress`` (pictures, evaluation) the salience path is used.

    Call: ``gen(B, L, device, generator=, noise=(B, L) U[0,1), tokens=(B, L, D), progress=)``.
    """

    def __init__(
        self,
        mask_ratio: float = 0.75,
        amr_mode: str = "batch",
        delta_ratio: float = 0.1,
        threshold: float = 0.5,
        noise_scale: float = 0.5,
        temperature: float = 1.0,
        start: float = 0.25,
    ):
        if amr_mode not in ("off", "batch", "sample"):
            raise ValueError(f"amr_mode must be off, batch or sample, got {amr_mode!r}")
        self.mask_ratio = mask_ratio
        self.amr_mode = amr_mode
        self.delta_ratio = delta_ratio
        self.threshold = threshold
        self.noise_scale = noise_scale
        self.temperature = temperature
        self.start = start

    def active(self, progress=None) -> bool:
        """Whether salience drives the masking at ``progress`` (False during the warm start)."""
        return progress is None or progress.fraction >= self.start

    def __call__(
        self,
        batch_size,
        num_tokens,
        device="cpu",
        generator=None,
        noise=None,
        tokens: torch.Tensor | None = None,
        progress=None,
        **context,
    ) -> MaskPlan:
        _check_noise(noise, (batch_size, num_tokens))
        if not self.active(progress):
            return RandomMasking(self.mask_ratio)(batch_size, num_tokens, device, generator=generator, noise=noise)
        if tokens is None:
            raise ValueError("salience-based masking needs tokens=(B, L, D) (the layer-0 embeddings)")
        if noise is None:
            noise = _uniform((batch_size, num_tokens), tokens.device, generator)
        salience = token_salience(tokens, self.temperature)
        scores = salience + self.noise_scale * noise.float()
        perm = torch.argsort(scores, dim=1)
        if self.amr_mode == "off":
            return MaskPlan.from_permutation(perm, num_keep(num_tokens, self.mask_ratio), scores=salience)
        counts = adaptive_keep_counts(
            salience, self.mask_ratio, self.delta_ratio, self.threshold, per_sample=self.amr_mode == "sample"
        )
        n_max = int(counts.max())
        lengths = counts if self.amr_mode == "sample" else None
        return MaskPlan.from_permutation(perm, n_max, keep_lengths=lengths, scores=salience)


# --------------------------------------------------------------------------------------------------


MASKING_KINDS = ("random", "block", "partition", "random_views", "complementary", "sbam")


@dataclass
class MaskingOptions:
    """Which generator a method uses and its knobs (``method.masking.*`` in configs).

    ``kind``: ``random`` (MAE), ``block`` (BEiT/CAE, exact count), ``partition`` (EMAE's K disjoint
    covering parts, one view each; ``ratio`` is ignored, each view masks ``(K-1)/K``),
    ``random_views`` (K independent MAE masks at ``ratio``: EMAE's "pure random" arm),
    ``complementary`` (two views, an MAE mask at ``ratio`` and its complement: EMAE's arm), ``sbam``
    (salience-based masking with the adaptive ratio; ``ratio`` is the base ratio r).

    ``num_views``: K for ``partition`` / ``random_views``; ``partition_strict``: refuse K not dividing L.
    SBAM: ``amr_mode`` (off | batch | sample), ``amr_delta_ratio`` (Δr), ``amr_threshold`` (δ),
    ``saliency_noise`` (noise U[0, saliency_noise)), ``saliency_temperature`` (1 = official),
    ``saliency_start`` (fraction of training with random masking first).
    """

    kind: str = "random"
    ratio: float = 0.75
    block_min_patches: int = 4
    block_min_aspect: float = 0.3
    num_views: int = 4
    partition_strict: bool = False
    amr_mode: str = "batch"
    amr_delta_ratio: float = 0.1
    amr_threshold: float = 0.5
    saliency_noise: float = 0.5
    saliency_temperature: float = 1.0
    saliency_start: float = 0.25


def build_mask_generator(opts: MaskingOptions):
    """A generator instance for ``opts`` (see :class:`RandomMasking` for the call signature)."""
    if opts.kind == "random":
        return RandomMasking(opts.ratio)
    if opts.kind == "block":
        return BlockMasking(opts.ratio, opts.block_min_patches, min_aspect=opts.block_min_aspect)
    if opts.kind == "partition":
        return PartitionMasking(opts.num_views, strict=opts.partition_strict)
    if opts.kind == "random_views":
        return RandomViewsMasking(opts.num_views, opts.ratio)
    if opts.kind == "complementary":
        return ComplementaryMasking(opts.ratio)
    if opts.kind == "sbam":
        return SalienceMasking(
            opts.ratio, opts.amr_mode, opts.amr_delta_ratio, opts.amr_threshold,
            opts.saliency_noise, opts.saliency_temperature, opts.saliency_start,
        )
    raise ValueError(f"unknown masking kind {opts.kind!r}; choose one of: {', '.join(MASKING_KINDS)}")
