"""Which training steps wait for the GPU? Every method's preset through the real trainer, with torch's
sync watch on.

The trainer is meant to read device values only at log steps (and checkpoints); a method's forward or
loss that reads a value back (``.item()``, ``bool(tensor)``, a data-dependent size) or copies host
values to the device the blocking way (``torch.tensor(values, device="cuda")``) makes every step wait
for the GPU. ``torch.cuda.set_sync_debug_mode("warn")`` warns at each such call; this script runs each
Fashion-MNIST preset (``configs/<method>_fashion_mnist.yaml`` with the method's offline overrides) for
``--steps`` steps, logging every ``--log-every``, and reports per step the synchronising calls and where
the first ones were made. On a CPU there is nothing to watch (the counts are 0; the tests count host
reads with ``mimkit.train.step.count_host_reads`` instead).

    python benchmarks/sync_check.py --out runs/syncs            # GPU, every method, eager, bf16
    python benchmarks/sync_check.py --methods emae,mixedae --compile true
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from _common import emit_json

ROOT = Path(__file__).resolve().parents[1]


def watch(preset: str, args) -> dict:
    from mimkit.config import load_config
    from mimkit.methods import METHODS
    from mimkit.train import Trainer

    name = preset.removesuffix("_fashion_mnist")
    with tempfile.TemporaryDirectory(prefix="mimkit-sync-") as tmp:
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml", [
            *METHODS[name].offline_overrides, f"train.max_steps={args.steps}", "train.epochs=1000",
            f"train.log_every_steps={args.log_every}", "train.ckpt_every_steps=1000000000", f"train.out_dir={tmp}",
            "train.tensorboard=false", "train.progress_bar=false", "eval.knn_at_end=false",
            "eval.picture_at_end=false", f"train.compile={args.compile}", f"data.batch_size={args.batch}",
            *args.overrides])
        tr = Trainer(cfg)
        tr.save = lambda *a, **k: Path(tmp) / "checkpoint.pt"  # steps, not checkpoint writes
        real = tr.train_model
        marks: list[int] = []
        box: dict = {"caught": []}  # the warnings caught so far, at each forward call

        def forward(images, progress):
            marks.append(len(box["caught"]))
            return real(images, progress)

        tr.train_model = forward
        cuda = tr.device.type == "cuda"
        with warnings.catch_warnings(record=True) as caught:
            box["caught"] = caught
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                tr.train()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        marks.append(len(caught))
        is_sync = [("synchroniz" in str(w.message)) for w in caught]
        syncs = [w for w, s in zip(caught, is_sync) if s]
        per_step = [sum(is_sync[a:b]) for a, b in zip(marks, marks[1:])]
        log_steps = [i for i in range(len(per_step)) if (i + 1) % args.log_every == 0 or i + 1 == len(per_step)]
        between = [n for i, n in enumerate(per_step) if i not in log_steps and i > 0]  # step 0: warm-up, compile
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
        return {"per_step": per_step, "log_steps": log_steps, "syncs_between_log_steps": sum(between),
                "where": where[:12]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=None, help="comma-separated (default: every Fashion-MNIST preset)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compile", choices=("true", "false"), default="false")
    ap.add_argument("--out", default=None, help="a directory for sync_check.json")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every preset")
    args = ap.parse_args(argv)
    presets = sorted(p.stem for p in (ROOT / "configs").glob("*_fashion_mnist.yaml"))
    if args.methods:
        want = {m.strip() for m in args.methods.split(",")}
        presets = [p for p in presets if p.removesuffix("_fashion_mnist") in want]
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "compile": args.compile, "batch": args.batch, "methods": {}}
    for p in presets:
        print(f"sync_check: {p}", file=sys.stderr, flush=True)
        try:
            res["methods"][p] = watch(p, args)
        except Exception as e:  # one method failing must not lose the others
            res["methods"][p] = {"error": f"{type(e).__name__}: {e}"[:300]}
        torch._dynamo.reset()
    emit_json(res, args.out, "sync_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
