"""Soak benchmark of exact resume under faults (not a test): a CPU pretraining job is interrupted again
and again -- ``kill -9`` at random steps, ``kill -9`` right as a checkpoint is being written, SIGTERM,
SIGINT, SIGUSR1 -- and restarted with the same command until it finishes; its losses and final
weights are then compared with an uninterrupted run of the same command (they must be bit-identical).

After every interruption it checks: the exit status (75 after a stop signal, -9 after kill -9), that
``checkpoint.pt`` loads and passes its checksum, and how many hidden temporary files a killed save
left (the next start must remove them). At the end: no temporary files, no lock file, identical
losses and weights.

    python benchmarks/soak.py                                # MAE, Fashion-MNIST in memory, 12 interruptions
    python benchmarks/soak.py --streaming --interruptions 8  # a PNG folder through 2 DataLoader workers
    python benchmarks/soak.py --checksum-cost                # + checksum/save cost of a ViT-B MAE checkpoint

One training process runs at a time. Results: printed as a markdown table and written to
``<out>/soak_result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("kill9", "kill9_at_save", "SIGTERM", "SIGINT", "SIGUSR1")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _losses(out: Path) -> list[float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def _hidden(out: Path) -> tuple[int, int]:
    files = [p for p in out.iterdir() if p.name.startswith(".") and ".tmp-" in p.name] if out.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def _make_folder(root: Path, n: int) -> Path:
    """The first ``n`` Fashion-MNIST training images as 28x28 PNGs (a streaming data set)."""
    from PIL import Image

    from mimkit.data import load_fashion_mnist

    if root.is_dir() and len(list(root.glob("*.png"))) == n:
        return root
    root.mkdir(parents=True, exist_ok=True)
    images, _ = load_fashion_mnist(None, "train")
    for i in range(n):
        Image.fromarray(images[i, 0].numpy()).save(root / f"{i:05d}.png")
    return root


def command(args, out: Path) -> list[str]:
    over = [
        "model.encoder.embed_dim=64", "model.encoder.depth=2", "model.encoder.num_heads=2",
        "model.decoder.embed_dim=32", "model.decoder.depth=1", "model.decoder.num_heads=2",
        f"data.batch_size={args.batch}", f"data.limit={args.images}", f"train.epochs={args.epochs}",
        "optim.warmup_epochs=1", "train.log_every_steps=1", "train.progress_bar=false", "train.tensorboard=false",
        "eval.knn_at_end=false", "eval.picture_at_end=false", f"train.ckpt_every_steps={args.ckpt_every}",
        "train.keep_checkpoints=2", f"train.num_threads={args.threads}", f"train.seed={args.seed}",
        f"train.out_dir={out}",
    ]
    if args.streaming:
        folder = _make_folder(Path(args.out) / "png", args.images)
        over += [f"data.dataset={folder}", "data.in_memory=false", "data.num_workers=2", "data.mean=[0.286]",
                 "data.std=[0.353]"]
    return [sys.executable, "-m", "mimkit.cli", "pretrain", str(ROOT / "configs/mae_fashion_mnist.yaml"), *over]


def run_to_end(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def soak(args) -> dict:
    from mimkit.train.checkpoint import LOCK_NAME, CheckpointError, load_checkpoint

    rng = random.Random(args.seed)
    base = Path(args.out)
    ref, out = base / "ref", base / "soak"
    for d in (ref, out):
        shutil.rmtree(d, ignore_errors=True)
    total = (args.images // args.batch) * args.epochs
    t_ref = run_to_end(command(args, ref))
    ref_losses = _losses(ref)
    assert len(ref_losses) == total, (len(ref_losses), total)

    cmd = command(args, out)
    events, t0 = [], time.perf_counter()
    kinds = [KINDS[i % len(KINDS)] for i in range(args.interruptions)]
    rng.shuffle(kinds)
    max_tmp = (0, 0)
    broken = 0
    starts = 0
    while True:
        starts += 1
        metrics = out / "metrics.jsonl"
        old_inode = metrics.stat().st_ino if metrics.exists() else None
        try:
            start_step = int(load_checkpoint(out / "checkpoint.pt")["step"])
        except CheckpointError:
            start_step = 0
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
                                start_new_session=True)
        kind = kinds.pop() if kinds else None
        target = None
        if kind is not None:
            # wait until this start has rewritten metrics.jsonl (a resume truncates it by a rename)
            while proc.poll() is None and (not metrics.exists() or metrics.stat().st_ino == old_inode):
                time.sleep(0.005)
            remaining = total - start_step
            if kind == "kill9_at_save":
                nxt = (start_step // args.ckpt_every + 1 + rng.randrange(2)) * args.ckpt_every
                target = min(nxt, total - 1)
            else:
                target = start_step + rng.randint(1, max(1, remaining // max(1, len(kinds) + 1)))
            while proc.poll() is None and _lines(metrics) < target:
                time.sleep(0.002)
            if kind == "kill9_at_save":  # the save follows the log line: catch its temporary file
                tmp = out / f".checkpoint.pt.tmp-{proc.pid}"
                t_end = time.perf_counter() + 2.0
                while proc.poll() is None and not tmp.exists() and time.perf_counter() < t_end:
                    pass
            if proc.poll() is None:
                if kind != "kill9_at_save":
                    time.sleep(rng.uniform(0, 0.05))  # somewhere inside the next step
                sig = signal.SIGKILL if kind.startswith("kill9") else getattr(signal, kind)
                os.killpg(proc.pid, sig)  # the whole process group, as a scheduler would
        _, err = proc.communicate()
        with_tmp = _hidden(out)
        max_tmp = max(max_tmp, with_tmp)
        step = None
        try:
            step = int(load_checkpoint(out / "checkpoint.pt")["step"])
        except CheckpointError:
            if (out / "checkpoint.pt").exists():
                broken += 1
        events.append({"start": starts, "kind": kind or "none", "exit": proc.returncode, "signal_at_step": target
                       if kind else None, "checkpoint_step": step, "temp_files_left": with_tmp[0],
                       "stderr_tail": err.strip().splitlines()[-1] if err.strip() else ""})
        print(f"start {starts}: {kind or 'to the end'} -> exit {proc.returncode}, checkpoint step {step}, "
              f"{with_tmp[0]} temp file(s) left", file=sys.stderr)
        if proc.returncode == 0:
            break
        expected = -9 if kind and kind.startswith("kill9") else 75
        if proc.returncode not in (expected, 0):
            raise SystemExit(f"unexpected exit {proc.returncode} after {kind}: {err[-3000:]}")
        if starts > args.interruptions + 5:
            raise SystemExit("the run does not finish")
    t_soak = time.perf_counter() - t0
    soak_losses = _losses(out)
    import torch

    a, b = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    same_weights = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    counts = {k: sum(e["kind"] == k for e in events) for k in KINDS}
    exits_ok = all(e["exit"] == (-9 if e["kind"].startswith("kill9") else 75) or e["exit"] == 0 for e in events)
    result = {
        "mode": "streaming folder, 2 workers" if args.streaming else "in-memory Fashion-MNIST",
        "steps": total, "ckpt_every_steps": args.ckpt_every, "interruptions": counts, "starts": starts,
        "losses_identical": soak_losses == ref_losses, "weights_identical": same_weights,
        "exit_codes_as_expected": exits_ok, "checkpoints_broken_after_a_kill": broken,
        "max_temp_files_left_by_a_kill": {"files": max_tmp[0], "bytes": max_tmp[1]},
        "temp_files_at_end": _hidden(out)[0], "lock_file_at_end": (out / LOCK_NAME).exists(),
        "wall_s_reference": round(t_ref, 1), "wall_s_soak": round(t_soak, 1), "events": events,
    }
    return result


def checksum_cost() -> dict:
    """Digest, save and verified-load time of a ViT-B/16 MAE checkpoint (model + AdamW state)."""
    import tempfile

    import torch

    from mimkit.methods import MAE, ModelConfig
    from mimkit.train import checkpoint as ck

    model = MAE(ModelConfig())
    opt = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                     for i, p in enumerate(model.parameters())}, "param_groups": []}
    state = {"model": model.state_dict(), "optimizer": opt, "step": 1}
    from mimkit.weights.safe import has_valid_checksum

    size = ck.estimate_bytes(state)
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        t = time.perf_counter()
        ck.atomic_save(state, Path(d) / "c.pt", checksum=False)
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        ck.atomic_save(state, Path(d) / "c.pt")
        t_save = time.perf_counter() - t
        t = time.perf_counter()
        assert has_valid_checksum(Path(d) / "c.pt")  # the file digest alone (over the bytes on disk)
        t_digest = time.perf_counter() - t
        t = time.perf_counter()
        ck.load_checkpoint(Path(d) / "c.pt", verify=False)
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        ck.load_checkpoint(Path(d) / "c.pt")
        t_vload = time.perf_counter() - t
    return {"checkpoint_MiB": round(size / 2**20), "digest_s": round(t_digest, 2), "save_s_without_checksum":
            round(t_plain, 2), "save_s_with_checksum": round(t_save, 2), "load_s": round(t_load, 2),
            "verified_load_s": round(t_vload, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--interruptions", type=int, default=12)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--streaming", action="store_true", help="a PNG folder through 2 DataLoader workers")
    p.add_argument("--checksum-cost", action="store_true", help="also time checksums on a ViT-B MAE checkpoint")
    args = p.parse_args()
    res = soak(args)
    if args.checksum_cost:
        res["checksum_cost_vit_b"] = checksum_cost()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "soak_result.json").write_text(json.dumps(res, indent=2))
    c = res["interruptions"]
    print(f"| {res['mode']} | {res['steps']} | {res['starts'] - 1} ({', '.join(f'{k} {v}' for k, v in c.items())}) | "
          f"{'yes' if res['losses_identical'] else 'NO'} | {'yes' if res['weights_identical'] else 'NO'} | "
          f"{res['checkpoints_broken_after_a_kill']} | {res['max_temp_files_left_by_a_kill']['files']} -> "
          f"{res['temp_files_at_end']} | {res['wall_s_reference']} / {res['wall_s_soak']} |")
    if "checksum_cost_vit_b" in res:
        print(json.dumps(res["checksum_cost_vit_b"]))


if __name__ == "__main__":
    main()
