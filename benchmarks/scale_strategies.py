"""DDP against FSDP2 (and FSDP2 + activation checkpointing): step time and per-rank memory.

Runs each strategy in its own ``torchrun`` launch (so peak RSS is per strategy) on ``--nproc``
processes; every rank trains an MAE on random images through the same wrapping code the trainer
uses (``mimkit.train.fsdp``) and reports:

* ``step_ms``: median time of one optimizer step (forward, backward, gradient sync, AdamW) after
  ``--warmup`` steps;
* ``state_mib``: this rank's resident training state: parameters + gradients + AdamW moments
  (the local shards under FSDP), counted from the tensors;
* ``peak_rss_mib`` (CPU) or ``peak_cuda_mib`` (GPU): the process's peak memory.

    python benchmarks/scale_strategies.py                         # CPU, gloo, 2 processes, ViT 192/6
    python benchmarks/scale_strategies.py --width 384 --depth 12 --batch 32
    python benchmarks/scale_strategies.py --device cuda --nproc 8 --width 1024 --depth 24 --img 224 --patch 16

Numbers from CPU/gloo say how the strategies compare on this machine, not on GPUs with NVLink.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

STRATEGIES = ("ddp", "fsdp", "fsdp+ac")


def worker(args) -> None:
    import torch.distributed as dist

    from mimkit.methods import MAE, DecoderConfig, ModelConfig, Progress
    from mimkit.nn import ViTConfig
    from mimkit.train.distributed import init_distributed
    from mimkit.train.fsdp import ShardedTrainModule, apply_activation_checkpointing, shard_model

    info = init_distributed(args.device)
    torch.manual_seed(0)
    enc = ViTConfig(img_size=args.img, patch_size=args.patch, in_chans=3, embed_dim=args.width, depth=args.depth,
                    num_heads=max(1, args.width // 64))
    model = MAE(ModelConfig(enc, DecoderConfig(embed_dim=max(64, args.width // 2), depth=2, num_heads=4))).to(info.device)
    amp = torch.bfloat16 if args.device == "cuda" else None
    if args.strategy.endswith("+ac"):
        apply_activation_checkpointing(model)
    if args.strategy.startswith("fsdp"):
        shard_model(model, info, amp)
        train_model = ShardedTrainModule(model)
    else:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 3, args.img, args.img, device=info.device)
    prog = Progress(0, 1000, 0.0, 1.0)
    times = []
    for i in range(args.warmup + args.steps):
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(info.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = train_model(x, prog).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients allocated: they are part of the state
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    nbytes = 0
    for p in model.parameters():
        nbytes += local(p).numel() * local(p).element_size()
        if p.grad is not None:
            nbytes += local(p.grad).numel() * local(p.grad).element_size()
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                nbytes += local(v).numel() * local(v).element_size()
    rec = {"strategy": args.strategy, "rank": info.rank, "world": info.world_size, "step_ms": 1e3 * statistics.median(times),
           "state_mib": nbytes / 2**20, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if info.device.type == "cuda":
        rec["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out: list = [None] * info.world_size
    dist.all_gather_object(out, rec)
    if info.rank == 0:
        print("RESULT " + json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", choices=STRATEGIES, default=None, help="(worker) one strategy")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="images per process")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--port", type=int, default=29650)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    if args.strategy is not None:
        worker(args)
        return
    results = []
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for k, strategy in enumerate(STRATEGIES):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
               str(args.port + k), __file__, "--strategy", strategy, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{strategy} failed:\n{proc.stderr[-3000:]}")
        ranks = json.loads(line[len("RESULT "):])
        mem_key = "peak_cuda_mib" if "peak_cuda_mib" in ranks[0] else "peak_rss_mib"
        row = {"strategy": strategy, "world": ranks[0]["world"], "params_m": round(ranks[0]["params_m"], 2),
               "step_ms": round(max(r["step_ms"] for r in ranks), 1),
               "state_mib_per_rank": round(max(r["state_mib"] for r in ranks), 2),
               f"{mem_key}_per_rank": round(max(r[mem_key] for r in ranks), 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    meta = {"device": args.device, "torch": torch.__version__, "args": vars(args), "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
