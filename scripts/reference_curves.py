"""Make the reference loss / kNN curves of the Fashion-MNIST presets (``docs/reference/fashion_mnist/``).

Every ``configs/*_fashion_mnist.yaml`` preset is trained with each seed on the first ``--limit``
training images with batch ``--batch`` (the preset's lr rule, warmup and epochs unchanged), logging the loss
every ``--log-every`` steps and kNN top-1 (k=20, 500 train / 250 test images) after every epoch; the
runs are reduced to ``loss.csv`` / ``knn.csv`` / ``meta.json`` / ``curves.png`` by
:func:`mimkit.compare.build_reference`. Hold a run against them with ``mimkit compare RUN_DIR``.

    nice -n 10 python scripts/reference_curves.py                      # all presets, seeds 0 1 2
    python scripts/reference_curves.py --presets mae_fashion_mnist --seeds 0 1 2
    python scripts/reference_curves.py --reduce-only                   # rebuild the CSVs from runs/reference
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



def offline_overrides(preset: str) -> list[str]:
    """What the preset needs offline, as its method declares it (CAE v2's teacher file is not shipped:
    a randomly initialised teacher of the preset's shape; :meth:`mimkit.methods.Method.preset_overrides`)."""
    from mimkit.config import read_yaml
    from mimkit.methods import METHODS

    name = read_yaml(ROOT / "configs" / f"{preset}.yaml").get("method", {}).get("name", "mae")
    return METHODS[name].preset_overrides()


def overrides_for(preset: str, seed: int, limit: int, batch: int, log_every: int, runs: Path) -> list[str]:
    return [
        f"data.limit={limit}", f"data.batch_size={batch}", f"train.seed={seed}", f"train.log_every_steps={log_every}",
        "eval.knn_every_epochs=1", "eval.knn_train_limit=500", "eval.knn_test_limit=250",
        "eval.picture_at_end=false", "train.tensorboard=false", "train.progress_bar=false",
        "train.ckpt_every_steps=100000", "train.num_threads=1", f"train.out_dir={runs / preset / f'seed{seed}'}",
        *offline_overrides(preset),
    ]


def _git_commit() -> str | None:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=None, help="default: every configs/*_fashion_mnist.yaml")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--limit", type=int, default=512, help="training images (data.limit)")
    ap.add_argument("--batch", type=int, default=32, help="data.batch_size (per process)")
    ap.add_argument("--log-every", type=int, default=2, help="train.log_every_steps")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "reference"), help="where the runs go")
    ap.add_argument("--out", default=str(ROOT / "docs" / "reference" / "fashion_mnist"))
    ap.add_argument("--reduce-only", action="store_true", help="only rebuild the references from existing runs")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from mimkit.compare import build_reference
    from mimkit.config import load_config, to_dict
    from mimkit.train import pretrain

    presets = args.presets or sorted(p.stem for p in (ROOT / "configs").glob("*_fashion_mnist.yaml"))
    runs = Path(args.runs)
    jobs = [(p, s) for p in presets for s in args.seeds]
    if not args.reduce_only:
        bar = tqdm(jobs, desc="reference runs", unit="run")
        for preset, seed in bar:
            bar.set_postfix_str(f"{preset} seed {seed}")
            run_dir = runs / preset / f"seed{seed}"
            if (run_dir / "result.json").is_file():
                continue  # done already (rerunning the script resumes the rest)
            cfg = load_config(ROOT / "configs" / f"{preset}.yaml",
                              overrides_for(preset, seed, args.limit, args.batch, args.log_every, runs))
            t0 = time.time()
            with contextlib.redirect_stdout(io.StringIO()):
                pretrain(cfg)
            bar.write(f"{preset} seed {seed}: {time.time() - t0:.0f} s")
    for preset in presets:
        dirs = {s: runs / preset / f"seed{s}" for s in args.seeds if (runs / preset / f"seed{s}" / "result.json").is_file()}
        if len(dirs) < 2:
            print(f"{preset}: fewer than 2 finished seeds, no reference written", file=sys.stderr)
            continue
        ov = overrides_for(preset, 0, args.limit, args.batch, args.log_every, Path("runs/reference"))
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml", ov)
        cmd = (f"mimkit pretrain configs/{preset}.yaml "
               + " ".join(o.replace("seed0", "seed<S>").replace("train.seed=0", "train.seed=<S>") for o in ov))
        meta = {
            "preset": preset, "method": cfg.method.name, "dataset": cfg.data.dataset,
            "made_by": (f"python scripts/reference_curves.py --presets {preset} --seeds {' '.join(map(str, args.seeds))} "
                        f"--limit {args.limit} --batch {args.batch} --log-every {args.log_every}"),
            "command": cmd, "overrides": ov, "limit": args.limit,
            "note": (f"the preset trained on the first {args.limit} Fashion-MNIST training images with batch "
                     f"{args.batch} (its lr rule, warmup and epochs unchanged); kNN k=20 on 500 train / 250 test images after every epoch"),
            "mimkit_commit": _git_commit(), "torch": torch.__version__, "python": platform.python_version(),
            "device": "cpu", "created": time.strftime("%Y-%m-%d", time.gmtime()), "config": to_dict(cfg),
        }
        out = build_reference(dirs, Path(args.out) / preset, meta)
        print(f"wrote {out}")
    (Path(args.out)).mkdir(parents=True, exist_ok=True)
    index = {p: json.loads((Path(args.out) / p / "meta.json").read_text())["command"]
             for p in presets if (Path(args.out) / p / "meta.json").is_file()}
    print(json.dumps(index, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
