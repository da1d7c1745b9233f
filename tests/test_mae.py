import math

import torch
from conftest import tiny_model_config

from mimkit.interop import from_official_state_dict, to_official_state_dict
from mimkit.methods import MAE, MAEOptions
from mimkit.train.optim import lr_at, param_groups


def reference_mae_loss(pred, images, mask, p, norm_pix=True):
    """Loops over images and patches: the official loss written out by hand."""
    b, c, h, w = images.shape
    total, count = 0.0, 0
    for n in range(b):
        for i in range(h // p):
            for j in range(w // p):
                t = i * (w // p) + j
                if mask[n, t] == 0:
                    continue
                vals = [images[n, ch, i * p + r, j * p + s].item() for r in range(p) for s in range(p) for ch in range(c)]
                if norm_pix:
                    mu = sum(vals) / len(vals)
                    var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
                    vals = [(v - mu) / math.sqrt(var + 1e-6) for v in vals]
                err = sum((pred[n, t, k].item() - vals[k]) ** 2 for k in range(len(vals))) / len(vals)
                total += err
                count += 1
    return total / count


def official_style_forward(model, images, noise, ratio=0.75):
    """models_mae.py's forward written against our weights, step by step."""
    enc, dec = model.encoder, model.decoder
    x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
    n, length, d = x.shape
    len_keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = enc.cls_token + enc.pos_embed[:, :1]
    x = torch.cat([cls.expand(n, -1, -1), x], 1)
    for blk in enc.blocks:
        x = blk(x)
    x = enc.norm(x)
    x = dec.embed(x)
    mt = dec.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], mt], 1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], 1) + dec.pos_embed
    for blk in dec.blocks:
        x = blk(x)
    return dec.pred(dec.norm(x))[:, 1:], mask


def test_mae_loss_equals_hand_written_reference():
    torch.manual_seed(0)
    model = MAE(tiny_model_config(img_size=8, in_chans=3, patch_size=4))
    images = torch.randn(3, 3, 8, 8)
    noise = torch.rand(3, 4)
    out = model(images, noise=noise)
    ref = reference_mae_loss(out.pred, images, out.plan.mask, 4)
    assert abs(out.loss.item() - ref) < 1e-5
    model_raw = MAE(tiny_model_config(img_size=8, in_chans=3, patch_size=4), MAEOptions(norm_target=False))
    out = model_raw(images, noise=noise)
    assert abs(out.loss.item() - reference_mae_loss(out.pred, images, out.plan.mask, 4, norm_pix=False)) < 1e-5


def test_mae_forward_matches_official_algorithm():
    torch.manual_seed(1)
    model = MAE(tiny_model_config(in_chans=1))
    images = torch.randn(4, 1, 28, 28)
    noise = torch.rand(4, 49)
    out = model(images, noise=noise)
    pred, mask = official_style_forward(model, images, noise)
    assert torch.allclose(out.pred, pred, atol=1e-5)
    assert torch.equal(out.plan.mask, mask)
    assert out.pred.shape == (4, 49, 16) and out.target.shape == (4, 49, 16)
    # loss over all masked patches of the batch, not per image
    per_patch = ((pred - out.target) ** 2).mean(-1)
    assert torch.allclose(out.loss, (per_patch * mask).sum() / mask.sum(), atol=1e-6)


def test_official_key_mapping_round_trip():
    model = MAE(tiny_model_config())
    sd = to_official_state_dict(model)
    for k in ["cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "norm.weight", "mask_token",
              "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.norm1.weight", "decoder_norm.bias",
              "decoder_pred.weight"]:
        assert k in sd
    back = from_official_state_dict(sd)
    assert set(back) == set(model.state_dict())
    with torch.no_grad():  # every tensor distinct, so a swapped or transposed pair would not round-trip
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.randn_like(p) + i)
    back = from_official_state_dict(to_official_state_dict(model))
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_param_groups_follow_mae_pretraining():
    model = MAE(tiny_model_config())
    groups = param_groups(model, 0.05)
    no_decay = {id(p) for p in groups[0]["params"]}
    decay = {id(p) for p in groups[1]["params"]}
    named = dict(model.named_parameters())
    assert id(named["encoder.cls_token"]) in decay and id(named["decoder.mask_token"]) in decay
    assert id(named["encoder.blocks.0.attn.qkv.bias"]) in no_decay
    assert id(named["encoder.norm.weight"]) in no_decay
    assert id(named["encoder.pos_embed"]) not in decay | no_decay  # frozen
    assert groups[1]["weight_decay"] == 0.05 and groups[0]["weight_decay"] == 0.0


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0.0, 1.0, 2, 10) == 0.0
    assert abs(lr_at(1.0, 1.0, 2, 10) - 0.5) < 1e-12
    assert abs(lr_at(2.0, 1.0, 2, 10) - 1.0) < 1e-12
    assert abs(lr_at(6.0, 1.0, 2, 10, min_lr=0.1) - (0.1 + 0.9 * 0.5)) < 1e-12
    assert abs(lr_at(10.0, 1.0, 2, 10)) < 1e-12


def test_latent_mim_optimizer_variants():
    model = MAE(tiny_model_config())
    groups = param_groups(model, 0.05, no_decay_keywords=("embed",))
    no_decay = {id(p) for p in groups[0]["params"]}
    named = dict(model.named_parameters())
    assert id(named["encoder.patch_embed.proj.weight"]) in no_decay and id(named["decoder.embed.weight"]) in no_decay
    assert id(named["encoder.blocks.0.mlp.fc1.weight"]) not in no_decay
    # warmup from min_lr (Latent MIM) instead of from 0 (MAE)
    assert lr_at(0.0, 1.0, 2, 10, min_lr=0.25, warmup_from_min_lr=True) == 0.25
    assert abs(lr_at(1.0, 1.0, 2, 10, min_lr=0.25, warmup_from_min_lr=True) - 0.625) < 1e-12
