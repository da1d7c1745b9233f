"""Target providers: what a method's predictions are compared with.

Each provider is a small module (or callable) that methods compose:

* :class:`PixelTarget` — per-patch (normalized) pixels (MAE, EMAE, SBAM, MixedAE, CAE's pixel option).
* :class:`LatentTarget` — an encoder branch producing latent targets, in one of four arms
  (Latent MIM's ablation; CAE's alignment target is the ``stopgrad`` arm):

  ========== ================================================ ===================================
  kind       branch that computes the target                  gradient / update
  ========== ================================================ ===================================
  naive      the online modules themselves                    gradients through both branches
  stopgrad   the online modules under ``no_grad``             none (weight sharing, momentum 0)
  separate   a copy, initialised equal, trained by back-prop  its own gradients
  ema        a copy, initialised equal                        ``m θ_T + (1 - m) θ`` (when: below)
  ========== ================================================ ===================================

  When the EMA copy is updated is the method's choice, in its hooks (:class:`~mimkit.methods.Method`):

  * once per optimizer step, from ``after_step(progress)``, with ``m`` from :class:`MomentumSchedule`
    at the progress *after* the step (``update(progress)``). This equals Latent MIM's code, which
    updates once per optimizer step before the next step's target forward. Latent MIM does this, and
    PCAE with ``ema_update=step``.
  * after every iteration, i.e. every micro-batch (PCAE's official loop, PCAE's default
    ``ema_update=micro_batch``): under gradient accumulation of ``k`` micro-batches the copy moves
    ``k`` times per optimizer step, and the second micro-batch's target forward sees the copy updated
    after the first. That is *not* the once-per-step rule when ``k > 1`` (the teacher would move about
    ``k`` times less per step), and even at ``k = 1`` its momentum index differs by one: iteration
    ``i`` (0-based, over all micro-batches) uses ``m`` at fraction ``i / (total_steps * k)``
    (``update(progress, fraction=...)``), so the first update uses the base momentum. See
    :class:`~mimkit.methods.pcae.PCAE`.
* :class:`FrozenTeacher` — a frozen encoder from a local file (mimkit checkpoint or export, timm ViT
  state dict, official MAE checkpoint, CLIP image tower: :class:`~mimkit.nn.clip.ClipImageTower`) or an in-memory
  module, whose patch grid is resampled to the student's when they differ (CAE v2).
* :class:`TokenDropper` — the per-block token-selection callback for a teacher that drops tokens
  between blocks (PCAE): keeps the tokens least similar to the mean token (or random ones) and carries
  their grid ids.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.nn.clip import ClipImageTower, teacher_encoder_from_spec  # noqa: F401 - re-exported
from mimkit.nn.patch import norm_pix, patchify
from mimkit.weights import load_encoder, read_weights


def pixel_targets(images: torch.Tensor, patch_size: int, norm_target: bool = True) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p*p*C)``, per-patch normalized when ``norm_target`` (MAE's ``norm_pix_loss``).

    Computed from the already mean/std-normalized input, in fp32."""
    target = patchify(images.float(), patch_size)
    return norm_pix(target) if norm_target else target


class PixelTarget(nn.Module):
    """``images (B, C, H, W)`` -> ``(B, L, p*p*C)`` pixels, per-patch normalized when ``norm_target`` (MAE's
    ``norm_pix_loss``, on in every published MAE run)."""

    def __init__(self, patch_size: int, norm_target: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.norm_target = norm_target

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_targets(images, self.patch_size, self.norm_target)


def cosine_momentum(base: float, fraction: float, final: float = 1.0) -> float:
    """``m(f) = final - (final - base) * (1 + cos(pi f)) / 2``: rises from ``base`` to ``final``."""
    return final - (final - base) * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0))) / 2


def cosine_schedule(start: float, end: float, fraction: float) -> float:
    """``end + (start - end) * (1 + cos(pi f)) / 2`` for ``f`` clamped to [0, 1]: ``start`` at 0, ``end`` at 1
    (Latent MIM's regularizer target ``gamma``: 0.75 -> 0.25)."""
    f = min(max(fraction, 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * f)) / 2


class MomentumSchedule:
    """EMA momentum over training: ``base`` -> ``final`` along a half cosine of ``progress.fraction``
    (BYOL/DINO/Latent MIM/PCAE). ``base == final`` gives a constant momentum."""

    def __init__(self, base: float = 0.99, final: float = 1.0):
        if not (0.0 <= base <= 1.0 and 0.0 <= final <= 1.0):
            raise ValueError(f"EMA momentum must lie in [0, 1], got {base} -> {final}")
        self.base, self.final = base, final

    def __call__(self, progress) -> float:
        return self.at(progress.fraction if progress is not None else 0.0)

    def at(self, fraction: float) -> float:
        """The momentum at ``fraction`` of training (clamped to [0, 1])."""
        return cosine_momentum(self.base, fraction, self.final)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``θ_T <- m θ_T + (1 - m) θ_S`` for every parameter of ``target``, matched to ``source`` by name
    (so a target with fewer blocks, Latent MIM's ``target_depth``, takes the first ones); floating
    buffers are copied."""
    src = dict(source.named_parameters())
    tgt, srcs = [], []
    for name, p in target.named_parameters():
        if name not in src or src[name].shape != p.shape:
            raise RuntimeError(f"EMA target parameter {name} has no match in the source")
        tgt.append(p)
        srcs.append(src[name].detach())
    if tgt:
        torch._foreach_lerp_(tgt, srcs, 1.0 - momentum)
    src_buf = dict(source.named_buffers())
    for name, b in target.named_buffers():
        if name in src_buf and b.is_floating_point():
            b.copy_(src_buf[name])


LATENT_TARGETS = ("naive", "stopgrad", "separate", "ema")


class LatentTarget(nn.Module):
    """Latent targets from an encoder branch (module table above).

    Args:
        kind: ``naive`` | ``stopgrad`` | ``separate`` | ``ema``.
        online: the online modules whose outputs are the targets (e.g. an ``nn.ModuleDict`` holding the
            method's encoder and projector). Not registered here (the method owns them); ``separate`` and
            ``ema`` keep an equal deep copy as :attr:`branch`.
        momentum: :class:`MomentumSchedule` for ``ema``.

    Use: ``z = target(lambda m: m["encoder"](...))`` runs the callable on the right branch, under
    ``no_grad`` for ``stopgrad`` and ``ema``; ``target.update(progress)`` after each optimizer step (or
    ``target.update(progress, fraction=f)`` where the method counts its own schedule: PCAE's iterations).
    """

    def __init__(self, kind: str, online: nn.Module, momentum: MomentumSchedule | None = None):
        super().__init__()
        if kind not in LATENT_TARGETS:
            raise ValueError(f"unknown target {kind!r}; choose one of: {', '.join(LATENT_TARGETS)}")
        self.kind = kind
        self._online = [online]  # a list hides it from module registration
        self.momentum = momentum or MomentumSchedule()
        self.branch: nn.Module | None = None
        if kind in ("separate", "ema"):
            self.branch = copy.deepcopy(online)
            if kind == "ema":
                for p in self.branch.parameters():
                    p.requires_grad_(False)

    @property
    def online(self) -> nn.Module:
        return self._online[0]

    def module(self) -> nn.Module:
        """The modules that compute the targets for this arm."""
        return self.branch if self.branch is not None else self.online

    def forward(self, fn):
        """``fn(modules)`` on the target branch; no gradient for ``stopgrad`` and ``ema``."""
        if self.kind in ("stopgrad", "ema"):
            with torch.no_grad():
                return fn(self.module())
        return fn(self.module())

    @torch.no_grad()
    def update(self, progress, fraction: float | None = None) -> float | None:
        """EMA step with ``m = momentum(progress)``, or ``momentum.at(fraction)`` when ``fraction`` is given
        (``ema`` only); returns ``m`` or ``None``."""
        if self.kind != "ema":
            return None
        m = self.momentum(progress) if fraction is None else self.momentum.at(fraction)
        ema_update(self.branch, self.online, m)
        return m

    def train(self, mode: bool = True):
        super().train(mode)
        if self.kind == "ema" and self.branch is not None:
            self.branch.train(mode)  # same dropout/drop-path behaviour as the online branch
        return self


class FrozenTeacher(nn.Module):
    """A frozen encoder that supplies per-token targets (CAE v2's CLIP teacher, or any local model).

    ``encoder``: a module with ``forward_features(images) -> (B, 1+L', D')`` (a
    :class:`~mimkit.nn.ViTEncoder`, or any loaded by :func:`mimkit.interop.load_encoder`). Its weights
    never require gradients and it always runs in eval mode under ``no_grad``; they are saved with the
    method (so a run resumes without the original file).

    :meth:`forward` returns ``(B, 1+L, D')``: cls then patch tokens, with the teacher's patch grid
    resampled to ``grid`` (bilinear on the ``(h', w')`` token map; a deviation from CAE v2, where both
    grids are 14x14) when they differ.
    """

    def __init__(self, encoder: nn.Module, norm: bool = True):
        super().__init__()
        self.encoder = encoder
        self.norm = norm
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    @classmethod
    def from_file(cls, path: str | Path, norm: bool = True, num_heads: int | None = None) -> FrozenTeacher:
        """Load a teacher from any encoder file :func:`mimkit.weights.read_weights` reads (a mimkit
        checkpoint or export, a timm ViT state dict, an official MAE file) or a CLIP checkpoint (its
        image tower, :class:`~mimkit.nn.clip.ClipImageTower`)."""
        w = read_weights(path)
        if w.format == "clip":
            return cls(ClipImageTower.from_state_dict(w.state), norm=norm)
        return cls(load_encoder(w, num_heads=num_heads), norm=norm)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode
        return self

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.encoder.grid_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        feats = self.encoder.forward_features(images, norm=self.norm).float()
        feats = one_prefix_token(feats, self.encoder)
        return resample_tokens(feats, self.grid_size, grid) if grid is not None else feats


def one_prefix_token(feats: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
    """``(B, P + L, D) -> (B, 1 + L, D)``: teachers of any timm family as a class token then patches.

    Encoders with register or distillation tokens (``P > 1``) keep their class token and drop the
    others; encoders without a class token (``has_class_token=False``, timm's ``class_token=False``
    models) get the mean of their patch tokens in its place. Plain ViTs (``P = 1``) pass unchanged.
    ``encoder``: any teacher encoder (a :class:`~mimkit.nn.ViTEncoder`, a wrapper of
    :mod:`mimkit.nn.adapters`, the CLIP tower), each with ``num_prefix_tokens`` and ``has_class_token``."""
    p = encoder.num_prefix_tokens
    if p == 1:
        return feats
    patches = feats[:, p:]
    if encoder.has_class_token:
        return torch.cat([feats[:, :1], patches], dim=1)
    return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)










def resample_tokens(tokens: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """``(B, 1+h*w, D)`` -> ``(B, 1+H*W, D)``: the cls token kept, patch tokens resampled bilinearly
    (``align_corners=False``) from ``src_grid`` to ``dst_grid``; unchanged when the grids match."""
    if tuple(src_grid) == tuple(dst_grid):
        return tokens
    b, n, d = tokens.shape
    h, w = src_grid
    if n != 1 + h * w:
        raise ValueError(f"{n} tokens do not match cls + grid {src_grid}")
    fmap = tokens[:, 1:].reshape(b, h, w, d).permute(0, 3, 1, 2)
    fmap = F.interpolate(fmap, size=tuple(dst_grid), mode="bilinear", align_corners=False)
    return torch.cat([tokens[:, :1], fmap.flatten(2).transpose(1, 2)], dim=1)


DROP_MODES = ("similarity", "random")


class TokenDropper:
    """Per-block token selection for :meth:`mimkit.nn.ViTEncoder.run_blocks` (PCAE).

    After each block in ``after_blocks`` keep ``int(n * keep)`` of the ``n`` patch tokens:
    ``similarity`` keeps those *least* similar to the mean token (cosine of each L2-normalised token
    with the mean of the normalised tokens, ascending sort); ``random`` keeps random ones (the "RD"
    ablation). The ``num_prefix`` leading tokens (cls) are always kept; the grid ``ids`` follow their
    tokens. ``keep = 1`` keeps everything (no drop). ``counts`` records the token count after each
    selection of the last call sequence (for logging).
    """

    def __init__(self, after_blocks, keep: float = 0.5, mode: str = "similarity", num_prefix: int = 0,
                 generator: torch.Generator | None = None):
        if mode not in DROP_MODES:
            raise ValueError(f"unknown drop mode {mode!r}; choose one of: {', '.join(DROP_MODES)}")
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
        self.after_blocks = set(after_blocks)
        self.keep = keep
        self.mode = mode
        self.num_prefix = num_prefix
        self.generator = generator
        self.counts: list[int] = []

    @staticmethod
    def mean_similarity(x: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)`` -> ``(B, n)``: ``t̂_i · mean_j t̂_j`` with ``t̂`` L2-normalised (fp32)."""
        xn = F.normalize(x.float(), dim=-1)
        return (xn * xn.mean(1, keepdim=True)).sum(-1)

    def __call__(self, i: int, x: torch.Tensor, ids: torch.Tensor | None):
        if i not in self.after_blocks:
            return None
        p = self.num_prefix
        tokens = x[:, p:]
        b, n, d = tokens.shape
        k = max(1, int(n * self.keep))
        if k >= n:
            self.counts.append(n)
            return None
        if self.mode == "similarity":
            score = self.mean_similarity(tokens)
        else:
            score = torch.rand(b, n, device=x.device, generator=self.generator)
        order = torch.argsort(score, dim=1)[:, :k]  # ascending: least mean-like first
        kept = torch.gather(tokens, 1, order[..., None].expand(-1, -1, d))
        new_ids = torch.gather(ids, 1, order) if ids is not None else None
        self.counts.append(k)
        return torch.cat([x[:, :p], kept], dim=1), new_ids
