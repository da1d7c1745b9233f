"""CAE and CAE v2: regressor, alignment target, token order, frozen teacher, codebook, options, files."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_fmnist, tiny_model_config

from mimkit.codebook import Codebook, fit_codebook, kmeans, patch_vectors
from mimkit.config import ConfigError
from mimkit.masking import BlockOptions, MaskingOptions, MaskPlan
from mimkit.methods import CAE, CAEOptions, CAEv2, CAEv2Options, Progress
from mimkit.nn import ViTConfig, ViTEncoder
from mimkit.nn.cae import LatentRegressor, RegressorBlock
from mimkit.nn.patch import norm_pix, patchify
from mimkit.nn.vit import gather_tokens
from mimkit.weights import read_codebook

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ViTConfig(img_size=28, patch_size=7, in_chans=1, embed_dim=24, depth=1, num_heads=2)


def images(b=4, seed=0):
    return torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def cae(**kw):
    torch.manual_seed(0)
    kw.setdefault("regressor_depth", 2)
    return CAE(tiny_model_config(), CAEOptions(**kw))


def cae_v2(**kw):
    torch.manual_seed(0)
    kw.setdefault("regressor_depth", 1)
    kw.setdefault("data_mean", (0.2860,))  # the colour jitter (on by default) works in pixel space
    kw.setdefault("data_std", (0.3530,))
    if "teacher_path" not in kw:
        kw.setdefault("teacher_vit", TEACHER)
        kw.update(teacher_random_init=True)
    return CAEv2(tiny_model_config(), CAEv2Options(**kw))


def plan_for(model, x, seed=0):
    return model.make_plan(x, None, torch.Generator().manual_seed(seed))


# -- regressor --------------------------------------------------------------------------------------
def test_regressor_block_equals_hand_formula():
    torch.manual_seed(0)
    d, h = 8, 2
    blk = RegressorBlock(d, h, mlp_ratio=2.0, layer_scale=0.3).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.1 * torch.randn_like(p))
    xm, zv = torch.randn(2, 3, d), torch.randn(2, 5, d)
    pm, pv = torch.randn(2, 3, d), torch.randn(2, 5, d)
    ln = lambda t, m: F.layer_norm(t, (d,), m.weight, m.bias, 1e-6)  # noqa: E731
    a = blk.cross_attn
    kv, pk = torch.cat([zv, xm], 1), torch.cat([pv, pm], 1)
    q = ln(xm + pm, blk.norm_q) @ a.q.weight.T + a.q.bias  # positions on q and k, not v
    k = ln(kv + pk, blk.norm_k) @ a.k.weight.T  # no key bias
    v = ln(kv, blk.norm_v) @ a.v.weight.T + a.v.bias
    hd = d // h
    outs = []
    for i in range(h):
        s = slice(i * hd, (i + 1) * hd)
        outs.append(torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(hd), -1) @ v[..., s])
    attn = torch.cat(outs, -1) @ a.proj.weight.T + a.proj.bias
    x = ln(xm + blk.ls1.gamma * attn, blk.norm2)  # post-norm after the attention residual
    expected = x + blk.ls2.gamma * blk.mlp(x)
    torch.testing.assert_close(blk(xm, zv, pm, pv), expected, rtol=1e-5, atol=1e-5)


def test_regressor_leaves_visible_latents_unchanged():
    torch.manual_seed(0)
    reg = LatentRegressor(8, (4, 4), depth=3, num_heads=2).eval()
    zv = torch.randn(2, 6, 8)
    before = zv.clone()
    ids_v = torch.stack([torch.randperm(16)[:6] for _ in range(2)])
    ids_m = torch.stack([torch.tensor([i for i in range(16) if i not in set(r.tolist())]) for r in ids_v])
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone())) for b in reg.blocks]
    out = reg(zv, ids_v, ids_m)
    for hk in hooks:
        hk.remove()
    assert out.shape == (2, 10, 8)
    assert torch.equal(zv, before)
    assert len(seen) == 3 and all(torch.equal(s, before) for s in seen)  # every block reads the same Z_v
    # the predictions depend on the visible latents (they are read)
    assert not torch.allclose(reg(zv + torch.randn_like(zv), ids_v, ids_m), out)


def test_cae_latents_visible_rows_are_the_encoder_output():
    m = cae().eval()
    x = images()
    plan = plan_for(m, x)
    lat = m.latents(x, plan)
    expected = m.proj(m.encoder.forward_masked(x, plan.ids_keep))
    torch.testing.assert_close(lat["z_v"], expected)


# -- alignment target -------------------------------------------------------------------------------
def test_alignment_target_is_the_encoder_on_masked_patches_without_grad():
    m = cae().eval()
    x = images()
    plan = plan_for(m, x)
    lat = m.latents(x, plan)
    ids_m = plan.ids_masked()
    with torch.no_grad():
        expected = m.proj(m.encoder.forward_masked(x, ids_m))[:, 1:]
    torch.testing.assert_close(lat["z_bar"], expected)
    assert not lat["z_bar"].requires_grad and lat["z_m"].requires_grad
    # the alignment loss sends no gradient into the target branch: d(align)/d(encoder) equals the
    # gradient with a constant target
    m.zero_grad()
    F.mse_loss(lat["z_m"], lat["z_bar"]).backward()
    g1 = m.encoder.blocks[0].attn.qkv.weight.grad.clone()
    m.zero_grad()
    lat2 = m.latents(x, plan)
    F.mse_loss(lat2["z_m"], expected.clone()).backward()
    torch.testing.assert_close(m.encoder.blocks[0].attn.qkv.weight.grad, g1)


def test_align_weight_scales_the_alignment_term():
    x = images()
    outs = {}
    for w in (0.0, 2.0):
        m = cae(align_weight=w).eval()
        outs[w] = m(x, plan=plan_for(m, x))
    o0, o2 = outs[0.0], outs[2.0]
    torch.testing.assert_close(o0.loss, o0.metrics["loss_pix"])
    torch.testing.assert_close(o2.loss, o2.metrics["loss_pix"] + 2.0 * o2.metrics["loss_align"])
    assert torch.isfinite(o0.metrics["align_cos"])


# -- token order ------------------------------------------------------------------------------------
def _reorder_masked(plan: MaskPlan) -> MaskPlan:
    """The same visible set, masked ids in reversed order."""
    n = plan.num_keep
    perm = plan.perm
    perm = torch.cat([perm[:, :n], perm[:, n:].flip(1)], 1)
    return MaskPlan.from_permutation(perm, n)


@pytest.mark.parametrize("kind", ["block", "random"])
def test_cae_predictions_and_targets_share_the_masked_order(kind):
    masking = MaskingOptions(kind=kind, ratio=0.5, block=BlockOptions(min_patches=4))
    m = cae(masking=masking).eval()
    x = images()
    plan = plan_for(m, x)
    out = m(x, plan=plan)
    ids_m = plan.ids_masked()
    expected = torch.gather(norm_pix(patchify(x, 4)), 1, ids_m[..., None].expand(-1, -1, 16))
    torch.testing.assert_close(out.target, expected)
    # reversing the masked ids reverses predictions and targets row for row (queries are equivariant)
    out2 = m(x, plan=_reorder_masked(plan))
    torch.testing.assert_close(out2.pred, out.pred.flip(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out2.target, out.target.flip(1))
    torch.testing.assert_close(out2.loss, out.loss, rtol=1e-5, atol=1e-6)


def test_cae_v2_prediction_and_teacher_token_order():
    m = cae_v2().eval()
    x = images()
    plan = plan_for(m, x)
    out = m(x, plan=plan)
    n, ids_m = plan.num_keep, plan.ids_masked()
    full = F.normalize(m.teacher(x, grid=m.encoder.grid_size), dim=-1)  # (B, 1+L, Dt)
    b = torch.arange(x.shape[0])[:, None]
    torch.testing.assert_close(out.target[:, 0], full[:, 0])
    torch.testing.assert_close(out.target[:, 1 : 1 + n], full[:, 1:][b, plan.ids_keep])
    torch.testing.assert_close(out.target[:, 1 + n :], full[:, 1:][b, ids_m])
    assert out.pred.shape == out.target.shape == (4, 1 + 49, 24)
    torch.testing.assert_close(out.pred.norm(dim=-1), torch.ones(4, 50))
    out2 = m(x, plan=_reorder_masked(plan))
    torch.testing.assert_close(out2.pred[:, 1 + n :], out.pred[:, 1 + n :].flip(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out2.target[:, 1 + n :], out.target[:, 1 + n :].flip(1))


@pytest.mark.parametrize("groups", [("visible",), ("masked",), ("cls",), ("cls", "visible", "masked")])
def test_cae_v2_loss_is_cosine_distance_on_selected_groups(groups):
    m = cae_v2(supervise=groups).eval()
    x = images()
    plan = plan_for(m, x)
    out = m(x, plan=plan)
    cos = (out.pred * out.target).sum(-1)
    n = plan.num_keep
    parts = {"cls": cos[:, :1], "visible": cos[:, 1 : 1 + n], "masked": cos[:, 1 + n :]}
    expected = (1 - torch.cat([parts[g] for g in groups], 1)).mean()
    torch.testing.assert_close(out.loss, expected)


# -- frozen teacher ---------------------------------------------------------------------------------
def test_teacher_gets_no_gradient_and_never_changes():
    from mimkit.train.optim import param_groups

    m = cae_v2()
    m.train()
    assert not m.teacher.encoder.training
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    teacher_ids = {id(p) for p in m.teacher.parameters()}
    groups = param_groups(m, 0.05)
    assert not teacher_ids & {id(p) for g in groups for p in g["params"]}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    x = images()
    for step in range(3):
        out = m(x, Progress(step, 3))
        out.loss.backward()
        assert all(p.grad is None for p in m.teacher.parameters())
        opt.step()
        opt.zero_grad()
        m.after_step(Progress(step + 1, 3))
    assert all(torch.equal(v, before[k]) for k, v in m.teacher.state_dict().items())
    assert all(not p.requires_grad for p in m.teacher.parameters())


def test_teacher_from_file_and_checkpoint_without_the_file(tmp_path):
    from mimkit.interop import export_encoder

    torch.manual_seed(1)
    teacher = ViTEncoder(TEACHER)
    path = export_encoder(teacher, tmp_path / "teacher.safetensors")
    m = cae_v2(teacher_path=str(path))
    assert torch.equal(m.teacher.encoder.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    state = m.state_dict()
    path.unlink()
    # no file and no shape: building works, a training step names the command that makes the file
    orphan = cae_v2(teacher_path=str(path))
    with pytest.raises(ConfigError, match="mimkit pretrain"):
        orphan(images())
    # a checkpoint fills the teacher (its shape travels in the state dict)
    orphan.load_state_dict(state)
    assert torch.equal(orphan.teacher.encoder.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    x = images()
    plan = plan_for(m, x)
    torch.testing.assert_close(orphan.eval()(x, plan=plan).loss, m.eval()(x, plan=plan).loss)
    # a placeholder of another shape is rebuilt from the checkpoint too
    other = cae_v2(teacher_path=str(path), teacher_vit=ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=8,
                                                                  depth=1, num_heads=2))
    other.load_state_dict(state)
    assert other.teacher.encoder.embed_dim == 24 and other.head.head.out_features == 24


def test_cae_v2_size_preset_and_errors():
    from mimkit.methods.cae_v2 import size_num_keep

    assert [196 - size_num_keep(196, s) for s in ("tiny", "small", "base")] == [30, 49, 98]
    assert 49 - size_num_keep(49, "tiny") == 8
    m = cae_v2(size_preset="tiny")
    assert int(plan_for(m, images()).mask.sum(1)[0]) == 8
    with pytest.raises(ValueError, match="supervise"):
        cae_v2(supervise=("patches",))
    with pytest.raises(ValueError, match="teacher_path"):
        CAEv2(tiny_model_config(), CAEv2Options())
    with pytest.raises(ValueError, match="teacher_vit"):
        CAEv2(tiny_model_config(), CAEv2Options(teacher_random_init=True))
    with pytest.raises(ValueError, match="block or random"):
        cae_v2(masking=MaskingOptions(kind="partition"))
    with pytest.raises(ValueError, match="size_preset"):
        cae_v2(size_preset="tiny", masking=MaskingOptions(kind="block", num_keep=10))


# -- colour jitter (Atten4Vis/CAE furnace/datasets.py: ColorJitter(0.4, 0.4, 0.4) before both views) --------
@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_is_torchvision_colorjitter_per_image(channels):
    from torchvision.transforms.v2 import functional as TF

    from mimkit.methods.cae_v2 import apply_jitter, jitter_params

    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, channels, 9, 7, generator=g)
    factors, order = jitter_params(16, 0.4, "cpu", g)
    assert bool(((factors >= 0.6) & (factors <= 1.4)).all())
    assert torch.equal(order.sort(1).values, torch.arange(3).expand(16, 3))  # a permutation per image
    assert len({tuple(o) for o in order.tolist()}) > 1  # drawn per image, not once per batch
    out = apply_jitter(x, factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]  # ColorJitter's fn_idx 0, 1, 2
    for i in range(16):
        ref = x[i]
        for k in order[i].tolist():
            ref = ops[k](ref, float(factors[i, k]))
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


def test_cae_v2_jitters_one_image_for_teacher_and_student_in_training_only():
    from mimkit.methods.cae_v2 import color_jitter

    m = cae_v2()
    x = images()
    plan = plan_for(m, x)
    with torch.no_grad():
        m.train()
        jittered = m(x, plan=plan, generator=torch.Generator().manual_seed(3))
        m.eval()
        plain = m(x, plan=plan, generator=torch.Generator().manual_seed(3))
        xj = color_jitter(x, 0.4, (0.2860,), (0.3530,), torch.Generator().manual_seed(3))
        by_hand = m(xj, plan=plan)  # eval: no second jitter; the teacher and the student both read xj
    assert not torch.allclose(xj, x)
    torch.testing.assert_close(jittered.loss, by_hand.loss)
    torch.testing.assert_close(jittered.target, by_hand.target)
    torch.testing.assert_close(jittered.pred, by_hand.pred)
    assert (jittered.loss - plain.loss).abs() > 1e-4
    off = cae_v2(color_jitter=0.0).train()
    with torch.no_grad():
        torch.testing.assert_close(off(x, plan=plan).loss, off.eval()(x, plan=plan).loss)


def test_cae_v2_jitter_needs_the_data_normalisation():
    m = cae_v2(data_mean=None, data_std=None).train()
    with pytest.raises(ConfigError, match="data_mean"):
        m(images())
    cae_v2(data_mean=None, data_std=None, color_jitter=0.0).train()(images())  # off: nothing to undo
    with pytest.raises(ValueError, match="data_std"):
        cae_v2(data_std=None)
    with pytest.raises(ValueError, match="needs the data's normalisation"):
        cae_v2(data_mean=None, data_std=None, teacher_mean=(0.5,), teacher_std=(0.5,))
    with pytest.raises(ValueError, match="color_jitter"):
        cae_v2(color_jitter=-0.1)


def test_cae_v2_presets_official_sizes():
    """Tiny / Small / Base presets: the official register functions' 12 heads, regressor width and depth,
    masked counts 30 / 49 / 98 of 196 (project/CAEv2/scripts/caev2_{tiny,small,base}_300e.sh) and jitter 0.4."""
    from mimkit.config import load_config
    from mimkit.methods.cae_v2 import SIZE_BY_WIDTH, size_num_keep

    want = {"tiny": (192, 96, 1, 30), "small": (384, 384, 1, 49), "base": (768, 768, 4, 98)}
    for size, (dim, width, depth, masked) in want.items():
        cfg = load_config(ROOT / "configs" / f"cae_v2_vit_{size}_imagenet.yaml")
        enc, dec, o = cfg.model.encoder, cfg.model.decoder, cfg.method
        assert (enc.embed_dim, enc.depth, enc.num_heads, enc.patch_size, enc.img_size) == (dim, 12, 12, 16, 224)
        assert (dec.embed_dim, dec.num_heads, o.regressor_depth) == (width, 12, depth)
        chosen = SIZE_BY_WIDTH[dim] if o.size_preset == "auto" else o.size_preset
        assert chosen == size and 196 - size_num_keep(196, chosen) == masked
        assert o.color_jitter == 0.4 and tuple(o.data_mean) == tuple(cfg.data.mean)


# -- masking and options ------------------------------------------------------------------------------
def test_block_masking_exact_count_and_errors():
    m = cae(masking=MaskingOptions(kind="block", ratio=0.5, block=BlockOptions(min_patches=4)))
    plan = plan_for(m, images(16)).validate()
    assert torch.equal(plan.mask.sum(1), torch.full((16,), 25.0))
    assert m.capabilities.masking_kinds == ("block", "random")
    assert "reconstruction" in m.capabilities.pictures
    with pytest.raises(ValueError, match="target"):
        cae(target="dalle")
    with pytest.raises(ValueError, match="codebook_path"):
        cae(target="codebook")
    with pytest.raises(ValueError, match="block or random"):
        cae(masking=MaskingOptions(kind="sbam"))


def test_cae_without_decoder_is_a_linear_head():
    assert len(cae().decoder.blocks) == 1  # model.decoder.depth
    cfg = tiny_model_config()
    cfg.decoder.depth = 0
    m = CAE(cfg, CAEOptions(regressor_depth=1)).eval()
    x = images()
    plan = plan_for(m, x)
    lat = m.latents(x, plan)
    out = m(x, plan=plan)
    torch.testing.assert_close(out.pred, m.decoder.head(m.decoder.norm(lat["z_m"])))


def test_cae_reconstruction_keeps_visible_patches():
    m = cae().eval()
    x = images()
    plan = plan_for(m, x)
    rec = m.reconstruct(x, plan)
    target = norm_pix(patchify(x, 4))
    vis = rec.mask == 0
    torch.testing.assert_close(rec.pred[vis], target[vis])
    out = m(x, plan=plan)
    b = torch.arange(4)[:, None]
    torch.testing.assert_close(rec.pred[b, plan.ids_masked()], out.pred)


# -- codebook ---------------------------------------------------------------------------------------
def test_codebook_assigns_each_patch_to_its_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    book = Codebook(torch.randn(7, 16, generator=g), patch_size=4)
    patches = torch.randn(3, 11, 16, generator=g)
    ids = book.assign(patches)
    brute = torch.cdist(patches.reshape(-1, 16), book.centroids).argmin(1).reshape(3, 11)
    assert ids.shape == (3, 11) and torch.equal(ids, brute)
    x = images(2)
    torch.testing.assert_close(book.tokens(x), book.assign(norm_pix(patchify(x, 4))), rtol=0, atol=0)
    assert torch.equal(patch_vectors(x, 4), norm_pix(patchify(x, 4)))


def test_kmeans_recovers_separated_clusters_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 10
    pts = centers.repeat_interleave(50, 0) + 0.01 * torch.randn(200, 16, generator=g)
    cents, info = kmeans(pts, 4, iters=10)
    err = torch.cdist(centers, cents).min(1).values
    assert err.max() < 0.1 and info["codes_used"] == 4
    x = (images(8) * 60 + 128).clamp(0, 255).to(torch.uint8)
    book, info = fit_codebook(x, 4, k=16, iters=5, mean=(0.5,), std=(0.25,))
    path = book.save(tmp_path / "cb.pt", info)
    again = read_codebook(path)
    assert torch.equal(again.centroids, book.centroids) and again.patch_size == 4
    with pytest.raises(FileNotFoundError, match="mimkit.codebook fit"):
        read_codebook(tmp_path / "missing.pt")


def test_cae_codebook_target_file_and_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    book = Codebook(torch.randn(32, 16, generator=g), 4)
    path = book.save(tmp_path / "cb.pt")
    m = cae(target="codebook", codebook_path=str(path), codebook_size=32).eval()
    x = images()
    plan = plan_for(m, x)
    out = m(x, plan=plan)
    assert out.pred.shape == (4, 25, 32)
    assert torch.equal(out.target, torch.gather(book.tokens(x), 1, plan.ids_masked()))
    ce = F.cross_entropy(out.pred.flatten(0, 1), out.target.flatten())
    torch.testing.assert_close(out.loss, ce + 2.0 * out.metrics["loss_align"])
    assert "reconstruction" not in m.capabilities.pictures
    with pytest.raises(ValueError, match="codebook_size=32"):
        cae(target="codebook", codebook_path=str(path), codebook_size=64)
    state = m.state_dict()
    path.unlink()
    orphan = cae(target="codebook", codebook_path=str(path), codebook_size=32)
    with pytest.raises(ConfigError, match="python -m mimkit.codebook fit"):
        orphan(x)
    orphan.load_state_dict(state)
    assert torch.equal(orphan.eval()(x, plan=plan).target, out.target)


# -- pictures and the trainer -------------------------------------------------------------------------
def test_regressor_picture_and_alignment_map(tmp_path):
    from mimkit.viz import draw_picture

    for m in (cae(), cae_v2()):
        x = images()
        cos = m.eval().alignment_map(x, plan_for(m, x))
        masked = plan_for(m, x).mask.bool()
        assert torch.isnan(cos[~masked]).all() and (cos[masked].abs() <= 1 + 1e-5).all()
        path = draw_picture("regressor", m, (images(3) * 60 + 128).clamp(0, 255).to(torch.uint8), (0.5,), (0.25,),
                            tmp_path / f"{type(m).__name__}.png")
        assert path.is_file() and path.stat().st_size > 1000


@needs_fmnist
def test_cae_v2_run_then_checkpoint_builds_without_teacher_file(tmp_path):
    """The real trainer with a random teacher (preset shapes shrunk), then the model rebuilt from the
    checkpoint's config with a teacher path that does not exist."""
    from mimkit.config import config_from_dict, load_config
    from mimkit.train import pretrain
    from mimkit.train.checkpoint import load_checkpoint
    from mimkit.train.loop import build_method

    tiny = ["model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
            "model.decoder.embed_dim=32", "model.decoder.num_heads=2", "data.batch_size=32", "data.limit=64",
            "train.max_steps=2", "train.progress_bar=false", "train.tensorboard=false", "eval.knn_at_end=false",
            "eval.picture_at_end=false", f"train.out_dir={tmp_path}", *CAEv2.offline_overrides,
            "method.teacher_vit.embed_dim=24", "method.teacher_vit.depth=1", "method.teacher_vit.num_heads=2",
            "method.teacher_vit.patch_size=7"]
    pretrain(load_config(ROOT / "configs/cae_v2_fashion_mnist.yaml", tiny))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    conf = state["config"]
    conf["method"].update(teacher_path=str(tmp_path / "gone.pt"), teacher_random_init=False, teacher_vit=None)
    model = build_method(config_from_dict(conf))
    assert model.teacher is None and not model._teacher_ready
    model.load_state_dict(state["model"])
    assert model._teacher_ready and model.teacher.encoder.embed_dim == 24 and model.teacher.grid_size == (4, 4)
    x = images()
    assert torch.isfinite(model(x).loss)


def test_cae_tokenizer_target(tmp_path, monkeypatch):
    (tmp_path / "toy_tokenizer.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Tok(nn.Module):\n"
        "    def forward(self, x):\n"
        "        p = torch.nn.functional.avg_pool2d(x, 4)[:, 0]  # (B, 7, 7)\n"
        "        return (p > 0).long() + 2 * (p > 1).long()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = cae(target="tokenizer", tokenizer="toy_tokenizer:Tok", tokenizer_vocab=4).eval()
    x = images()
    plan = plan_for(m, x)
    out = m(x, plan=plan)
    p = F.avg_pool2d(x, 4)[:, 0].flatten(1)
    ids = (p > 0).long() + 2 * (p > 1).long()
    assert out.pred.shape == (4, 25, 4)
    assert torch.equal(out.target, torch.gather(ids, 1, plan.ids_masked()))
    assert not any("tokenizer" in k for k in m.state_dict())  # never saved
    assert not any("tokenizer" in n for n, _ in m.named_modules())


# -- CLIP teacher -----------------------------------------------------------------------------------
def clip_visual(width=32, layers=1, patch=7, img=28, out=16):
    """A random CLIP image tower in OpenAI's ``visual.*`` keys (one head: width // 64 -> 1)."""
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return 0.1 * torch.randn(*s, generator=g)

    n = (img // patch) ** 2
    sd = {"visual.class_embedding": r(width), "visual.positional_embedding": r(1 + n, width),
          "visual.conv1.weight": r(width, 3, patch, patch), "visual.ln_pre.weight": 1 + r(width),
          "visual.ln_pre.bias": r(width), "visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width),
          "visual.proj": r(width, out)}
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
                   p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                   p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                   p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
                   p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
                   p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width)})
    return sd


def clip_reference(sd, x, width=32, layers=1, patch=7):
    """OpenAI CLIP's image tower by hand, with ln_post on every token then the projection (CAE v2)."""
    def ln(t, name):
        return F.layer_norm(t, (width,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    t = F.conv2d(x, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), t], 1) + sd["visual.positional_embedding"]
    t = ln(t, "visual.ln_pre")
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        q, k, v = (ln(t, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(width), -1) @ v
        t = t + a @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = ln(t, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        t = t + (h * torch.sigmoid(1.702 * h)) @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return ln(t, "visual.ln_post") @ sd["visual.proj"]


def test_clip_teacher_matches_openai_forward_and_travels_in_checkpoints(tmp_path):
    from mimkit.targets import ClipImageTower, FrozenTeacher

    sd = clip_visual()
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)  # open_clip-style wrapping
    teacher = FrozenTeacher.from_file(path)
    assert isinstance(teacher.encoder, ClipImageTower) and teacher.grid_size == (4, 4)
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(teacher(x), clip_reference(sd, x), rtol=1e-4, atol=1e-4)
    m = cae_v2(teacher_path=str(path))
    assert m.head.head.out_features == 16
    xs = images()
    plan = plan_for(m, xs)
    out = m.eval()(xs, plan=plan)  # grey student images -> 3 channels, 4x4 teacher grid -> 7x7
    state = m.state_dict()
    path.unlink()
    orphan = cae_v2(teacher_path=str(path))
    orphan.load_state_dict(state)
    assert isinstance(orphan.teacher.encoder, ClipImageTower)
    torch.testing.assert_close(orphan.eval()(xs, plan=plan).loss, out.loss)


@pytest.mark.parametrize("kind", ["reg", "no_cls"])
def test_timm_teacher_with_other_prefix_tokens_gives_cls_then_patches(tmp_path, kind):
    """A teacher with register tokens keeps its class token and drops the registers; one without a
    class token gets the mean of its patches in the class slot -- the patches are timm's, unchanged."""
    import timm

    from mimkit.targets import FrozenTeacher

    extra = dict(reg_tokens=4) if kind == "reg" else dict(class_token=False, global_pool="avg", fc_norm=False)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, num_classes=0, **extra).eval()
    path = tmp_path / "teacher.pth"
    torch.save(model.state_dict(), path)
    teacher = FrozenTeacher.from_file(path, num_heads=2)  # 32 wide: no standard head count to infer
    x = torch.randn(3, 3, 28, 28)
    out = teacher(x)
    ref = model.forward_features(x)
    p = model.num_prefix_tokens
    assert out.shape == (3, 1 + 16, 32) and teacher.grid_size == (4, 4)
    torch.testing.assert_close(out[:, 1:], ref[:, p:], rtol=1e-5, atol=1e-5)
    first = ref[:, :1] if kind == "reg" else ref[:, p:].mean(1, keepdim=True)
    torch.testing.assert_close(out[:, :1], first, rtol=1e-5, atol=1e-5)
    assert teacher(x, grid=(7, 7)).shape == (3, 1 + 49, 32)


@needs_fmnist
def test_a_fresh_cae_v2_run_without_its_teacher_file_stops_before_touching_the_run_directory(tmp_path):
    """The missing teacher is a one-line ConfigError raised by Trainer() before the run directory (and its
    config.yaml) exists; a run that resumes gets the teacher from its checkpoint and is not refused."""
    from conftest import TINY_RUN

    from mimkit.config import load_config
    from mimkit.train import Trainer, pretrain

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    tiny = [*TINY_RUN, "data.batch_size=32", f"train.out_dir={out}", "method.teacher_vit.embed_dim=16",
            "method.teacher_vit.depth=1", "method.teacher_vit.num_heads=2"]
    missing = load_config(root / "configs/cae_v2_fashion_mnist.yaml", [*tiny, f"method.teacher_path={tmp_path}/gone.pt"])
    with pytest.raises(ConfigError, match="teacher file .*gone.pt not found; make it with") as e:
        Trainer(missing)
    assert "\n" not in str(e.value) and not out.exists()
    # a run with a teacher file and the data's normalisation passed by the trainer (no method.data_mean):
    # the jitter runs; with the file gone, resuming that run is allowed (the checkpoint holds the teacher)
    from mimkit.interop import export_encoder

    teacher = tmp_path / "teacher.safetensors"
    export_encoder(ViTEncoder(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)),
                   teacher)
    with_file = [*tiny, f"method.teacher_path={teacher}", "method.data_mean=null", "method.data_std=null"]
    pretrain(load_config(root / "configs/cae_v2_fashion_mnist.yaml", [*with_file, "train.max_steps=2"]))
    assert (out / "checkpoint.pt").is_file()
    teacher.unlink()
    t = Trainer(load_config(root / "configs/cae_v2_fashion_mnist.yaml", [*with_file, "train.max_steps=3"]))
    assert t.step == 2 and t.model._data_norm == ((0.286,), (0.353,))
    t.close()


# -- CAE v2 with PCAE's token-dropping teacher (configs/compose/) ----------------------------------
def test_cae_v2_teacher_token_dropping_supervises_only_what_the_teacher_kept():
    """``teacher_drop_after=(0,)``, keep 0.5: the teacher runs block 0 on all 49 patches, keeps the 24 least
    similar to the mean token (PCAE's rule), runs block 1 on those; the targets there are its normalised
    outputs, the loss is the mean of 1 - cos over the supervised tokens it kept (cls always), and the
    positions it dropped get no gradient."""
    from mimkit.targets import TokenDropper

    grid_teacher = ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=24, depth=2, num_heads=2)
    on = cae_v2(color_jitter=0.0, teacher_vit=grid_teacher, teacher_drop_after=(0,), teacher_drop_keep=0.5)
    x = images()
    plan = plan_for(on, x)
    enc = on.teacher.encoder
    with torch.no_grad():  # by hand, block by block
        seq = enc.blocks[0](enc.with_cls(enc.patch_tokens(x)))
        order = TokenDropper.mean_similarity(seq[:, 1:]).argsort(1)[:, :24]
        seq = torch.cat([seq[:, :1], torch.gather(seq[:, 1:], 1, order[..., None].expand(-1, -1, 24))], 1)
        y = F.normalize(enc.norm(enc.blocks[1](seq)), dim=-1)
    full = torch.zeros(4, 50, 24)
    full[:, 0] = y[:, 0]
    full[:, 1:].scatter_(1, order[..., None].expand(-1, -1, 24), y[:, 1:])
    kept = torch.zeros(4, 49, dtype=torch.bool).scatter_(1, order, True)
    ids_v, ids_m = plan.ids_keep, plan.ids_masked()
    want = torch.cat([full[:, :1], gather_tokens(full[:, 1:], ids_v), gather_tokens(full[:, 1:], ids_m)], 1)
    w = torch.cat([torch.ones(4, 1), torch.gather(kept, 1, ids_v).float(), torch.gather(kept, 1, ids_m).float()], 1)
    out = on(x, plan=plan)
    torch.testing.assert_close(out.target, want, rtol=1e-5, atol=1e-6)
    cos = (out.pred * want).sum(-1)
    torch.testing.assert_close(out.loss, ((1 - cos) * w).sum() / w.sum(), rtol=1e-6, atol=1e-7)
    assert float(out.metrics["teacher_kept"]) == pytest.approx(24 / 49)
    out.pred.retain_grad()
    out.loss.backward()
    g = out.pred.grad.abs().sum(-1)  # (B, 1+n+m)
    assert (g[w == 0] == 0).all() and (g[w == 1] > 0).all() and (w == 0).any()
    m = ids_m.shape[1]
    # keep 1.0 drops nothing: CAE v2's loss
    same = cae_v2(color_jitter=0.0, teacher_vit=grid_teacher, teacher_drop_after=(0,), teacher_drop_keep=1.0)
    base = cae_v2(color_jitter=0.0, teacher_vit=grid_teacher)
    torch.testing.assert_close(same(x, plan=plan).loss, base(x, plan=plan).loss, rtol=1e-6, atol=1e-7)
    assert m == 49 - plan.num_keep


def test_cae_v2_teacher_token_dropping_needs_a_vit_teacher_on_the_students_grid():
    m = cae_v2(color_jitter=0.0, teacher_drop_after=(0,))  # TEACHER: patch 7 -> 4x4, the student 7x7
    x = images()
    with pytest.raises(ConfigError, match="teacher_drop_after needs a mimkit ViT teacher on the student's patch "
                                          r"grid \(7x7\)"):
        m(x, plan=plan_for(m, x))
    with pytest.raises(ValueError, match="keep ratio must be in"):
        cae_v2(teacher_drop_after=(0,), teacher_drop_keep=0.0)
