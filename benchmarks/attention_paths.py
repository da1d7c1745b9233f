"""Which attention path is fastest for a device and dtype: the measurement behind ``mimkit.nn.layers.attention``.

Times one multi-head self-attention (the part between the ``qkv`` projection and ``proj``) at the
standard workload's shapes, forward + backward (training) and forward only (feature extraction),
through each path, interleaved round by round in one process so that machine noise hits every path
alike; reports the median per path.

Paths:

* ``sdpa``: ``F.scaled_dot_product_attention``, PyTorch's own kernel choice;
* ``sdpa_math``: SDPA restricted to its math kernel;
* ``explicit``: ``softmax(q k^T * scale) v`` as three ops (logits and softmax in the input dtype);
* ``explicit_sm32``: logits in the input dtype, softmax in fp32, probabilities cast back (Hugging Face's
  eager attention);
* ``explicit_f32``: logits and softmax in fp32 (then cast back).

Errors are the largest absolute difference of the output from the same attention in float64.

Shapes (batch 256): the MAE encoder of the Fashion-MNIST preset (3 heads of 64, 13 tokens: 12 visible
+ cls), its decoder (4 heads of 32, 50 tokens) and a ViT-B/16 encoder at 224 px and 75 % masking (12
heads of 64, 50 tokens, batch 64) and unmasked (197 tokens, batch 32: fine-tuning, evaluation).

    python benchmarks/attention_paths.py                     # CPU, fp32 and bf16, 2 threads
    python benchmarks/attention_paths.py --device cuda --batch 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import write_rows
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # name: (batch scale, heads, tokens, head dim)
    "fmnist_encoder": (1.0, 3, 13, 64),
    "fmnist_decoder": (1.0, 4, 50, 32),
    "vitb_encoder": (0.25, 12, 50, 64),
    "vitb_full": (0.125, 12, 197, 64),
}


def explicit(q, k, v, mode: str = "low"):
    scale = q.shape[-1] ** -0.5
    if mode == "f32":
        a = ((q.float() @ k.float().transpose(-2, -1)) * scale).softmax(-1)
        return a.to(v.dtype) @ v
    if mode == "sm32":
        return ((q @ k.transpose(-2, -1)) * scale).softmax(-1, dtype=torch.float32).to(v.dtype) @ v
    return ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v


def sdpa_math(q, k, v):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v)


PATHS = {
    "sdpa": F.scaled_dot_product_attention,
    "sdpa_math": sdpa_math,
    "explicit": lambda q, k, v: explicit(q, k, v, "low"),
    "explicit_sm32": lambda q, k, v: explicit(q, k, v, "sm32"),
    "explicit_f32": lambda q, k, v: explicit(q, k, v, "f32"),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, q, k, v, grad: bool, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    if grad:
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            fn(q, k, v)
    sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated from " + ", ".join(SHAPES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for dname in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        for shape in args.shapes.split(","):
            scale, h, n, d = SHAPES[shape]
            b = max(1, int(args.batch * scale))
            for grad in (True, False):
                g = torch.Generator(device="cpu").manual_seed(0)
                q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype).requires_grad_(grad)
                           for _ in range(3))
                ref = explicit(*(x.detach().double() for x in (q, k, v)), "f32").float()
                times = {p: [] for p in PATHS}
                for r in range(args.warmup + args.rounds):
                    for p, fn in PATHS.items():
                        t = time_once(fn, q, k, v, grad, device)
                        if r >= args.warmup:
                            times[p].append(t)
                        for x in (q, k, v):
                            x.grad = None
                med = {p: statistics.median(ts) * 1e3 for p, ts in times.items()}
                err = {p: float((fn(q.detach(), k.detach(), v.detach()).float() - ref).abs().max().cpu())
                       for p, fn in PATHS.items()}
                best = min(med, key=med.get)
                row = {"dtype": dname, "shape": shape, "b,h,n,d": [b, h, n, d],
                       "pass": "fwd+bwd" if grad else "fwd", "ms": med, "max_err_vs_f32": err, "fastest": best}
                rows.append(row)
                print(f"{dname:5s} {shape:15s} {row['pass']:8s} " + "  ".join(f"{p} {m:7.2f}" for p, m in med.items())
                      + f"   fastest {best}", flush=True)
    meta = {"device": str(device), "threads": args.threads, "torch": torch.__version__, "rounds": args.rounds}
    write_rows(args.json, meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
