"""Distributed exits, back to back: does every torchrun job end with exit status 0?

A stress check, not a timing: each round runs, one after the other,
- ``ddp``: ``torchrun --standalone --nproc_per_node 2 -m mimkit.cli pretrain`` (DDP, gloo),
- ``fsdp``: the same with ``train.strategy=fsdp`` (FSDP2 + sharded DCP checkpoints),
- ``worker``: tests/scale_worker.py under torchrun (the test suite's worker, FSDP with asynchronous
  DCP writes and a gathered full state after training),
- ``global``: a user script that keeps the ``Trainer`` (and so its process group) alive as a module
  global and never closes it (the trainer must still tear down in order at interpreter exit),
- ``rendezvous``: two torchrun launchers (``--nnodes 2``, c10d rendezvous on a store hosted here on a
  free port), as tests/test_scale.py runs them,
and counts the runs whose every process exited 0 and wrote its result. Failures keep their stderr under
``--log-dir``. Needs Fashion-MNIST (``data.limit=256`` of it).

    python benchmarks/dist_exit.py --runs 50            # 250 jobs; ~30-60 min on 2 CPU cores
    python benchmarks/dist_exit.py --runs 2 --kinds ddp,global
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2",
    "data.limit=256", "data.batch_size=16", "train.log_every_steps=1", "train.progress_bar=false",
    "train.tensorboard=false", "eval.knn_at_end=false", "eval.picture_at_end=false", "optim.warmup_epochs=1",
    "train.num_threads=1", "train.epochs=1", "train.max_steps=3", "train.ckpt_every_steps=1",
]
CONFIG = str(ROOT / "configs/mae_fashion_mnist.yaml")
KINDS = ("ddp", "fsdp", "worker", "global", "rendezvous")

# the careless user script: the trainer lives in a module global until the interpreter exits
GLOBAL_SCRIPT = """
import sys
from mimkit.config import load_config
from mimkit.train.loop import Trainer
trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]))
result = trainer.train()
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run_once(kind: str, work: Path, timeout: float) -> tuple[bool, str]:
    """One job of ``kind`` in the fresh directory ``work``: ``(ok, what went wrong)``."""
    out = work / "run"
    common = [*TINY, f"train.out_dir={out}"]
    if kind == "rendezvous":
        store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        cmd = _torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                        f"127.0.0.1:{store.port}", "--rdzv_id", "dist-exit", "--rdzv_conf", "is_host=0",
                        str(ROOT / "tests/scale_worker.py"), *common)
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                  cwd=ROOT) for _ in range(2)]
        try:
            res = [(p.communicate(timeout=timeout)[1], p.returncode) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return False, f"timed out after {timeout:.0f} s"
        finally:
            del store
        bad = [(rc, err) for err, rc in res if rc != 0]
        if bad:
            return False, f"exit {bad[0][0]}: {bad[0][1][-3000:]}"
    else:
        if kind == "ddp":
            cmd = _torchrun("--standalone", "--nproc_per_node", "2", "-m", "mimkit.cli", "pretrain", CONFIG, *common)
        elif kind == "fsdp":
            cmd = _torchrun("--standalone", "--nproc_per_node", "2", "-m", "mimkit.cli", "pretrain", CONFIG, *common,
                            "train.strategy=fsdp")
        elif kind == "worker":
            cmd = _torchrun("--standalone", "--nproc_per_node", "2", str(ROOT / "tests/scale_worker.py"), *common,
                            "train.strategy=fsdp")
        elif kind == "global":
            script = work / "careless.py"
            script.write_text(GLOBAL_SCRIPT)
            cmd = _torchrun("--standalone", "--nproc_per_node", "2", str(script), CONFIG, *common)
        else:
            raise ValueError(kind)
        env = _env()
        if kind == "worker":
            env["MIMKIT_TEST_ASYNC_DCP"] = "1"
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:.0f} s"
        if p.returncode != 0:
            return False, f"exit {p.returncode}: {p.stderr[-3000:]}"
    if not (out / "result.json").is_file():
        return False, "exit 0 but no result.json"
    if kind == "worker" and not (out / "full_state.pt").is_file():
        return False, "exit 0 but no full_state.pt"
    return True, ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="rounds (each runs every kind once)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a job may take before it counts as hung")
    ap.add_argument("--log-dir", type=Path, default=ROOT / "runs/bench/dist_exit", help="failures' stderr, summary")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    passed = dict.fromkeys(kinds, 0)
    failures: list[dict] = []
    t0 = time.time()
    total = args.runs * len(kinds)
    for r in range(args.runs):
        for kind in kinds:
            with tempfile.TemporaryDirectory(prefix=f"dist-exit-{kind}-") as td:
                t = time.time()
                ok, why = run_once(kind, Path(td), args.timeout)
            done = r * len(kinds) + kinds.index(kind) + 1
            passed[kind] += ok
            if not ok:
                log = args.log_dir / f"fail-{kind}-{r:03d}.txt"
                log.write_text(why)
                failures.append({"kind": kind, "round": r, "log": str(log), "first_line": why.splitlines()[0]})
            print(f"[{done}/{total}] round {r + 1} {kind}: {'ok' if ok else 'FAILED (' + why.splitlines()[0] + ')'}"
                  f" in {time.time() - t:.1f} s", flush=True)
    summary = {"runs": args.runs, "passed": passed, "failures": failures, "wall_s": round(time.time() - t0, 1),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (args.log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| job | exit 0 |\n|---|---|")
    for k in kinds:
        print(f"| {k} | {passed[k]} / {args.runs} |")
    print(f"\n{sum(passed.values())} / {total} jobs exited 0 in {summary['wall_s']:.0f} s; summary in "
          f"{args.log_dir / 'summary.json'}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
