"""Training throughput and peak memory of the standard workload (Fashion-MNIST MAE, see BENCHMARKS.md).

Fashion-MNIST in memory, batch 256, random horizontal flip, ViT 192/6/3 heads (patch 4), decoder
128/2/4 heads, mask 0.75, norm-pix, AdamW (0.9, 0.95) wd 0.05; one step = batch + flip + forward +
backward + AdamW step. Reports the median step time after ``--warmup`` steps as images/s.

Peer comparison in the same process (so the ratio holds on a noisy machine): ``--peer-mae DIR``
points at a checkout of facebookresearch/mae; its ``models_mae.py`` runs with 3-channel input (as
its patchify requires) under the identical loop. Nothing of it is copied here; it is imported.

    python benchmarks/throughput.py                          # mimkit, fp32, CPU
    python benchmarks/throughput.py --precision bf16         # bf16 autocast (CPUs with bf16, GPUs)
    python benchmarks/throughput.py --peer-mae /tmp/mae      # + the official model, interleaved
    python benchmarks/throughput.py --device cuda --batch 512 --compile
    python benchmarks/throughput.py --hooks-peer             # + the same model without the encoder hooks
    python benchmarks/throughput.py --precision bf16 --compile --peer-mae /tmp/mae   # mimkit's fast CPU path
    python benchmarks/throughput.py --precision bf16 --peer-hf eager --previous-attention  # vs HF, before/after

mimkit's runners use AdamW as the trainer builds it (fused kernel wherever torch has one, CPU included:
``--fused off`` for the foreach path); ``--compile`` compiles mimkit's model only. The official model
runs as its code does (eager, fp32, AdamW's default foreach path), so the ratio compares against the
code a user would otherwise run.

``--peer-hf eager|sdpa`` adds Hugging Face ``transformers``' ``ViTMAEForPreTraining`` at the same shapes
(ViT 192/6/3, decoder 128/2/4, MLP 4x, LayerNorm eps 1e-6, mask 0.75, norm-pix, 1 channel) in the same
precision, with that attention implementation and the same optimizer as mimkit (so the ratio compares
the models). ``--previous-attention`` adds mimkit's model with the attention path it used before the
measured rule of ``mimkit.nn.layers.sdpa`` (SDPA, its math kernel for bf16 training on CPU): the
before/after of that rule in one process.

``--hooks-peer`` measures what the method-contract hooks cost when unused (token selection, TopK
attention, attention callbacks in ``ViTEncoder.run_blocks`` / ``Block`` / ``Attention``): a second copy of
the same MAE (same weights, same data) whose blocks and encoder loop are replaced by a minimal
SDPA forward with no hook arguments, interleaved step by step with the library model.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch


def mimkit_model(in_chans: int):
    from mimkit.methods import MAE, DecoderConfig, ModelConfig
    from mimkit.nn import ViTConfig

    enc = ViTConfig(img_size=28, patch_size=4, in_chans=in_chans, embed_dim=192, depth=6, num_heads=3)
    return MAE(ModelConfig(enc, DecoderConfig(128, 2, 4)))


def official_model_class(repo: str):
    """``(MaskedAutoencoderViT, module)`` from a facebookresearch/mae checkout, with shims for current
    numpy (the removed ``np.float`` alias) and timm >= 0.6 (``Block`` no longer takes ``qk_scale``)."""
    import numpy as np
    import timm.models.vision_transformer as tv

    if not hasattr(np, "float"):
        np.float = float
    if not getattr(tv.Block, "_accepts_qk_scale", False):
        base = tv.Block

        class Block(base):
            _accepts_qk_scale = True

            def __init__(self, *a, qk_scale=None, **k):
                super().__init__(*a, **k)

        tv.Block = Block
    sys.path.insert(0, repo)
    import models_mae

    return models_mae.MaskedAutoencoderViT, models_mae


def official_model(repo: str):
    """The official model at the workload's shape."""
    import functools

    cls, _ = official_model_class(repo)
    return cls(
        img_size=28, patch_size=4, in_chans=3, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128,
        decoder_depth=2, decoder_num_heads=4, mlp_ratio=4, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
        norm_pix_loss=True,
    )


def plain_copy(model):
    """The same model with hook-free forwards: each ``Block`` runs ``x + attn(norm1(x)); x + mlp(norm2(x))``
    with SDPA directly, and the encoder's ``forward_tokens`` is a plain loop over the blocks."""
    import copy
    import types

    from mimkit.nn.layers import Block, sdpa

    m = copy.deepcopy(model)

    def block_forward(self, x, attn_mask=None, topk=None, return_attn=False):
        a = self.attn
        b, n, d = x.shape
        q, k, v = a.qkv(self.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = sdpa(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, n, d)
        x = x + self.drop_path1(self.ls1(a.proj(o)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_tokens(self, tokens, valid=None, norm=True, return_blocks=None):
        x = self.with_cls(tokens)
        mask = None
        if valid is not None:
            mask = torch.cat([valid.new_ones(x.shape[0], 1), valid], dim=1)[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x) if norm else x

    for mod in m.modules():
        if isinstance(mod, Block):
            mod.forward = types.MethodType(block_forward, mod)
    m.encoder.forward_tokens = types.MethodType(forward_tokens, m.encoder)
    return m


def hf_model():
    """Hugging Face ViTMAEForPreTraining at the workload's shape (randomly initialised)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                       image_size=28, patch_size=4, num_channels=1, decoder_hidden_size=128,
                       decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=512,
                       mask_ratio=0.75, norm_pix_loss=True, layer_norm_eps=1e-6)
    return ViTMAEForPreTraining(cfg)


def previous_sdpa(q, k, v, attn_mask=None, dropout_p: float = 0.0):
    """mimkit's attention before the measured rule: SDPA, with its math kernel for bf16/fp16 training on CPU."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad:
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class Runner:
    def __init__(self, name, model, loader, device, dtype, compile_, three_channels, fused=None, attention=None):
        from mimkit.train.optim import param_groups

        self.attention = attention  # replaces mimkit.nn.layers.sdpa during this runner's steps
        self.name = name
        self.model = model.to(device)
        self.loader = loader
        self.device = device
        self.dtype = dtype
        self.three = three_channels
        if fused is None:
            from mimkit.train.step import fused_adamw_supported

            fused = fused_adamw_supported(device)
        self.opt = torch.optim.AdamW(param_groups(self.model, 0.05), lr=1.5e-4, betas=(0.9, 0.95), fused=fused)
        self.fwd = torch.compile(self.model) if compile_ else self.model
        self.it = None
        self.epoch = 0
        self.times: list[float] = []

    def _next(self):
        while True:
            if self.it is None:
                self.it = iter(self.loader.iter_from(self.epoch))
            try:
                return next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1

    def step(self, record: bool):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        x, _ = self._next()
        if self.three:
            x = x.expand(-1, 3, -1, -1)
        import mimkit.nn.layers as layers

        current = layers.sdpa
        layers.sdpa = self.attention or current
        try:
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                out = self.fwd(x) if self.three else self.fwd(x)
                loss = out[0] if isinstance(out, tuple) else out.loss
            loss.backward()
        finally:
            layers.sdpa = current
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        if record:
            self.times.append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile mimkit's model (the peer runs eager)")
    ap.add_argument("--fused", default="auto", choices=["auto", "on", "off"],
                    help="mimkit's AdamW: fused kernel (auto: wherever torch has one, as the trainer does)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-mae", default=None, help="path of a facebookresearch/mae checkout to compare against")
    ap.add_argument("--peer-precision", default="fp32", choices=["fp32", "bf16"],
                    help="the official code has no CPU bf16 path; fp32 is how it runs there")
    ap.add_argument("--hooks-peer", action="store_true",
                    help="also run the same model with hook-free block/encoder forwards (cost of unused hooks)")
    ap.add_argument("--peer-hf", default=None, choices=["eager", "sdpa"],
                    help="also run Hugging Face ViTMAEForPreTraining with this attention implementation")
    ap.add_argument("--previous-attention", action="store_true",
                    help="also run mimkit's model with its attention path before the measured rule")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    from mimkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, InMemoryLoader, load_fashion_mnist

    images, labels = load_fashion_mnist(split="train")

    def loader(seed):
        return InMemoryLoader(images, labels, args.batch, device=device, mean=FASHION_MNIST_MEAN,
                              std=FASHION_MNIST_STD, augment="flip", seed=seed)

    model = mimkit_model(1)
    fused = {"auto": None, "on": True, "off": False}[args.fused]
    tag = f"{args.precision}{', compiled' if args.compile else ''}, fused AdamW {args.fused}"
    runners = [Runner(f"mimkit MAE (1-channel, {tag})", model, loader(0), device, dtype, args.compile, False, fused)]
    if args.hooks_peer:
        runners.append(Runner(f"mimkit MAE, hook-free blocks ({tag})", plain_copy(model), loader(0), device,
                              dtype, args.compile, False, fused))
    if args.peer_mae:
        peer_dtype = torch.bfloat16 if args.peer_precision == "bf16" else None
        official_fused = False  # the official code builds torch.optim.AdamW with its defaults (foreach)
        runners.append(Runner(f"official MAE models_mae.py (3-channel, {args.peer_precision})",
                              official_model(args.peer_mae), loader(0), device, peer_dtype, False, True,
                              official_fused))
    if args.previous_attention:
        import copy

        runners.append(Runner(f"mimkit MAE, previous attention path ({tag})", copy.deepcopy(model), loader(0),
                              device, dtype, args.compile, False, fused, attention=previous_sdpa))
    if args.peer_hf:
        hf = hf_model()
        hf.config._attn_implementation = args.peer_hf
        runners.append(Runner(f"Hugging Face ViTMAEForPreTraining ({args.peer_hf} attention, {args.precision}, same "
                              "optimizer)", hf, loader(0), device, dtype, False, False, fused))
    if args.hooks_peer:  # the hook-free copy computes the same numbers
        x = images[:8].float().div(255).sub(FASHION_MNIST_MEAN[0]).div(FASHION_MNIST_STD[0]).to(device)
        noise = torch.rand(8, 49, device=device)
        with torch.no_grad():
            same = torch.equal(runners[0].model(x, noise=noise).loss, runners[1].model(x, noise=noise).loss)
        if not same:
            raise SystemExit("the hook-free copy does not reproduce the library model's loss")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        for r in runners:
            r.step(record=False)
    for _ in range(args.steps):  # interleaved so both see the same machine load
        for r in runners:
            r.step(record=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    results = []
    for r in runners:
        med = statistics.median(r.times)
        results.append({"code": r.name, "img_per_s": args.batch / med, "median_step_s": med})
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "precision": args.precision, "compile": args.compile, "fused": args.fused,
        "batch": args.batch,
        "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
        "peak_rss_gib_process": round(rss, 2),
        "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "results": results,
    }
    if args.peer_mae:
        info["ratio_mimkit_over_official"] = results[0]["img_per_s"] / results[-1]["img_per_s"]
    if args.hooks_peer:
        info["ratio_with_hooks_over_hook_free"] = results[0]["img_per_s"] / results[1]["img_per_s"]
    by_name = {r["code"]: r["img_per_s"] for r in results}
    for r in results:
        if r["code"].startswith("Hugging Face"):
            info["ratio_mimkit_over_hf"] = results[0]["img_per_s"] / r["img_per_s"]
        if "previous attention" in r["code"]:
            info["ratio_mimkit_over_previous_attention"] = results[0]["img_per_s"] / by_name[r["code"]]
    print(json.dumps(info, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
