import math

import pytest
import torch

from mimkit.nn import ViTConfig, ViTEncoder, gapped_patchify, norm_pix, patchify, sincos_2d, unpatchify
from mimkit.nn.vit import gather_tokens


def test_patchify_layout_and_round_trip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    # token t = i*w + j; inside a patch the channel is the fastest index, then column, then row
    i, j, r, c, ch = 1, 0, 2, 3, 1
    assert p[1, i * 2 + j, (r * 4 + c) * 3 + ch] == x[1, ch, i * 4 + r, j * 4 + c]
    assert torch.equal(unpatchify(p, 4, 3), x)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 1, 7, 8), 4)


def test_norm_pix_statistics():
    t = torch.randn(3, 5, 12) * 4 + 2
    n = norm_pix(t)
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).sum(-1, keepdim=True) / (12 - 1)  # unbiased, eps inside sqrt
    assert torch.allclose(n, (t - mean) / torch.sqrt(var + 1e-6), atol=1e-6)


def test_sincos_values_follow_mae_layout():
    d, h, w = 8, 3, 4
    pe = sincos_2d(d, h, w, cls_token=True)
    assert pe.shape == (1 + h * w, d)
    assert torch.equal(pe[0], torch.zeros(d))
    omega = [1.0, 1.0 / 100.0]  # 10000^(-k/(D/4)), k = 0, 1 for D/4 = 2
    i, j = 2, 3  # row 2, column 3 -> token 11
    row = pe[1 + i * w + j]
    expect = [math.sin(j * omega[0]), math.sin(j * omega[1]), math.cos(j * omega[0]), math.cos(j * omega[1]),
              math.sin(i * omega[0]), math.sin(i * omega[1]), math.cos(i * omega[0]), math.cos(i * omega[1])]
    assert torch.allclose(row, torch.tensor(expect), atol=1e-6)
    with pytest.raises(ValueError):
        sincos_2d(6, 2)


def _enc(**kw):
    base = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=24, depth=2, num_heads=3)
    base.update(kw)
    return ViTEncoder(ViTConfig(**base))


def test_encoder_shapes_names_and_init():
    torch.manual_seed(0)
    enc = _enc()
    x = torch.randn(2, 3, 16, 16)
    assert enc.forward_features(x).shape == (2, 17, 24)
    ids = torch.tensor([[0, 5, 7], [15, 1, 2]])
    assert enc.forward_masked(x, ids).shape == (2, 4, 24)
    names = set(enc.state_dict())
    for k in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
              "blocks.1.mlp.fc2.bias", "norm.weight"]:
        assert k in names
    assert not enc.pos_embed.requires_grad
    assert torch.all(enc.blocks[0].attn.qkv.bias == 0)
    # xavier on the fused qkv matrix: bound sqrt(6 / (D + 3D))
    bound = math.sqrt(6 / (24 + 72))
    assert enc.blocks[0].attn.qkv.weight.abs().max() <= bound + 1e-6
    with pytest.raises(ValueError, match="does not match"):
        enc.forward_features(torch.randn(1, 3, 20, 20))


def test_key_padding_mask_leaves_real_tokens_unchanged():
    torch.manual_seed(0)
    enc = _enc().eval()
    x = torch.randn(1, 3, 16, 16)
    tokens = enc.patch_tokens(x)
    ids = torch.tensor([[3, 9, 4]])
    short = enc.forward_tokens(gather_tokens(tokens, ids))
    padded_ids = torch.tensor([[3, 9, 4, 0, 1]])
    valid = torch.tensor([[True, True, True, False, False]])
    long = enc.forward_tokens(gather_tokens(tokens, padded_ids), valid)
    assert torch.allclose(long[:, :4], short, atol=1e-5)
    # without the mask the padding would change the outputs
    assert not torch.allclose(enc.forward_tokens(gather_tokens(tokens, padded_ids))[:, :4], short, atol=1e-4)


def test_pixel_tokens_equal_conv_tokens_and_gapped_patchify():
    torch.manual_seed(0)
    enc = _enc()
    x = torch.randn(2, 3, 16, 16)
    px = patchify(x, 4)
    ids = torch.arange(16).expand(2, 16)
    assert torch.allclose(enc.pixel_tokens(px, ids), enc.patch_tokens(x), atol=1e-5)
    assert torch.equal(gapped_patchify(x, 4, 0), px)
    # gap 1: cells of 5 pixels, offset always 0 -> patch (i, j) starts at (5i, 5j)
    y = torch.randn(1, 3, 20, 20)
    g = gapped_patchify(y, 4, 1)
    assert torch.equal(g[0, 1 * 4 + 2], patchify(y[:, :, 5:9, 10:14], 4)[0, 0])


def test_intermediate_block_features():
    torch.manual_seed(0)
    enc = _enc().eval()
    x = torch.randn(2, 3, 16, 16)
    last = enc.forward_features(x, norm=False, block=-1)
    assert torch.allclose(last, enc.forward_features(x, norm=False), atol=1e-6)
    first = enc.forward_features(x, norm=False, block=0)
    t = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), enc.patch_tokens(x)], 1)
    assert torch.allclose(first, enc.blocks[0](t), atol=1e-6)


def test_bf16_cpu_attention_path_matches_fp32():
    from mimkit.nn.layers import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(8, 13, 32)
    ref = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), ref, atol=0.05, rtol=0.05)
    explicit, weights = attn(x, return_attn=True)
    assert torch.allclose(explicit, ref, atol=1e-5) and torch.allclose(weights.sum(-1), torch.ones(8, 4, 13))


def test_forward_intermediates_matches_block_outputs_and_timm():
    import timm  # noqa: F401

    from mimkit.interop import timm_model_for

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=3, num_heads=2)
    enc = ViTEncoder(cfg).eval()
    x = torch.randn(2, 1, 16, 16)
    final, inter = enc.forward_intermediates(x, indices=2, output_fmt="NLC")
    _, saved = enc.forward_tokens(enc.patch_tokens(x), return_blocks=[1, 2])
    assert len(inter) == 2 and torch.equal(inter[0], saved[0][:, 1:]) and torch.equal(inter[1], saved[1][:, 1:])
    torch.testing.assert_close(final, enc.forward_features(x))
    nchw = enc.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert nchw[0].shape == (2, 24, 4, 4)
    ref = timm_model_for(cfg).eval()
    ref.load_state_dict(enc.state_dict())
    _, timm_inter = ref.forward_intermediates(x, indices=2)
    for a, b in zip(enc.forward_intermediates(x, indices=2)[1], timm_inter, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="output_fmt"):
        enc.forward_intermediates(x, output_fmt="NHWC")


def test_token_selection_hook_and_topk_attention():
    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=2, num_heads=2)).eval()
    x = enc.with_cls(enc.patch_tokens(torch.randn(2, 1, 16, 16)))
    ids = torch.arange(16).expand(2, 16)

    def keep_even(i, h, tid):  # after block 0 keep the even grid ids
        return (torch.cat([h[:, :1], h[:, 1::2]], 1), tid[:, ::2]) if i == 0 else None

    out = enc.run_blocks(x, ids=ids, select=keep_even)
    assert out.x.shape == (2, 9, 24) and torch.equal(out.ids, ids[:, ::2])
    h = enc.blocks[0](x)
    ref = enc.blocks[1](torch.cat([h[:, :1], h[:, 1::2]], 1))
    torch.testing.assert_close(out.x, ref)
    # TopK with K = number of keys is plain attention; smaller K changes it and zeroes the dropped keys
    plain = enc.run_blocks(x).x
    torch.testing.assert_close(enc.run_blocks(x, topk=17).x, plain, atol=1e-5, rtol=1e-5)
    seen = []
    topk = enc.run_blocks(x, topk=3, topk_blocks=[1], attn_callback=lambda i, a: seen.append((i, a)))
    assert [i for i, _ in seen] == [1] and not torch.allclose(topk.x, plain)
    assert bool(((seen[0][1] > 0).sum(-1) <= 3).all())


# -- the attention path rule (mimkit.nn.layers.sdpa; benchmarks/attention_paths.py) ----------------
@pytest.mark.parametrize("n,explicit", [(13, True), (64, True), (65, False), (197, False)])
def test_attention_takes_the_measured_path_and_computes_the_same(monkeypatch, n, explicit):
    import torch.nn.functional as F

    from mimkit.nn import layers

    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 1, n, generator=g) > 0.3
    mask[..., 0] = True  # every query attends to at least one key
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for m in (None, mask):
        out = layers.sdpa(q, k, v, attn_mask=m)
        torch.testing.assert_close(out, real(q, k, v, attn_mask=m), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, layers.explicit_attention(q, k, v, m), rtol=1e-5, atol=1e-6)
    assert bool(calls) != explicit  # short CPU sequences never reach SDPA, long ones always do
    # bf16: the explicit path rounds as Hugging Face's eager attention; close to float64 at bf16 precision
    ref = layers.explicit_attention(q.double(), k.double(), v.double())
    low = layers.sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.dtype == torch.bfloat16 and (low.double() - ref).abs().max() < 3e-2


def test_explicit_attention_additive_mask_and_dropout():
    from mimkit.nn.layers import explicit_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    keep = torch.tensor([True, True, False, True, False])
    add = torch.zeros(5).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(explicit_attention(q, k, v, add), explicit_attention(q, k, v, keep))
    torch.manual_seed(1)
    dropped = explicit_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, explicit_attention(q, k, v))
