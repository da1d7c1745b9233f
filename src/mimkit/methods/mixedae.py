"""MixedAE — "Mixed Autoencoder for Self-supervised Visual Representation Learning" (Chen et al.,
CVPR 2023). No official code was released; this is the only working implementation we
know of, so every choice the paper leaves open is an option whose default is the spec's [PROPOSAL].

Groups of ``G = 1/r`` images of the (already shuffled) batch are mixed into one encoder sequence: a
random partition of the ``L`` grid positions gives each member of the group its own ``~L/G``
positions (every position is owned by exactly one image), and the encoder sees the group's tokens
at the positions each image owns. Homologous recognition makes every token find the tokens of its own
image: TopK attention in the encoder (training only) and a contrastive loss on the encoder's patch
features. The decoder then reconstructs every image from its own tokens alone, as MAE does. Shapes
for B images, ``n`` tokens owned per image (``n = ceil(L/G)``, shorter parts padded), ``P = p*p*C``::

    tokens = encoder.patch_tokens(images)                 (B, L, D)       positions added before mixing
    plan   = PartitionMasking(G)(B/G, L)                  ids_keep (B, n) image b = g*G + k owns part k of
                                                          group g's permutation (rotated views, as in masking.py)
    x_mix  = mix(gather(tokens, ids_keep))                (B/G, G*n, D)   member-major (+ segment embedding
                                                                          only when asked: segment_embed)
    z      = encoder(cls + x_mix, TopK in training)       (B/G, 1+G*n, D) after the final norm
    L_con  = HomoCon(z[:, 1:], member of each slot)       positives: same source image, same sequence;
                                                          summed over (anchor, positive) pairs per sequence,
                                                          mean over the B/G sequences (contrastive_reduction)
    latent = unmix(z)                                     (B, 1+n, D)     the group's cls + own tokens
    pred   = MAE decoder(latent, ids_restore)             (B, L, P)       mask tokens where others own
    L_pix  = masked MSE, mask[b, l] = 1 iff b does not own l   (MAE's reduction)
    loss   = pixel_weight * L_pix + contrastive_weight * L_con

The mixed sequence lists each member's tokens one member after the other rather than in grid order;
attention does not depend on token order (positions are in the embeddings), so this is the grid-order
mixed sequence of the paper up to a permutation, and unmixing is a reshape. When ``G`` does not divide
``L`` (49 Fashion-MNIST patches, G = 4: parts of 13, 12, 12, 12) the shorter parts are padded and the
padding is masked out of the encoder's attention (key padding), the loss and every metric.

Which source each choice follows ([SLIDES] = the authors' deck, [ABS] = abstract /
TL;DR page, [PROPOSAL] = the sources are silent):

* symmetric mixing, every member reconstructed, groups of ``G = 1/r``: [SLIDES]; default ``G = 4``
  (r = 0.25, MAE's 75 % masking per image, no extra random masking): inferred from the paper.
* partners = consecutive chunks of ``G`` images of the shuffled batch: [PROPOSAL]. The batch must be a
  multiple of ``G`` (:meth:`MixedAE.check_batch_size`).
* homologous attention ``softmax(TopK(q k^T / sqrt(d)))`` in the encoder, training only, the same
  weights running plain SDPA attention for evaluation and fine-tuning: [SLIDES]. ``K = ceil(r * T)``,
  ``T = 1 + L`` keys (13 at L = 49, 50 at ViT-B/16) and every encoder block: [PROPOSAL]
  (``topk``, ``topk_ratio``, ``topk_blocks``). The decoder uses plain attention (one image per
  sequence after unmixing).
* homologous contrastive loss (HomoCon) on the encoder's patch tokens after the final LayerNorm,
  cosine similarity with temperature, positives = the other tokens of the same source image in the same
  mixed sequence, negatives = the other images' tokens in that sequence: [SLIDES]. The deck writes it
  for one mixed sample as a *sum* over anchors ``l`` and their positives ``l+``
  (``-sum_l sum_{l+} log softmax``) [SLIDES]; default ``contrastive_reduction=sum``: that sum per mixed
  sequence, averaged over the ``B/G`` sequences as the pixel loss is averaged over images.
  ``contrastive_reduction=mean`` is the SupCon-"out" mean (over an anchor's positives, then over the
  anchors of all sequences; :func:`mimkit.losses.homologous_contrastive`) [PROPOSAL]: it equals the sum
  divided by the pairs per sequence ``P = sum_k n_k (n_k - 1)`` exactly when the G parts are equal
  (``P = L (L/G - 1)``: 196 * 48 = 9408 at ViT-B/16, 224, G = 4; 64 * 15 = 960 at L = 64), and about so
  otherwise (49 patches, parts 13/12/12/12: P = 552). So ``contrastive_weight`` λ under ``mean`` equals
  ``λ / P`` under ``sum``, and λ under ``sum`` equals ``λ * P`` under ``mean``. τ and λ are not in the
  sources: ``temperature = 0.25``, no projector, and HomoCon as a regularizer [PROPOSAL]: λ = 0.1 under
  the mean (~0.1 * log(L - 1) next to a pixel loss of order 1), which under the deck's sum is
  ``λ = 0.1 / P``. The default ``contrastive_weight = 0.1 / 9408 = 1.0629e-5`` is that weight at
  ViT-B/16, 224 px, G = 4 (the published shape); the Fashion-MNIST preset sets ``0.1 / 552``. A λ of
  0.1 under the sum would make HomoCon ~P times the regularizer (a loss of ~200 next to a pixel loss of
  ~1 at 49 patches), so sweep it around these values.
* segment embeddings: the TL;DR page lists them among MixedAE's parts [ABS], but the authors' deck (its
  mixing, HomoAtt and HomoCon) does not have them and their placement is not recoverable, so the default
  is ``segment_embed=none``. On request, a learnable ``(G, D)`` table indexed by the slot (0..G-1), init
  N(0, 0.02), added to the encoder input (``encoder``, BERT-style; discarded with the rest of the method
  when the encoder is exported) or to the unmixed tokens before the decoder (``decoder``) [PROPOSAL].
  Why not by default: the slot id in the encoder input tells every token which image it belongs to, a
  content-free shortcut for HomoCon and HomoAtt (on pure-noise images, with nothing to recognise, HomoCon
  falls far below chance with ``encoder`` and stays at chance with ``none``; ``tests/test_mixedae.py``).
* the decoder sees the group's cls latent (MAE-style; it has seen all G images): [PROPOSAL] with the
  flag ``decoder_cls`` (false: a zero latent instead).
* ``pixel_weight`` (1; 0 = the deck's "HomoCon only" arm, which collapses) and ``contrastive_weight``
  (0 = reconstruction only) give the ablation arms; ``homologous_attention=false`` with
  ``contrastive_weight=0`` is "naive mixing".

Metrics each step: ``loss_pixel``, ``loss_contrastive`` (the term λ multiplies, in the chosen reduction;
computed without gradient when its weight is 0, so naive mixing logs it too), ``loss_contrastive_mean``
(the per-anchor mean whatever the reduction: comparable across reductions and runs, chance = the log of
the keys per anchor, ~log(L - 1)) and, in training with TopK, ``recognition_acc``: the share of a
query's TopK keys (patch keys; the cls key is not counted) that come from its own image, averaged over
queries, heads and TopK blocks (the deck's homologous-recognition accuracy).

``G = 1`` mixes nothing; given an explicit plan (e.g. MAE's random masking) the method computes MAE's
loss exactly (no segment embedding, no contrastive term, ``K = T`` is plain attention). Its own
:meth:`make_plan` refuses ``G = 1`` (every patch would be visible).

Cost: the encoder runs ``B/G`` sequences of ``1 + G*n`` tokens (≈ MAE's ``B`` sequences of ``1 + n``
up to the quadratic attention term), the decoder is MAE's; TopK needs explicit ``(B/G, H, T, T)``
logits in the chosen blocks instead of a fused SDPA kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mimkit.losses import homologous_pair_terms, masked_mse
from mimkit.masking import MaskPlan, PartitionMasking
from mimkit.methods.base import (
    Capabilities,
    Method,
    MethodOptions,
    ModelConfig,
    PictureData,
    Progress,
    Reconstruction,
    StepOutput,
)
from mimkit.nn.decoder import MAEDecoder
from mimkit.nn.patch import patchify, unpatchify
from mimkit.nn.projector import MLPProjector
from mimkit.nn.vit import ViTEncoder, gather_tokens
from mimkit.targets import PixelTarget

SEGMENT_EMBEDS = ("none", "encoder", "decoder")
PROJECTORS = ("none", "mlp")
REDUCTIONS = ("sum", "mean")


@dataclass
class MixedAEOptions(MethodOptions):
    """MixedAE knobs; defaults = the paper's ViT-B recipe (sources in the module docstring).

    * ``group_size``: G = 1/r images per mixed sequence (4 [inferred]); ``partition_strict``: refuse a
      G that does not divide the number of patches.
    * ``homologous_attention``: TopK attention in training [SLIDES]; ``topk``: K as a count (wins),
      else ``K = ceil(topk_ratio * (1 + L))`` with ``topk_ratio`` defaulting to r = 1/G [PROPOSAL];
      ``topk_blocks``: encoder blocks with TopK (``None`` = all [PROPOSAL]; negative counts from the end).
    * ``contrastive_weight`` λ (``0.1 / 9408``: the proposal's regularizer weight 0.1 under the mean,
      on the sum at ViT-B/16 [PROPOSAL]; 0 = off, still logged), ``temperature`` τ (0.25
      [PROPOSAL]), ``projector``: ``none`` [PROPOSAL] | ``mlp`` (2 layers, width D) on the features.
    * ``contrastive_reduction``: ``sum`` (default: the deck's formula, a sum over the (anchor, positive)
      pairs of each mixed sequence, mean over sequences [SLIDES]) | ``mean`` (SupCon-"out": mean over
      positives, then anchors [PROPOSAL]). With ``P`` pairs per sequence (``L (L/G - 1)`` for equal parts:
      9408 at ViT-B/16 and G = 4), λ under ``mean`` equals ``λ / P`` under ``sum`` (the sources give no λ
      for either; mimkit's earlier default, ``mean`` with 0.1, equals the default here at ViT-B).
    * ``pixel_weight``: weight of the reconstruction loss (1; 0 = contrastive only).
    * ``segment_embed``: ``none`` (default: the authors' deck has no segment embedding; the slot id would
      let HomoCon group tokens without looking at them) | ``encoder`` | ``decoder`` [PROPOSAL, open].
    * ``decoder_cls``: give every decoder sequence the group's cls latent (true [PROPOSAL]).
    * ``norm_target``: per-patch normalized pixel targets (MAE's ``norm_pix_loss``, on).
    * ``log_recognition``: log ``recognition_acc`` in training (needs the attention probabilities).
    """

    name: str = "mixedae"
    norm_target: bool = True
    group_size: int = 4
    partition_strict: bool = False
    homologous_attention: bool = True
    topk: int | None = None
    topk_ratio: float | None = None
    topk_blocks: tuple[int, ...] | None = None
    contrastive_weight: float = 0.1 / 9408  # = 1.0629e-5, see the options docstring
    temperature: float = 0.25
    projector: str = "none"
    contrastive_reduction: str = "sum"
    pixel_weight: float = 1.0
    segment_embed: str = "none"
    decoder_cls: bool = True
    log_recognition: bool = True


def mix(visible: torch.Tensor, group_size: int, keep_valid: torch.Tensor | None = None):
    """Mix each group's own tokens into one sequence.

    ``visible (B, n, D)``: image ``b``'s tokens at the positions it owns (padded to ``n``);
    ``keep_valid (B, n)`` bool or ``None``. Returns ``x (B/G, G*n, D)`` (member-major: slot
    ``k*n + i`` is token ``i`` of member ``k``), ``valid (B/G, G*n)`` or ``None``, and
    ``member (G*n,)`` long, the source image (0..G-1) of each slot."""
    b, n, d = visible.shape
    g = group_size
    x = visible.reshape(b // g, g * n, d)
    valid = None if keep_valid is None else keep_valid.reshape(b // g, g * n)
    member = torch.arange(g, device=visible.device).repeat_interleave(n)
    return x, valid, member


def unmix(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`mix`: ``(B/G, G*n, D)`` -> ``(B, n, D)``, each image's own tokens."""
    s, gn, d = x.shape
    return x.reshape(s * group_size, gn // group_size, d)


def mixed_images(images: torch.Tensor, source: torch.Tensor, patch_size: int, group_size: int) -> torch.Tensor:
    """The mixed inputs in pixel space: ``images (B, C, H, W)`` normalized, ``source (B, L)`` (the plan's
    owner of each position, equal within a group) -> ``(B/G, C, H, W)``, patch ``l`` of group ``g``
    taken from image ``g*G + source[g*G, l]``."""
    b, c = images.shape[:2]
    g = group_size
    px = patchify(images.float(), patch_size)  # (B, L, P)
    length, p = px.shape[1:]
    px = px.view(b // g, g, length, p)
    src = source[::g]  # (B/G, L)
    mixed = torch.gather(px, 1, src[:, None, :, None].expand(-1, 1, -1, p)).squeeze(1)
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    return unpatchify(mixed, patch_size, c, grid)


def homologous_contrastive_sum_mean(features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None,
                                    temperature: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """HomoCon in both reductions from one similarity matrix: ``(sum, mean)``.

    The pair term is that of :func:`mimkit.losses.homologous_contrastive` (same arguments): for anchor
    ``i`` and positive ``p in P(i)`` (same label, ``p != i``, both valid), ``-log(exp(s_ip) / sum_{j != i,
    valid} exp(s_ij))`` with ``s = cos / temperature``. ``sum``: the deck's ``sum_i sum_{p in P(i)}`` per
    sequence, averaged over the ``N`` sequences. ``mean``: mean over ``P(i)``, then over the anchors of all
    sequences; equal to :func:`~mimkit.losses.homologous_contrastive`. When every anchor has the same
    ``|P(i)|`` (equal parts, no padding) ``sum == mean * pairs per sequence``. fp32, autocast off."""
    per_anchor_sum, n_pos, anchors = homologous_pair_terms(features, labels, valid, temperature)  # (N, T) each
    n = features.shape[0]
    total = (per_anchor_sum * anchors).sum() / n
    mean = (per_anchor_sum / n_pos.clamp(min=1) * anchors).sum() / anchors.sum().clamp(min=1.0)
    return total, mean


@torch.no_grad()
def recognition_accuracy(attn: torch.Tensor, member: torch.Tensor, valid: torch.Tensor | None = None,
                         num_prefix: int = 1) -> torch.Tensor:
    """Homologous-recognition accuracy of one block's attention.

    ``attn (S, H, P+M, P+M)`` probabilities in which the keys TopK dropped are exactly 0; ``member
    (M,)`` or ``(S, M)`` the source image of each patch slot; ``valid (S, M)`` bool or ``None``
    (padding slots are neither queries nor keys). For every valid patch query: the share of its kept
    patch keys (probability > 0; the ``P`` prefix keys are not counted) from its own image; averaged
    over queries and heads -> scalar in ``[0, 1]``."""
    a = attn[:, :, num_prefix:, num_prefix:]
    kept = a > 0  # (S, H, M, M)
    mem = member if member.ndim == 2 else member.expand(a.shape[0], -1)
    same = mem[:, :, None] == mem[:, None, :]  # (S, M, M)
    if valid is not None:
        kept = kept & valid[:, None, None, :]
    hits = (kept & same[:, None]).sum(-1).float()
    total = kept.sum(-1).float()
    acc = hits / total.clamp(min=1)  # (S, H, M)
    q = (total > 0) if valid is None else (total > 0) & valid[:, None, :]
    q = q.float()
    return (acc * q).sum() / q.sum().clamp(min=1)


class MixedAE(Method):
    """``encoder`` (a plain :class:`ViTEncoder`: nothing MixedAE-specific, exported as is), ``decoder``
    (MAE's), ``segment_embedding (G, D)`` (unless ``segment_embed=none`` or G = 1), ``projector``."""

    options_class = MixedAEOptions

    def __init__(self, model: ModelConfig | None = None, options: MixedAEOptions | None = None):
        super().__init__()
        model = model or ModelConfig()
        o = self.options = options or MixedAEOptions()
        g = o.group_size
        self.encoder = ViTEncoder(model.encoder)
        enc = self.encoder
        length, depth = enc.num_patches, len(enc.blocks)
        if not 1 <= g <= length:
            raise ValueError(f"method.group_size must be in [1, {length}] (images per mixed sequence), got {g}")
        if o.segment_embed not in SEGMENT_EMBEDS:
            raise ValueError(f"method.segment_embed must be one of {', '.join(SEGMENT_EMBEDS)}, got {o.segment_embed!r}")
        if o.contrastive_reduction not in REDUCTIONS:
            raise ValueError(f"method.contrastive_reduction must be one of {', '.join(REDUCTIONS)}, "
                             f"got {o.contrastive_reduction!r}")
        if o.projector not in PROJECTORS:
            raise ValueError(f"method.projector must be one of {', '.join(PROJECTORS)}, got {o.projector!r}")
        if o.temperature <= 0:
            raise ValueError(f"method.temperature must be > 0, got {o.temperature}")
        if o.pixel_weight < 0 or o.contrastive_weight < 0:
            raise ValueError("method.pixel_weight and method.contrastive_weight must be >= 0")
        if o.pixel_weight == 0 and (o.contrastive_weight == 0 or g == 1):
            raise ValueError("method.pixel_weight=0 leaves no loss; set method.contrastive_weight > 0 (and group_size > 1)")
        if o.topk is not None and o.topk < 1:
            raise ValueError(f"method.topk must be >= 1 (or null for ceil(topk_ratio * (1 + L))), got {o.topk}")
        if o.topk_ratio is not None and not 0 < o.topk_ratio <= 1:
            raise ValueError(f"method.topk_ratio must be in (0, 1], got {o.topk_ratio}")
        if o.topk_blocks is not None:
            bad = [i for i in o.topk_blocks if not -depth <= i < depth]
            if bad:
                raise ValueError(f"method.topk_blocks {bad} outside the encoder's {depth} blocks (0..{depth - 1})")
        if o.partition_strict and length % g:
            raise ValueError(f"method.group_size {g} does not divide the {length} patches (partition_strict=true)")
        self.group_size = g
        # K counts keys including cls: T = 1 + L
        keys = 1 + length
        self.topk_k = o.topk if o.topk is not None else math.ceil((o.topk_ratio or 1.0 / g) * keys - 1e-9)
        d = model.decoder
        self.decoder = MAEDecoder(enc.embed_dim, enc.grid_size, enc.patch_size**2 * enc.in_chans,
                                  d.embed_dim, d.depth, d.num_heads, d.mlp_ratio)
        self.segment_embedding = None
        if o.segment_embed != "none" and g > 1:
            self.segment_embedding = nn.Parameter(torch.zeros(g, enc.embed_dim))
            nn.init.normal_(self.segment_embedding, std=0.02)  # BERT's token-type init
        self.projector = (MLPProjector(enc.embed_dim, enc.embed_dim, enc.embed_dim, depth=2, out_norm=False)
                          if o.projector == "mlp" else nn.Identity())
        self.masking = PartitionMasking(g, strict=o.partition_strict)
        self.target = PixelTarget(enc.patch_size, o.norm_target)

    # -- contract ---------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        o = self.options
        unused = o.pixel_weight == 0 or (o.projector != "none" and (o.contrastive_weight == 0 or self.group_size == 1))
        # mixing always uses the partition generator; ``views`` draws one image's own part per row and
        # needs at least G images (the drawer takes up to 4)
        pics = ("reconstruction", "mixing") + (("views",) if self.group_size <= 4 else ())
        return Capabilities(pictures=pics, find_unused_parameters=unused, masking_kinds=("partition",))

    def check_batch_size(self, n: int) -> None:
        """Raise ``ValueError`` naming the fix when ``n`` images do not form whole groups of G."""
        g = self.group_size
        if n % g:
            fix = max(g, n - n % g)
            raise ValueError(f"mixedae mixes groups of method.group_size={g} images, so the batch must be a multiple "
                             f"of {g}; got {n}. Set data.batch_size (per process) to a multiple of {g} (e.g. {fix}) "
                             f"or change method.group_size")

    def make_plan(self, images: torch.Tensor, progress: Progress | None = None,
                  generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None) -> MaskPlan:
        """The mixing plan for ``images (B, C, H, W)``: one partition of the ``L`` positions per group of
        G consecutive images (``noise (B/G, L)`` reproduces one). Sequence ``s = g*G + k`` is image
        ``s``, which owns part ``k`` of group ``g``'s permutation: ``ids_keep (B, n)`` its positions,
        ``mask (B, L)`` 1 where another member owns the position, ``source (B, L)`` the member owning
        each position (the same for the G images of a group), ``group_size = G``, ``num_views = 1``."""
        b = images.shape[0]
        self.check_batch_size(b)
        if self.group_size == 1:
            raise ValueError("method.group_size=1 mixes nothing: every patch would be visible and nothing is left "
                             "to reconstruct; use method.name=mae, or pass an explicit plan")
        groups = self.masking(b // self.group_size, self.encoder.num_patches, images.device,
                              generator=generator, noise=noise)
        return groups.replace(num_views=1, scores=groups.scores.repeat_interleave(self.group_size, 0))

    # -- the steps of the module docstring ------------------------------------------------------------
    def _topk_active(self, homologous: bool) -> bool:
        return homologous and self.options.homologous_attention and self.topk_k < 1 + self.encoder.num_patches

    def encode(self, tokens: torch.Tensor, plan: MaskPlan, homologous: bool):
        """Mix, encode, and return ``(z (B/G, 1+G*n, D) after the final norm, valid (B/G, G*n) | None,
        member (G*n,), recognition accuracy | None)``."""
        g = self.group_size
        visible = gather_tokens(tokens, plan.ids_keep)  # (B, n, D): each image's own positions
        if self.segment_embedding is not None and self.options.segment_embed == "encoder":
            slot = torch.arange(visible.shape[0], device=visible.device) % g
            visible = visible + self.segment_embedding[slot][:, None].to(visible.dtype)
        x, valid, member = mix(visible, g, plan.keep_valid)
        enc = self.encoder
        topk = self.topk_k if self._topk_active(homologous) else None
        accs: list[torch.Tensor] = []
        callback = None
        if topk is not None and self.training and self.options.log_recognition:
            def callback(i, attn):
                accs.append(recognition_accuracy(attn.detach(), member, valid))
        out = enc.run_blocks(enc.with_cls(x), valid=valid, topk=topk,
                             topk_blocks=self.options.topk_blocks, attn_callback=callback)
        acc = torch.stack(accs).mean() if accs else None
        return enc.norm(out.x), valid, member, acc

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """Unmix ``z (B/G, 1+G*n, D)`` -> ``(B, 1+n, D)``: the group's cls latent, then each image's own
        tokens in its permutation order (MAE's encoder-output layout)."""
        g = self.group_size
        patches = unmix(z[:, 1:], g)
        cls = z[:, :1].repeat_interleave(g, dim=0)
        if not self.options.decoder_cls:
            cls = torch.zeros_like(cls)
        if self.segment_embedding is not None and self.options.segment_embed == "decoder":
            slot = torch.arange(patches.shape[0], device=z.device) % g
            patches = patches + self.segment_embedding[slot][:, None].to(patches.dtype)
        return torch.cat([cls, patches], dim=1)

    def forward(self, images: torch.Tensor, progress: Progress | None = None, *, plan: MaskPlan | None = None,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                homologous: bool | None = None) -> StepOutput:
        """``images (B, C, H, W)`` -> :class:`StepOutput` with ``pred (B, L, P)``, ``target (B, L, P)``.

        ``homologous``: run TopK attention (default: in training only, the paper's rule; the pictures
        pass ``True`` to show the pretext task as trained)."""
        o = self.options
        b = images.shape[0]
        self.check_batch_size(b)
        tokens = self.encoder.patch_tokens(images)
        if plan is None:
            plan = self.make_plan(images, progress, generator, noise=noise)
        elif plan.group_size != self.group_size or plan.num_seqs != b or plan.num_views != 1:
            raise ValueError(f"plan has group_size {plan.group_size}, {plan.num_seqs} sequences and {plan.num_views} "
                             f"views; mixedae needs group_size {self.group_size}, one sequence per image ({b})")
        homologous = self.training if homologous is None else homologous
        z, valid, member, acc = self.encode(tokens, plan, homologous)

        metrics: dict[str, torch.Tensor] = {}
        loss = None
        if self.group_size > 1:
            feats = self.projector(z[:, 1:])
            with torch.set_grad_enabled(torch.is_grad_enabled() and o.contrastive_weight > 0):
                con_sum, con_mean = homologous_contrastive_sum_mean(feats, member, valid, o.temperature)
            con = con_sum if o.contrastive_reduction == "sum" else con_mean
            metrics["loss_contrastive"] = con.detach()
            metrics["loss_contrastive_mean"] = con_mean.detach()
            if o.contrastive_weight > 0:
                loss = o.contrastive_weight * con

        latent = self.decoder_input(z)
        with torch.set_grad_enabled(torch.is_grad_enabled() and o.pixel_weight > 0):
            src = latent if o.pixel_weight > 0 else latent.detach()
            pred = self.decoder(src, plan.ids_restore, plan.keep_valid)
            target = self.target(images)
            pix = masked_mse(pred, target, plan.mask)
        metrics["loss_pixel"] = pix.detach()
        if o.pixel_weight > 0:
            loss = o.pixel_weight * pix if loss is None else loss + o.pixel_weight * pix
        if acc is not None:
            metrics["recognition_acc"] = acc
        return StepOutput(loss, metrics, pred=pred, target=target, plan=plan)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, plan: MaskPlan) -> Reconstruction:
        """Each image decoded from its own tokens of the mixed sequence (per-image decoding), with the
        encoder's TopK attention on as in training."""
        out = self(images, plan=plan, homologous=True)
        return Reconstruction(out.pred.float(), plan.mask.float(), self.options.norm_target, plan)

    @torch.no_grad()
    def picture_data(self, kind: str, images: torch.Tensor,
                     generator: torch.Generator | None = None) -> PictureData:
        """``mixing``: the first group of ``images`` (``B >= G``) mixed by :meth:`make_plan` with
        ``generator``, the mixed input in pixel space, the owner of each position and each image's
        reconstruction (:meth:`reconstruct`); the rest as the base class."""
        if kind != "mixing":
            return super().picture_data(kind, images, generator)
        g = self.group_size
        if images.shape[0] < g:
            raise ValueError(f"the mixing picture needs at least {g} images (one group of method.group_size), "
                             f"got {images.shape[0]}")
        x = images[:g]
        plan = self.make_plan(x, None, generator)
        rec = self.reconstruct(x, plan)
        mixed = mixed_images(x, plan.source, self.encoder.patch_size, g)
        return PictureData(x, plan, reconstruction=rec, maps={"mixed": mixed, "owner": plan.source})
