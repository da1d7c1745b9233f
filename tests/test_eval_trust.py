"""Evaluation one can trust: one class map per evaluation, any encoder (every timm ViT family, any
nn.Module), kNN against a reference implementation, probe statistics and defaults, bounded memory,
and one-line errors for bad choices."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimkit.nn import ViTConfig, ViTEncoder

TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)


def tiny_encoder(seed: int = 0) -> ViTEncoder:
    torch.manual_seed(seed)
    return ViTEncoder(ViTConfig(**TINY)).eval()


def _save_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def class_image(c: int, i: int, size: int = 20) -> np.ndarray:
    """A grey image whose class is the position of a bright vertical band (plus a little noise)."""
    rng = np.random.default_rng(1000 * c + i)
    x = rng.integers(0, 40, (size, size)).astype(np.uint8)
    w = size // 4
    x[:, c * w : (c + 1) * w] = 220
    return x


def mismatched_folder(tmp_path, train_classes=(0, 1, 2), val_classes=(0, 2), n=6):
    """``train/{c0,c1,c2}`` and ``val/{c0,c2}``: per-split class maps would label ``val/c2`` as 1."""
    root = tmp_path / "mismatch"
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c in classes:
            for i in range(n):
                _save_png(root / split / f"c{c}" / f"{i}.png", class_image(c, i + (100 if split == "val" else 0)))
    return root


def _parser():
    from mimkit.eval.cli import register, register_report

    parser = argparse.ArgumentParser(prog="mimkit")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    register_report(sub)
    return parser


def _ckpt(tmp_path, enc=None):
    enc = enc or tiny_encoder()
    cfg = {"model": {"encoder": dict(TINY)}, "data": {"mean": [0.3], "std": [0.3]}}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"encoder." + k: v for k, v in enc.state_dict().items()}, "config": cfg, "step": 3,
                "epoch": 1 / 3}, path)
    return path


# -- one class map per evaluation -----------------------------------------------------------------
def test_split_labels_follow_the_training_class_map(tmp_path):
    from mimkit.eval.data import load_split

    root = mismatched_folder(tmp_path)
    xtr, ytr, itr = load_split(str(root), "train", 28, 1, crop_pct=1.0)
    xte, yte, ite = load_split(str(root), "test", 28, 1, class_names=itr["classes"], crop_pct=1.0)
    assert itr["classes"] == ["c0", "c1", "c2"] and ite["folder_classes"] == ["c0", "c2"]
    assert sorted(set(yte.tolist())) == [0, 2]  # val/c2 is class 2, not 1

    def band_class(x):  # the bright band's centre column: 3.5, 10.5, 17.5 for classes 0, 1, 2
        bright = (x[:, 0].float().mean(1) > 150).float()
        centre = (bright * torch.arange(28.0)).sum(1) / bright.sum(1)
        return ((centre - 3.5) / 7).round().long()

    assert torch.equal(band_class(xtr), ytr) and torch.equal(band_class(xte), yte)


def test_split_with_a_class_the_bank_lacks_is_an_error(tmp_path):
    from mimkit.errors import DataError
    from mimkit.eval.data import load_split

    root = mismatched_folder(tmp_path, train_classes=(0, 2), val_classes=(0, 1, 2))
    info = load_split(str(root), "train", 28, 1)[2]
    with pytest.raises(DataError, match=r"class folder\(s\) 'c1' that the training split lacks"):
        load_split(str(root), "test", 28, 1, class_names=info["classes"])


def test_cli_knn_on_mismatched_folders_is_right(tmp_path, capsys):
    """Per-split maps gave 50 % here (val's c2 read as c1); one map gives the separable data's 100 %."""
    root = mismatched_folder(tmp_path)
    ckpt = _ckpt(tmp_path)
    out = tmp_path / "out"
    args = _parser().parse_args(["eval", "knn", str(ckpt), "--dataset", str(root), "--out", str(out), "--device",
                                 "cpu", "--pool", "mean", "--ks", "1,3", "--k", "1", "--crop-pct", "1"])
    assert args.func(args) == 0
    res = json.loads((out / "knn.json").read_text())
    assert res["metrics"]["knn1_mean"] == 100.0
    assert res["setup"]["test_data"]["classes"] == ["c0", "c1", "c2"] and res["setup"]["n_test"] == 12
    # and --test-dataset with a class the training folder lacks stops before any work
    extra = tmp_path / "extra"
    _save_png(extra / "c9" / "0.png", class_image(0, 0))
    args = _parser().parse_args(["eval", "knn", str(ckpt), "--dataset", str(root), "--test-dataset", str(extra),
                                 "--device", "cpu"])
    from mimkit.errors import DataError

    with pytest.raises(DataError, match="'c9'"):
        args.func(args)


def test_limit_train_decodes_only_the_subset(tmp_path, monkeypatch):
    from mimkit.data import folder as folder_mod
    from mimkit.eval.data import load_split

    root = mismatched_folder(tmp_path, n=10)
    opened = []
    real = folder_mod._open_image
    monkeypatch.setattr(folder_mod, "_open_image", lambda p, m, *a: opened.append(p) or real(p, m, *a))
    x, y, info = load_split(str(root), "train", 28, 1, limit=5, seed=3)
    assert len(x) == 5 == len(opened) and info["n"] == 5
    again = load_split(str(root), "train", 28, 1, limit=5, seed=3)[1]
    assert torch.equal(y, again)


def test_mae_eval_resize_then_centre_crop(tmp_path):
    """crop_pct 0.875: a 64 px image goes to 32 then its centre 28 (MAE's 256 -> 224)."""
    from mimkit.eval.data import load_split

    img = np.zeros((64, 64), np.uint8)
    img[:4] = 255  # a bright top border: outside the centre crop at 0.875, inside at 1.0
    _save_png(tmp_path / "d" / "train" / "a" / "0.png", img)
    _save_png(tmp_path / "d" / "val" / "a" / "0.png", img)
    x87 = load_split(str(tmp_path / "d"), "train", 28, 1, crop_pct=0.875)[0]
    x100 = load_split(str(tmp_path / "d"), "train", 28, 1, crop_pct=1.0)[0]
    assert x87.shape == x100.shape == (1, 1, 28, 28)
    assert x100[0, 0, 0].float().mean() > 200 and x87[0, 0, 0].float().mean() < 60


# -- kNN ------------------------------------------------------------------------------------------
def reference_knn(train, train_labels, test, k, T, C):
    """DINO's vote written plainly, one query at a time, in float64 numpy."""
    tr = train.double().numpy()
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    out = []
    for q in test.double().numpy():
        q = q / np.linalg.norm(q)
        sim = tr @ q
        nn = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(C)
        for j in nn:
            votes[train_labels[j]] += np.exp(sim[j] / T)
        out.append(votes)
    return np.array(out)


def test_knn_equals_reference_at_several_k_including_chunks():
    from mimkit.eval.knn import knn_eval, knn_scores

    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(150, 12, generator=g), torch.randn(37, 12, generator=g)
    labels, test_labels = torch.randint(0, 5, (150,), generator=g), torch.randint(0, 5, (37,), generator=g)
    scores = knn_scores(train, labels, test, ks=(1, 10, 20, 100), temperature=0.1, num_classes=5, chunk=8)
    for k, s in scores.items():
        ref = reference_knn(train, labels.numpy(), test, k, 0.1, 5)
        np.testing.assert_allclose(s.double().numpy(), ref, rtol=1e-4, atol=1e-6 * ref.max())
    res = knn_eval(train, labels, test, test_labels, ks=(10, 200), temperature=0.1, chunk=5)
    ref10 = reference_knn(train, labels.numpy(), test, 10, 0.1, 5)
    assert res[10]["top1"] == pytest.approx(100 * np.mean(ref10.argmax(1) == test_labels.numpy()))
    top5 = np.argsort(-ref10, axis=1)[:, :5]
    assert res[10]["top5"] == pytest.approx(100 * np.mean((top5 == test_labels.numpy()[:, None]).any(1)))
    ref150 = reference_knn(train, labels.numpy(), test, 150, 0.1, 5)  # k=200 is clipped to the bank
    assert res[200]["top1"] == pytest.approx(100 * np.mean(ref150.argmax(1) == test_labels.numpy()))


def test_loo_uses_features_without_final_norm_by_default(tmp_path):
    from mimkit.eval.knn import loo_1nn_accuracy
    from mimkit.eval.protocols import EvalContext, EvalOptions, run_knn

    ctx = EvalContext(tiny_encoder(), EvalOptions(limit_train=60, limit_test=40, progress=False))
    res = run_knn(ctx, k=5, ks=(5,))
    raw = ctx.features("test", "cls", norm=False)
    assert res["metrics"]["loo1nn_cls-noLN"] == loo_1nn_accuracy(raw, ctx.labels("test"))
    assert res["pools"]["cls"]["loo_features"]["final_norm"] is False
    # features after the final norm really differ from those without it
    assert not torch.allclose(raw, ctx.features("test", "cls"))


# -- any encoder ----------------------------------------------------------------------------------
TIMM_FAMILIES = {
    # name: (timm model, kwargs, pool to compare with timm's forward_head(pre_logits=True))
    "plain": ("vit_base_patch16_224", {}, "cls"),
    "clip": ("vit_base_patch16_clip_224", {}, "cls"),  # pre-norm (norm_pre)
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", {}, "cls"),  # 4 register tokens, layer scale, no_embed_class
    "gap_fc_norm": ("vit_base_patch16_224", {"class_token": False, "global_pool": "avg", "fc_norm": True}, "mean"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, "cls"),  # cls + distillation token
}
SMALL = dict(img_size=28, patch_size=7, embed_dim=192, depth=2, num_heads=3, num_classes=0)  # 192 wide: 3 heads


@pytest.mark.parametrize("family", list(TIMM_FAMILIES))
def test_every_timm_family_loads_with_identical_features(tmp_path, family):
    import timm

    from mimkit.eval.features import extract_features
    from mimkit.interop import load_encoder

    name, kw, pool = TIMM_FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **kw}).eval()
    with torch.no_grad():  # non-trivial prefix tokens, positions and norms
        for n, p in model.named_parameters():
            if any(t in n for t in ("cls_token", "reg_token", "dist_token", "pos_embed", "norm")):
                p.add_(0.5 * torch.randn_like(p))
    path = tmp_path / f"{family}.pth"
    torch.save(model.state_dict(), path)
    # recognised from the keys, no model name needed; CLIP's activation (QuickGELU or GELU) is not in the
    # keys, so its name is required (tests/test_timm_families.py)
    enc = load_encoder(path, timm_model=name if family == "clip" else None)
    x = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        ours = extract_features(enc, x, pool=[pool, "all", "mean"], batch_size=2)
        head = model.forward_head(model.forward_features(x), pre_logits=True)
        if family == "deit_distilled":  # timm's head averages the class and distillation tokens
            head = model.forward_features(x)[:, 0]
        inter = model.forward_intermediates(x, indices=[0], norm=False, output_fmt="NLC", intermediates_only=True)[0]
        ours_b0 = extract_features(enc, x, pool="mean", norm=False, block=0)
    torch.testing.assert_close(ours[pool], head, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["all"], model.forward_features(x), rtol=1e-4, atol=1e-4)
    npt = model.num_prefix_tokens
    assert getattr(enc, "num_prefix_tokens", 1) == npt and ours["all"].shape[1] == npt + 16
    assert (type(enc).__name__ == "ViTEncoder") == (family == "plain")  # the plain family stays a mimkit ViT
    torch.testing.assert_close(ours_b0, inter.mean(1), rtol=1e-4, atol=1e-4)  # patches only, prefix excluded
    if family == "gap_fc_norm":
        with pytest.raises(ValueError, match="needs a class token and this encoder has none"):
            extract_features(enc, x, pool="cls")
    # by name, too
    named = load_encoder(path, timm_model=name)
    torch.testing.assert_close(extract_features(named, x, pool=pool), head, rtol=1e-4, atol=1e-4)


def test_in_memory_modules_are_evaluated_through_adapters():
    import timm

    from mimkit.eval.protocols import EvalContext, EvalOptions, run_knn

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **{**SMALL, "in_chans": 1}).eval()

    class Pooled(torch.nn.Module):  # anything: one vector per image
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(28 * 28, 16)

        def forward(self, x):
            return self.lin(x.flatten(1))

    def scaled(images):  # Fashion-MNIST's default mean / std for a 1-channel encoder without a config
        return (images.float() / 255 - 0.2860) / 0.3530

    opts = EvalOptions(limit_train=80, limit_test=40, progress=False)
    pooled = Pooled()
    for module, pool in ((vit, "cls"), (pooled, "cls")):
        from mimkit.nn.adapters import wrap_encoder

        enc = wrap_encoder(module, img_size=28, in_chans=1)
        ctx = EvalContext(enc, replace_pool(opts, pool))
        res = run_knn(ctx, k=5, ks=(5,), loo_norm=True)
        # by hand: the module's own output (timm: the cls token after its final norm) and DINO's vote
        (xtr, ytr, _), (xte, yte, _) = ctx.data("train"), ctx.data("test")
        with torch.no_grad():
            ftr, fte = (vit.forward_features(scaled(v))[:, 0] if module is vit else module(scaled(v))
                        for v in (xtr, xte))
        torch.testing.assert_close(ctx.features("train", pool), ftr, rtol=1e-4, atol=1e-4)
        votes = reference_knn(ftr, ytr.numpy(), fte, 5, 0.07, 10)
        assert res["metrics"][f"knn5_{pool}"] == pytest.approx(100 * np.mean(votes.argmax(1) == yte.numpy()))
    from dataclasses import replace

    from mimkit.eval import evaluate
    from mimkit.eval.linear import LINEAR_PRESETS, train_linear_probe

    out = evaluate(pooled, ["knn", "linear"], replace_pool(opts, "cls"),
                   {"knn": {"k": 5, "ks": (5,), "loo_norm": True}}, img_size=28, in_chans=1)
    assert out["setup"]["encoder"] == "ModuleEncoder" and out["setup"]["n_train"] == 80
    assert "model" not in out["linear"]["pools"]["cls"]
    assert out["knn"]["metrics"]["knn5_cls"] == res["metrics"]["knn5_cls"]  # the same module, data and vote
    # the linear probe: the default ("small") recipe trained on the module's features, 10 classes
    probe = train_linear_probe(ftr, ytr, fte, yte, replace(LINEAR_PRESETS["small"], seed=opts.seed), num_classes=10)
    assert out["linear"]["metrics"]["linear_cls"] == pytest.approx(probe["top1"])


def replace_pool(opts, pool):
    from dataclasses import replace

    return replace(opts, pool=pool)


def test_verified_loader_refuses_a_tampered_checkpoint(tmp_path):
    from mimkit.errors import FileRefusedError
    from mimkit.interop import load_encoder
    from mimkit.train.checkpoint import atomic_save

    enc = tiny_encoder()
    state = {"model": {"encoder." + k: v for k, v in enc.state_dict().items()},
             "config": {"model": {"encoder": dict(TINY)}}}
    atomic_save(state, tmp_path / "ok.pt")  # with mimkit's file checksum
    assert isinstance(load_encoder(tmp_path / "ok.pt"), ViTEncoder)
    state["model"]["encoder.cls_token"] = state["model"]["encoder.cls_token"] + 1.0  # damaged after writing
    good = (tmp_path / "ok.pt").read_bytes()
    buf = io.BytesIO()
    torch.save(state, buf)  # as atomic_save writes it (to a file object), before the checksum goes in
    plain = buf.getvalue()
    assert len(plain) == len(good) - 96  # same layout; the checksum record is the only addition
    (tmp_path / "bad.pt").write_bytes(plain[:-2] + good[-98:])  # the new bytes under the old checksum
    with pytest.raises(FileRefusedError, match="does not match the checksum"):  # a refusal, named as one
        load_encoder(tmp_path / "bad.pt")


# -- probes ---------------------------------------------------------------------------------------
def test_linear_probe_bn_statistics_are_the_full_train_statistics():
    from mimkit.eval.linear import LinearProbeConfig, train_linear_probe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = 50.0 + 20.0 * torch.randn(200, 6, generator=g) + 8.0 * F.one_hot(y, 6)[:, :6].float() * 5
    cfg = LinearProbeConfig(epochs=1, batch_size=40, warmup_epochs=0.2, optimizer="sgd", lr=0.1)  # 5 updates
    res = train_linear_probe(x, y, x, y, cfg)
    bn = res["model"].bn
    torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bn.running_var, x.var(0, unbiased=True), rtol=1e-5, atol=1e-3)
    stale = train_linear_probe(x, y, x, y, LinearProbeConfig(**{**cfg.__dict__, "recompute_bn": False}))
    assert not torch.allclose(stale["model"].bn.running_mean, x.mean(0), atol=1.0)  # 5 momentum steps: far off
    assert res["top1"] > stale["top1"]


def test_attentive_probe_beats_chance_on_a_separable_set_and_streams_a_memmap(tmp_path):
    from mimkit.eval.attentive import AttentiveProbeConfig, train_attentive_probe

    g = torch.Generator().manual_seed(0)
    n, t, d, c = 600, 9, 16, 4
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, t, d, generator=g)
    where = torch.randint(1, t, (n,), generator=g)
    x[torch.arange(n), where] += 3 * torch.randn(c, d, generator=g)[y]  # one token anywhere holds the class
    mm = np.memmap(tmp_path / "tok.f16", dtype=np.float16, mode="w+", shape=(n, t, d))
    mm[:] = x.numpy()
    tokens = torch.from_numpy(mm)
    cfg = AttentiveProbeConfig(epochs=15, warmup_epochs=2)
    res = train_attentive_probe(tokens[:400], y[:400], tokens[400:], y[400:], num_heads=2, cfg=cfg)
    assert res["top1"] > 100 / c + 40  # chance is 25 %
    assert res["batch_size"] == 50 and res["lr"] == pytest.approx(0.1 * 50 / 256)
    # a cls-token linear probe cannot see the class (token 0 carries noise only)
    from mimkit.eval.linear import LinearProbeConfig, train_linear_probe

    lin = train_linear_probe(x[:400, 0], y[:400], x[400:, 0], y[400:], LinearProbeConfig(epochs=15, batch_size=50))
    assert lin["top1"] < 45


def test_token_cache_goes_to_a_memory_mapped_file_when_large():
    from mimkit.eval.attentive import AttentiveProbeConfig
    from mimkit.eval.protocols import EvalContext, EvalOptions, run_attentive

    opts = EvalOptions(limit_train=64, limit_test=32, progress=False, max_cache_gb=1e-6)  # ~1 kB: forces disk
    ctx = EvalContext(tiny_encoder(), opts)
    tok = ctx.tokens("train")
    assert ctx.token_cache_info()["train/all"]["where"] == "memory-mapped file"
    assert tok.untyped_storage().nbytes() == 0 or isinstance(tok.numpy().base, np.memmap) or \
        next(ctx._cache_dir.iterdir()).stat().st_size == tok.numel() * 2  # the file holds the tokens
    ref = ctx.encoder.forward_features(((ctx.data("train")[0][:4].float() / 255) - 0.2860) / 0.3530)
    torch.testing.assert_close(tok[:4].float(), ref, rtol=2e-3, atol=2e-3)  # float16 cache
    assert not ctx.tokens_in_memory("train")
    res = run_attentive(ctx, AttentiveProbeConfig(epochs=1, warmup_epochs=0.5))
    assert res["token_cache"]["train/all"]["where"] == "memory-mapped file"


def test_attentive_probe_reads_a_memory_mapped_cache_batch_by_batch_even_under_bf16(monkeypatch):
    """The once-normalised copy is for in-memory caches: a memory-mapped one is never copied whole."""
    from mimkit.eval import attentive
    from mimkit.eval.attentive import AttentiveProbeConfig
    from mimkit.eval.protocols import EvalContext, EvalOptions, run_attentive

    copied = []
    real = attentive.normalized_copy
    monkeypatch.setattr(attentive, "normalized_copy", lambda *a, **k: copied.append(tuple(a[1].shape)) or real(*a, **k))
    cfg = AttentiveProbeConfig(epochs=1, warmup_epochs=0.5)
    for max_gb, expect in ((1e-6, []), (4.0, [(64, 50, 32), (32, 50, 32)])):
        ctx = EvalContext(tiny_encoder(), EvalOptions(limit_train=64, limit_test=32, progress=False, amp="bf16",
                                                      max_cache_gb=max_gb))
        run_attentive(ctx, cfg)
        assert ctx.tokens_in_memory("train") == (max_gb > 1) and copied == expect
        copied.clear()


def test_fewshot_encodes_only_the_drawn_images(monkeypatch):
    from mimkit.eval import protocols
    from mimkit.eval.fewshot import draw_supports, fewshot_logreg

    ctx = protocols.EvalContext(tiny_encoder(), protocols.EvalOptions(limit_train=300, limit_test=50, progress=False))
    seen = []
    real = protocols.extract_features
    monkeypatch.setattr(protocols, "extract_features", lambda enc, data, **kw: seen.append(len(data)) or real(enc, data, **kw))
    res = protocols.run_fewshot(ctx, shots=2, draws=3)
    assert seen[0] <= 2 * 10 * 3 and res["pools"]["mean"]["encoded_train_images"] == seen[0]
    # identical numbers to running on every train feature
    full = fewshot_logreg(real(ctx.encoder, ctx.data("train")[0], pool="mean", mean=ctx.mean, std=ctx.std),
                          ctx.labels("train"), ctx.features("test", "mean"), ctx.labels("test"), shots=2, draws=3)
    assert res["pools"]["mean"]["accs"] == pytest.approx(full["accs"])
    assert len(draw_supports(ctx.labels("train"), 2, 3)) == 3


# -- CLI: bad choices are one-line errors before work -------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["eval", "knn", "x.pt", "--pool", "max"], "unknown pooling max"),
    (["eval", "finetune", "x.pt", "--preset", "foo"], "invalid choice: 'foo'"),
    (["report", "x.pt", "--protocols", "knn,lineer"], "unknown protocol lineer"),
    (["eval", "attentive", "x.pt", "--attentive-preset", "big"], "invalid choice: 'big'"),
    (["eval", "knn", "x.pt", "--ks", "10,zero"], "not a list of integers"),
])
def test_cli_rejects_bad_choices(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1]


def test_cli_rejects_flags_a_protocol_would_ignore(tmp_path):
    from mimkit.config import ConfigError

    ckpt = _ckpt(tmp_path)
    for argv, needle in ((["eval", "attentive", str(ckpt), "--pool", "cls"], "attentive probe"),
                         (["eval", "finetune", str(ckpt), "--no-norm"], "fine-tuning"),
                         (["eval", "finetune", str(ckpt), "--pool", "cls+mean"], "fine-tuning takes one of")):
        args = _parser().parse_args([*argv, "--limit-train", "20", "--limit-test", "10"])
        with pytest.raises(ConfigError, match=needle):
            args.func(args)


def test_every_flag_has_help_and_shows_its_default():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    ev = next(a for a in sub.choices["eval"]._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in [*ev.choices.items(), ("report", sub.choices["report"])]:
        for a in p._actions:
            if a.option_strings and a.dest != "help":
                assert a.help, (name, a.option_strings)
        text = p.format_help()
        assert "(default:" in text, name


def test_report_single_checkpoint_says_why_no_plot_and_writes_by_default(tmp_path, monkeypatch):
    ckpt = _ckpt(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = _parser().parse_args(["report", str(ckpt), "--protocols", "knn", "--limit-train", "60", "--limit-test",
                                 "30", "--ks", "5", "--k", "5", "--device", "cpu", "--no-progress"])
    from mimkit.eval.cli import run_report_command

    assert args.out == "report"
    notes = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: notes.append(" ".join(map(str, a))))
    assert run_report_command(args) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| 0.33 |" in md and "60 images" in md and "fashion_mnist" in md
    assert any("no training-curve plot" in n and "keep_checkpoints" in n for n in notes)


def test_mae_preset_uses_timm_randaugment_and_erasing_reproducibly():
    from mimkit.eval.finetune import FINETUNE_PRESETS, rand_augment

    mae = FINETUNE_PRESETS["mae_vit_base"]
    assert mae.rand_augment == "rand-m9-mstd0.5-inc1" and mae.reprob == 0.25 and mae.eval_every == 1
    x = (torch.rand(6, 1, 28, 28) * 255).to(torch.uint8)
    a = rand_augment(x, mae.rand_augment, (0.286,), torch.Generator().manual_seed(0))
    b = rand_augment(x, mae.rand_augment, (0.286,), torch.Generator().manual_seed(0))
    c = rand_augment(x, mae.rand_augment, (0.286,), torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_report_over_seeds_gives_mean_and_std(tmp_path):
    from mimkit.eval.linear import LinearProbeConfig
    from mimkit.eval.protocols import EvalOptions
    from mimkit.eval.report import run_report

    ckpt = _ckpt(tmp_path)
    opts = EvalOptions(limit_train=100, limit_test=50, progress=False, pool="cls")
    cfg = LinearProbeConfig(epochs=3, batch_size=20, warmup_epochs=1, optimizer="sgd")
    rep = run_report([ckpt], ["linear"], opts, out_dir=tmp_path / "rep", protocol_kwargs={"linear": {"cfg": cfg}},
                     seeds=[0, 1, 2], log=lambda m: None)
    res = rep["rows"][0]["results"]["linear"]
    per = [m["linear_cls"] for m in res["per_seed"]]
    assert len(per) == 3 and len(set(per)) > 1  # the seeds differ
    assert rep["rows"][0]["metrics"]["linear_cls"] == pytest.approx(np.mean(per))
    assert rep["rows"][0]["metrics"]["linear_cls_std"] == pytest.approx(np.std(per, ddof=1))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert " ± " in md and "seeds: 0, 1, 2 (mean ± std over seeds)" in md and "sgd lr" in md


def test_knn_beyond_the_bank_is_not_reported_under_a_false_k(tmp_path, capsys):
    """k larger than the train bank would silently be the bank size again: such columns are not written,
    the requested main k is clipped to the bank (and named by the k it measured), and stderr says so."""
    root = mismatched_folder(tmp_path)
    ckpt = _ckpt(tmp_path)
    out = tmp_path / "out"
    args = _parser().parse_args(["eval", "knn", str(ckpt), "--dataset", str(root), "--out", str(out), "--device",
                                 "cpu", "--pool", "mean", "--ks", "1,3,500", "--k", "500", "--crop-pct", "1"])
    assert args.func(args) == 0
    res = json.loads((out / "knn.json").read_text())
    n = res["setup"]["n_train"]
    assert n < 500
    keys = set(res["metrics"])
    assert {"knn1_mean", "knn3_mean", f"knn{n}_mean", f"knn{n}top5_mean"} <= keys
    assert not any(k.startswith("knn500") for k in keys)
    assert f"the train bank has {n} images; k = [500] not measured" in capsys.readouterr().err
