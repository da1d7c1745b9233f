"""Where does a small model's training step go? The trainer against a bare loop, with a profile.

At the Fashion-MNIST preset's size (ViT 192/6, 0.34 GFLOP per image and step) a GPU finishes the
arithmetic of a 512-image step in well under a millisecond, so the step time is whatever the host
does: kernel launches, Python, synchronisations. This script runs, in one process on one device:

* ``trainer``: :class:`mimkit.train.Trainer` on the preset (in-memory data on the device, the real
  loop: schedule, clipping, the non-finite guard, fused AdamW, logging), ``--steps`` steps; img/s from
  its own log windows of ``--window`` steps (the first window holds compilation, and windows that
  overlap the profiled or sync-watched steps run slower: those are dropped);
* ``bare``: the same method's forward, backward and fused AdamW on device-resident random images,
  nothing else (the least any loop does), compiled when the trainer was, in the same mode
  (``--mode reduce-overhead``: as CUDA graphs, the way to take the launches off the host; the trainer
  runs it as ``train.compile_mode=reduce-overhead``);
* a ``torch.profiler`` trace of ``--profile`` trainer steps in the middle of the run: host time per
  step, device (kernel) time per step, kernel launches per step, the top host ops, and on a GPU the
  Python stacks of every synchronising CUDA call (``torch.cuda.set_sync_debug_mode``).

    python benchmarks/step_overhead.py --device cuda --compile true --out runs/step_overhead
    python benchmarks/step_overhead.py --device cuda --compile true --mode reduce-overhead   # CUDA graphs
    python benchmarks/step_overhead.py --device cpu --steps 60 --batch 64     # the same on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from _common import emit_json, kernel_profile


def trainer_run(args, tmp: str) -> dict:
    from mimkit.config import load_config
    from mimkit.train import Trainer

    cfg = load_config(args.config, [
        f"data.batch_size={args.batch}", f"train.max_steps={args.steps}", "train.epochs=1000",
        f"train.out_dir={tmp}", f"train.log_every_steps={args.window}", "train.ckpt_every_steps=1000000000",
        "train.tensorboard=false", "train.progress_bar=false", "eval.knn_at_end=false",
        "eval.picture_at_end=false", f"train.precision={args.precision}", f"train.compile={args.compile}",
        f"train.device={args.device}", f"train.compile_mode={args.mode or 'default'}", *args.overrides])
    tr = Trainer(cfg)
    tr.save = lambda *a, **k: Path(tmp) / "checkpoint.pt"  # steps, not checkpoint writes
    dev = tr.device
    start = max(args.window + 2, args.steps // 2 - args.profile // 2)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    prof = torch.profiler.profile(activities=acts, schedule=torch.profiler.schedule(
        wait=start - 2, warmup=2, active=args.profile, repeat=1))
    syncs: list[str] = []
    inner = tr._train_step
    n = {"i": 0}

    def step(run):
        i = n["i"]
        sync_watch = dev.type == "cuda" and start + args.profile <= i < start + args.profile + args.window
        if sync_watch:  # every synchronising CUDA call warns; the warning names the line that made it
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                inner(run)
            torch.cuda.set_sync_debug_mode(0)
            syncs.extend(f"step {i}: {w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
        else:
            inner(run)
        prof.step()
        n["i"] += 1

    tr._train_step = step
    prof.start()
    t = time.perf_counter()
    try:
        tr.train()
    finally:
        prof.stop()
    wall = time.perf_counter() - t
    recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    ips = [r["img_per_s"] for r in recs if "img_per_s" in r]
    from torch._dynamo.utils import counters

    ka = prof.key_averages()
    host_us = sum(e.self_cpu_time_total for e in ka) / args.profile
    top_host = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:25]
    # kernels only: the device spans of annotations (ProfilerStep#, Optimizer.step#) cover the kernels
    # inside them and were counted as device time in the first (2026-12-04) version of this script
    kernels = kernel_profile(prof, args.profile, dev.type == "cuda")
    # windows that overlap the profiled steps (and the profiler's warm-up) or the sync watch run slower:
    # only the others count (the first holds compilation)
    busy = range(start - 2, start + args.profile + (args.window if dev.type == "cuda" else 0))
    clean = [v for k, v in enumerate(ips) if k > 0 and not set(range(k * args.window, (k + 1) * args.window)) & set(busy)]
    return {
        "img_per_s_windows": ips, "clean_windows": clean, "img_per_s": statistics.median(clean) if clean else None,
        "wall_s": wall, "compiled": tr.compiled,
        "profile_steps": args.profile, "profiled_from_step": start,
        "host_ms_per_step_profiled": host_us / 1e3,
        "top_host_ops (name, calls/step, self ms/step)": [
            f"{e.key[:70]} | {e.count / args.profile:g} | {e.self_cpu_time_total / args.profile / 1e3:.3f}"
            for e in top_host],
        "kernels": kernels,
        "syncs": syncs,
        "dynamo": {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles")},
    }


def bare_run(args) -> dict:
    from mimkit.config import load_config
    from mimkit.methods import Progress
    from mimkit.train.loop import build_method
    from mimkit.train.optim import param_groups
    from mimkit.train.precision import compile_kwargs
    from mimkit.train.step import build_adamw

    dev = torch.device(args.device)
    cfg = load_config(args.config, list(args.overrides))
    torch.manual_seed(0)
    model = build_method(cfg).to(dev).train()
    e = cfg.model.encoder
    x = torch.randn(args.batch, e.in_chans, e.img_size, e.img_size, device=dev)
    opt = build_adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.95), 1e-8, None, dev)
    run = torch.compile(model, **compile_kwargs(args.mode or "default")) if args.compile == "true" else model
    bf16 = args.precision == "bf16"
    prog = Progress(50, 1000, 0.2, 3.0)

    def step():
        if args.mode is not None:  # both modes replay CUDA graphs: a new iteration may reuse the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = run(x, prog).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    for _ in range(args.window):  # warm-up (compilation)
        step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    first = time.perf_counter() - t
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(args.window):
            step()
        sync()
        times.append((time.perf_counter() - t) / args.window)
    sec = statistics.median(times)
    return {"img_per_s": args.batch / sec, "ms_per_step": sec * 1e3, "warmup_s": first}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/mae_fashion_mnist.yaml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=140)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--profile", type=int, default=10)
    ap.add_argument("--compile", choices=("true", "false"), default="false")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--mode", default=None, choices=(None, "reduce-overhead", "max-autotune"),
                    help="torch.compile mode of both runs (reduce-overhead: CUDA graphs on a GPU; the trainer "
                         "takes it as train.compile_mode and marks each step)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="a directory for step_overhead.json")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config (both runs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mimkit-step-") as tmp:
        try:
            tr = trainer_run(args, tmp)
        except Exception:  # the bare row still says something
            tr = {"error": traceback.format_exc()[-2000:]}
    torch._dynamo.reset()
    bare = bare_run(args)
    res = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "batch": args.batch, "compile": args.compile, "mode": args.mode,
           "precision": args.precision,
           "trainer": tr, "bare": bare}
    if tr.get("img_per_s"):
        res["trainer_over_bare"] = bare["img_per_s"] / tr["img_per_s"]
    emit_json(res, args.out, f"step_overhead_{args.compile}{'_' + args.mode if args.mode else ''}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
