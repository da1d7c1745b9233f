"""Where does the JPEG input path spend its time? Its stages timed apart, on one device, no training.

The trainer reached ~1,700 img/s from JPEG files on an H200 (BENCHMARKS.md, "GPU speed") through both
input paths, against 4,090 from uint8 shards. This script times, on the same kind of files (the bench's
mixed-size photo-like JPEGs, 333-1024 px, written once under ``--dir``):

* ``read``: the worker processes reading file bytes only (``data.decode=gpu``'s DataLoader);
* ``decode``: nvJPEG's batched ``decode_jpeg`` of byte batches already in memory (``--device cuda``;
  on a CPU torchvision's CPU decoder);
* ``transform``: random-resized-crop + flip + normalize of decoded batches already on the device (the
  per-image crop-and-resize loop of :class:`mimkit.data.gpu.JpegBatchLoader`);
* ``gpu loader``: :class:`~mimkit.data.gpu.JpegBatchLoader` iterated as the trainer iterates it (all of
  the above, with its prefetch thread);
* ``pil loader``: :class:`~mimkit.data.FolderLoader` with ``--workers`` PIL processes (decode, crop,
  resize on the CPU), batches copied to the device.

The in-memory rows (decode, transform) time ``--batches`` batches of ``--batch`` after one warm-up
batch. The loader rows time one pass in its steady state: the batches in flight from the start (2 per
worker, the decode thread's 2) are left out, so ``--files`` must give many more batches than that
(the worker rows use ``--loader-batch``, small, for this; ``whole_pass_img_per_s`` includes the start).
The slowest stage is the path's limit.

    python benchmarks/jpeg_path.py --out runs/jpeg_path                  # GPU, 4,096 files
    python benchmarks/jpeg_path.py --device cpu --files 96 --batch 8 --loader-batch 4 --batches 2 --workers 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import emit_json


def timed(fn, n: int, batch: int, sync) -> dict:
    """img/s of ``n`` calls of ``fn(i)`` on data in memory (after one warm-up call)."""
    fn(-1)
    sync()
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    sync()
    sec = time.perf_counter() - t
    return {"img_per_s": round(n * batch / sec, 1), "ms_per_batch": round(sec / n * 1e3, 2)}


def streamed(make_iter, batch: int, skip: int, sync, keep: list | None = None) -> dict:
    """img/s of a loader over one pass in its steady state: batches arrive timed one by one and the first
    ``skip`` (those in flight from the start: worker prefetch, a decode thread's queue) are left out, so
    what is timed is the rate the loader makes new batches at. ``keep`` collects the batches."""
    t0 = time.perf_counter()
    times = []
    for b in make_iter():
        sync()
        times.append(time.perf_counter())
        if keep is not None:
            keep.append(b)
    n = len(times) - 1 - skip
    if n < 2:
        raise SystemExit(f"jpeg_path: {len(times)} batches per pass leave {n} to time after {skip} in flight; "
                         "raise --files, or lower --loader-batch (worker rows) or --batch (GPU loader)")
    return {"img_per_s": round(n * batch / (times[-1] - times[skip]), 1), "batches_timed": n,
            "first_batch_s": round(times[0] - t0, 2), "whole_pass_img_per_s": round(len(times) * batch / (times[-1] - t0), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--files", type=int, default=4096)
    ap.add_argument("--dir", default=None, help="where the JPEG files are written (default: a temp dir)")
    ap.add_argument("--batch", type=int, default=256, help="batch of the in-memory rows and of the GPU loader")
    ap.add_argument("--loader-batch", type=int, default=32,
                    help="batch of the worker rows (read, PIL loader): small, so that many batches follow the "
                         "workers x 2 in flight from the start")
    ap.add_argument("--batches", type=int, default=6, help="timed batches of the in-memory rows")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default=None, help="a directory for jpeg_path.json")
    args = ap.parse_args(argv)

    from mimkit.bench import make_jpeg_folder
    from mimkit.data import FolderLoader
    from mimkit.data.gpu import JpegBatchLoader, codecs

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    tmp = tempfile.TemporaryDirectory(prefix="mimkit-jpeg-") if args.dir is None else None
    root = Path(args.dir or tmp.name)
    t = time.perf_counter()
    make_jpeg_folder(root / "images", args.files, smoke=False, workers=args.workers)
    print(f"jpeg_path: {args.files} files ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    # prefetch 2 batches per worker (the PIL loader's default; the GPU loader's workers read 4 ahead in the
    # trainer, which changes nothing in the steady state measured here)
    common = dict(out_size=args.size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                  num_workers=args.workers, device=dev, seed=0, prefetch_factor=2)
    in_flight = max(1, args.workers) * 2
    rows = {}

    reader = JpegBatchLoader(root / "images", batch_size=args.loader_batch, **common)
    small: list = []
    rows[f"read ({args.workers} worker processes, file bytes only, batch {args.loader_batch})"] = streamed(
        lambda: iter(reader.loader), args.loader_batch, in_flight, sync, keep=small)
    reader.close()
    per = max(1, args.batch // args.loader_batch)  # the bytes read, regrouped into batches of --batch
    byte_batches = [([d for b in small[i:i + per] for d in b[0]], [p for b in small[i:i + per] for p in b[2]])
                    for i in range(0, len(small) - per + 1, per)]
    gpu = JpegBatchLoader(root / "images", batch_size=args.batch, prefetch=0, **{**common, "num_workers": 0})
    decoded = []

    def decode(i):
        datas, paths = byte_batches[i % len(byte_batches)]
        imgs = gpu.decode(datas, paths)
        if not decoded:
            decoded.append(imgs)

    how = "nvJPEG, one batched decode_jpeg call" if cuda else "decode_image per file on the CPU"
    rows[f"decode ({codecs()[0]}: {how}, batch {args.batch})"] = timed(decode, args.batches, args.batch, sync)

    def transform(i):
        gpu.transform(decoded[0], gpu.generator(0, i))

    rows[f"transform (crop + resize + flip + normalize on {dev.type}, batch {args.batch})"] = timed(
        transform, args.batches, args.batch, sync)
    gpu.close()
    loader = JpegBatchLoader(root / "images", batch_size=args.batch, **common)
    rows[f"gpu loader (data.decode=gpu as the trainer iterates it, batch {args.batch})"] = streamed(
        lambda: iter(loader), args.batch, 3, sync)  # bytes of the next batches are read; 2 decoded ahead
    loader.close()
    pil = FolderLoader(root / "images", batch_size=args.loader_batch, **common)
    rows[f"pil loader (data.decode=cpu, {args.workers} workers, batch {args.loader_batch})"] = streamed(
        lambda: iter(pil), args.loader_batch, in_flight, sync)
    pil.close()
    res = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
           "cpus": os.cpu_count(), "files": args.files, "batch": args.batch, "loader_batch": args.loader_batch,
           "batches": args.batches, "workers": args.workers, "size": args.size, "rows": rows}
    emit_json(res, args.out, "jpeg_path.json")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
