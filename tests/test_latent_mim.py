"""Latent MIM: schedules, EMA, PatchDisc, visual cues, gapped patchify, every ablation
arm, and the collapse of the naive arm against the EMA arm in a short CPU run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mimkit.config import load_config
from mimkit.losses import average_patch_similarity, patch_disc, similarity_regularizer
from mimkit.masking import MaskingOptions, resolve_num_keep
from mimkit.methods import METHODS, ModelConfig, Progress
from mimkit.methods.base import DecoderConfig
from mimkit.methods.latent_mim import LatentMIM, LatentMIMOptions, ProjectorOptions
from mimkit.nn.cross_decoder import CrossDecoder, SelfAttnLatentDecoder
from mimkit.nn.patch import gapped_patchify, patchify
from mimkit.nn.pos_embed import sincos_2d
from mimkit.nn.projector import MLPProjector
from mimkit.nn.vit import ViTConfig, gather_tokens
from mimkit.targets import LatentTarget, cosine_momentum, cosine_schedule, ema_update

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(patch: int = 4, dim: int = 32, dec_depth: int = 1) -> ModelConfig:
    return ModelConfig(
        ViTConfig(img_size=28, patch_size=patch, in_chans=1, embed_dim=dim, depth=2, num_heads=2),
        DecoderConfig(embed_dim=dim, depth=dec_depth, num_heads=2),
    )


def tiny_method(mask_ratio: float = 0.9, num_keep: int | None = 5, **opts) -> LatentMIM:
    opts.setdefault("projector", ProjectorOptions(hidden_dim=48))
    opts.setdefault("masking", MaskingOptions(kind="random", ratio=mask_ratio, num_keep=num_keep))
    return LatentMIM(tiny_model(), LatentMIMOptions(**opts))


# -- schedules and EMA -------------------------------------------------------------------------


def test_schedules_exact():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99, abs=1e-15)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995, abs=1e-15)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0, abs=1e-15)
    assert cosine_momentum(0.99, 0.25) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2, abs=1e-15)
    assert cosine_schedule(0.75, 0.25, 0.0) == pytest.approx(0.75, abs=1e-15)
    assert cosine_schedule(0.75, 0.25, 0.5) == pytest.approx(0.5, abs=1e-15)
    assert cosine_schedule(0.75, 0.25, 1.0) == pytest.approx(0.25, abs=1e-15)
    assert cosine_schedule(0.75, 0.25, 2.0) == pytest.approx(0.25, abs=1e-15)  # clamped
    m = tiny_method()
    out = m(torch.randn(2, 1, 28, 28), Progress(step=30, total_steps=120))
    f = 0.25
    assert out.metrics["ema_momentum"] == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi * f)) / 2, abs=1e-15)
    assert out.metrics["gamma"] == pytest.approx(0.25 + 0.5 * (1 + math.cos(math.pi * f)) / 2, abs=1e-15)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _target_params(m: LatentMIM) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.target.branch.parameters()]


def _online_params(m: LatentMIM) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*m.encoder.parameters(), *m.projector.parameters()]]


def test_ema_update_exact_once_per_step_after_it():
    m = tiny_method(patch_gap=0)
    # starts as an exact copy, frozen
    for t, s in zip(_target_params(m), _online_params(m), strict=True):
        assert torch.equal(t, s)
    assert not any(p.requires_grad for p in m.target.branch.parameters())

    _perturb(m.encoder, 1)
    _perturb(m.projector, 2)
    old_t, online = _target_params(m), _online_params(m)
    x = torch.randn(2, 1, 28, 28)
    # forward passes (micro-batches, eval, no progress) never touch the target
    m(x, Progress(step=4, total_steps=10))
    m(x, Progress(step=4, total_steps=10))
    m(x)
    for a, b in zip(old_t, _target_params(m)):
        assert torch.equal(a, b)
    # the trainer's after_step after optimizer step 5: momentum at progress 5/10
    mom = cosine_momentum(0.99, 0.5)
    m.after_step(Progress(step=5, total_steps=10))
    new_t = _target_params(m)
    for t0, s, t1 in zip(old_t, online, new_t, strict=True):
        expect = mom * t0.double() + (1 - mom) * s.double()
        torch.testing.assert_close(t1.double(), expect, rtol=0, atol=2e-7)  # fp32 rounding of lerp
    # the next forward's targets come from the updated branch
    out = m(x, Progress(step=5, total_steps=10))
    ids = out.plan.ids_masked()
    pix = patchify(x, 4)
    with torch.no_grad():
        tgt = m.target.branch["encoder"]
        z = m.target.branch["projector"](tgt.forward_tokens(tgt.pixel_tokens(gather_tokens(pix, ids), ids)))[:, 1:]
    torch.testing.assert_close(out.target, z)


def test_ema_update_matches_by_name_and_copies_buffers():
    src = torch.nn.Linear(3, 2)
    tgt = torch.nn.Linear(3, 2)
    with torch.no_grad():
        src.weight.fill_(1.0)
        src.bias.fill_(-1.0)
        tgt.weight.fill_(3.0)
        tgt.bias.fill_(0.0)
    ema_update(tgt, src, 0.75)
    torch.testing.assert_close(tgt.weight, torch.full((2, 3), 0.75 * 3 + 0.25 * 1.0))
    torch.testing.assert_close(tgt.bias, torch.full((2,), -0.25))
    with pytest.raises(RuntimeError, match="no match"):
        ema_update(torch.nn.Linear(3, 4), src, 0.5)


def test_latent_target_arms():
    online = torch.nn.Linear(3, 3)
    x = torch.randn(4, 3)
    for kind in ("naive", "stopgrad", "separate", "ema"):
        t = LatentTarget(kind, online)
        y = t(lambda m: m(x))
        torch.testing.assert_close(y, online(x))  # every arm starts equal to the online branch
        assert y.requires_grad == (kind in ("naive", "separate"))
        assert (t.branch is None) == (kind in ("naive", "stopgrad"))
        if kind == "separate":
            assert t.branch.weight is not online.weight and t.branch.weight.requires_grad
        assert t.update(Progress(1, 2)) == (cosine_momentum(0.99, 0.5) if kind == "ema" else None)
    with pytest.raises(ValueError, match="unknown target"):
        LatentTarget("bogus", online)


def test_shallower_target_and_unmasked_target_options():
    m = tiny_method(target_depth=1, patch_gap=0)
    assert len(m.target.branch["encoder"].blocks) == 1 and len(m.encoder.blocks) == 2
    _perturb(m.encoder, 3)
    before = {k: v.detach().clone() for k, v in m.target.branch["encoder"].named_parameters()}
    online = dict(m.encoder.named_parameters())
    m.after_step(Progress(1, 2))  # name-matched EMA over the first block, the norm and the projector
    mom = cosine_momentum(0.99, 0.5)
    for name, p in m.target.branch["encoder"].named_parameters():
        expect = mom * before[name].double() + (1 - mom) * online[name].detach().double()
        torch.testing.assert_close(p.double(), expect, rtol=0, atol=2e-7)
    assert not torch.equal(before["norm.weight"], m.target.branch["encoder"].norm.weight)
    out = m(torch.randn(2, 1, 28, 28), Progress(0, 4))
    assert out.target.shape == (2, 44, 32)
    with pytest.raises(ValueError, match="target_depth"):
        tiny_method(target_depth=3)
    # mask_target=False: the target encoder sees all 49 patches; the targets are its last 44 outputs
    m = tiny_method(mask_target=False, patch_gap=0, target="stopgrad")
    x = torch.randn(2, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    plan = m.make_plan(x, None, g)
    out = m(x, plan=plan)
    pix = patchify(x, 4)
    ids = plan.perm
    with torch.no_grad():
        z = m.projector(m.encoder.forward_tokens(m.encoder.pixel_tokens(gather_tokens(pix, ids), ids)))[:, 1:]
    torch.testing.assert_close(out.target, z[:, 5:])


# -- losses ------------------------------------------------------------------------------------


def test_patch_disc_closed_form():
    # two tokens, predictions standardize to +-e1 exactly (second channel has zero std -> 0)
    pred = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    tau = 0.2
    good = torch.tensor([[[2.0, 0.0], [-3.0, 0.0]]])  # same directions as the standardized predictions
    bad = torch.tensor([[[-2.0, 0.0], [3.0, 0.0]]])  # swapped directions
    # logits = +-1/tau on the diagonal, -+1/tau off it: CE = log(1 + exp(-+2/tau))
    # (fp32 cross-entropy: absolute error ~1e-8 around a 1.8e-5 value)
    assert patch_disc(pred, good, tau).item() == pytest.approx(2 * tau * math.log1p(math.exp(-2 / tau)), abs=1e-7)
    assert patch_disc(pred, bad, tau).item() == pytest.approx(2 * tau * math.log1p(math.exp(2 / tau)), rel=1e-5)


def _patch_disc_by_hand(pred: list[list[float]], target: list[list[float]], tau: float) -> float:
    """Scalar-loop PatchDisc for one image."""
    m, d = len(pred), len(pred[0])
    mean = [sum(pred[k][c] for k in range(m)) / m for c in range(d)]
    std = [math.sqrt(sum((pred[k][c] - mean[c]) ** 2 for k in range(m)) / (m - 1)) for c in range(d)]
    p = [[(pred[k][c] - mean[c]) / (std[c] + 1e-4) for c in range(d)] for k in range(m)]

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    p = [unit(v) for v in p]
    z = [unit(v) for v in target]
    total = 0.0
    for k in range(m):
        logits = [sum(p[k][c] * z[j][c] for c in range(d)) / tau for j in range(m)]
        total += -logits[k] + math.log(sum(math.exp(v) for v in logits))
    return 2 * tau * total / m


def test_patch_disc_matches_hand_computation_and_is_per_image():
    pred = torch.tensor([[0.3, -1.2, 0.5], [1.1, 0.4, -0.7], [-0.2, 0.9, 0.8], [0.6, -0.3, -1.5]])
    target = torch.tensor([[1.0, 0.2, -0.4], [0.1, 1.3, 0.6], [-0.9, 0.5, 0.2], [0.4, -0.8, 1.1]])
    for tau in (0.2, 1.0):
        got = patch_disc(pred[None], target[None], tau).item()
        assert got == pytest.approx(_patch_disc_by_hand(pred.tolist(), target.tolist(), tau), rel=1e-5)

    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 5, 8, generator=g)
    t = torch.randn(6, 5, 8, generator=g)
    per_image = torch.stack([patch_disc(p[i : i + 1], t[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(patch_disc(p, t), per_image.mean())
    # an image's term does not depend on which other images share its batch (no cross-image negatives)
    torch.testing.assert_close(patch_disc(p[:2], t[:2]), per_image[:2].mean())
    torch.testing.assert_close(patch_disc(torch.cat([p[:1]] * 4), torch.cat([t[:1]] * 4)), per_image[0])


def test_similarity_regularizer_and_average_similarity():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # pairs: 1, 0, 0, 1 -> mean 0.5 (diagonal included)
    assert average_patch_similarity(x).item() == pytest.approx(0.5)
    same = torch.tensor([[[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]])
    assert average_patch_similarity(same).item() == pytest.approx(1.0)
    r = similarity_regularizer(same, x, 0.25)
    assert r.item() == pytest.approx((1.0 - 0.25) ** 2 + (0.5 - 0.25) ** 2)


# -- decoder, projector --------------------------------------------------------------------------


def test_visual_cue_weights_depend_only_on_positions():
    dec = CrossDecoder(embed_dim=16, out_dim=16, grid_size=(4, 4), decoder_dim=32, depth=1, num_heads=2)
    vis = torch.tensor([[0, 5, 10], [0, 5, 10]])
    tgt = torch.tensor([[3, 7, 12, 1], [3, 7, 12, 1]])
    w = dec.cue_weights(vis, tgt)
    # by hand from the fixed sin-cos table
    pe = sincos_2d(32, 4, 4).double()
    logits = pe[tgt[0]] @ pe[vis[0]].T / math.sqrt(32)
    torch.testing.assert_close(w[0].double(), logits.softmax(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4))
    # same ids, different image content (and different decoder weights) -> identical weights
    lat_a, lat_b = torch.randn(2, 4, 16), torch.randn(2, 4, 16) * 5
    _, wa = dec(lat_a, vis, tgt, return_cues=True)
    other = CrossDecoder(embed_dim=16, out_dim=16, grid_size=(4, 4), decoder_dim=32, depth=1, num_heads=2)
    _, wb = other(lat_b, vis, tgt, return_cues=True)
    torch.testing.assert_close(wa, wb, rtol=0, atol=0)
    torch.testing.assert_close(wa[0], wa[1], rtol=0, atol=0)
    # permuting the visible tokens permutes the columns only
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(dec.cue_weights(vis[:, perm], tgt), w[:, :, perm])
    # the cues enter the queries: the same weights without cues predict differently
    nocue = CrossDecoder(16, 16, (4, 4), 32, 1, 2, visual_cues=False)
    nocue.load_state_dict(dec.state_dict())
    out_nc, w_nc = nocue(lat_a, vis, tgt, return_cues=True)
    assert w_nc is None
    assert not torch.allclose(out_nc, dec(lat_a, vis, tgt))


def test_decoders_keep_target_order():
    torch.manual_seed(0)
    for dec in (CrossDecoder(16, 8, (4, 4), 32, 2, 2), SelfAttnLatentDecoder(16, 8, (4, 4), 32, 2, 2)):
        dec.eval()
        lat = torch.randn(2, 4, 16)
        vis = torch.tensor([[0, 5, 10], [2, 6, 9]])
        tgt = torch.tensor([[3, 7, 12, 1], [4, 8, 15, 0]])
        out = dec(lat, vis, tgt)
        assert out.shape == (2, 4, 8)
        perm = torch.tensor([2, 0, 3, 1])  # permuting targets permutes the predictions the same way
        torch.testing.assert_close(dec(lat, vis, tgt[:, perm]), out[:, perm], rtol=1e-5, atol=1e-5)


def test_projector_shape_and_layers():
    proj = MLPProjector(8, hidden_dim=16, depth=3)
    kinds = [type(m).__name__ for m in proj.layers]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Linear", "LayerNorm", "GELU", "Linear", "LayerNorm"]
    assert all(m.bias is None for m in proj.layers if isinstance(m, torch.nn.Linear))
    assert proj(torch.randn(2, 5, 8)).shape == (2, 5, 8)


# -- gapped patchify -----------------------------------------------------------------------------


def test_gap_zero_equals_patchify_and_encoder_paths_agree():
    x = torch.randn(3, 2, 12, 12)
    assert torch.equal(gapped_patchify(x, 4, 0), patchify(x, 4))
    m = LatentMIM(
        ModelConfig(ViTConfig(img_size=12, patch_size=4, in_chans=2, embed_dim=16, depth=1, num_heads=2), DecoderConfig(16, 1, 2)),
        LatentMIMOptions(patch_gap=0, projector=ProjectorOptions(kind="none"), masking=MaskingOptions(ratio=0.5, num_keep=None)),
    )
    ids = torch.arange(9).expand(3, 9)
    # the Linear on pre-cut patches equals the conv patch embedding used at evaluation
    torch.testing.assert_close(m.encoder.pixel_tokens(patchify(x, 4), ids), m.encoder.patch_tokens(x), rtol=1e-5, atol=1e-5)


def test_gapped_patchify_takes_one_patch_per_cell_at_random_offsets():
    p, gap, grid = 3, 3, 4
    cell = p + gap
    x = torch.randn(2, 2, grid * cell, grid * cell)
    out = gapped_patchify(x, p, gap, torch.Generator().manual_seed(0))
    assert out.shape == (2, grid * grid, p * p * 2)
    rows, cols = set(), set()
    for b in range(2):
        for i in range(grid):
            for j in range(grid):
                hits = [
                    (a, c)
                    for a in range(gap)
                    for c in range(gap)
                    if torch.equal(
                        out[b, i * grid + j],
                        patchify(x[b : b + 1, :, i * cell + a : i * cell + a + p, j * cell + c : j * cell + c + p], p)[0, 0],
                    )
                ]
                assert len(hits) == 1, "each patch is a contiguous p x p block at an offset in [0, gap-1]"
                rows.add(hits[0][0])
                cols.add(hits[0][1])
    assert rows == set(range(gap)) and cols == set(range(gap))  # offsets vary, rows and columns both
    # gap 1: offsets are always 0 -> a fixed 1-pixel gap, no randomness
    y = torch.randn(1, 1, 10, 10)
    torch.testing.assert_close(gapped_patchify(y, 4, 1), patchify(y[:, :, [0, 1, 2, 3, 5, 6, 7, 8]][..., [0, 1, 2, 3, 5, 6, 7, 8]], 4))


def test_images_are_resized_for_the_gap():
    m = tiny_method(patch_gap=1)
    assert m.train_size == 35
    assert m.prepare_images(torch.randn(2, 1, 28, 28)).shape == (2, 1, 35, 35)
    x35 = torch.randn(2, 1, 35, 35)
    assert m.prepare_images(x35) is x35
    with pytest.raises(ValueError):
        m.prepare_images(torch.randn(2, 1, 30, 30))
    assert tiny_method(patch_gap=0).train_size == 28


# -- every ablation arm ---------------------------------------------------------------------------

ARMS = [
    dict(),  # published default: ema, patchdisc, gap, regularizer, cross-attn + cues, mlp projector
    dict(target="naive", loss="mse", patch_gap=0, reg_weight=0.0, decoder="self_attn", projector=ProjectorOptions(kind="none")),
    dict(target="separate", loss="mse"),
    dict(target="stopgrad", loss="l1", decoder="cross_attn"),
    dict(target="ema", loss="huber", decoder="self_attn", mask_ratio=0.75, num_keep=None),
    dict(target="ema", loss="patchdisc", decoder="cross_attn_cues", num_keep=10, patch_gap=2),
    dict(target="stopgrad", loss="patchdisc", projector=ProjectorOptions(kind="none"), reg_weight=0.0),
]


@pytest.mark.parametrize("arm", ARMS, ids=lambda a: "-".join(f"{k}={getattr(v, 'kind', v)}" for k, v in a.items()) or "default")
def test_each_arm_forward_backward(arm):
    torch.manual_seed(0)
    m = tiny_method(**arm)
    out = m(torch.randn(3, 1, 28, 28), Progress(1, 10))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    n_vis = out.plan.num_keep
    assert n_vis == resolve_num_keep(49, arm.get("mask_ratio", 0.9), arm.get("num_keep", 5))
    assert out.pred.shape == out.target.shape == (3, 49 - n_vis, 32)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.encoder.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in m.decoder.parameters() if p.requires_grad)
    for key in ("sim_pred", "sim_vis", "sim_trg", "gamma"):
        assert key in out.metrics
    assert ("ema_momentum" in out.metrics) == (m.options.target == "ema")
    assert ("loss_reg" in out.metrics) == (m.options.reg_weight > 0)
    target = m.options.target
    if target == "separate":
        assert all(p.grad is not None for p in m.target.branch.parameters() if p.requires_grad)
    if target == "ema":
        assert all(p.grad is None for p in m.target.branch.parameters())
    if target in ("naive", "stopgrad"):
        assert m.target.branch is None  # shared weights (see test_naive_gradient_flows_through_target_branch)
    m.after_step(Progress(2, 10))


def test_naive_gradient_flows_through_target_branch():
    x = torch.randn(2, 1, 28, 28)
    grads = {}
    for target in ("naive", "stopgrad"):
        torch.manual_seed(0)
        m = tiny_method(target=target, loss="mse", reg_weight=0.0)
        plan = m.make_plan(x, None, torch.Generator().manual_seed(1))
        m(x, Progress(0, 10), plan=plan, generator=torch.Generator().manual_seed(2)).loss.backward()
        grads[target] = m.encoder.blocks[0].mlp.fc1.weight.grad.clone()
    assert not torch.allclose(grads["naive"], grads["stopgrad"])


def test_visible_count_and_registration():
    assert resolve_num_keep(196, 0.9) == 19  # MAE's floor rule; the presets set the official num_vis
    assert resolve_num_keep(196, 0.9, 20) == 20 and resolve_num_keep(49, 0.9) == 4 and resolve_num_keep(49, 0.9, 5) == 5
    with pytest.raises(ValueError):
        resolve_num_keep(49, 0.9, 50)
    with pytest.raises(ValueError, match="at least one target"):
        tiny_method(num_keep=49)
    assert METHODS["latent_mim"] is LatentMIM and LatentMIM.options_class is LatentMIMOptions
    with pytest.raises(ValueError):
        tiny_method(target="bogus")
    with pytest.raises(ValueError, match="amr_mode"):
        from mimkit.masking import SalienceOptions

        tiny_method(masking=MaskingOptions(kind="sbam", sbam=SalienceOptions(amr_mode="sample")))
    with pytest.raises(ValueError, match="masking kind"):
        tiny_method(masking=MaskingOptions(kind="partition"))


def test_sbam_masking_on_latent_mim_masks_the_most_salient_gapped_tokens():
    from mimkit.masking import SalienceOptions, token_salience

    m = tiny_method(patch_gap=1, masking=MaskingOptions(kind="sbam", ratio=0.75, sbam=SalienceOptions(amr_mode="off", noise=0.0)))
    x = torch.randn(3, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    out = m(x, Progress(9, 10), generator=g)
    assert out.plan.num_keep == resolve_num_keep(49, 0.75)
    g = torch.Generator().manual_seed(0)
    pix = gapped_patchify(m.prepare_images(x), 4, 1, g)
    sal = token_salience(m.encoder.pixel_tokens(pix, torch.arange(49).expand(3, 49)))
    # without noise, every masked token is at least as salient as every visible one
    vis = torch.gather(sal, 1, out.plan.ids_keep)
    tgt = torch.gather(sal, 1, out.plan.target_ids())
    assert bool((vis.amax(1) <= tgt.amin(1)).all())
    assert "salience" in m.capabilities.pictures


def test_configs_load_and_build():
    base = load_config(ROOT / "configs/latent_mim_vit_base_imagenet.yaml")
    o = base.method
    assert (o.name, o.target, o.loss, o.tau, o.masking.num_keep, o.patch_gap, o.reg_weight, o.reg_gamma, o.decoder) == (
        "latent_mim", "ema", "patchdisc", 0.2, 20, 4, 0.1, (0.75, 0.25), "cross_attn_cues",
    )
    assert (o.momentum, o.projector.kind, o.projector.depth, o.projector.hidden_dim) == (0.99, "mlp", 3, 4096)
    assert (base.model.decoder.embed_dim, base.model.decoder.depth, base.model.decoder.num_heads) == (512, 3, 16)
    small = load_config(ROOT / "configs/latent_mim_fashion_mnist.yaml", ["method.target=naive", "method.decoder=self_attn"])
    assert base.optim.min_lr_ratio == 0.25 and small.optim.min_lr_ratio == 0.25
    m = METHODS[small.method.name](small.model, small.method)
    assert (m.options.masking.num_keep, m.train_size, m.options.target) == (5, 35, "naive")
    out = m(torch.randn(2, 1, 28, 28), Progress(0, 10))
    assert torch.isfinite(out.loss)


# -- collapse: naive vs EMA -----------------------------------------------------------------------


def _fashion_mnist_test_images(n: int) -> torch.Tensor | None:
    """The first ``n`` test images, or ``None`` when Fashion-MNIST is not installed (any other error of
    the loader is a bug and fails the test)."""
    from mimkit.data import DataError, load_fashion_mnist

    try:
        images, _ = load_fashion_mnist(split="test")
    except DataError:
        return None
    return images[:n]


def _train_collapse_arm(target: str, x: torch.Tensor, steps: int) -> tuple[float, float]:
    """The collapse table's setting: MSE, mask 0.75, no gap, no R,
    self-attn decoder, no projector. Returns (Sim of full-image encoder features, last sim_trg)."""
    torch.manual_seed(0)
    m = LatentMIM(
        tiny_model(patch=7),
        LatentMIMOptions(
            target=target, loss="mse", masking=MaskingOptions(ratio=0.75, num_keep=None), patch_gap=0, reg_weight=0.0,
            decoder="self_attn", projector=ProjectorOptions(kind="none"),
        ),
    )
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    train, held_out = x[:1536], x[1536:]
    for step in range(steps):
        batch = train[torch.randint(0, len(train), (64,), generator=g)]
        out = m(batch, Progress(step, steps), generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        m.after_step(Progress(step + 1, steps))
    with torch.no_grad():
        feats = m.encoder.forward_features(held_out, norm=False)[:, 1:]  # LN removed, cls excluded
    return average_patch_similarity(feats).item(), float(out.metrics["sim_trg"])


@pytest.mark.slow
def test_naive_arm_collapses_ema_arm_does_not():
    images = _fashion_mnist_test_images(2048)
    if images is None:
        pytest.skip("Fashion-MNIST not found")
    x = (images.float() / 255 - 0.2860) / 0.3530
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        naive_sim, naive_trg = _train_collapse_arm("naive", x, 300)
        ema_sim, ema_trg = _train_collapse_arm("ema", x, 300)
    finally:
        torch.set_num_threads(threads)
    assert naive_sim > 0.97 and naive_trg > 0.97, (naive_sim, naive_trg)  # every patch the same latent
    assert ema_sim < 0.8 and ema_trg < 0.85, (ema_sim, ema_trg)
