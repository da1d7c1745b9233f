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
* ``scores (B, L)``: the per-token score that was ranked (noise, salience + noise, ...), kept for
  pictures and diagnostics; ``groups``: optional per-sequence group ids (MixedAE mixing groups).
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


@dataclass
class MaskingOptions:
    """Which generator a method uses and its knobs (``method.masking.*`` in configs).

    ``kind``: ``random`` (MAE) or ``block`` (BEiT/CAE, exact count). ``ratio``: fraction masked.
    """

    kind: str = "random"
    ratio: float = 0.75
    block_min_patches: int = 4
    block_min_aspect: float = 0.3


def build_mask_generator(opts: MaskingOptions):
    """A generator instance for ``opts`` (see :class:`RandomMasking` for the call signature)."""
    if opts.kind == "random":
        return RandomMasking(opts.ratio)
    if opts.kind == "block":
        return BlockMasking(opts.ratio, opts.block_min_patches, min_aspect=opts.block_min_aspect)
    raise ValueError(f"unknown masking kind {opts.kind!r}; choose one of: random, block")
