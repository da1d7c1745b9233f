"""Mask generators. Every generator returns one :class:`MaskPlan`.

All masking reduces to "a score per token -> argsort -> permutation -> slices":
the first ``num_keep`` ids of a sequence's permutation are visible, the rest are masked. Views (EMAE)
are flattened into the batch axis: sequence ``s = b * num_views + v`` belongs to image ``b``.

The generator protocol (:class:`MaskGenerator`) is one call with explicit keywords, so a misspelt
keyword is a ``TypeError``::

    plan = gen(batch_size, num_tokens, device, generator=None, noise=None, tokens=None, progress=None, grid=None)

Each generator has a small options dataclass beside it (:class:`BlockOptions`, :class:`SalienceOptions`);
:class:`MaskingOptions` (``method.masking.*`` in configs) selects the kind and holds them. The visible
count follows one rule everywhere, :func:`resolve_num_keep`: MAE's ``int(L * (1 - ratio))`` (floor), or an
explicit ``num_keep`` that wins over the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class MaskPlan:
    """Which tokens each encoder sequence sees and which are prediction targets.

    Shapes: ``S`` sequences (``S = B * num_views``; sequence ``s = b * num_views + v``), ``L`` tokens
    per image, ``n = num_keep`` visible slots, ``m`` target slots.

    * ``ids_keep (S, n)`` long: visible token ids in permutation order (not sorted).
    * ``ids_restore (S, L)`` long: ``argsort(perm)``; gathering ``[kept tokens, mask tokens]`` with it
      restores grid order (MAE's decoder un-shuffle).
    * ``mask (S, L)`` float: ``1`` = masked (not seen by the encoder), ``0`` = visible.
    * ``keep_valid (S, n)`` bool or ``None``: ``False`` marks padding slots when sequences keep
      different numbers of tokens (SBAM/AMR per-sample mode, uneven EMAE parts); padded ids count as
      masked. ``None`` when every slot is real.
    * ``ids_target (S, m)`` long or ``None``: the positions a method predicts, when they are not
      simply the masked ids in permutation order (:meth:`target_ids`). Every target id is masked.
    * ``source (S, L)`` long or ``None``: for sequences that mix several images (MixedAE), the index
      ``0 .. group_size - 1`` of the image that owns each position.
    * ``scores``: a per-token score kept for pictures and diagnostics (the ranked noise ``(B, L)`` or
      ``(S, L)``, SBAM's salience ``(B, L)``).

    Invariants (checked by :meth:`validate`): each row of :attr:`perm` is a permutation of
    ``0..L-1``; ``mask`` is 0 exactly at the valid visible ids; ``ids_target`` holds distinct masked
    ids; ``source`` lies in ``[0, group_size)``.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor
    num_views: int = 1
    keep_valid: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    ids_target: torch.Tensor | None = None
    source: torch.Tensor | None = None
    group_size: int = 1

    @property
    def num_seqs(self) -> int:
        return self.ids_keep.shape[0]

    @property
    def batch_size(self) -> int:
        return self.num_seqs // self.num_views

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[1]

    @property
    def perm(self) -> torch.Tensor:
        """``(S, L)`` the permutation: visible ids first, then masked ids."""
        return torch.argsort(self.ids_restore, dim=1)

    def ids_masked(self) -> torch.Tensor:
        """``(S, L - num_keep)`` ids after the kept block, in permutation order."""
        return self.perm[:, self.num_keep :]

    def target_ids(self) -> torch.Tensor:
        """``(S, m)`` the positions to predict: ``ids_target`` when set, else :meth:`ids_masked`."""
        return self.ids_target if self.ids_target is not None else self.ids_masked()

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat a per-image tensor ``(B, ...)`` for every view -> ``(B * V, ...)``."""
        if self.num_views == 1:
            return x
        return x.repeat_interleave(self.num_views, dim=0)

    def replace(self, **changes) -> MaskPlan:
        """A copy with some fields changed (e.g. ``plan.replace(ids_target=ids)``)."""
        import dataclasses

        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> MaskPlan:
        def mv(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t

        import dataclasses

        return dataclasses.replace(self, **{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def validate(self) -> MaskPlan:
        """Check the invariants of the class docstring; raise ``ValueError`` naming the first broken one."""
        s, n = self.ids_keep.shape
        if self.ids_restore.shape[0] != s or self.mask.shape != self.ids_restore.shape:
            raise ValueError(f"ids_restore {tuple(self.ids_restore.shape)} and mask {tuple(self.mask.shape)} "
                             f"do not match ids_keep {tuple(self.ids_keep.shape)}")
        length = self.num_tokens
        if s % self.num_views:
            raise ValueError(f"{s} sequences are not a multiple of num_views={self.num_views}")
        ar = torch.arange(length, device=self.ids_restore.device).expand(s, length)
        if not torch.equal(torch.sort(self.ids_restore, dim=1).values, ar):
            raise ValueError("ids_restore rows are not permutations of 0..L-1")
        if not torch.equal(self.perm[:, :n], self.ids_keep):
            raise ValueError("ids_keep is not the first num_keep entries of the permutation")
        valid = torch.ones_like(self.ids_keep, dtype=torch.bool) if self.keep_valid is None else self.keep_valid
        if valid.shape != self.ids_keep.shape:
            raise ValueError(f"keep_valid {tuple(valid.shape)} does not match ids_keep {tuple(self.ids_keep.shape)}")
        expect = torch.ones(s, length, device=self.mask.device)
        expect.scatter_(1, self.ids_keep, (~valid).float())
        if not torch.equal(self.mask.float(), expect):
            raise ValueError("mask is not 0 exactly at the valid visible ids")
        if self.ids_target is not None:
            t = self.ids_target
            if t.shape[0] != s:
                raise ValueError(f"ids_target has {t.shape[0]} rows, expected {s}")
            if not bool(torch.gather(self.mask, 1, t).eq(1).all()):
                raise ValueError("ids_target contains visible ids")
            st = torch.sort(t, dim=1).values
            if t.shape[1] > 1 and bool((st[:, 1:] == st[:, :-1]).any()):
                raise ValueError("ids_target repeats an id")
        if self.source is not None:
            if self.source.shape[1] != length:
                raise ValueError(f"source has {self.source.shape[1]} columns, expected {length}")
            if bool((self.source < 0).any()) or bool((self.source >= self.group_size).any()):
                raise ValueError(f"source ids must lie in [0, {self.group_size})")
        return self

    @classmethod
    def from_permutation(
        cls,
        perm: torch.Tensor,
        num_keep: int,
        num_views: int = 1,
        keep_lengths: torch.Tensor | Sequence[int] | None = None,
        scores: torch.Tensor | None = None,
    ) -> MaskPlan:
        """Build a plan from ``perm (S, L)`` (visible first).

        ``keep_lengths (S,)``: per-sequence visible counts ``<= num_keep``; positions of the kept
        block past a sequence's length become padding and those tokens count as masked. Host counts (a
        sequence of ints, or a CPU tensor) that are all ``num_keep`` give ``keep_valid=None``; counts on
        a GPU are not read back (that would wait for the device): the caller drops them when they are
        all ``num_keep``.
        """
        s, length = perm.shape
        if not 0 < num_keep <= length:
            raise ValueError(f"num_keep must be in [1, {length}], got {num_keep}")
        ids_restore = torch.argsort(perm, dim=1)
        ids_keep = perm[:, :num_keep]
        rank = torch.arange(length, device=perm.device).expand(s, length)
        if keep_lengths is None:
            keep_valid = None
            masked_in_order = rank >= num_keep
        else:
            if not isinstance(keep_lengths, torch.Tensor):  # host ints: checked and copied without a read
                all_kept = all(n >= num_keep for n in keep_lengths)
                keep_lengths = torch.tensor(keep_lengths)
            else:
                all_kept = keep_lengths.device.type == "cpu" and bool((keep_lengths >= num_keep).all())
            keep_lengths = to_device(keep_lengths, perm.device)
            masked_in_order = rank >= keep_lengths[:, None]
            keep_valid = None if all_kept else ~masked_in_order[:, :num_keep]
        mask = torch.gather(masked_in_order.float(), 1, ids_restore)
        return cls(ids_keep, ids_restore, mask, num_views, keep_valid, scores)


def resolve_num_keep(num_tokens: int, ratio: float, num_keep: int | None = None) -> int:
    """The one keep-count rule: ``num_keep`` when given (``1 <= num_keep <= L``), else MAE's
    ``int(L * (1 - ratio))`` (floor), at least 1.

    At ``L = 49``, ratio 0.9 this keeps 4 tokens; Latent MIM's presets set ``num_keep`` (5 of 49,
    20 of 196, the official ``num_vis``) explicitly."""
    if num_keep is not None:
        if not 1 <= num_keep <= num_tokens:
            raise ValueError(f"num_keep must be in [1, {num_tokens}], got {num_keep}")
        return int(num_keep)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    return max(1, int(num_tokens * (1 - ratio)))


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` without waiting for it: a CPU tensor goes to a GPU through pinned memory with
    ``non_blocking=True`` (``torch.tensor(values, device="cuda")`` or a plain ``.to("cuda")`` of a CPU
    tensor waits until the GPU has finished all queued work: a host sync inside the step)."""
    device = torch.device(device)
    if t.device == device or t.device.type != "cpu" or device.type != "cuda" or torch.compiler.is_compiling():
        return t.to(device)  # (compiled: a constant of the graph, made on the device)
    return t.pin_memory().to(device, non_blocking=True)


def _uniform(shape, device, generator) -> torch.Tensor:
    # no ``generator=None`` argument: torch.compile cannot trace it with a symbolic batch size
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, device=device, generator=generator)


def _check_noise(noise, shape) -> None:
    if noise is not None and tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")


class MaskGenerator:
    """The protocol every generator follows (subclass it and implement :meth:`__call__`).

    ``gen(batch_size, num_tokens, device="cpu", *, generator=None, noise=None, tokens=None,
    progress=None, grid=None) -> MaskPlan``

    * ``generator``: a ``torch.Generator`` for reproducible draws (the global RNG when ``None``).
    * ``noise``: explicit uniform noise (shape :meth:`noise_shape`) to reproduce a masking exactly.
    * ``tokens (B, L, D)``: the layer-0 tokens, for generators with ``needs_tokens`` (salience).
    * ``progress``: :class:`mimkit.methods.Progress`, for schedules (SBAM's warm start).
    * ``grid (h, w)``: the token grid, for spatial generators (block masking).

    ``num_views``: sequences per image in the returned plan.
    """

    num_views: int = 1
    needs_tokens: bool = False

    def __call__(
        self, batch_size: int, num_tokens: int, device: torch.device | str = "cpu", *,
        generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None, progress=None, grid: tuple[int, int] | None = None,
    ) -> MaskPlan:
        raise NotImplementedError

    def noise_shape(self, batch_size: int, num_tokens: int) -> tuple[int, ...]:
        """Shape of the ``noise`` argument this generator accepts."""
        return (batch_size, num_tokens)


class RandomMasking(MaskGenerator):
    """MAE's random masking: argsort of uniform noise, keep the first :func:`resolve_num_keep` ids.

    Pass ``noise (B, L)`` to reproduce a given masking exactly (as the official ``random_masking``
    would with the same noise).
    """

    def __init__(self, ratio: float = 0.75, num_keep: int | None = None):
        self.ratio = ratio
        self.num_keep = num_keep

    def __call__(self, batch_size, num_tokens, device="cpu", *, generator=None, noise=None, tokens=None,
                 progress=None, grid=None) -> MaskPlan:
        if noise is None:
            noise = _uniform((batch_size, num_tokens), device, generator)
        _check_noise(noise, (batch_size, num_tokens))
        perm = torch.argsort(noise, dim=1)
        return MaskPlan.from_permutation(perm, resolve_num_keep(num_tokens, self.ratio, self.num_keep), scores=noise)


def plan_from_mask(mask: torch.Tensor) -> MaskPlan:
    """Plan from an explicit boolean/0-1 mask ``(B, L)`` (1 = masked) with equal counts per row.

    Visible ids are kept in raster order (CAE's convention for boolean masks), masked ids follow in
    raster order, so :meth:`MaskPlan.ids_masked` is the masked ids in raster order.
    """
    m = mask.bool()
    counts = m.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError("every image must mask the same number of tokens; got counts " f"{counts.tolist()}")
    length = m.shape[1]
    # stable sort of (masked flag, position): visible tokens first in raster order
    key = m.long() * length + torch.arange(length, device=m.device)
    perm = torch.argsort(key, dim=1)
    num_keep = length - int(counts[0]) if counts.numel() else length
    return MaskPlan.from_permutation(perm, num_keep)


@dataclass
class BlockOptions:
    """Block-wise masking knobs (BEiT's ``MaskingGenerator``; CAE: min 16 patches at 14x14, aspect 0.3).

    ``min_patches``: smallest rectangle; ``max_patches``: largest (default: the whole masked count);
    ``min_aspect``: aspect ratios log-uniform in ``[min_aspect, 1/min_aspect]``."""

    min_patches: int = 4
    max_patches: int | None = None
    min_aspect: float = 0.3


class BlockMasking(MaskGenerator):
    """BEiT/CAE block-wise masking with an exact masked count ``L - resolve_num_keep(L, ratio, num_keep)``.

    The algorithm of CAE's ``MaskingGenerator`` (Atten4Vis/CAE ``furnace/masking_generator.py``, itself
    BEiT's with an exact count): with ``remaining`` patches still to mask and ``cap = min(remaining,
    max_patches)``, a rectangle is drawn with area uniform between ``min_patches`` and ``cap`` (when
    ``cap < min_patches`` the area lies in ``[cap, min_patches]``, as ``random.uniform(a, b)`` with
    ``a > b`` gives), aspect ratio log-uniform in ``[min_aspect, 1/min_aspect]``, ``h = round(sqrt(area
    * aspect))``, ``w = round(sqrt(area / aspect))`` (both below the grid's sides) and a uniform corner;
    it is accepted when it adds between 1 and ``cap`` new patches (overlapping masked ones is allowed).
    Rectangles are drawn until exactly the count is masked, so masks stay made of a few blocks even
    for the last patches (no scattered single patches).

    Vectorised over the batch: each round draws one rectangle for every image that is not complete;
    an image's sequence of draws is independent of the others', so each mask has the distribution of
    the sequential generator. A mask still short after ``max_rounds`` rounds (not met in practice; the
    statistics test draws thousands) is completed with random patches. Visible and masked ids are in
    raster order (:func:`plan_from_mask`).
    """

    def __init__(self, ratio: float = 0.5, options: BlockOptions | None = None, num_keep: int | None = None,
                 max_rounds: int = 4096, check_every: int = 8):
        self.ratio = ratio
        self.options = options or BlockOptions()
        self.num_keep = num_keep
        o = self.options
        if o.min_patches < 1 or not 0 < o.min_aspect <= 1:
            raise ValueError(f"block masking needs min_patches >= 1 and 0 < min_aspect <= 1, got {o}")
        self.log_aspect = (math.log(o.min_aspect), math.log(1 / o.min_aspect))
        self.max_rounds = max_rounds
        self.check_every = check_every  # rounds between two reads of "all complete?" (a host sync each)

    def num_masked(self, num_tokens: int) -> int:
        return num_tokens - resolve_num_keep(num_tokens, self.ratio, self.num_keep)

    def boolean_mask(
        self,
        batch_size: int,
        grid: tuple[int, int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(B, L)`` bool with exactly :meth:`num_masked` True per row."""
        gh, gw = grid
        length = gh * gw
        target = self.num_masked(length)
        min_p = float(self.options.min_patches)
        max_area = self.options.max_patches or target
        m = torch.zeros(batch_size, gh, gw, dtype=torch.bool, device=device)
        rows = torch.arange(gh, device=device)[None, :, None]
        cols = torch.arange(gw, device=device)[None, None, :]
        lo_ar, hi_ar = self.log_aspect
        for r in range(self.max_rounds):
            remaining = target - m.flatten(1).sum(1)  # (B,), 0 for a complete mask
            if r % self.check_every == 0 and not bool((remaining > 0).any()):
                break
            cap = remaining.clamp(max=max_area).float()
            area = min_p + _uniform((batch_size,), device, generator) * (cap - min_p)  # random.uniform(min_p, cap)
            ar = torch.exp(lo_ar + _uniform((batch_size,), device, generator) * (hi_ar - lo_ar))
            h = torch.round(torch.sqrt(area * ar)).long()
            w = torch.round(torch.sqrt(area / ar)).long()
            fits = (h < gh) & (w < gw)
            top = (_uniform((batch_size,), device, generator) * (gh - h + 1).clamp(min=1)).long()
            left = (_uniform((batch_size,), device, generator) * (gw - w + 1).clamp(min=1)).long()
            rect = (
                (rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
                & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None])
            )
            new = (rect & ~m).flatten(1).sum(1)
            accept = fits & (new > 0) & (new <= cap.long())  # a complete mask has cap 0: nothing is accepted
            m = m | (rect & accept[:, None, None])
        m = m.flatten(1)
        short = target - m.sum(1)
        if bool((short > 0).any()):  # after max_rounds only: complete with random patches
            score = m.float() + _uniform((batch_size, length), device, generator) * 0.5
            top_ids = torch.topk(score, target, dim=1).indices
            m = torch.zeros(batch_size, length, dtype=torch.bool, device=device).scatter_(1, top_ids, True)
        return m

    def __call__(self, batch_size, num_tokens, device="cpu", *, generator=None, noise=None, tokens=None,
                 progress=None, grid=None) -> MaskPlan:
        if noise is not None:
            raise ValueError("block masking draws its own rectangles; it takes a generator, not noise")
        if grid is None:
            side = int(round(num_tokens**0.5))
            if side * side != num_tokens:
                raise ValueError("block masking needs grid=(h, w) for a non-square token grid")
            grid = (side, side)
        if grid[0] * grid[1] != num_tokens:
            raise ValueError(f"grid {grid} does not hold {num_tokens} tokens")
        return plan_from_mask(self.boolean_mask(batch_size, grid, device, generator))


# --------------------------------------------------------------------------------------------------
# Several views per image (EMAE): views are flattened into the batch, s = b * V + v.


def _rotated_views(perm: torch.Tensor, starts: list[int], sizes: list[int], scores=None) -> MaskPlan:
    """View ``v`` sees ``perm[:, starts[v] : starts[v] + sizes[v]]``.

    ``perm (B, L)`` is rolled by ``-starts[v]`` for every view, so MAE's unchanged gather of the first
    ``num_keep`` ids and its decoder un-shuffle serve each view. Unequal ``sizes`` are padded to the
    largest one through ``keep_lengths`` (key-padding mask in the encoder, mask tokens in the decoder).
    Returns a plan with ``S = B * V`` sequences.
    """
    b, length = perm.shape
    v = len(starts)
    # index tables from host values, made on the CPU and copied without a sync (to_device)
    idx = to_device((torch.tensor(starts)[:, None] + torch.arange(length)[None, :]) % length, perm.device)  # (V, L)
    views = perm[:, idx].reshape(b * v, length)  # (B, V, L) -> (B*V, L)
    num_keep = max(sizes)
    lengths = None
    if min(sizes) != num_keep:
        lengths = sizes * b  # host ints: from_permutation copies them over
    return MaskPlan.from_permutation(views, num_keep, num_views=v, keep_lengths=lengths, scores=scores)


def partition_sizes(num_tokens: int, num_parts: int) -> list[int]:
    """Sizes of a partition of ``L`` tokens into ``K`` parts: ``L/K`` each when ``K | L``, otherwise
    ``floor``/``ceil`` sizes (the larger parts first), differing by at most one."""
    if not 1 <= num_parts <= num_tokens:
        raise ValueError(f"num_views must be in [1, {num_tokens}], got {num_parts}")
    bounds = [(k * num_tokens) // num_parts for k in range(num_parts + 1)]
    sizes = [bounds[k + 1] - bounds[k] for k in range(num_parts)]
    return sorted(sizes, reverse=True)


def partition_slots(perm: torch.Tensor, num_parts: int) -> torch.Tensor:
    """Which part owns each position: ``perm (B, L)`` -> ``(B, L)`` long in ``0..K-1``; part ``k`` is
    the ``k``-th consecutive block of ``perm`` with the sizes of :func:`partition_sizes`. Used to mix
    images (MixedAE: the part index is the source image within the group)."""
    b, length = perm.shape
    sizes = partition_sizes(length, num_parts)
    # from host values (repeat_interleave with tensor counts has a data-dependent size: a read on a GPU, a
    # graph break under torch.compile), copied over without a sync
    part_of_rank = to_device(torch.tensor([k for k, n in enumerate(sizes) for _ in range(n)]), perm.device)
    slots = torch.empty_like(perm)
    slots.scatter_(1, perm, part_of_rank.expand(b, length).contiguous())
    return slots


class PartitionMasking(MaskGenerator):
    """EMAE's parallel masks ([SLIDES] Algorithm 1): the ``L`` tokens of an image are
    split into ``K`` disjoint random parts that cover the image; view ``k`` sees part ``k`` only, so
    each view masks ``(K-1)/K`` of the image and every token is visible in exactly one view.

    One noise vector per image: ``perm = argsort(noise)``, part ``k`` = a consecutive block of
    ``perm``. When ``K`` does not divide ``L`` (e.g. 49 Fashion-MNIST patches, K = 4) the parts differ
    in size by one and the shorter views are padded ([PROPOSAL]; the paper requires ``K | L``; set
    ``strict=True`` to refuse). ``noise (B, L)``. Returns ``B * K`` sequences; ``plan.source (B*K, L)``
    holds the part that owns each position (the same for the K views of an image).
    """

    def __init__(self, num_views: int = 4, strict: bool = False):
        self.num_views = num_views
        self.strict = strict

    def __call__(self, batch_size, num_tokens, device="cpu", *, generator=None, noise=None, tokens=None,
                 progress=None, grid=None) -> MaskPlan:
        if self.strict and num_tokens % self.num_views:
            raise ValueError(f"num_views {self.num_views} does not divide the {num_tokens} tokens")
        _check_noise(noise, (batch_size, num_tokens))
        if noise is None:
            noise = _uniform((batch_size, num_tokens), device, generator)
        perm = torch.argsort(noise, dim=1)
        sizes = partition_sizes(num_tokens, self.num_views)
        starts = [sum(sizes[:k]) for k in range(self.num_views)]
        plan = _rotated_views(perm, starts, sizes, scores=noise)
        plan.source = partition_slots(perm, self.num_views).repeat_interleave(self.num_views, dim=0)
        plan.group_size = self.num_views
        return plan


class RandomViewsMasking(MaskGenerator):
    """EMAE's "pure random" ablation arm ([PROPOSAL] reading of the deck): ``K``
    independent MAE masks per image at ``ratio``, same compute as the partition but no coverage
    guarantee. ``noise (B, K, L)`` or ``(B*K, L)``. Returns ``B * K`` sequences."""

    def __init__(self, num_views: int = 4, ratio: float = 0.75, num_keep: int | None = None):
        self.num_views = num_views
        self.ratio = ratio
        self.num_keep = num_keep

    def noise_shape(self, batch_size: int, num_tokens: int) -> tuple[int, ...]:
        return (batch_size * self.num_views, num_tokens)

    def __call__(self, batch_size, num_tokens, device="cpu", *, generator=None, noise=None, tokens=None,
                 progress=None, grid=None) -> MaskPlan:
        s = batch_size * self.num_views
        if noise is None:
            noise = _uniform((s, num_tokens), device, generator)
        elif noise.ndim == 3:
            _check_noise(noise, (batch_size, self.num_views, num_tokens))
            noise = noise.reshape(s, num_tokens)
        _check_noise(noise, (s, num_tokens))
        perm = torch.argsort(noise, dim=1)
        return MaskPlan.from_permutation(
            perm, resolve_num_keep(num_tokens, self.ratio, self.num_keep), num_views=self.num_views, scores=noise
        )


class ComplementaryMasking(MaskGenerator):
    """EMAE's "complementary" ablation arm ([PROPOSAL] reading): two views per image,
    view 0 is an MAE mask at ``ratio`` (25 % visible at 0.75) and view 1 sees exactly the tokens
    view 0 masks (75 % visible). View 0 is padded to view 1's length. ``noise (B, L)``."""

    num_views = 2

    def __init__(self, ratio: float = 0.75, num_keep: int | None = None):
        self.ratio = ratio
        self.num_keep = num_keep

    def __call__(self, batch_size, num_tokens, device="cpu", *, generator=None, noise=None, tokens=None,
                 progress=None, grid=None) -> MaskPlan:
        _check_noise(noise, (batch_size, num_tokens))
        if noise is None:
            noise = _uniform((batch_size, num_tokens), device, generator)
        perm = torch.argsort(noise, dim=1)
        n0 = resolve_num_keep(num_tokens, self.ratio, self.num_keep)
        if n0 >= num_tokens:
            raise ValueError("complementary masking needs at least one masked token in view 0")
        return _rotated_views(perm, [0, n0], [n0, num_tokens - n0], scores=noise)


# --------------------------------------------------------------------------------------------------
# Salience-based masking with an adaptive ratio (SBAM / AMR)


@torch.no_grad()
def token_salience(tokens: torch.Tensor, temperature: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """SBAM's token salience ([CODE] ``saliency_guided_masking``).

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
    """AMR: ``R = r - Δr + 2Δr * mean(1[S > δ])`` -> visible counts.

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


AMR_MODES = ("off", "batch", "sample")


@dataclass
class SalienceOptions:
    """SBAM/AMR knobs (``method.masking.sbam.*``; defaults:).

    ``amr_mode``: ``off`` | ``batch`` (official: one ratio per batch) | ``sample`` (one per image,
    padded); ``delta_ratio`` Δr and ``threshold`` δ of AMR; ``noise``: the score adds
    ``U[0, noise)`` (official 0.5); ``temperature`` divides ``X X^T`` (1 = official); ``start``:
    fraction of training with MAE's random masking first (warm start)."""

    amr_mode: str = "batch"
    delta_ratio: float = 0.1
    threshold: float = 0.5
    noise: float = 0.5
    temperature: float = 1.0
    start: float = 0.25


class SalienceMasking(MaskGenerator):
    """SBAM: mask the most salient tokens, with an adaptive ratio.

    ``score = S + noise * U[0, 1)`` with ``S`` = :func:`token_salience` of ``tokens`` (the official
    noise is ``U[0, 0.5)``); ``argsort(score)`` ascending, keep the first ``n`` (low-salience tokens
    stay visible, the high-salience ones become targets).

    ``amr_mode`` (:class:`SalienceOptions`): ``off`` (``n =`` :func:`resolve_num_keep`), ``batch`` (official
    [CODE]: one ratio per batch), ``sample`` ([PROPOSAL]: one ratio per image, shorter sequences padded;
    the plan's ``keep_valid`` becomes the encoder's key-padding mask and padded slots count as masked
    in the loss).

    Warm start ([CODE] README resumes from a 100-epoch "warmup checkpoint"; [PROPOSAL] random MAE
    masking before it): while ``progress.fraction < start`` the plan is MAE's random masking at ``r``.
    Without ``progress`` (pictures, evaluation) the salience path is used.

    A degenerate salience (every token equal, e.g. all-zero layer-0 tokens at ViT-B initialisation,
    where the range is 0 and AMR falls to ``r - Δr``) is counted in :attr:`degenerate_count` and
    reported once with a warning.
    """

    needs_tokens = True

    def __init__(self, ratio: float = 0.75, options: SalienceOptions | None = None, num_keep: int | None = None):
        self.options = o = options or SalienceOptions()
        if o.amr_mode not in AMR_MODES:
            raise ValueError(f"amr_mode must be off, batch or sample, got {o.amr_mode!r}")
        self.ratio = ratio
        self.num_keep = num_keep
        self.degenerate_count = 0

    @property
    def temperature(self) -> float:
        return self.options.temperature

    def active(self, progress=None) -> bool:
        """Whether salience drives the masking at ``progress`` (False during the warm start)."""
        return progress is None or progress.fraction >= self.options.start

    def __call__(self, batch_size, num_tokens, device="cpu", *, generator=None, noise=None, tokens=None,
                 progress=None, grid=None) -> MaskPlan:
        o = self.options
        _check_noise(noise, (batch_size, num_tokens))
        if not self.active(progress):
            return RandomMasking(self.ratio, self.num_keep)(
                batch_size, num_tokens, device, generator=generator, noise=noise)
        if tokens is None:
            raise ValueError("salience-based masking needs tokens=(B, L, D) (the layer-0 embeddings)")
        if noise is None:
            noise = _uniform((batch_size, num_tokens), tokens.device, generator)
        salience = token_salience(tokens, o.temperature)
        if self.degenerate_count == 0 and bool((salience.amax(1) == 0).any()):
            import warnings

            warnings.warn("SBAM: the layer-0 salience is constant for some images (e.g. all-zero tokens at "
                          "initialisation); AMR falls to ratio - delta_ratio there. Consider a warm start "
                          "(method.masking.sbam.start) or a saliency temperature.", stacklevel=2)
        self.degenerate_count += int((salience.amax(1) == 0).sum())
        scores = salience + o.noise * noise.float()
        perm = torch.argsort(scores, dim=1)
        if o.amr_mode == "off":
            return MaskPlan.from_permutation(perm, resolve_num_keep(num_tokens, self.ratio, self.num_keep), scores=salience)
        counts = adaptive_keep_counts(salience, self.ratio, o.delta_ratio, o.threshold,
                                      per_sample=o.amr_mode == "sample")
        lo, n_max = torch.stack([counts.min(), counts.max()]).tolist()  # one read: the shapes depend on it
        n_max = int(n_max)
        lengths = counts if o.amr_mode == "sample" and lo < n_max else None  # all equal: no padding
        return MaskPlan.from_permutation(perm, n_max, keep_lengths=lengths, scores=salience)


# --------------------------------------------------------------------------------------------------


MASKING_KINDS = ("random", "block", "partition", "random_views", "complementary", "sbam")


@dataclass
class MaskingOptions:
    """Which generator a method uses and its knobs (``method.masking.*`` in configs).

    ``kind``: ``random`` (MAE), ``block`` (BEiT/CAE, exact count; ``block.*``), ``partition`` (EMAE's
    K disjoint covering parts, one view each; ``ratio`` is ignored, each view masks ``(K-1)/K``),
    ``random_views`` (K independent MAE masks at ``ratio``: EMAE's "pure random" arm),
    ``complementary`` (two views, an MAE mask at ``ratio`` and its complement: EMAE's arm), ``sbam``
    (salience-based masking with the adaptive ratio; ``ratio`` is the base ratio r; ``sbam.*``).

    ``ratio``: the mask ratio; ``num_keep``: the visible count, wins over ``ratio`` (one rule:
    :func:`resolve_num_keep`). ``num_views``: K for ``partition`` / ``random_views``; ``partition_strict``:
    refuse K not dividing L.
    """

    kind: str = "random"
    ratio: float = 0.75
    num_keep: int | None = None
    num_views: int = 4
    partition_strict: bool = False
    block: BlockOptions = field(default_factory=BlockOptions)
    sbam: SalienceOptions = field(default_factory=SalienceOptions)


def build_mask_generator(opts: MaskingOptions) -> MaskGenerator:
    """The generator for ``opts``."""
    if not 0.0 <= opts.ratio < 1.0:
        raise ValueError(f"method.masking.ratio must be in [0, 1), got {opts.ratio}")
    if opts.kind == "random":
        return RandomMasking(opts.ratio, opts.num_keep)
    if opts.kind == "block":
        return BlockMasking(opts.ratio, opts.block, opts.num_keep)
    if opts.kind == "partition":
        return PartitionMasking(opts.num_views, strict=opts.partition_strict)
    if opts.kind == "random_views":
        return RandomViewsMasking(opts.num_views, opts.ratio, opts.num_keep)
    if opts.kind == "complementary":
        return ComplementaryMasking(opts.ratio, opts.num_keep)
    if opts.kind == "sbam":
        return SalienceMasking(opts.ratio, opts.sbam, opts.num_keep)
    raise ValueError(f"unknown masking kind {opts.kind!r}; choose one of: {', '.join(MASKING_KINDS)}")
