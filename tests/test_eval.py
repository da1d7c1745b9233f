"""Evaluation protocols: exact values where they can be computed, orderings where they cannot, and the
CLI end to end on a tiny checkpoint and a small synthetic image folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimkit.eval.attentive import AttentiveProbe, AttentiveProbeConfig, train_attentive_probe
from mimkit.eval.diagnostics import effective_rank, patch_similarity, per_class_accuracy, spectrum_summary
from mimkit.eval.features import extract_features
from mimkit.eval.fewshot import fewshot_logreg
from mimkit.eval.finetune import (
    FinetuneConfig,
    FinetuneModel,
    finetune,
    finetune_preset,
    layer_id,
    make_mixup,
    param_groups_lrd,
)
from mimkit.eval.knn import knn_accuracy, loo_1nn_accuracy
from mimkit.eval.linear import LinearProbe, LinearProbeConfig, linear_probe_augmented, train_linear_probe
from mimkit.eval.optim import LARS, warmup_cosine
from mimkit.nn import ViTConfig, ViTEncoder

TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)


def tiny_encoder(seed: int = 0, **kw) -> ViTEncoder:
    torch.manual_seed(seed)
    return ViTEncoder(ViTConfig(**{**TINY, **kw})).eval()


def blobs(n_per_class=60, classes=3, dim=8, sep=6.0, seed=0):
    """Well separated Gaussian blobs: ``(N, dim)`` features and labels."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * sep
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    return x, y


def stripe_images(n_per_class=16, classes=3, seed=0, size=28):
    """uint8 ``(N, 1, size, size)``: noise plus a bright vertical band whose position is the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randint(0, 60, (len(y), 1, size, size), generator=g)
    w = size // classes
    for c in range(classes):
        x[y == c, :, :, c * w : (c + 1) * w] += 180
    return x.to(torch.uint8), y


# -- optimisation ---------------------------------------------------------------------------------
def test_lars_matches_hand_computed_steps():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))  # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    gw = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    gb = torch.tensor([0.5, 0.25])
    # step 1 by hand: d = g + 0.1 w = [[1.3, 0.4], [0, 2]]; ‖d‖ = sqrt(1.69 + .16 + 4) = sqrt(5.85)
    d = torch.tensor([[1.3, 0.4], [0.0, 2.0]])
    q = 0.001 * 5.0 / math.sqrt(5.85)
    mu_w = q * d
    w1 = torch.tensor([[3.0, 4.0], [0.0, 0.0]]) - 0.5 * mu_w
    mu_b = gb.clone()  # 1-D: no weight decay, no trust ratio
    b1 = torch.tensor([1.0, -1.0]) - 0.5 * mu_b
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), w1, rtol=0, atol=1e-7)
    torch.testing.assert_close(b.detach(), b1, rtol=0, atol=1e-7)
    # step 2: momentum accumulates the new (trust-scaled) direction
    d2 = gw + 0.1 * w1
    q2 = 0.001 * w1.norm() / d2.norm()
    w2 = w1 - 0.5 * (0.9 * mu_w + q2 * d2)
    b2 = b1 - 0.5 * (0.9 * mu_b + gb)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), w2, rtol=0, atol=1e-7)
    torch.testing.assert_close(b.detach(), b2, rtol=0, atol=1e-7)


def test_lars_zero_weight_uses_unit_ratio():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=1.0, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), -torch.ones(2, 2))


def test_warmup_cosine_schedule():
    assert warmup_cosine(0.0, 1.0, 10, 2) == 0.0
    assert warmup_cosine(1.0, 1.0, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(2.0, 1.0, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(6.0, 1.0, 10, 2, min_lr=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(10.0, 1.0, 10, 2, min_lr=0.1) == pytest.approx(0.1)


# -- linear probe ---------------------------------------------------------------------------------
def test_linear_probe_structure():
    probe = LinearProbe(8, 3)
    assert not probe.bn.affine and probe.bn.eps == 1e-6
    assert [n for n, _ in probe.named_parameters()] == ["head.weight", "head.bias"]
    assert probe.head.weight.std() < 0.03 and probe.head.bias.abs().sum() == 0


@pytest.mark.parametrize("optimizer,lr", [("sgd", None), ("lars", 10.0)])
def test_linear_probe_separable_features(optimizer, lr):
    xtr, ytr = blobs(seed=0)
    xte, yte = blobs(seed=0, n_per_class=20)  # same centres (seeded), fresh noise below
    xte = xte + 0.3 * torch.randn_like(xte)
    cfg = LinearProbeConfig(epochs=30, batch_size=32, warmup_epochs=3, optimizer=optimizer, lr=lr, base_lr=0.5)
    res = train_linear_probe(xtr, ytr, xte, yte, cfg)
    assert res["top1"] >= 98.0
    assert len(res["per_class"]) == 3 and min(res["per_class"]) >= 95.0
    assert res["history"][-1] < res["history"][0]
    # shuffled labels carry no information: near chance on the test set
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(1))
    bad = train_linear_probe(xtr, ytr[perm], xte, yte, cfg)
    assert bad["top1"] < res["top1"] - 30


def test_linear_probe_augmented_runs_and_freezes_encoder():
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x, y = stripe_images(8)
    xt, yt = stripe_images(4, seed=1)
    cfg = LinearProbeConfig(epochs=2, batch_size=8, warmup_epochs=1, optimizer="sgd", lr=0.5, crop_scale=(0.5, 1.0))
    res = linear_probe_augmented(enc, x, y, xt, yt, cfg, pool="mean")
    assert len(res["history"]) == 2
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k])
    # testing: un-augmented mean-pooled features (inputs scaled by the default mean/std 0.5), the BN set to
    # the exact mean / unbiased variance of the un-augmented *train* features, then the head
    with torch.no_grad():
        feats, test_feats = (enc.forward_features((v.float() / 255 - 0.5) / 0.5)[:, 1:].mean(1) for v in (x, xt))
        bn, head = res["model"].bn, res["model"].head
        torch.testing.assert_close(bn.running_mean, feats.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, feats.var(0), rtol=1e-4, atol=1e-5)
        logits = (test_feats - feats.mean(0)) / (feats.var(0) + 1e-6).sqrt() @ head.weight.T + head.bias
    pred = logits.argmax(1)
    assert len(set(pred.tolist())) > 1  # not a constant prediction, so the values below can be wrong
    assert res["top1"] == pytest.approx(100.0 * float((pred == yt).float().mean()))
    assert res["per_class"] == pytest.approx([100.0 * float((pred[yt == c] == c).float().mean()) for c in range(3)])


# -- attentive probe ------------------------------------------------------------------------------
def test_attentive_probe_equals_hand_formula():
    torch.manual_seed(0)
    dim, heads, b, n = 4, 2, 2, 3
    probe = AttentiveProbe(dim, heads, num_classes=5)
    with torch.no_grad():  # non-trivial values everywhere
        for p in probe.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(b, n, dim)
    blk, ca = probe.block, probe.block.cross_attn
    ln = lambda t, m: F.layer_norm(t, (dim,), m.weight, m.bias, 1e-6)  # noqa: E731
    q = ln(probe.query.expand(b, -1, -1), blk.norm_q) @ ca.q.weight.T + ca.q_bias  # (B, 1, D)
    k = ln(x, blk.norm_k) @ ca.k.weight.T  # no key bias
    v = ln(x, blk.norm_v) @ ca.v.weight.T + ca.v_bias
    hd = dim // heads
    outs = []
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(hd), dim=-1)  # (B, 1, n)
        outs.append(a @ v[..., s])
    expected = (torch.cat(outs, -1) @ ca.proj.weight.T + ca.proj.bias)[:, 0]  # no residual, no MLP
    torch.testing.assert_close(probe.pooled(x), expected, rtol=1e-5, atol=1e-5)
    probe.eval()
    logits = probe(x)
    bn = probe.bn
    manual = (expected - bn.running_mean) / torch.sqrt(bn.running_var + 1e-6) @ probe.head.weight.T + probe.head.bias
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)


def test_attentive_probe_parameters_and_gradients():
    probe = AttentiveProbe(32, 2, 3)
    assert torch.count_nonzero(probe.query) == 0
    names = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert "query" in names and "block.cross_attn.q_bias" in names and "block.cross_attn.v_bias" in names
    assert probe.block.cross_attn.k.bias is None and probe.block.cross_attn.q.bias is None
    assert not any(n.startswith("bn") for n in names) and not probe.bn.affine
    assert not any("mlp" in n for n in names)
    enc = tiny_encoder()
    x, y = stripe_images(6)
    tokens = extract_features(enc, x, pool="all", mean=(0.2,), std=(0.3,))
    assert tokens.shape == (18, 1 + 49, 32) and not tokens.requires_grad
    loss = F.cross_entropy(probe(tokens), y)
    loss.backward()
    for n, p in probe.named_parameters():
        if n == "block.norm_k.bias":  # adds the same amount to every logit of the query: no gradient
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert all(p.grad is None for p in enc.parameters())
    res = train_attentive_probe(tokens, y, tokens, y, enc.num_heads,
                                AttentiveProbeConfig(epochs=3, batch_size=9, warmup_epochs=1, base_lr=0.5))
    assert (res["batch_size"], res["steps"], len(res["history"])) == (9, 6, 3)
    # the reported accuracies are those of the returned probe in eval mode (BN running statistics)
    probe = res["model"].eval()
    with torch.no_grad():
        pred = probe(tokens).argmax(1)
    assert len(set(pred.tolist())) > 1  # not a constant prediction, so the values below can be wrong
    assert res["top1"] == pytest.approx(100.0 * float((pred == y).float().mean()))
    assert res["per_class"] == pytest.approx([100.0 * float((pred[y == c] == c).float().mean()) for c in range(3)])


def test_attentive_probe_small_data_defaults():
    """Batch min(256, N/8) and lr 0.1 at 256 (scaled); the "cae" preset keeps CAE's published 0.4 at
    batch 8192."""
    from mimkit.eval.attentive import ATTENTIVE_PRESETS, attentive_batch_size

    cfg = AttentiveProbeConfig()
    assert attentive_batch_size(cfg, 2000) == 250 and attentive_batch_size(cfg, 60000) == 256
    assert attentive_batch_size(cfg, 10) == 2
    cae = ATTENTIVE_PRESETS["cae"]
    assert attentive_batch_size(cae, 100000) == 8192 and cae.base_lr * 8192 / 256 == pytest.approx(0.4)
    torch.manual_seed(0)
    y = torch.randint(0, 3, (1024,))
    x = torch.randn(1024, 1 + 9, 8)
    x[torch.arange(1024), torch.randint(1, 10, (1024,))] += 2 * torch.randn(3, 8)[y]  # one token holds the class
    res = train_attentive_probe(x, y, x, y, num_heads=2, cfg=AttentiveProbeConfig(epochs=20, warmup_epochs=2))
    assert res["batch_size"] == 128 and res["steps"] == 160 and res["lr"] == pytest.approx(0.1 * 128 / 256)
    assert res["top1"] > 85


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_attentive_probe_normalized_once_is_bitwise_the_per_batch_probe(amp):
    """Under a 16-bit autocast the cache is normalised once into a copy of that dtype: every epoch's
    loss, every weight and the test accuracy are bitwise those of normalising each batch in float32,
    the cache itself is left as it was, and that path is the default for 16-bit autocast only."""
    from mimkit.eval import attentive

    torch.manual_seed(0)
    y = torch.randint(0, 3, (300,))
    x = torch.randn(300, 1 + 9, 16) * 3 + 1  # far from normalised: a skipped or doubled LayerNorm shows
    x[torch.arange(300), torch.randint(1, 10, (300,))] += 4 * torch.randn(3, 16)[y]
    x = x.half()
    before = x.clone()
    cfg = AttentiveProbeConfig(epochs=10, warmup_epochs=1, batch_size=32, base_lr=1.0)
    per_batch, once = (train_attentive_probe(x[:200], y[:200], x[200:], y[200:], num_heads=2, cfg=cfg,
                                             autocast_dtype=amp, normalize_once=flag) for flag in (False, True))
    assert per_batch["top1"] > 60 and per_batch["history"][-1] < per_batch["history"][0]  # it learns
    assert once["history"] == per_batch["history"] and once["top1"] == per_batch["top1"]
    for (name, a), b in zip(per_batch["model"].state_dict().items(), once["model"].state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(x, before)
    copy = attentive.normalized_copy(once["model"].block, x, "cpu", amp, chunk=7)  # chunks of any size
    assert copy.dtype == amp and torch.equal(copy, F.layer_norm(x.float(), (16,), eps=1e-6).to(amp))

    fp32_per_batch = train_attentive_probe(x[:200], y[:200], x[200:], y[200:], num_heads=2, cfg=cfg,
                                           autocast_dtype=None, normalize_once=False)
    calls = []
    real = attentive.normalized_copy
    try:
        attentive.normalized_copy = lambda *a, **k: calls.append(a[3]) or real(*a, **k)
        for dtype, expect in ((amp, once), (None, fp32_per_batch)):
            default = train_attentive_probe(x[:200], y[:200], x[200:], y[200:], num_heads=2, cfg=cfg,
                                            autocast_dtype=dtype)
            assert default["history"] == expect["history"] and default["top1"] == expect["top1"]
    finally:
        attentive.normalized_copy = real
    assert calls == [amp, amp]  # train and test caches under the 16-bit autocast, none in float32
    assert fp32_per_batch["history"] != once["history"]  # the two precisions differ: the checks above can fail


def test_attentive_block_folds_layernorm_affines_exactly():
    torch.manual_seed(0)
    probe = AttentiveProbe(8, 2, num_classes=3)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn_like(p))
    x, q = torch.randn(4, 6, 8), torch.randn(4, 1, 8)
    blk = probe.block
    plain = blk.cross_attn.__class__.forward(blk.cross_attn, blk.norm_q(q), blk.norm_k(x), blk.norm_v(x))
    torch.testing.assert_close(blk(q, x), plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blk(q, blk.normalize(x), normalized=True), plain, rtol=1e-5, atol=1e-5)


# -- fine-tuning ----------------------------------------------------------------------------------
def test_layer_decay_scales_depth2():
    model = FinetuneModel(tiny_encoder(), num_classes=3)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    # n = depth + 1 = 3 : id 0 -> 0.5^3, block 0 -> 0.5^2, block 1 -> 0.5, rest -> 1
    assert scale["encoder.cls_token"] == scale["encoder.pos_embed"] == scale["encoder.patch_embed.proj.weight"] == 0.125
    assert scale["encoder.blocks.0.attn.qkv.weight"] == 0.25 and scale["encoder.blocks.0.norm1.bias"] == 0.25
    assert scale["encoder.blocks.1.mlp.fc2.weight"] == 0.5
    assert scale["fc_norm.weight"] == scale["head.weight"] == 1.0
    assert layer_id("blocks.1.attn.proj.weight", 3) == 2 and layer_id("norm.weight", 3) == 3
    assert not any(n.startswith("encoder.norm") for n in scale)  # the final norm is replaced by fc_norm
    assert wd["encoder.pos_embed"] == wd["encoder.cls_token"] == wd["encoder.blocks.0.attn.qkv.bias"] == 0.0
    assert wd["fc_norm.weight"] == 0.0 and wd["head.bias"] == 0.0
    assert wd["encoder.patch_embed.proj.weight"] == wd["head.weight"] == wd["encoder.blocks.1.mlp.fc1.weight"] == 0.05
    assert model.encoder.pos_embed.requires_grad and model.head.weight.std() < 1e-4
    total = sum(len(g["params"]) for g in groups)
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_finetune_drop_path_and_pooling():
    enc = tiny_encoder()
    model = FinetuneModel(enc, num_classes=3, drop_path=0.2)
    rates = [m.rate for m in model.encoder.modules() if type(m).__name__ == "DropPath"]
    assert rates == pytest.approx([0.0, 0.0, 0.2, 0.2])
    assert all(m.rate == 0.0 for m in enc.modules() if type(m).__name__ == "DropPath")  # original untouched
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    tokens = model.encoder.forward_features(x, norm=False)
    torch.testing.assert_close(model(x), model.head(model.fc_norm(tokens[:, 1:].mean(1))))


def test_finetune_uses_timm_mixup_with_smoothed_targets():
    mix = make_mixup(FinetuneConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), num_classes=10)
    from timm.data import Mixup

    assert isinstance(mix, Mixup) and mix.mode == "batch" and mix.label_smoothing == 0.1
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    xm, t = mix(x.clone(), y)
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    lam = t[0, 0].item() - 0.01 + t[0, 5].item() - 0.01  # smoothed: 0.01 off-target mass per class
    assert t[0, 0] > 0.01 and lam == pytest.approx(0.9, abs=1e-5)
    assert make_mixup(FinetuneConfig(mixup=0.0, cutmix=0.0), 10) is None


def test_finetune_learns_stripes():
    x, y = stripe_images(16, seed=0)
    xt, yt = stripe_images(8, seed=1)
    cfg = finetune_preset("quick", epochs=8, batch_size=12, warmup_epochs=1, base_lr=2e-3, drop_path=0.1,
                          crop_scale=(0.8, 1.0), flip=False, eval_every=4)  # flips would swap the classes
    enc = tiny_encoder()
    before = enc.patch_embed.proj.weight.clone()
    res = finetune(enc, x, y, xt, yt, cfg, mean=(0.3,), std=(0.3,))
    assert res["top1"] >= 90.0
    assert torch.equal(enc.patch_embed.proj.weight, before)  # works on a copy
    assert "top1" in res["history"][3] and res["history"][-1]["top1"] == res["top1"]
    tops = [h["top1"] for h in res["history"] if "top1" in h]
    assert res["top1_best"] == max(tops) and res["history"][res["best_epoch"] - 1]["top1"] == res["top1_best"]
    # the mixup/cutmix path (soft-target cross-entropy) trains too
    mixed = finetune(enc, x, y, xt, yt, finetune_preset("quick", epochs=2, batch_size=12, mixup=0.8, cutmix=1.0),
                     mean=(0.3,), std=(0.3,))
    assert all(math.isfinite(h["loss"]) for h in mixed["history"]) and mixed["config"]["mixup"] == 0.8


# -- few-shot -------------------------------------------------------------------------------------
def test_fewshot_mean_std_and_determinism():
    xtr, ytr = blobs(n_per_class=40, classes=4, sep=2.0, seed=0)
    xte, yte = blobs(n_per_class=40, classes=4, sep=2.0, seed=0)
    xte = xte + 0.5 * torch.randn(xte.shape, generator=torch.Generator().manual_seed(5))
    a = fewshot_logreg(xtr, ytr, xte, yte, shots=2, draws=4, seed=7)
    b = fewshot_logreg(xtr, ytr, xte, yte, shots=2, draws=4, seed=7)
    assert a == b
    assert len(a["accs"]) == 4
    assert a["mean"] == pytest.approx(np.mean(a["accs"])) and a["std"] == pytest.approx(np.std(a["accs"], ddof=1))
    assert len(set(a["accs"])) > 1  # draws differ
    c = fewshot_logreg(xtr, ytr, xte, yte, shots=2, draws=4, seed=8)
    assert c["accs"] != a["accs"]
    easy = fewshot_logreg(*blobs(40, 4, sep=20.0), *blobs(40, 4, sep=20.0), shots=1, draws=3)
    assert easy["mean"] == 100.0 and easy["std"] == 0.0
    with pytest.raises(ValueError, match="fewer than"):
        fewshot_logreg(xtr, ytr, xte, yte, shots=41)


# -- diagnostics ----------------------------------------------------------------------------------
def test_patch_similarity_exact_values():
    same = torch.randn(3, 1, 5).expand(3, 9, 5)
    tokens = torch.cat([torch.randn(3, 1, 5), same], 1)  # cls + 9 identical patches
    s = patch_similarity(tokens)
    assert s["sim"] == pytest.approx(1.0, abs=1e-5) and s["sim_offdiag"] == pytest.approx(1.0, abs=1e-5)
    x = torch.randn(4, 7, 6)
    s = patch_similarity(x, has_cls=False)
    xn = F.normalize(x, dim=-1)
    cos = xn @ xn.transpose(1, 2)
    n = 7
    full = cos.mean((1, 2)).mean().item()
    off = ((cos.sum((1, 2)) - n) / (n * (n - 1))).mean().item()
    assert s["sim"] == pytest.approx(full, abs=1e-6)
    assert s["sim_offdiag"] == pytest.approx(off, abs=1e-6)
    assert s["sim_offdiag"] == pytest.approx((n * s["sim"] - 1) / (n - 1), abs=1e-6)
    # orthogonal patches: Sim = 1/N with the diagonal, 0 without
    s = patch_similarity(torch.eye(6)[None], has_cls=False)
    assert s["sim"] == pytest.approx(1 / 6) and s["sim_offdiag"] == pytest.approx(0.0, abs=1e-7)


def test_effective_rank_and_spectrum():
    assert effective_rank(torch.eye(7), center=False) == pytest.approx(7.0)
    assert effective_rank(3.0 * torch.eye(5), center=False) == pytest.approx(5.0)
    rank1 = torch.randn(20, 1) @ torch.randn(1, 6)
    assert effective_rank(rank1, center=False) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(2.0)
    summary = spectrum_summary(torch.randn(200, 16))
    assert summary["dim"] == 16 and 10 < summary["effective_rank"] <= 16
    assert summary["singular_values"][0] == pytest.approx(1.0) and summary["rank99"] <= 16


def test_per_class_accuracy():
    pred = torch.tensor([0, 0, 1, 2, 2, 2])
    y = torch.tensor([0, 1, 1, 2, 2, 0])
    acc = per_class_accuracy(pred, y, 4)
    assert acc[:3] == pytest.approx([50.0, 50.0, 100.0]) and math.isnan(acc[3])


# -- nearest neighbours on constructed data ------------------------------------------------------
def test_knn_and_loo_known_values():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 1, 1])
    # LOO: points 0 and 1 are each other's neighbour with different labels; 2 and 3 agree -> 50 %
    assert loo_1nn_accuracy(feats, labels) == 50.0
    test = torch.tensor([[1.0, 0.01], [0.05, 1.0]])
    assert knn_accuracy(feats, labels, test, torch.tensor([0, 1]), k=1) == 100.0
    # k = 4: the query [1, 0.01] sees one label-0 and three label-1 items; with T = 0.07 the nearest
    # (label 0, cos≈1) outweighs the other label-1 votes (cos≈0.99, 0.01, 0.11)
    assert knn_accuracy(feats, labels, test[:1], torch.tensor([0]), k=4, temperature=0.001) == 100.0
    assert knn_accuracy(feats, labels, test[:1], torch.tensor([0]), k=4, temperature=100.0) == 0.0


# -- CLI end to end -------------------------------------------------------------------------------
def _write_run(tmp_path):
    """A tiny mimkit checkpoint (and a run dir with two periodic ones) + a PNG class folder."""
    from PIL import Image

    enc = tiny_encoder()
    cfg = {"model": {"encoder": dict(TINY)}, "data": {"mean": [0.3], "std": [0.3]}}
    run = tmp_path / "run"
    run.mkdir()
    for step, epoch in ((5, 1.0), (10, 2.0)):
        sd = {"encoder." + k: v for k, v in enc.state_dict().items()}
        torch.save({"model": sd, "config": cfg, "step": step, "epoch": epoch}, run / f"checkpoint-{step:08d}.pt")
    x, y = stripe_images(10, classes=3, size=20)  # folder images are resized to 28
    root = tmp_path / "imgs"
    for i, (img, lab) in enumerate(zip(x, y)):
        d = root / f"class{int(lab)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).convert("RGB").save(d / f"{i}.png")  # RGB -> converted to 1 channel
    return run, root


def test_cli_eval_knn_end_to_end(tmp_path):
    import argparse

    from mimkit.eval.cli import register, register_report

    run, root = _write_run(tmp_path)
    parser = argparse.ArgumentParser(prog="mimkit")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    register_report(sub)
    out = tmp_path / "out"
    ckpt = run / "checkpoint-00000010.pt"
    args = parser.parse_args(["eval", "knn", str(ckpt), "--dataset", str(root), "--out", str(out), "--device", "cpu"])
    assert args.func(args) == 0
    data = json.loads((out / "knn.json").read_text())
    n = data["setup"]["n_train"]  # a small bank: k beyond it is not reported under a false name
    assert set(data["metrics"]) == {f"knn{k}_{p}" for k in (10, 20, 100, 200) if k <= n for p in ("cls", "mean")} | {
        "knn20top5_cls", "knn20top5_mean", "loo1nn_cls-noLN", "loo1nn_mean-noLN"}
    assert data["setup"]["mean"] == [0.3] and data["setup"]["norm_source"] == "checkpoint config"
    assert data["setup"]["train_data"]["n"] == 24 and data["setup"]["test_data"]["n"] == 6  # 80/20 split
    # the numbers, by hand on the same split: the saved encoder's features of images scaled by the checkpoint's
    # mean/std 0.3, DINO's vote (k = 10, T = 0.07), and leave-one-out 1-NN on test features without the final norm
    from mimkit.eval.protocols import EvalContext, EvalOptions
    from tests.test_eval_trust import reference_knn

    ctx = EvalContext(tiny_encoder(), EvalOptions(dataset=str(root), progress=False))
    (xtr, ytr, _), (xte, yte, _) = ctx.data("train"), ctx.data("test")
    enc = tiny_encoder()
    with torch.no_grad():
        tr, te = (enc.forward_features((v.float() / 255 - 0.3) / 0.3) for v in (xtr, xte))
        raw = enc.forward_features((xte.float() / 255 - 0.3) / 0.3, norm=False)
    for pool, a, b, r in (("cls", tr[:, 0], te[:, 0], raw[:, 0]), ("mean", tr[:, 1:].mean(1), te[:, 1:].mean(1),
                                                                    raw[:, 1:].mean(1))):
        votes = reference_knn(a, ytr.numpy(), b, 10, 0.07, 3)
        assert data["metrics"][f"knn10_{pool}"] == pytest.approx(100 * np.mean(votes.argmax(1) == yte.numpy()))
        cos = F.normalize(r, dim=1) @ F.normalize(r, dim=1).T
        nearest = cos.fill_diagonal_(-2.0).argmax(1)
        loo = 100 * float((yte[nearest] == yte).float().mean())
        assert data["metrics"][f"loo1nn_{pool}-noLN"] == pytest.approx(loo)
    md = (out / "knn.md").read_text().splitlines()
    assert md[0].startswith("| checkpoint |") and "checkpoint-00000010.pt" in md[2]

    # every other protocol, quickly, through the same parser
    for proto, extra in [("linear", ["--epochs", "2", "--optimizer", "sgd"]), ("attentive", ["--epochs", "2"]),
                         ("fewshot", ["--shots", "2", "--draws", "2"]), ("diagnostics", []),
                         ("finetune", ["--epochs", "1", "--train-batch-size", "8"])]:
        args = parser.parse_args(["eval", proto, str(ckpt), "--dataset", str(root), "--out", str(out),
                                  "--device", "cpu", *extra])
        assert args.func(args) == 0
        res = json.loads((out / f"{proto}.json").read_text())
        assert res["protocol"] == proto and res["metrics"], proto

    # report over a run directory with periodic checkpoints -> table, JSON and the epoch plot
    rep = tmp_path / "report"
    args = parser.parse_args(["report", str(run), "--protocols", "knn,fewshot,diagnostics", "--dataset", str(root),
                              "--shots", "2", "--draws", "2", "--out", str(rep), "--device", "cpu"])
    assert args.func(args) == 0
    report = json.loads((rep / "report.json").read_text())
    assert [r["epoch"] for r in report["rows"]] == [1.0, 2.0]
    table = (rep / "report.md").read_text()
    assert "knn20_cls" in table and "fewshot2_mean" in table and " ± " in table
    assert "| 1 |" in table and "1.0" not in table.split("\n")[2].split("|")[2]  # tidy epoch labels
    assert "**Setup**" in table and "24 images" in table and "k = 10, 20 " in table and "T = 0.07" in table
    assert (rep / "training_curves.png").stat().st_size > 1000
    from PIL import Image

    assert Image.open(rep / "training_curves.png").size[1] > 3 * 350  # stacked panels: accuracy, Sim, effective rank
    assert all("sim" in r["metrics"] and "erank_cls" in r["metrics"] for r in report["rows"])


def test_logistic_probe_anchor_protocol():
    from mimkit.eval.linear import logistic_probe

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 5
    labels = torch.arange(300) % 3
    feats = centers[labels] + 0.1 * torch.randn(300, 8, generator=g)
    res = logistic_probe(feats[:200], labels[:200], feats[200:], labels[200:])
    assert res["top1"] == 100.0 and len(res["per_class"]) == 3
    shuffled = labels[torch.randperm(300, generator=g)]
    chance = logistic_probe(feats[:200], shuffled[:200], feats[200:], shuffled[200:])["top1"]
    assert chance < 60.0


def test_training_curves_one_axis_per_quantity_and_a_legend_beside_the_lines(tmp_path):
    """Top-5 never shares the top-1 axis, every series on an axis is told apart by colour or line style
    (2 runs x 6 accuracies = 12 series), each axis has a title, and no legend overlaps its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mimkit.eval.report import curve_panels, plot_curves

    metrics = ["knn20_cls", "knn20_mean", "linear_cls", "knn20_top5_cls", "linear_top5_cls", "fewshot2_mean"]
    rows = [{"run": run, "epoch": e, "metrics": {**{m: 10.0 * e + i for i, m in enumerate(metrics)}, "sim": 0.5,
                                                 "erank_cls": 3.0}}
            for run in ("runs/a", "runs/b") for e in (1, 2, 3)]
    x_key, runs, panels = curve_panels(rows)
    assert x_key == "epoch" and list(runs) == ["runs/a", "runs/b"]
    by_title = {t: ms for t, _, ms in panels}
    top1 = by_title["top-1 accuracy during pretraining"]
    assert "knn20_top5_cls" not in top1 and by_title["top-5 accuracy during pretraining"] == [
        "knn20_top5_cls", "linear_top5_cls"]
    assert by_title["patch similarity (Sim)"] == ["sim"] and by_title["effective rank of the features"] == ["erank_cls"]

    saved = {}
    real_close = plt.close
    plt.close = lambda fig=None: saved.setdefault("fig", fig)
    try:
        assert plot_curves(rows, tmp_path / "c.png").is_file()
    finally:
        plt.close = real_close
    fig = saved["fig"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert ax.get_title()
        styles = [(matplotlib.colors.to_hex(ln.get_color()), ln.get_linestyle()) for ln in ax.get_lines()]
        assert len(styles) == len(set(styles)), ax.get_title()
        legend = ax.get_legend().get_window_extent(renderer)
        assert legend.x0 >= ax.get_window_extent(renderer).x1  # beside the axes, not over the lines
    assert len(fig.axes[0].get_lines()) == 2 * len(top1)
    real_close(fig)
