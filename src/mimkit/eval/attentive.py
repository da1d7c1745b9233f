"""Attentive probe, exactly as CAE defines it (CAE ``modeling_finetune.py``,
``run_attentive.py``).

Input: all output tokens ``X (B, 1+N, D)`` of the frozen encoder (eval mode, after the final LN).
Trainable: a query ``q (1, 1, D)`` initialised to 0, one attentive block, the BatchNorm statistics and
the linear head::

    Q = LN_q(q) W_q + b_q        K = LN_k(X) W_k   (no key bias)        V = LN_v(X) W_v + b_v
    per head h:  A_h = softmax(Q_h K_hᵀ / √d_h)      O = concat_h(A_h V_h) W_o + b_o
    logits = Linear(BatchNorm1d(O, affine=False))

There is **no residual connection and no MLP** after the cross-attention; no positional terms are
added. The BatchNorm uses batch statistics in training even though the backbone is frozen in eval mode.
Optimiser: SGD with Nesterov momentum 0.9, wd 0, 90 epochs, 10 warm-up, cosine to 1e-6. CAE uses lr 0.4
at batch 8192 (256 x 32 GPUs; = 0.0125 per 256): the ``cae`` preset of :data:`ATTENTIVE_PRESETS`. On a
small data set that batch leaves one step per epoch and a tiny lr (Fashion-MNIST, 2k train images: the
probe then scores below the linear probe), so the default (``small``) takes a batch of
``min(256, N // 8)`` (at least 8 steps per epoch) and lr 0.1 at batch 256 (8x CAE's per-256 rate),
scaled linearly below it. Measured on Fashion-MNIST (2k train / 2k test images, 90 epochs, 2026-11-27;
logistic linear probe on the cls token for reference): a 1-epoch MAE encoder 61.6 (``cae`` preset) /
74.9 (lr 0.0125 at 256) / 76.9 (0.1) / 77.8 (0.4), linear 76.8; a 1-epoch CAE encoder 63.1 / — /
79.1 (0.1) / 64.6 (0.4: unstable), linear 78.9. 0.1 is the value that beats the linear probe on both.
CAE's rule is an *absolute* lr (0.4 whatever the batch); ``AttentiveProbeConfig(lr=0.4)`` reproduces
it at any batch, ``base_lr`` scales linearly with the batch instead.

Scale: :func:`train_attentive_probe` reads one batch at a time from whatever indexable cache it gets
(an in-memory float16 tensor for small sets, a memory-mapped file for large ones:
:meth:`mimkit.eval.protocols.EvalContext.features`) and trains under bf16 autocast on a GPU. Under a
16-bit autocast an in-memory cache is normalised once into a copy of that dtype (the same inputs to the
probe's matmuls as normalising every batch, without redoing it every epoch); a memory-mapped cache is
normalised batch by batch, so its tokens are never all in RAM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.eval.diagnostics import per_class_accuracy
from mimkit.eval.optim import scaled_lr, set_lr, warmup_cosine


class AttentiveCrossAttention(nn.Module):
    """CAE's cross-attention: separate ``q``/``k``/``v`` Linear maps without bias, learned ``q_bias`` and
    ``v_bias`` (no key bias), output projection ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
                v_affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``q (B, Nq, D)``, ``k``/``v (B, Nk, D)`` -> ``(B, Nq, D)``.

        Computed on the query side, exactly (up to rounding): ``q_h · (W_k k_j)_h = (W_k,hᵀ q_h) · k_j``
        and ``Σ_j a_hj (W_v v_j + b_v)_h = W_v,h (Σ_j a_hj v_j) + b_v,h`` (the weights sum to 1). With one
        query and ``Nk`` tokens this costs ``O(H·Nk·D)`` per image instead of projecting every token
        (``O(Nk·D²)``), which is what makes 90 probe epochs affordable on a CPU. ``k_scale (D,)`` and
        ``v_affine = (γ, β)`` fold a LayerNorm's affine into the same computation when ``k``/``v`` are
        the normalized tokens without it (:class:`AttentiveBlock`)."""
        b, nq, d = q.shape
        h, hd = self.num_heads, self.head_dim
        qh = F.linear(q, self.q.weight, self.q_bias).reshape(b, nq, h, hd)
        u = torch.einsum("bqhe,hed->bhqd", qh, self.k.weight.reshape(h, hd, d)) * self.scale  # (B, H, Nq, D)
        if k_scale is not None:
            u = u * k_scale
        attn = torch.einsum("bhqd,bkd->bhqk", u, k).softmax(-1)  # (B, H, Nq, Nk)
        pooled = torch.einsum("bhqk,bkd->bhqd", attn, v)  # (B, H, Nq, D)
        if v_affine is not None:
            pooled = pooled * v_affine[0] + v_affine[1]
        out = torch.einsum("bhqd,hed->bqhe", pooled, self.v.weight.reshape(h, hd, d)) + self.v_bias.reshape(h, hd)
        return self.proj(out.reshape(b, nq, d))


class AttentiveBlock(nn.Module):
    """``cross_attn(LN_q(q), LN_k(x), LN_v(x))`` — no residual, no MLP."""

    def __init__(self, dim: int, num_heads: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_k = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_v = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = AttentiveCrossAttention(dim, num_heads)

    def forward(self, q: torch.Tensor, x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """Equal to ``cross_attn(LN_q(q), LN_k(x), LN_v(x))``: the tokens are normalized once (no
        affine; ``normalized=True``: ``x`` already is, see :meth:`normalize`) and the two affines folded in
        (``LN_k``'s bias adds the same amount to every logit of a query, so it drops out of the softmax)."""
        xn = x if normalized else self.normalize(x)
        return self.cross_attn(self.norm_q(q), xn, xn, k_scale=self.norm_k.weight,
                               v_affine=(self.norm_v.weight, self.norm_v.bias))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens' LayerNorm without affine (``LN_k`` and ``LN_v`` share eps 1e-6)."""
        return F.layer_norm(x, x.shape[-1:], eps=self.norm_k.eps)


class AttentiveProbe(nn.Module):
    """Query token + :class:`AttentiveBlock` + ``BatchNorm1d(affine=False)`` + ``Linear``.

    ``forward(tokens (B, 1+N, D)) -> logits (B, C)``.
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = AttentiveBlock(dim, num_heads)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        for m in self.block.modules():  # CAE's _init_weights: trunc-normal 0.02 Linear, zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def pooled(self, tokens: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """``(B, 1+N, D)`` -> the attended feature ``(B, D)`` (before BatchNorm); ``normalized``: the
        tokens went through :meth:`AttentiveBlock.normalize` already (done once for cached features)."""
        return self.block(self.query.expand(tokens.shape[0], -1, -1), tokens, normalized)[:, 0]

    def forward(self, tokens: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        return self.head(self.bn(self.pooled(tokens, normalized)))


@dataclass
class AttentiveProbeConfig:
    """Small-data defaults (module docstring): SGD nesterov 0.9, lr ``base_lr x batch / 256`` with
    ``base_lr`` 0.1, batch ``min(256, N // 8)`` when ``batch_size`` is ``None``, wd 0, 90 epochs,
    10 warm-up, cosine to 1e-6. ``lr`` sets the absolute lr."""

    epochs: int = 90
    batch_size: int | None = None
    base_lr: float = 0.1
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0


ATTENTIVE_PRESETS: dict[str, AttentiveProbeConfig] = {
    "small": AttentiveProbeConfig(),
    # CAE's published recipe (tools/run_attentive.py): lr 0.4 at batch 8192 = 256 x 32 GPUs
    "cae": AttentiveProbeConfig(batch_size=8192, base_lr=0.0125),
}


def attentive_batch_size(cfg: AttentiveProbeConfig, num_samples: int) -> int:
    """``cfg.batch_size`` (at most ``N``), or ``min(256, N // 8)`` (at least 2: BatchNorm) when unset."""
    if cfg.batch_size is not None:
        return max(1, min(cfg.batch_size, num_samples))
    return max(2, min(256, num_samples // 8))


def normalized_copy(block: AttentiveBlock, tokens: torch.Tensor, device: str | torch.device, dtype: torch.dtype,
                    chunk: int = 1024) -> torch.Tensor:
    """``block.normalize`` of every token of ``tokens (N, T, D)``, computed in float32 on ``device`` a
    chunk of images at a time and stored as ``dtype`` on ``device`` (a new tensor; the cache is not
    touched). Per token, so equal to normalising any batch of the same images."""
    out = torch.empty(tokens.shape, dtype=dtype, device=device)
    for i in range(0, len(tokens), chunk):
        out[i : i + chunk] = block.normalize(tokens[i : i + chunk].to(device, torch.float32))
    return out


def train_attentive_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    test_tokens: torch.Tensor,
    test_labels: torch.Tensor,
    num_heads: int,
    cfg: AttentiveProbeConfig | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | str | None = "auto",
    show_progress: bool = False,
    normalize_once: bool | None = None,
) -> dict:
    """Train an :class:`AttentiveProbe` on cached all-token features ``(N, P+L, D)`` (any float dtype;
    a float16 or memory-mapped cache: only one batch at a time is read) and test it. Returns
    ``{"top1", "per_class", "lr", "batch_size", "steps", "config", "history", "model"}``.

    ``normalize_once``: normalise each cache once into a copy of the autocast dtype on ``device``
    (:func:`normalized_copy`) instead of every batch of every epoch. ``None`` = when the autocast dtype
    is bfloat16 or float16: the probe's matmuls then see bitwise the inputs of the per-batch path (which
    casts the same float32 LayerNorm to that dtype), so results are unchanged and CPU training is
    1.26x (1 thread) to 1.35x (2 threads) faster, the copy included (Fashion-MNIST zoo shapes, 10
    epochs: ``benchmarks/attentive_speed.py``, BENCHMARKS.md). Never by default in float32 (the copy would
    be twice a float16 cache); pass ``False`` for a memory-mapped cache too large to hold in memory."""
    from mimkit.eval.features import default_autocast, progress

    cfg = cfg or AttentiveProbeConfig()
    device = torch.device(device)
    if autocast_dtype == "auto":
        autocast_dtype = default_autocast(device)
    amp = dict(device_type=device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = AttentiveProbe(train_tokens.shape[-1], num_heads, num_classes).to(device)

    if normalize_once is None:
        normalize_once = autocast_dtype in (torch.bfloat16, torch.float16)
    if normalize_once:
        store = autocast_dtype if autocast_dtype in (torch.bfloat16, torch.float16) else torch.float32
        train_tokens, test_tokens = (normalized_copy(model.block, t, device, store) for t in (train_tokens, test_tokens))

    def batch(tokens, idx):  # one batch from the cache, normalised (LayerNorm without affine) on the device
        if normalize_once:
            return tokens[idx]
        return model.block.normalize(tokens[idx].to(device, torch.float32))

    bs = attentive_batch_size(cfg, len(train_tokens))
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, bs)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    iters = max(len(train_tokens) // bs, 1)
    history = []
    for epoch in progress(range(cfg.epochs), cfg.epochs, "attentive probe", enabled=None if show_progress else False,
                          unit="epoch"):
        perm = torch.randperm(len(train_tokens), generator=gen)
        total = 0.0
        for it in range(iters):
            set_lr(opt, warmup_cosine(epoch + it / iters, lr, cfg.epochs, cfg.warmup_epochs, cfg.min_lr))
            idx = perm[it * bs : (it + 1) * bs].sort().values  # sorted: sequential reads from a memory map
            with torch.autocast(**amp):
                logits = model(batch(train_tokens, idx), normalized=True)
            loss = F.cross_entropy(logits.float(), train_labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        history.append(total / iters)
    model.eval()
    with torch.no_grad(), torch.autocast(**amp):
        pred = torch.cat([
            model(batch(test_tokens, slice(i, i + 1024)), normalized=True).argmax(1).cpu()
            for i in range(0, len(test_tokens), 1024)
        ])
    return {
        "top1": 100.0 * (pred == test_labels).float().mean().item(),
        "per_class": per_class_accuracy(pred, test_labels, num_classes),
        "lr": lr,
        "batch_size": bs,
        "steps": iters * cfg.epochs,
        "config": asdict(cfg),
        "history": history,
        "model": model,
    }
