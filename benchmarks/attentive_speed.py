"""The attentive probe's training step: normalising the token cache once against every batch.

One process, one float16 token cache of the Fashion-MNIST zoo's shape (``--images`` x 50 tokens x 192
for ViT 192/6 patch 4; random values: the step's cost does not depend on them), the probe of
:func:`mimkit.eval.attentive.train_attentive_probe` under ``--amp`` autocast. Each round runs, in turn,
``--epochs`` epochs of the probe with ``normalize_once=False`` (LayerNorm of every batch, in float32,
every epoch) and with ``normalize_once=True`` (one normalised copy of the cache in the autocast dtype,
its time included), and checks that both trained bitwise the same probe (every epoch's loss and the
test accuracy). Reported: ms per training step (median over rounds) and the ratio.

    python benchmarks/attentive_speed.py --images 20000 --epochs 2 --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--amp", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from mimkit.eval.attentive import AttentiveProbeConfig, attentive_batch_size, train_attentive_probe

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    g = torch.Generator().manual_seed(0)
    n_test = max(args.images // 6, 1)
    tokens = (torch.randn(args.images + n_test, args.tokens, args.dim, generator=g) * 2 + 0.5).half()
    labels = torch.randint(0, 10, (len(tokens),), generator=g)
    cfg = AttentiveProbeConfig(epochs=args.epochs, warmup_epochs=min(1.0, args.epochs / 2))
    steps = args.epochs * (args.images // attentive_batch_size(cfg, args.images))
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        results = {}
        for once in (False, True):
            t = time.perf_counter()
            results[once] = train_attentive_probe(tokens[: args.images], labels[: args.images], tokens[args.images :],
                                                  labels[args.images :], args.heads, cfg, autocast_dtype=amp,
                                                  normalize_once=once)
            times[once].append((time.perf_counter() - t) / steps * 1e3)
        same = results[False]["history"] == results[True]["history"] and results[False]["top1"] == results[True]["top1"]
        if not same:
            raise SystemExit("normalize_once changed the probe's training: a bug")
    per_batch, once = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({"images": args.images, "tokens": args.tokens, "dim": args.dim, "amp": args.amp,
                      "threads": torch.get_num_threads(), "steps_per_round": steps, "rounds": args.rounds,
                      "ms_per_step_per_batch_norm": round(per_batch, 2), "ms_per_step_normalized_once": round(once, 2),
                      "speedup": round(per_batch / once, 2), "bitwise_equal": True}))


if __name__ == "__main__":
    main()
