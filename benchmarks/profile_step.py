"""Where does a method's training step spend its device time? A profile of the model-only step.

``mimkit bench`` says how fast a step is (img/s, MFU against a measured matmul); this says why. It
builds the bench's model row (the method's ViT-B/16 config, images already on the device, bf16
autocast on a GPU, fused AdamW, compiled as the trainer compiles: ``--compile``, ``--mode``), times
``--steps`` steps, then profiles ``--profile`` more and reports per step:

* wall time and kernel time (on a GPU: the CUDA kernels; the difference is the device idling while the
  host launches), kernel launches;
* kernel time by category (matmul, attention, layer norm, fused element-wise, optimizer, copies; the
  rule is ``benchmarks/_common.py``'s ``KERNEL_CATEGORIES``) and the top kernels;
* FLOPs per step split into matmul and attention (``FlopCounterMode``'s per-op counts) and the TFLOP/s
  each category's kernels reach, against the measured matmul ceiling: whether the missing MFU is slow
  GEMMs, slow attention, or time spent in kernels that do no counted FLOPs.

    python benchmarks/profile_step.py --out runs/profile                 # GPU: MAE ViT-B/16, batch 256
    python benchmarks/profile_step.py --method pcae --batch 128 --mode reduce-overhead
    python benchmarks/profile_step.py --smoke --device cpu               # tiny shapes, any machine
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import emit_json, kernel_profile

from mimkit.config.schema import COMPILE_MODES

ATTENTION_OPS = ("attention", "sdpa", "bmm")  # batched products: explicit attention (q k^T, attn v) in a ViT
MATMUL_OPS = ("mm", "addmm", "matmul", "linear")


def split_flops(fn) -> dict:
    """FLOPs of ``fn()`` (with grad) by kind: ``{"matmul": n, "attention": n, "convolution": n, "other": n}``
    (the convolution is the patch embedding). Batched matrix products count as attention: in these models
    only the explicit attention path (CPU, short sequences) makes them; its kernels are GEMMs, so on that
    path the per-category TFLOP/s mix the two."""
    from torch.utils.flop_counter import FlopCounterMode

    from mimkit.flops import _extra_formulas

    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as fc:
        fn()
    out = {"matmul": 0, "attention": 0, "convolution": 0, "other": 0}
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        name = str(op).lower().removeprefix("aten.").split(".")[0]  # "aten.mm" / "aten.mm.default" -> "mm"
        kind = ("attention" if any(k in name for k in ATTENTION_OPS) else
                "convolution" if name.startswith("convolution") else
                "matmul" if name in MATMUL_OPS else "other")
        out[kind] += int(n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="mae")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default 256 (smoke 4)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--compile", choices=("true", "false"), default=None, help="default: true on a GPU")
    ap.add_argument("--mode", default="default", choices=COMPILE_MODES, help="torch.compile mode, as train.compile_mode")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (compilation); default 5 (smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps; default 20 (smoke 2)")
    ap.add_argument("--profile", type=int, default=None, help="profiled steps; default 5 (smoke 2)")
    ap.add_argument("--smoke", action="store_true", help="the bench's tiny shapes")
    ap.add_argument("--out", default=None, help="a directory for profile_<method>.json")
    args = ap.parse_args(argv)

    from mimkit.bench import Plan, matmul_ceiling, method_config
    from mimkit.methods import Progress
    from mimkit.train.loop import build_method
    from mimkit.train.optim import param_groups
    from mimkit.train.precision import compile_kwargs
    from mimkit.train.step import build_adamw

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    batch = args.batch or (4 if args.smoke else 256)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    steps = args.steps or (2 if args.smoke else 20)
    nprof = args.profile or (2 if args.smoke else 5)
    precision = args.precision or ("bf16" if cuda else "fp32")
    compiled = (args.compile or ("true" if cuda else "false")) == "true"
    plan = Plan(device=dev, smoke=args.smoke, batch=batch, steps=steps, warmup=warmup, precision=precision,
                compile=compiled, methods=(args.method,), jpegs=0, jpeg_dir=None, workers=0, fmnist_batch=0,
                budget_s=None, peer=False, out=None, compile_mode=args.mode, e2e=False)
    dtype = plan.dtype
    cfg = method_config(args.method, args.smoke)
    torch.manual_seed(0)
    model = build_method(cfg).to(dev).train()
    e = cfg.model.encoder
    images = torch.randn(batch, e.in_chans, e.img_size, e.img_size, device=dev)
    prog = Progress(500, 1000, 50.0, 100.0)  # mid-run, as the bench
    opt = build_adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.95), 1e-8, None, dev)
    run = torch.compile(model, **compile_kwargs(args.mode)) if compiled else model  # as the trainer compiles

    def fwd_bwd(m):
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = m(images, prog).loss
        loss.backward()

    flops = split_flops(lambda: fwd_bwd(model))
    opt.zero_grad(set_to_none=True)

    def step():
        if compiled and plan.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        fwd_bwd(run)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(prog)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    sec = (time.perf_counter() - t) / steps
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(nprof):
            step()
        sync()
    kp = kernel_profile(prof, nprof, cuda)
    ceiling = matmul_ceiling(dev, dtype or torch.float32, 256 if args.smoke else (8192 if cuda else 2048),
                             iters=5 if args.smoke or not cuda else 20)
    cat_ms = kp["by_category_ms_per_step"]
    total_flop = sum(flops.values())

    def tflops(n: float, ms: float | None):
        return round(n / (ms / 1e3) / 1e12, 2) if ms else None

    res = {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
        "method": args.method, "batch": batch, "precision": precision, "compiled": compiled, "mode": args.mode,
        "smoke": args.smoke, "warmup_s": round(warm_s, 2),
        "ms_per_step": round(sec * 1e3, 3), "img_per_s": round(batch / sec, 1),
        "gflop_per_img": round(total_flop / batch / 1e9, 3),
        "tflops": tflops(total_flop, sec * 1e3), "ceiling_tflops": round(ceiling / 1e12, 1),
        "mfu": round(total_flop / sec / ceiling, 4),
        "flop_split_per_step": flops,
        "matmul_kernel_tflops": tflops(flops["matmul"], cat_ms.get("matmul")),
        "attention_kernel_tflops": tflops(flops["attention"], cat_ms.get("attention")),
        "device_busy_share": round(kp["kernel_ms_per_step"] / (sec * 1e3), 3) if cuda else None,
        **kp,
    }
    emit_json(res, args.out, f"profile_{args.method}{'_' + args.mode if args.mode != 'default' else ''}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
