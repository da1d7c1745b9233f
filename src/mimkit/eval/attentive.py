"""Attentive probe, exactly as CAE defines it (methods_a §5.3; CAE ``modeling_finetune.py``,
``run_attentive.py``).

Input: all output tokens ``X (B, 1+N, D)`` of the frozen encoder (eval mode, after the final LN).
Trainable: a query ``q (1, 1, D)`` initialised to 0, one attentive block, the BatchNorm statistics and
the linear head::

    Q = LN_q(q) W_q + b_q        K = LN_k(X) W_k   (no key bias)        V = LN_v(X) W_v + b_v
    per head h:  A_h = softmax(Q_h K_hᵀ / √d_h)      O = concat_h(A_h V_h) W_o + b_o
    logits = Linear(BatchNorm1d(O, affine=False))

There is **no residual connection and no MLP** after the cross-attention; no positional terms are
added. The BatchNorm uses batch statistics in training even though the backbone is frozen in eval mode.
Optimiser: SGD with Nesterov momentum 0.9, wd 0; CAE uses lr 0.4 at batch 8192 (= base lr 0.0125 per
256), 90 epochs, 10 warm-up, cosine to 1e-6.
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q (B, Nq, D)``, ``k``/``v (B, Nk, D)`` -> ``(B, Nq, D)``."""
        b, nq, d = q.shape
        nk = k.shape[1]
        qh = F.linear(q, self.q.weight, self.q_bias).reshape(b, nq, self.num_heads, self.head_dim).transpose(1, 2)
        kh = F.linear(k, self.k.weight).reshape(b, nk, self.num_heads, self.head_dim).transpose(1, 2)
        vh = F.linear(v, self.v.weight, self.v_bias).reshape(b, nk, self.num_heads, self.head_dim).transpose(1, 2)
        attn = ((qh * self.scale) @ kh.transpose(-2, -1)).softmax(-1)  # (B, H, Nq, Nk)
        out = (attn @ vh).transpose(1, 2).reshape(b, nq, d)
        return self.proj(out)


class AttentiveBlock(nn.Module):
    """``cross_attn(LN_q(q), LN_k(x), LN_v(x))`` — no residual, no MLP."""

    def __init__(self, dim: int, num_heads: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_k = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_v = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = AttentiveCrossAttention(dim, num_heads)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.cross_attn(self.norm_q(q), self.norm_k(x), self.norm_v(x))


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

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, 1+N, D)`` -> the attended feature ``(B, D)`` (before BatchNorm)."""
        return self.block(self.query.expand(tokens.shape[0], -1, -1), tokens)[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.pooled(tokens)))


@dataclass
class AttentiveProbeConfig:
    """CAE's recipe with a small-data batch: SGD nesterov 0.9, base lr 0.0125 (0.4 @ 8192), wd 0,
    90 epochs, 10 warm-up, cosine to 1e-6."""

    epochs: int = 90
    batch_size: int = 1024
    base_lr: float = 0.0125
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0


def train_attentive_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    test_tokens: torch.Tensor,
    test_labels: torch.Tensor,
    num_heads: int,
    cfg: AttentiveProbeConfig | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train an :class:`AttentiveProbe` on cached all-token features ``(N, 1+L, D)`` (any float dtype;
    float16 caching halves memory) and test it. Returns ``{"top1", "per_class", "lr", "config",
    "history", "model"}``."""
    cfg = cfg or AttentiveProbeConfig()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = AttentiveProbe(train_tokens.shape[-1], num_heads, num_classes).to(device)
    bs = min(cfg.batch_size, len(train_tokens))
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, bs)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    iters = max(len(train_tokens) // bs, 1)
    history = []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(train_tokens), generator=gen)
        total = 0.0
        for it in range(iters):
            set_lr(opt, warmup_cosine(epoch + it / iters, lr, cfg.epochs, cfg.warmup_epochs, cfg.min_lr))
            idx = perm[it * bs : (it + 1) * bs]
            logits = model(train_tokens[idx].to(device, torch.float32))
            loss = F.cross_entropy(logits, train_labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        history.append(total / iters)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([
            model(test_tokens[i : i + 1024].to(device, torch.float32)).argmax(1).cpu()
            for i in range(0, len(test_tokens), 1024)
        ])
    return {
        "top1": 100.0 * (pred == test_labels).float().mean().item(),
        "per_class": per_class_accuracy(pred, test_labels, num_classes),
        "lr": lr,
        "config": asdict(cfg),
        "history": history,
        "model": model,
    }
