"""PCAE — Progressively Compressed Auto-Encoder (Li et al., ICLR 2023), after the authors' public
re-implementation caddyless/PCAE (``models_mae.py``, ``engine_pretrain.py``, ``main_pretrain.py`` at
commit 33322322, "fix the bug in random_masking"). The README of that repository warns that it is an
unvalidated re-implementation; where it has bugs we follow the evident intent (listed below).

A MAE-like student predicts *latent* targets of a momentum (EMA) teacher that encodes the masked
patches only and discards redundant tokens inside its forward pass: after chosen blocks it keeps the
tokens least similar to the mean token. The student's decoder has queries only at the few masked
positions that survive (~9% of the image), so both the teacher and the decoder run on fewer tokens.

One step, shapes for B images, L = G*G patches, n visible, m = L - n masked, r retained::

    plan     = masking(B, L)                                  vis ids (B, n), masked ids (B, m), permutation order
    # teacher (EMA copy of the encoder, no grad, no cls token, drop-path 0) on the masked patches:
    h, ids   = gather(teacher.patch_tokens(x), masked), masked    (B, m, D), (B, m)
    for block i:  h = block_i(h)
        if i in after_blocks:                                  (default [0, 4, 8] at depth 12)
            s = l2n(h) . mean_j l2n(h_j)                       (B, k) similarity to the mean token
            keep = argsort(s)[:, :int(k * keep_ratio)]         ascending: least mean-like first
            h, ids = gather(h, keep), gather(ids, keep)        ids always name original grid cells
    y        = standardize(teacher.norm(h))                    (B, r, D)  LN, then per-token (x-mu)/sigma
    # student (drop-path from model.encoder.drop_path_rate) and decoder:
    z        = encoder(cls + gather(patch_tokens(x), vis))     (B, 1+n, D)
    pred     = decoder([e_cls, e_v + p_v, m + p_ids])[-r:]     (B, r, D)  queries only at retained ids
    loss     = 1 - mean_{b,k} cos(pred, y)
    teacher <- m teacher + (1 - m) encoder after every micro-batch (iteration), m cosine momentum -> momentum_final

EMA timing (``ema_update``). The official loop (``engine_pretrain.py``) updates the teacher after every
iteration, i.e. every micro-batch under gradient accumulation (``--accum_iter``), with
``m = momentum_schedule[it]``, ``it`` the 0-based iteration over the whole run and the cosine schedule
spread over all ``epochs * len(data_loader)`` iterations; an iteration that ends an optimizer step
updates after ``optimizer.step()``. ``ema_update=micro_batch`` (default) does exactly this through the
method hooks: with ``k`` micro-batches per step (``Progress.micro_batches``), after micro-batch ``j`` of
step ``s`` the teacher takes ``m`` at fraction ``(s k + j) / (total_steps k)``, in
:meth:`PCAE.after_micro_batch` for ``j < k - 1`` (so micro-batch ``j + 1``'s teacher forward sees it) and
in :meth:`PCAE.after_step` for the last one (after the optimizer step). A loop that never calls
``after_micro_batch`` (no accumulation) gets the ``k = 1`` rule from ``after_step``.
``ema_update=step``: once per optimizer step from ``after_step``, ``m`` at the progress after the step
(``(s + 1) / total_steps``), the rule of Latent MIM and mimkit's earlier PCAE: under accumulation the
teacher then moves about ``k`` times less per step than in the official loop, and at ``k = 1`` every
update uses the next iteration's momentum. The logged ``ema_momentum`` is ``m`` at the step's progress
(``s / total_steps``): under the default, the momentum of the step's first update.

At ViT-B/16, 224, mask 0.75: m = 147 -> 73 -> 36 -> 18 teacher tokens (r = 18); the decoder runs on
1 + 49 + 18 = 68 tokens (MAE's: 197).

Options (:class:`PCAEOptions`; defaults = ``main_pretrain.py``'s): ``keep`` (keep ratio per stage, 0.5;
``1`` = no drop, the plain EMA-latent control), ``drop`` (``similarity`` | ``random``, the paper's "RD"
ablation), the drop schedule (``after_blocks`` explicitly, or ``drop_case`` with ``drop_stages``:
the code's cases, :func:`drop_schedule`; default case 0 = every ``depth // stages`` blocks starting
at block 0, stages capped at the depth), ``momentum`` -> ``momentum_final`` (0.9999 -> 1, the code's;
the Fashion-MNIST preset uses 0.999 for its 702-step runs, tuned on a validation split), ``ema_update`` (``micro_batch``, the code's timing, or
``step``; above), ``decoder_drop_path`` (the code uses the student's ``--drop_path`` as a
constant rate in every decoder block; ``None`` = ``model.encoder.drop_path_rate``) and ``norm_target``.

Differences from the public code, on purpose:

* the teacher starts as an exact copy of the student encoder (the code copies it only inside its
  ``if args.distributed:`` branch; single-process runs start from a random teacher);
* ``drop_case`` is an int (the code parses a string and compares with ints, so only the default works)
  and case 2 uses ``linspace`` (the code's ``np.linsapce`` typo would crash);
* the teacher's target standardisation divides by the biased std (LN without affine); the code uses the
  unbiased variance. The two differ by a constant factor per token, which ``1 - cos`` ignores;
* the decoder's output width is the encoder width ``D`` (the code's ``p*p*3`` equals 768 = D only at
  ViT-B/16). Its mask token is drawn from N(0, 0.02) as in the code.
* the teacher's masked ids come from the shared ``method.masking`` (random 0.75 by default, the code's
  ``random_masking``; ``block`` also works); the retained ids are returned as the plan's
  ``ids_target``.

Logged each step (Python numbers and detached tensors, no host sync): ``teacher_tokens_0`` (masked tokens entering the
teacher) and ``teacher_tokens_<j>`` after drop stage ``j``, ``decoder_seq_len``, ``teacher_flops`` (per
image, counted with ``FlopCounterMode`` once per token-count signature, :mod:`mimkit.flops`) and
``teacher_flops_ratio`` (over the same teacher without dropping), ``ema_momentum``, and the collapse
monitors ``sim_target`` / ``sim_pred`` (mean cosine between different retained tokens of an image,
diagonal excluded: 1 = all the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mimkit.flops import FlopCache
from mimkit.losses import average_patch_similarity
from mimkit.masking import MaskingOptions, MaskPlan, build_mask_generator, resolve_num_keep
from mimkit.methods.base import (
    Capabilities,
    Method,
    MethodOptions,
    ModelConfig,
    PictureData,
    Progress,
    StepOutput,
    TargetCopy,
    draw_plan,
)
from mimkit.nn.cross_decoder import SelfAttnLatentDecoder
from mimkit.nn.layers import DropPath
from mimkit.nn.vit import ViTEncoder, gather_tokens
from mimkit.targets import DROP_MODES, LatentTarget, MomentumSchedule, TokenDropper

MASKING_KINDS = ("random", "block")
DROP_CASES = (0, 1, 2, 3)
EMA_UPDATES = ("micro_batch", "step")


def drop_schedule(depth: int, stages: int = 3, case: int = 0) -> tuple[int, ...]:
    """Blocks after which the teacher drops tokens (0-based), the public code's ``drop_case``:

    * 0 (default): ``depth // stages * i`` -> ``[0, 4, 8]`` at depth 12, ``[0, 2, 4]`` at depth 6;
    * 1: the last block of each ``depth // stages`` -> ``[3, 7, 11]``;
    * 2: ``linspace(0, depth - 1, stages)`` truncated -> ``[0, 5, 11]``;
    * 3: the first ``stages`` blocks -> ``[0, 1, 2]``.

    ``stages`` is capped at ``depth`` (one drop per block at most: depth 2 gives ``[0, 1]``). The paper's
    ablation numbers its cases 1-5; their mapping to these is not documented."""
    if case not in DROP_CASES:
        raise ValueError(f"method.drop_case must be one of {DROP_CASES}, got {case!r}")
    if stages < 1:
        raise ValueError(f"method.drop_stages must be >= 1, got {stages}")
    stages = min(stages, depth)
    step = depth // stages
    if case == 0:
        return tuple(step * i for i in range(stages))
    if case == 1:
        return tuple(step * (i + 1) - 1 for i in range(stages))
    if case == 2:
        return tuple(int(v) for v in np.linspace(0, depth - 1, stages, endpoint=True, dtype=int))
    return tuple(range(stages))


def stage_counts(num_tokens: int, num_stages: int, keep: float) -> list[int]:
    """Teacher token counts ``[m, m_1, ..., m_S]``: ``m_j = int(m_{j-1} * keep)`` (at least 1), as
    :class:`~mimkit.targets.TokenDropper` keeps them."""
    counts = [num_tokens]
    for _ in range(num_stages):
        counts.append(min(counts[-1], max(1, int(counts[-1] * keep))))
    return counts


@dataclass
class PCAEOptions(MethodOptions):
    """PCAE knobs; defaults = the public code's ``main_pretrain.py`` (module docstring).

    * ``keep``: keep ratio at each drop stage (0.5; ``1.0`` = no drop). ``drop``: ``similarity`` keeps
      the tokens least similar to the mean token; ``random`` keeps random ones (the "RD" control).
    * ``after_blocks``: the blocks after which to drop (0-based); ``None`` = :func:`drop_schedule`
      (``drop_stages``, ``drop_case``).
    * ``momentum`` -> ``momentum_final``: EMA momentum along a cosine over training (no warm-up).
    * ``ema_update``: ``micro_batch`` (default; the official loop: after every iteration, momentum indexed
      by the iteration) | ``step`` (once per optimizer step, momentum at the progress after it: mimkit's
      earlier rule). They differ under gradient accumulation (k updates per step vs one) and, by one
      iteration of the momentum schedule, without (module docstring).
    * ``decoder_drop_path``: constant drop-path rate in the decoder blocks (``None`` = the encoder's
      ``drop_path_rate``, as the code's single ``--drop_path``).
    * ``norm_target``: per-token standardisation of the teacher's final-LN output.
    * ``masking``: shared masking options (``random`` or ``block``), ratio 0.75.
    """

    name: str = "pcae"
    keep: float = 0.5
    drop: str = "similarity"
    drop_stages: int = 3
    drop_case: int = 0
    after_blocks: tuple[int, ...] | None = None
    momentum: float = 0.9999
    momentum_final: float = 1.0
    ema_update: str = "micro_batch"
    decoder_drop_path: float | None = None
    norm_target: bool = True
    masking: MaskingOptions = field(default_factory=lambda: MaskingOptions(kind="random", ratio=0.75))


@dataclass
class TeacherOutput:
    """``target (B, r, D)`` fp32 (standardised when ``norm_target``), ``ids (B, r)`` the retained grid
    ids in the order of ``target``, ``counts`` the token counts ``[m, m_1, ..., m_S]``."""

    target: torch.Tensor
    ids: torch.Tensor
    counts: list[int]


class _StageRecorder:
    """Wraps a :class:`~mimkit.targets.TokenDropper`; records the grid ids kept after each drop stage."""

    def __init__(self, dropper: TokenDropper):
        self.dropper = dropper
        self.stage_ids: list[torch.Tensor] = []

    def __call__(self, i, x, ids):
        res = self.dropper(i, x, ids)
        if i in self.dropper.after_blocks:
            self.stage_ids.append(ids if res is None else res[1])
        return res


class PCAE(Method):
    """``encoder`` (student ViT, exported), ``decoder`` (:class:`SelfAttnLatentDecoder`, output width D)
    and ``target`` (:class:`~mimkit.targets.LatentTarget` ``ema`` over the encoder: the teacher)."""

    options_class = PCAEOptions

    def __init__(self, model: ModelConfig | None = None, options: PCAEOptions | None = None):
        super().__init__()
        model = model or ModelConfig()
        o = self.options = options or PCAEOptions()
        if o.masking.kind not in MASKING_KINDS:
            raise ValueError(f"pcae takes method.masking.kind in {MASKING_KINDS}, got {o.masking.kind!r}")
        if o.drop not in DROP_MODES:
            raise ValueError(f"unknown method.drop {o.drop!r}; choose one of: {', '.join(DROP_MODES)}")
        if o.ema_update not in EMA_UPDATES:
            raise ValueError(f"method.ema_update must be one of {', '.join(EMA_UPDATES)}, got {o.ema_update!r}")
        if not 0.0 < o.keep <= 1.0:
            raise ValueError(f"method.keep must be in (0, 1] (1 = no drop), got {o.keep}")
        depth = model.encoder.depth
        blocks = tuple(o.after_blocks) if o.after_blocks is not None else drop_schedule(depth, o.drop_stages, o.drop_case)
        if len(set(blocks)) != len(blocks) or any(not 0 <= i < depth for i in blocks):
            raise ValueError(f"drop blocks {list(blocks)} must be distinct and in [0, {depth - 1}] at depth {depth}; "
                             "set method.after_blocks explicitly or lower method.drop_stages")
        self.after_blocks = tuple(sorted(blocks))
        self.encoder = ViTEncoder(model.encoder)
        length = self.encoder.num_patches
        if length - resolve_num_keep(length, o.masking.ratio, o.masking.num_keep) < 1:
            raise ValueError("pcae needs masked patches for the teacher; lower method.masking.num_keep")
        self.masking = build_mask_generator(o.masking)
        dim, d = self.encoder.embed_dim, model.decoder
        self.decoder = SelfAttnLatentDecoder(dim, dim, self.encoder.grid_size, d.embed_dim, d.depth, d.num_heads,
                                             d.mlp_ratio, norm_eps=model.encoder.norm_eps)
        torch.nn.init.normal_(self.decoder.mask_token, std=0.02)  # the code's init (Latent MIM's is zeros)
        rate = model.encoder.drop_path_rate if o.decoder_drop_path is None else o.decoder_drop_path
        for blk in self.decoder.blocks:
            blk.drop_path1.rate = blk.drop_path2.rate = rate
        # the teacher: an exact copy of the student encoder, EMA-updated, drop-path 0
        self.target = LatentTarget("ema", self.encoder, MomentumSchedule(o.momentum, o.momentum_final))
        for m in self.target.branch.modules():
            if isinstance(m, DropPath):
                m.rate = 0.0
        self.flops = FlopCache()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(pictures=("teacher_drops", "views"), find_unused_parameters=False,
                            masking_kinds=MASKING_KINDS)

    def make_plan(self, images: torch.Tensor, progress: Progress | None = None,
                  generator: torch.Generator | None = None) -> MaskPlan:
        return draw_plan(self.masking, self.encoder, images, progress, generator)

    # -- teacher --------------------------------------------------------------------------------
    def dropper(self, generator: torch.Generator | None = None, keep: float | None = None) -> TokenDropper:
        """The per-block token selection of the teacher (a fresh one per call: it records counts)."""
        return TokenDropper(self.after_blocks, self.options.keep if keep is None else keep, self.options.drop,
                            num_prefix=0, generator=generator)

    def encode_teacher(self, images: torch.Tensor, ids_masked: torch.Tensor, generator: torch.Generator | None = None,
                       *, select=None, keep: float | None = None) -> TeacherOutput:
        """The EMA teacher on the masked patches ``ids_masked (B, m)`` of ``images (B, C, H, W)``, dropping
        tokens after :attr:`after_blocks` -> :class:`TeacherOutput`. ``select`` wraps the dropper
        (``select(dropper) -> callback``) to record stages (pictures); ``keep`` overrides the ratio."""
        dropper = self.dropper(generator, keep)
        callback = dropper if select is None else select(dropper)

        def run(enc: ViTEncoder):
            x = gather_tokens(enc.patch_tokens(images), ids_masked)  # (B, m, D), no cls token
            out = enc.run_blocks(x, num_prefix=0, ids=ids_masked, select=callback)
            return enc.norm(out.x), out.ids

        y, ids = self.target(run)
        y = y.float()
        if self.options.norm_target:
            y = F.layer_norm(y, y.shape[-1:], eps=1e-6)
        return TeacherOutput(y, ids, [ids_masked.shape[1], *dropper.counts])

    def teacher_flops(self, images: torch.Tensor, ids_masked: torch.Tensor, keep: float | None = None) -> int:
        """Teacher FLOPs per image (patch embedding of the image + blocks at the stage token counts),
        counted once per (masked count, keep) on one image and cached."""
        k = self.options.keep if keep is None else keep
        key = (ids_masked.shape[1], k)
        stored = self.flops.get(key)  # traced by torch.compile: no graph break once the count is stored
        if stored is not None:
            return stored
        return self.flops(key, lambda: self.encode_teacher(images[:1], ids_masked[:1], keep=k))

    # -- step -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, progress: Progress | None = None, *, plan: MaskPlan | None = None,
                generator: torch.Generator | None = None) -> StepOutput:
        """``images (B, C, H, W)`` -> :class:`StepOutput` with ``pred``/``target`` ``(B, r, D)`` and the plan
        whose ``ids_target (B, r)`` are the retained ids (the teacher input is ``plan.ids_masked()``)."""
        if plan is None:
            plan = self.make_plan(images, progress, generator)
        if plan.num_views != 1 or plan.keep_valid is not None:
            raise ValueError("pcae takes one view per image with equal visible counts (masking random or block)")
        ids_masked = plan.ids_masked()  # (B, m)
        teacher = self.encode_teacher(images, ids_masked, generator)  # (B, r, D), (B, r)

        visible = gather_tokens(self.encoder.patch_tokens(images), plan.ids_keep)  # (B, n, D)
        latent = self.encoder.forward_tokens(visible)  # (B, 1+n, D)
        pred = self.decoder(latent, plan.ids_keep, teacher.ids)  # (B, r, D)
        loss = 1.0 - F.cosine_similarity(pred.float(), teacher.target, dim=-1).mean()

        # the teacher's FLOPs are counted once (outside torch.compile: a graph break) and looked up after;
        # the lookups come first, so a compiled forward guards on them and is traced once more without
        # the break when the counts are stored, and no half-built call sits on the stack at a break
        flops, full = self.flops.get((ids_masked.shape[1], self.options.keep)), self.flops.get((ids_masked.shape[1], 1.0))
        if flops is None or full is None:
            flops = self.teacher_flops(images, ids_masked)
            full = self.teacher_flops(images, ids_masked, keep=1.0)
        metrics: dict[str, torch.Tensor | float] = {f"teacher_tokens_{j}": c for j, c in enumerate(teacher.counts)}
        metrics.update(
            decoder_seq_len=latent.shape[1] + teacher.ids.shape[1],
            teacher_flops=flops,
            teacher_flops_ratio=flops / full,
            ema_momentum=self.target.momentum(progress),
            sim_target=average_patch_similarity(teacher.target, include_diagonal=False),
            sim_pred=average_patch_similarity(pred.detach(), include_diagonal=False),
        )
        return StepOutput(loss, metrics, pred=pred, target=teacher.target, plan=plan.replace(ids_target=teacher.ids))

    @staticmethod
    def iteration_fraction(step: int, micro_batch: int, progress: Progress) -> float:
        """The official momentum index as a fraction: iteration ``step * k + micro_batch`` of the run's
        ``total_steps * k`` iterations (``k = progress.micro_batches``), clamped to [0, 1]."""
        k = max(1, progress.micro_batches)
        return min(1.0, max(0.0, (step * k + micro_batch) / (max(1, progress.total_steps) * k)))

    def after_micro_batch(self, progress: Progress) -> None:
        """``ema_update=micro_batch``: the teacher's EMA step after micro-batch ``j < k - 1`` of the step
        (``progress.step`` steps done), at the momentum of iteration ``step * k + j``. The last
        micro-batch's update comes after the optimizer step (:meth:`after_step`), as in the official
        loop."""
        if self.options.ema_update == "micro_batch" and progress.micro_batch < progress.micro_batches - 1:
            self.target.update(progress, fraction=self.iteration_fraction(progress.step, progress.micro_batch,
                                                                          progress))

    def after_step(self, progress: Progress) -> None:
        """The teacher's EMA step after the optimizer step (``progress.step`` counts it).
        ``micro_batch``: the update of the step's last micro-batch, iteration ``step * k - 1``; ``step``: the
        one update of the step at the progress after it (:class:`~mimkit.targets.LatentTarget`)."""
        if self.options.ema_update == "step":
            self.target.update(progress)
        else:
            self.target.update(progress, fraction=self.iteration_fraction(progress.step, -1, progress))

    def target_copies(self) -> tuple[TargetCopy, ...]:
        """The EMA teacher (``target.branch``), a copy of the encoder."""
        return (TargetCopy("target.branch", self.target.branch, self.target.online),)

    # -- pictures -------------------------------------------------------------------------------
    @torch.no_grad()
    def picture_data(self, kind: str, images: torch.Tensor,
                     generator: torch.Generator | None = None) -> PictureData:
        """``teacher_drops``: the teacher's input (the masked patches) and the ids it keeps after each
        drop stage (``generator`` draws the mask, then the random drop); the rest as the base class."""
        if kind != "teacher_drops":
            return super().picture_data(kind, images, generator)
        plan = self.make_plan(images, None, generator)
        rec: list[_StageRecorder] = []

        def select(dropper):
            rec.append(_StageRecorder(dropper))
            return rec[0]

        masked_ids = plan.ids_masked()
        self.encode_teacher(images, masked_ids, generator, select=select)
        stages = [(f"teacher in ({masked_ids.shape[1]})", masked_ids)]
        stages += [(f"after block {blk} ({ids.shape[1]})", ids)
                   for blk, ids in zip(self.after_blocks, rec[0].stage_ids)]
        return PictureData(images, plan, stages=stages)
