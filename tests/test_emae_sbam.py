"""EMAE (parallel masks + self-consistency) and SBAM/AMR (salience-based adaptive masking)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mimkit.config import load_config
from mimkit.losses import consistency_loss, masked_mse
from mimkit.masking import (
    ComplementaryMasking,
    MaskingOptions,
    MaskPlan,
    PartitionMasking,
    RandomMasking,
    RandomViewsMasking,
    SalienceMasking,
    SalienceOptions,
    adaptive_keep_counts,
    build_mask_generator,
    partition_sizes,
    token_salience,
)
from mimkit.methods import METHODS
from mimkit.methods.base import DecoderConfig, ModelConfig, Progress
from mimkit.methods.emae import EMAE, EMAEOptions
from mimkit.methods.mae import MAE, MAEOptions
from mimkit.nn.vit import ViTConfig
from mimkit.viz.masks import salience_picture, save_salience_masks, save_views, views_picture

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_model() -> ModelConfig:
    """16x16 grey images, patch 4 -> L = 16 tokens."""
    enc = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    return ModelConfig(enc, DecoderConfig(embed_dim=16, depth=1, num_heads=2))


def views(plan: MaskPlan) -> torch.Tensor:
    """``(B, V, L)`` masks."""
    return plan.mask.view(plan.batch_size, plan.num_views, plan.num_tokens)


# --------------------------------------------------------------------------------------------------
# EMAE's mask generators


@pytest.mark.parametrize("length,k", [(16, 4), (196, 4), (196, 7), (49, 4), (49, 7), (10, 1)])
def test_partition_disjoint_and_covering(length, k):
    b = 3
    plan = PartitionMasking(k)(b, length, generator=torch.Generator().manual_seed(1))
    assert plan.num_seqs == b * k and plan.num_views == k
    m = views(plan)
    visible = 1 - m
    # every token is visible in exactly one view: disjoint and covering
    assert torch.equal(visible.sum(1), torch.ones(b, length))
    # part sizes: L/K, or floor/ceil when K does not divide L
    sizes = visible.sum(2)
    assert int(sizes.max() - sizes.min()) <= (0 if length % k == 0 else 1)
    assert sizes.sum(1).tolist() == [length] * b
    # the visible ids handed to the encoder are exactly the view's visible tokens
    valid = torch.ones_like(plan.ids_keep, dtype=torch.bool) if plan.keep_valid is None else plan.keep_valid
    for s in range(plan.num_seqs):
        ids = plan.ids_keep[s][valid[s]]
        assert len(set(ids.tolist())) == len(ids)
        assert torch.equal(torch.sort(ids).values, torch.nonzero(plan.mask[s] == 0).flatten())
    # all views of an image come from one permutation: consecutive blocks of argsort(noise)
    perm = torch.argsort(plan.scores, dim=1)
    first = partition_sizes(length, k)[0]
    assert torch.equal(plan.ids_keep[::k, :first], perm[:, :first])


def test_partition_strict_refuses_uneven():
    with pytest.raises(ValueError):
        PartitionMasking(4, strict=True)(2, 49)


def test_pure_random_views_counts():
    b, k, length, r = 2, 4, 16, 0.75
    plan = RandomViewsMasking(k, r)(b, length, generator=torch.Generator().manual_seed(0))
    assert plan.num_seqs == b * k and plan.keep_valid is None
    assert plan.mask.sum(1).tolist() == [length - int(length * (1 - r))] * (b * k)
    # independent masks: the views of an image are not a partition
    assert not torch.equal((1 - views(plan)).sum(1), torch.ones(b, length))
    # explicit noise (B, K, L) reproduces MAE's masking of each view
    noise = torch.rand(b, k, length)
    plan = RandomViewsMasking(k, r)(b, length, noise=noise)
    ref = RandomMasking(r)(b * k, length, noise=noise.reshape(b * k, length))
    assert torch.equal(plan.mask, ref.mask) and torch.equal(plan.ids_keep, ref.ids_keep)


def test_complementary_pair_counts():
    b, length, r = 3, 16, 0.75
    plan = ComplementaryMasking(r)(b, length, generator=torch.Generator().manual_seed(0))
    m = views(plan)
    n0 = int(length * (1 - r))
    assert plan.num_views == 2
    assert m[:, 0].sum(1).tolist() == [length - n0] * b  # view 0: 75 % masked
    assert m[:, 1].sum(1).tolist() == [n0] * b  # view 1 masks exactly what view 0 sees
    assert torch.equal(m[:, 0] + m[:, 1], torch.ones(b, length))
    # view 0 is padded to view 1's length
    assert plan.num_keep == length - n0
    assert plan.keep_valid[0::2].sum(1).tolist() == [n0] * b


# --------------------------------------------------------------------------------------------------
# EMAE method


def test_emae_k1_equals_mae_exactly():
    torch.manual_seed(0)
    mae = MAE(tiny_model())
    emae = EMAE(tiny_model(), EMAEOptions(masking=MaskingOptions(kind="partition", num_views=1, ratio=0.0)))
    emae.load_state_dict(mae.state_dict())
    images = torch.randn(3, 1, 16, 16)
    noise = torch.rand(3, 16)
    # K = 1 partition masks nothing; give both the same MAE plan to compare the losses
    plan = RandomMasking(0.75)(3, 16, noise=noise)
    out_mae = mae(images, noise=noise)
    out_emae = emae(images, plan=plan)
    assert torch.equal(out_mae.pred, out_emae.pred)
    assert torch.equal(out_mae.loss, out_emae.loss)
    # gradients are the same too
    out_mae.loss.backward()
    out_emae.loss.backward()
    for (n, p), q in zip(mae.named_parameters(), emae.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n


def test_emae_k1_own_masking_equals_mae():
    """K = 1 through EMAE's own multi-view masking path (one independent view) is MAE."""
    torch.manual_seed(0)
    mae = MAE(tiny_model())
    emae = EMAE(tiny_model(), EMAEOptions(masking=MaskingOptions(kind="random_views", num_views=1)))
    emae.load_state_dict(mae.state_dict())
    images, noise = torch.randn(2, 1, 16, 16), torch.rand(2, 16)
    assert torch.equal(mae(images, noise=noise).loss, emae(images, noise=noise).loss)


def test_emae_one_pass_equals_separate_mae_passes():
    """K views in one forward pass == MAE run on each view's plan; L_whole = mean over views."""
    torch.manual_seed(0)
    opts = EMAEOptions(consistency_weight=0.0)
    emae = EMAE(tiny_model(), opts)
    images = torch.randn(2, 1, 16, 16)
    out = emae(images, noise=torch.rand(2, 16))
    plan, k = out.plan, 4
    assert out.pred.shape == (2 * k, 16, 16) and out.target.shape == (2, 16, 16)  # targets once per image
    losses = []
    for v in range(k):
        sub = MaskPlan(plan.ids_keep[v::k], plan.ids_restore[v::k], plan.mask[v::k])
        single = MAE.forward(emae, images, plan=sub)
        torch.testing.assert_close(single.pred, out.pred[v::k], rtol=1e-5, atol=1e-5)
        losses.append(single.loss)
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)
    assert out.metrics["mask_ratio"] == pytest.approx(0.75)


def reference_pairwise_sg(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pairwise consistency loss literally: 1/(K(K-1)) sum_{i != j} sum o_ij mse(pred_i, sg pred_j) / sum o_ij."""
    _, k, _, _ = pred.shape
    terms = []
    for i in range(k):
        for j in range(k):
            if i != j:
                o = mask[:, i] * mask[:, j]
                d = (pred[:, i] - pred[:, j].detach()).pow(2).mean(-1)
                terms.append((d * o).sum() / o.sum())
    return torch.stack(terms).mean()


def test_consistency_hand_value():
    # B=1, K=3 views, L=3 positions, P=1; view i masks every position except position i (partition)
    pred = torch.tensor([[[[1.0], [2.0], [3.0]], [[0.0], [4.0], [1.0]], [[2.0], [0.0], [5.0]]]])
    mask = 1 - torch.eye(3)[None]
    # overlaps: o_01 = {2}, o_02 = {1}, o_12 = {0}; squared differences:
    # (0,1) at 2: (3-1)^2 = 4; (0,2) at 1: (2-0)^2 = 4; (1,2) at 0: (0-2)^2 = 4 -> mean 4
    assert consistency_loss(pred, mask).item() == pytest.approx(4.0)
    # l1: |3-1| = 2, |2-0| = 2, |0-2| = 2 -> 2
    assert consistency_loss(pred, mask, dist="l1").item() == pytest.approx(2.0)
    # to the detached mean: every position has two predictions, each at distance (diff/2)^2 = 1
    assert consistency_loss(pred, mask, mode="to_detached_mean").item() == pytest.approx(1.0)
    # cosine of 1-d vectors: 1 - sign product; pairs (3,1), (2,0), (0,2): 0, 1, 1 -> 2/3
    assert consistency_loss(pred, mask, dist="cosine").item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("gen", [PartitionMasking(4), RandomViewsMasking(4, 0.75), PartitionMasking(3)])
def test_consistency_matches_ordered_stop_gradient_form(gen):
    """Value and gradient equal the literal ordered-pair stop-gradient formula, on the O(K) path
    (equal overlaps) and on the pair loop (unequal overlaps)."""
    torch.manual_seed(0)
    plan = gen(2, 16, generator=torch.Generator().manual_seed(3))
    k = plan.num_views
    mask = views(plan)
    pred = torch.randn(2, k, 16, 5, requires_grad=True)
    ours = consistency_loss(pred, mask)
    (g_ours,) = torch.autograd.grad(ours, pred)
    ref = reference_pairwise_sg(pred, mask)
    (g_ref,) = torch.autograd.grad(ref, pred)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.parametrize("dist", ["mse", "l1", "cosine"])
@pytest.mark.parametrize("mode", ["pairwise_sym", "to_detached_mean"])
def test_consistency_zero_when_views_agree(dist, mode):
    plan = PartitionMasking(4)(2, 16, generator=torch.Generator().manual_seed(0))
    same = torch.randn(2, 1, 16, 6).expand(2, 4, 16, 6)
    assert consistency_loss(same, views(plan), dist, mode).item() == pytest.approx(0.0, abs=1e-6)
    # the complementary pair never masks a position twice: nothing to compare
    comp = ComplementaryMasking()(2, 16)
    assert consistency_loss(torch.randn(2, 2, 16, 6), views(comp), dist, mode).item() == 0.0


def test_emae_forward_backward_with_consistency():
    torch.manual_seed(0)
    model = EMAE(tiny_model())
    out = model(torch.randn(2, 1, 16, 16))
    assert set(out.metrics) >= {"loss_whole", "loss_consistency", "mask_ratio"}
    torch.testing.assert_close(out.loss, out.metrics["loss_whole"] + out.metrics["loss_consistency"])
    out.loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("kind,k", [("partition", 4), ("partition", 3), ("partition", 2), ("random_views", 4),
                                    ("random_views", 2), ("complementary", 2)])
def test_emae_equal_pair_hint_matches_reading_the_mask(kind, k, monkeypatch):
    """EMAE tells the consistency loss from its masking whether every pair of views overlaps equally (two
    views; a partition into equal parts: 16 tokens in 4 or 2 parts, not in 3) instead of the loss reading
    it from the mask on the device: the loss is the same to the bit as with the read, value and gradient,
    including the partition into 2 halves, whose views overlap nowhere (loss 0)."""
    import mimkit.methods.emae as emae_module

    opts = EMAEOptions(masking=MaskingOptions(kind=kind, num_views=k, ratio=0.6 if kind == "complementary" else 0.75))
    torch.manual_seed(0)
    model = EMAE(tiny_model(), opts)
    x = torch.randn(3, 1, 16, 16)
    hints = []

    def run(read: bool):
        def cons(*a, equal_pairs=None, **kw):
            hints.append(equal_pairs)
            return consistency_loss(*a, equal_pairs=None if read else equal_pairs, **kw)

        monkeypatch.setattr(emae_module, "consistency_loss", cons)
        model.zero_grad()
        out = model(x, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        return out.metrics["loss_consistency"], model.decoder.pred.weight.grad.clone()

    (c_hint, g_hint), (c_read, g_read) = run(False), run(True)
    assert hints[0] == (k == 2 or (kind == "partition" and 16 % k == 0))
    assert torch.equal(c_hint, c_read) and torch.equal(g_hint, g_read)
    assert (float(c_hint) == 0.0) == (kind in ("partition", "complementary") and k == 2)  # views overlap nowhere


# --------------------------------------------------------------------------------------------------
# SBAM: salience, masking, AMR, warm start


def test_salience_hand_value():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    a = [[1, 0, 1], [0, 1, 1], [1, 1, 2]]  # X X^T
    rows = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in a]
    cols = [sum(rows[i][j] for i in range(3)) for j in range(3)]
    lo, hi = min(cols), max(cols)
    expected = [(c - lo) / (hi - lo + 1e-6) for c in cols]
    got = token_salience(x)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert got[0].tolist() == pytest.approx(expected, abs=1e-6)
    # temperature divides the affinities
    rows_t = [[math.exp(v / 2) / sum(math.exp(u / 2) for u in r) for v in r] for r in a]
    cols_t = [sum(rows_t[i][j] for i in range(3)) for j in range(3)]
    exp_t = [(c - min(cols_t)) / (max(cols_t) - min(cols_t) + 1e-6) for c in cols_t]
    assert token_salience(x, temperature=2.0)[0].tolist() == pytest.approx(exp_t, abs=1e-6)


def test_salience_is_fp32_under_autocast():
    tokens = torch.randn(2, 16, 8) * 3
    ref = token_salience(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_salience(tokens)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_sbam_masks_the_most_salient_tokens():
    torch.manual_seed(0)
    tokens = torch.randn(3, 16, 8, requires_grad=True)
    sal = token_salience(tokens)
    gen = SalienceMasking(0.75, SalienceOptions(amr_mode="off"))
    plan = gen(3, 16, noise=torch.zeros(3, 16), tokens=tokens)
    top = torch.topk(sal, 12, dim=1).indices  # 16 - int(16 * 0.25) masked
    expect = torch.zeros(3, 16).scatter_(1, top, 1.0)
    assert torch.equal(plan.mask, expect)
    assert torch.equal(plan.scores, sal)
    # with U[0, 0.5) noise: a token whose salience beats every other by > 0.5 is always masked
    tok = torch.zeros(2, 16, 4)
    tok[:, 5] = 3.0  # large self-affinity: receives most attention
    for seed in range(5):
        p = gen(2, 16, tokens=tok, generator=torch.Generator().manual_seed(seed))
        assert p.mask[:, 5].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_amr_realized_ratio_inside_interval(mode):
    r, dr = 0.75, 0.1
    gen = SalienceMasking(r, SalienceOptions(amr_mode=mode, delta_ratio=dr, threshold=0.5))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for length in (16, 49, 196):
        for scale in (0.1, 1.0, 3.0, 10.0):
            tokens = torch.randn(4, length, 8, generator=g) * scale
            plan = gen(4, length, tokens=tokens, generator=g)
            ratios = plan.mask.mean(1)
            assert bool(((ratios >= r - dr - 1e-9) & (ratios <= r + dr + 1e-9)).all()), (length, scale, ratios)
            if mode == "batch":
                assert plan.keep_valid is None and len(set(ratios.tolist())) == 1
            seen.update(ratios.tolist())
    assert len(seen) > 2  # the ratio does adapt
    # extremes of the formula: nothing / everything salient -> r - Δr / r + Δr
    for length in (16, 49, 196):
        lo = adaptive_keep_counts(torch.zeros(1, length), r, dr, 0.5, True)
        hi = adaptive_keep_counts(torch.ones(1, length), r, dr, 0.5, True)
        for n, bound in ((lo, r - dr), (hi, r + dr)):
            realized = 1 - n.item() / length
            assert r - dr - 1e-9 <= realized <= r + dr + 1e-9
            assert abs(realized - bound) <= 1 / length + 1e-9


def test_warm_start_uses_random_masking():
    gen = SalienceMasking(0.75, SalienceOptions(start=0.25))
    tokens = torch.randn(2, 16, 8)
    noise = torch.rand(2, 16)
    early = gen(2, 16, noise=noise, tokens=tokens, progress=Progress(step=24, total_steps=100))
    ref = RandomMasking(0.75)(2, 16, noise=noise)
    assert torch.equal(early.mask, ref.mask) and torch.equal(early.ids_keep, ref.ids_keep)
    late = gen(2, 16, noise=noise, tokens=tokens, progress=Progress(step=25, total_steps=100))
    sal = token_salience(tokens)
    assert torch.equal(late.perm, torch.argsort(sal + 0.5 * noise, dim=1))
    assert not torch.equal(late.mask, ref.mask)


def test_sample_amr_padding_equals_each_image_alone():
    """Per-image ratios, padded batch: each image's summed per-patch loss and count match a run of
    that image alone (unpadded), so the batch loss is sum(sums) / sum(counts) of the single runs."""
    torch.manual_seed(0)
    opts = MAEOptions(masking=MaskingOptions(kind="sbam", sbam=SalienceOptions(amr_mode="sample", delta_ratio=0.25, threshold=0.3)))
    model = MAE(tiny_model(), opts)
    images = torch.randn(4, 1, 16, 16)
    images[1] = 0.0
    images[2] *= 3
    images[3, :, :8] = 2.0
    out = model(images, noise=torch.rand(4, 16))
    plan = out.plan
    lengths = (1 - plan.mask).sum(1).long()
    assert plan.keep_valid is not None and len(set(lengths.tolist())) > 1  # padding is exercised
    perm = plan.perm
    sums, counts = [], []
    for b in range(4):
        single_plan = MaskPlan.from_permutation(perm[b : b + 1], int(lengths[b]))
        assert single_plan.keep_valid is None
        alone = model(images[b : b + 1], plan=single_plan)
        torch.testing.assert_close(alone.pred[0], out.pred[b], rtol=1e-5, atol=1e-5)
        count = single_plan.mask.sum()
        sums.append(alone.loss * count)
        counts.append(count)
        # the image's own contribution inside the padded batch
        own = masked_mse(out.pred[b : b + 1], out.target[b : b + 1], plan.mask[b : b + 1])
        torch.testing.assert_close(own, alone.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, torch.stack(sums).sum() / torch.stack(counts).sum(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Registration, configs, pictures


def test_registered_methods_and_options():
    assert "emae" in METHODS and "sbam" in METHODS
    assert isinstance(build_mask_generator(MaskingOptions(kind="partition")), PartitionMasking)
    assert isinstance(build_mask_generator(MaskingOptions(kind="random_views")), RandomViewsMasking)
    assert isinstance(build_mask_generator(MaskingOptions(kind="complementary")), ComplementaryMasking)
    assert isinstance(build_mask_generator(MaskingOptions(kind="sbam")), SalienceMasking)
    with pytest.raises(ValueError):
        build_mask_generator(MaskingOptions(kind="nope"))
    with pytest.raises(ValueError):
        EMAE(tiny_model(), EMAEOptions(consistency_dist="huber"))


@pytest.mark.parametrize(
    "name,method", [("emae_fashion_mnist", "emae"), ("emae_vit_base_imagenet", "emae"),
                    ("sbam_fashion_mnist", "sbam"), ("sbam_vit_base_imagenet", "sbam")],
)
def test_configs_load(name, method):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.method.name == method
    if method == "emae":
        assert cfg.method.masking.kind == "partition" and cfg.method.masking.num_views == 4
    else:
        assert cfg.method.masking.kind == "sbam"


def _masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_patch * mask).sum() / mask.sum()


def _norm_pix_by_hand(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, 28, 28)`` -> ``(B, 49, 16)``: 4x4 patches row-major over the 7x7 grid, each standardised
    with MAE's unbiased variance and eps 1e-6."""
    patches = torch.stack([x[:, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(len(x), 16)
                           for r in range(7) for c in range(7)], 1)
    return (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()


def test_fashion_mnist_presets_run_one_step():
    """What the two presets' comments promise, and one step's loss written out by hand: a 192-wide ViT on
    the 49 patches of 28x28 images, per-patch normalised pixel targets; EMAE with 4 disjoint covering
    views (13/12/12/12 visible) and the pairwise consistency term at weight 1; SBAM with random masking
    for the first 25 % of training, then the least salient tokens kept (salience + 0.5 noise) at one
    adaptive ratio 0.75 +- 0.1 per batch (threshold 0.5)."""
    over = ["model.encoder.depth=1", "model.decoder.depth=1"]
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    target = _norm_pix_by_hand(x)
    cfg = load_config(CONFIGS / "emae_fashion_mnist.yaml", over)
    model = METHODS[cfg.method.name](cfg.model, cfg.method)
    assert isinstance(model, EMAE) and (model.encoder.embed_dim, model.encoder.num_patches) == (192, 49)
    out = model(x, Progress(step=9, total_steps=10), generator=torch.Generator().manual_seed(0))
    plan = out.plan
    assert (plan.num_views, plan.num_seqs) == (4, 8) and out.pred.shape == (8, 49, 16)
    mask = plan.mask.view(2, 4, 49)
    assert torch.equal((1 - mask).sum(1), torch.ones(2, 49))  # every patch visible in exactly one view
    assert [sorted(row) for row in (1 - mask).sum(2).tolist()] == [[12, 12, 12, 13]] * 2
    torch.testing.assert_close(out.target, target, rtol=1e-5, atol=1e-5)
    pred = out.pred.detach().view(2, 4, 49, 16)
    whole = sum(_masked_mean((pred[:, v] - target).pow(2).mean(-1), mask[:, v]) for v in range(4)) / 4
    pairs = [_masked_mean((pred[:, i] - pred[:, j]).pow(2).mean(-1), mask[:, i] * mask[:, j])
             for i in range(4) for j in range(4) if i != j]
    cons = sum(pairs) / 12
    torch.testing.assert_close(out.metrics["loss_consistency"], cons, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), whole + 1.0 * cons, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert float(model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum()) > 0

    cfg = load_config(CONFIGS / "sbam_fashion_mnist.yaml", over)
    model = METHODS[cfg.method.name](cfg.model, cfg.method)
    assert (model.encoder.embed_dim, model.encoder.num_patches) == (192, 49)
    x = 0.05 * torch.randn(2, 1, 28, 28)
    x[0, :, 8:20, 6:18] += 1.0  # a bright square, a vertical ramp: a few clearly salient tokens, more in the ramp
    x[1] += torch.linspace(-1.5, 1.5, 28)[:, None]
    noise = torch.rand(2, 49)
    early = model(x, Progress(step=2, total_steps=10), noise=noise).plan  # warm start: MAE's random masking
    assert torch.equal(early.mask, RandomMasking(0.75)(2, 49, noise=noise).mask)
    out = model(x, Progress(step=9, total_steps=10), noise=noise)
    with torch.no_grad():  # SBAM's salience by hand: column sums of softmax(X X^T), min-max per image
        tok = model.encoder.patch_tokens(x).double()
        received = (tok @ tok.transpose(1, 2)).softmax(-1).sum(1)
        lo, hi = received.amin(1, keepdim=True), received.amax(1, keepdim=True)
        sal = (received - lo) / (hi - lo + 1e-6)
    assert float((sal - 0.5).abs().min()) > 0.01  # no token on the threshold: the count below is robust
    ratio = 0.75 - 0.1 + 0.2 * float((sal > 0.5).double().mean())  # one ratio for the batch
    n_keep = min(max(math.floor(49 * (1 - ratio) + 1e-9), math.ceil(49 * 0.15)), math.floor(49 * 0.35))
    assert n_keep > 12  # few salient tokens: fewer masked than the base ratio's 37
    order = torch.argsort(sal + 0.5 * noise.double(), dim=1)
    expect = torch.ones(2, 49)
    for b in range(2):
        expect[b, order[b, :n_keep]] = 0.0
    assert torch.equal(out.plan.mask, expect) and out.plan.keep_valid is None
    target = _norm_pix_by_hand(x)
    torch.testing.assert_close(out.target, target, rtol=1e-5, atol=1e-5)
    loss = _masked_mean((out.pred.detach() - target).pow(2).mean(-1), expect)
    torch.testing.assert_close(out.loss.detach(), loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert float(model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum()) > 0


def test_pictures(tmp_path):
    torch.manual_seed(0)
    images = torch.randn(3, 1, 16, 16)
    emae = EMAE(tiny_model())
    p1 = views_picture(emae, images, tmp_path / "parts.png")
    sbam = MAE(tiny_model(), MAEOptions(masking=MaskingOptions(kind="sbam", sbam=SalienceOptions(amr_mode="sample"))))
    p2 = salience_picture(sbam, images, tmp_path / "sbam.png")
    plan = RandomViewsMasking(3)(3, 16)
    p3 = save_views(images, plan, tmp_path / "random_views.png", 4)
    p4 = save_salience_masks(images, torch.rand(3, 16), plan.mask[::3], tmp_path / "s.png", 4)
    for p in (p1, p2, p3, p4):
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG"


# -- a latent (EMA) target for MAE and EMAE (configs/compose/) ------------------------------------
def test_ema_target_is_the_ema_encoders_patch_tokens_and_moves_by_the_momentum_rule():
    """``target: ema``: the decoder predicts D-dim tokens; the target is the EMA copy's patch tokens of the
    whole image (final LN, then per-token standardisation), equal to the encoder at the start; the loss is
    MAE's masked MSE against it, no gradient reaches the copy, and after_step moves the copy to
    m * copy + (1 - m) * encoder with Latent MIM's cosine momentum."""
    from mimkit.targets import cosine_momentum

    torch.manual_seed(0)
    pixel = MAE(tiny_model(), MAEOptions())
    torch.manual_seed(0)
    m = MAE(tiny_model(), MAEOptions(target="ema", momentum=0.9))
    for (name, a), b in zip(pixel.encoder.state_dict().items(), m.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the pixel model's initialisation is unchanged
    assert m.decoder.pred.out_features == m.encoder.embed_dim
    assert [c.prefix for c in m.target_copies()] == ["target.branch"] and pixel.target_copies() == ()
    assert "reconstruction" not in m.capabilities.pictures and "reconstruction" in pixel.capabilities.pictures
    x = torch.randn(4, 1, 16, 16)
    plan = m.make_plan(x, generator=torch.Generator().manual_seed(1))
    out = m(x, plan=plan)
    with torch.no_grad():
        tok = m.encoder.forward_features(x)[:, 1:]  # the copy equals the encoder at the start
        want = (tok - tok.mean(-1, keepdim=True)) / torch.sqrt(tok.var(-1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(out.target, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, masked_mse(out.pred, want, plan.mask), rtol=1e-6, atol=1e-7)
    out.loss.backward()
    assert all(p.grad is None for p in m.target.branch.parameters())
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    before = {k: v.clone() for k, v in m.target.branch.state_dict().items()}
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(0.1)
    prog = Progress(step=5, total_steps=10, epoch=0.5, total_epochs=1)
    m.after_step(prog)
    mom = cosine_momentum(0.9, 0.5, 1.0)
    online = m.encoder.state_dict()
    for k, v in m.target.branch.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, mom * before[k] + (1 - mom) * online[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="method.target must be one of pixel, ema"):
        MAE(tiny_model(), MAEOptions(target="clip"))


def test_emae_views_with_an_ema_target_equal_the_hand_loss():
    """EMAE's K views on the EMA target: the per-view masked MSE against the same (B, L, D) target,
    averaged over views, plus the consistency term on the D-dim predictions."""
    torch.manual_seed(0)
    m = EMAE(tiny_model(), EMAEOptions(target="ema", masking=MaskingOptions(kind="partition", num_views=4)))
    x = torch.randn(3, 1, 16, 16)
    out = m(x, plan=m.make_plan(x, generator=torch.Generator().manual_seed(0)))
    k, d = 4, m.encoder.embed_dim
    assert out.pred.shape == (3 * k, 16, d) and out.target.shape == (3, 16, d)
    pv, mv = out.pred.view(3, k, 16, d), out.plan.mask.view(3, k, 16)
    whole = torch.stack([masked_mse(pv[:, v], out.target, mv[:, v]) for v in range(k)]).mean()
    cons = consistency_loss(pv, mv, "mse", "pairwise_sym")
    torch.testing.assert_close(out.loss, whole + cons, rtol=1e-6, atol=1e-7)
    assert float(cons.detach()) > 0


@pytest.mark.parametrize("name", ["mae_block", "latent_mim_sbam", "emae_ema", "cae_v2_pcae_drop"])
def test_compose_configs_build_the_composition_they_name(name):
    from mimkit.train.loop import build_method

    overrides = ["method.teacher_path=null", "method.teacher_random_init=true"] if name.startswith("cae_v2") else []
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "compose" / f"{name}_fashion_mnist.yaml",
                      overrides)
    m = build_method(cfg)
    x = torch.rand(2, 1, 28, 28)
    plan = m.make_plan(x, generator=torch.Generator().manual_seed(0))
    if name == "mae_block":
        assert type(m).__name__ == "MAE" and cfg.method.masking.kind == "block"
        assert int(plan.mask.sum(1)[0]) == 49 - int(49 * (1 - 0.75))  # MAE's count, placed in blocks
    elif name == "latent_mim_sbam":
        assert type(m).__name__ == "LatentMIM" and plan.scores is not None  # SBAM's salience drew the mask
    elif name == "emae_ema":
        assert type(m).__name__ == "EMAE" and cfg.method.target == "ema" and plan.num_views == 4
    else:  # the teacher (random here, the MAE encoder in the zoo) keeps 6 of 49 tokens after three drops
        m.set_input_normalisation((0.286,), (0.353,))
        out = m(x, plan=plan)
        assert type(m).__name__ == "CAEv2" and float(out.metrics["teacher_kept"]) == pytest.approx(6 / 49)
    assert cfg.train.out_dir == f"runs/compose/{name}_fashion_mnist"


def test_pair_counts_stay_exact_under_bf16_autocast():
    """The consistency loss's overlap counts (its O(K) divisor) are integers up to B*L: under bf16 autocast
    (how training runs) an einsum in bf16 would round them (8-bit mantissa: 0.14 % off the loss at ViT-B's
    196 tokens); they are counted in fp32."""
    from mimkit.losses import _pair_counts

    mask = PartitionMasking(4)(64, 196, generator=torch.Generator().manual_seed(0)).mask.view(64, 4, 196)
    exact = torch.einsum("bil,bjl->ij", mask.double(), mask.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        counts = _pair_counts(mask)
    assert counts.dtype == torch.float32 and torch.equal(counts.double(), exact)
    assert exact[0, 1] == 64 * (196 - 2 * 49) and exact[0, 1] > 256  # not representable in bf16 steps of 1
