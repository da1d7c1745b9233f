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

Each row: img/s over ``--batches`` batches of ``--batch`` after one warm-up batch; the slowest stage is
the path's limit.

    python benchmarks/jpeg_path.py --out runs/jpeg_path                  # GPU, 2,048 files, batch 256
    python benchmarks/jpeg_path.py --device cpu --files 64 --batch 8 --batches 2 --workers 1   # any machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, n: int, batch: int, sync) -> dict:
    """img/s of ``n`` calls of ``fn(i)`` (after one warm-up call)."""
    fn(-1)
    sync()
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    sync()
    sec = time.perf_counter() - t
    return {"img_per_s": round(n * batch / sec, 1), "ms_per_batch": round(sec / n * 1e3, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--files", type=int, default=2048)
    ap.add_argument("--dir", default=None, help="where the JPEG files are written (default: a temp dir)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per row")
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
    if args.files < args.batch * (args.batches + 1):
        ap.error(f"--files {args.files} is fewer than --batch x (--batches + 1) = {args.batch * (args.batches + 1)}")
    tmp = tempfile.TemporaryDirectory(prefix="mimkit-jpeg-") if args.dir is None else None
    root = Path(args.dir or tmp.name)
    t = time.perf_counter()
    make_jpeg_folder(root / "images", args.files, smoke=False, workers=args.workers)
    print(f"jpeg_path: {args.files} files ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    common = dict(batch_size=args.batch, out_size=args.size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                  num_workers=args.workers, device=dev, seed=0)
    rows = {}

    gpu = JpegBatchLoader(root / "images", **common)
    it = iter(gpu.loader)
    byte_batches = []

    def read(i):
        byte_batches.append(next(it))

    rows["read (worker processes, bytes only)"] = timed(read, args.batches, args.batch, sync)
    decoded = []

    def decode(i):
        datas, _, paths = byte_batches[i % len(byte_batches)]
        imgs = gpu.decode(datas, paths)
        if i < 1:
            decoded.append(imgs)

    how = "nvJPEG, one batched decode_jpeg call" if cuda else "decode_image per file on the CPU"
    rows[f"decode ({codecs()[0]}: {how})"] = timed(decode, args.batches, args.batch, sync)

    def transform(i):
        gpu.transform(decoded[0], gpu.generator(0, i))

    rows[f"transform (crop + resize + flip + normalize, on {dev.type})"] = timed(transform, args.batches, args.batch,
                                                                                sync)
    gpu.close()
    loader = JpegBatchLoader(root / "images", **common)
    stream = iter(loader)
    rows["gpu loader (data.decode=gpu, as the trainer iterates it)"] = timed(lambda i: next(stream), args.batches,
                                                                            args.batch, sync)
    loader.close()
    pil = FolderLoader(root / "images", **common)
    pil_stream = iter(pil)
    rows[f"pil loader (data.decode=cpu, {args.workers} workers)"] = timed(lambda i: next(pil_stream), args.batches,
                                                                          args.batch, sync)
    pil.close()
    res = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
           "cpus": os.cpu_count(), "files": args.files, "batch": args.batch, "batches": args.batches,
           "workers": args.workers, "size": args.size, "rows": rows}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "jpeg_path.json").write_text(text)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
