"""Does evaluation run at the model's speed? mimkit's feature extraction and kNN against a bare loop.

One process, one encoder (a mimkit checkpoint, e.g. the quickstart's), the same uint8 Fashion-MNIST
images. Each round times, in turn:

* ``bare``: the least a user's own loop does: per batch of ``--batch`` images, ``float / 255``,
  normalise, ``encoder.forward_features`` under ``no_grad``, keep the cls token and the patch-token
  mean;
* ``extract``: :func:`mimkit.eval.features.extract_features` with pools ``cls`` and ``mean`` (what
  ``mimkit eval`` runs; one pass for both pools), same batch, same autocast;
* ``knn``: the kNN vote alone (:func:`mimkit.eval.knn.knn_eval`, k = 10/20/100/200 from one pass, on
  the ``extract`` features: ``--train`` bank, ``--test`` queries), reported as a share of the
  extraction time.

The ratio ``extract / bare`` (medians over ``--rounds``) is the overhead of mimkit's path; the goal
is within 10 %.

    python benchmarks/eval_speed.py runs/mae_fashion_mnist/checkpoint.pt --train 10000 --test 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a mimkit checkpoint (or any weight file mimkit eval reads)")
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp", choices=("off", "bf16"), default="off")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mimkit.data import load_fashion_mnist
    from mimkit.eval.data import load_checkpoint_encoder
    from mimkit.eval.features import extract_features
    from mimkit.eval.knn import knn_eval

    ck = load_checkpoint_encoder(args.checkpoint)
    enc = ck.encoder.eval()
    mean, std = tuple(ck.input["mean"]), tuple(ck.input["std"])
    (xtr, ytr), (xte, yte) = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    images = xtr[: args.train]
    dtype = torch.bfloat16 if args.amp == "bf16" else None
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    prefix = enc.num_prefix_tokens

    def bare():
        cls, avg = [], []
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            for i in range(0, len(images), args.batch):
                x = (images[i : i + args.batch].float() / 255 - m) / s
                t = enc.forward_features(x)
                cls.append(t[:, 0].float())
                avg.append(t[:, prefix:].float().mean(1))
        return torch.cat(cls), torch.cat(avg)

    def extract():
        return extract_features(enc, images, pool=["cls", "mean"], batch_size=args.batch, mean=mean, std=std,
                                device="cpu", autocast_dtype=dtype)

    b_cls, b_avg = bare()
    feats = extract()
    same = max(float((feats["cls"] - b_cls).abs().max()), float((feats["mean"] - b_avg).abs().max()))
    bank, queries = feats["cls"][: args.train], extract_features(enc, xte[: args.test], pool="cls",
                                                                batch_size=args.batch, mean=mean, std=std,
                                                                device="cpu", autocast_dtype=dtype)
    times = {"bare": [], "extract": [], "knn": []}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare), ("extract", extract),
                         ("knn", lambda: knn_eval(bank, ytr[: args.train], queries, yte[: args.test]))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"images": args.train, "batch": args.batch, "threads": args.threads, "amp": args.amp,
           "bare_img_per_s": args.train / med["bare"], "extract_img_per_s": args.train / med["extract"],
           "extract_over_bare": med["extract"] / med["bare"], "knn_s": med["knn"],
           "knn_share_of_extract": med["knn"] / med["extract"], "max_feature_diff": same,
           "queries": args.test, "torch": torch.__version__}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
