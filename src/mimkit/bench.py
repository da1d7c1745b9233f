"""``mimkit bench``: training speed of every method, end to end and model only, with a peer in the same run.

Rows (each a dict in the JSON file and a line of the markdown table):

* ``ceiling``: a square matmul in the run's precision (8192^3 bf16 on a GPU) -- the achievable
  TFLOP/s that MFU is measured against, on the same device in the same process.
* ``model``: one training step of a method (forward, backward, fused AdamW step) on images already on
  the device, at ViT-B/16 224 px (each method's ``configs/<method>_vit_base_imagenet.yaml`` with the
  method's ``offline_overrides``: no tokenizer or teacher file is needed), bf16 on a GPU,
  ``torch.compile`` on. FLOPs per image are counted with torch's ``FlopCounterMode`` on the
  actual step (:func:`mimkit.flops.count_flops`, forward + backward); TFLOP/s = FLOPs x img/s; MFU =
  TFLOP/s / ceiling. Peak memory: ``torch.cuda.max_memory_allocated`` (GPU) or the process's peak RSS.
* ``peer``: Hugging Face ``transformers`` ``ViTMAEForPreTraining`` at the reference method's (MAE's)
  shapes, batch and precision, same optimizer, compiled the same way (skipped with a note when not
  installed).
* ``e2e``: the real trainer (:class:`mimkit.train.Trainer`, as ``mimkit pretrain`` runs it) reading a
  JPEG folder that the bench writes first (mixed sizes), through each input path available: PIL
  worker processes, GPU decoding (``data.decode=gpu``), pre-resized uint8 shards (``mimkit data
  prepare``); and the Fashion-MNIST workload (in memory, augmented on the device). img/s is the
  trainer's own ``img_per_s`` over the logging windows after the first (compilation, warm-up).

Rows run in priority order; with ``--budget-s`` the bench stops starting rows once the budget is
spent and lists the rows it skipped. ``--smoke`` runs the same rows at tiny shapes on any device in
seconds (a test of the bench, not a measurement): ``SMOKE_MODEL`` and each method's ``smoke_overrides``.
The methods are those registered in :data:`mimkit.methods.METHODS`; the bench names only its
``REFERENCE`` method (the one the peer implements and the end-to-end rows train).

``--compile-mode`` compiles in another ``torch.compile`` mode, as ``train.compile_mode`` does
(``reduce-overhead``: CUDA graphs, each step marked as a new iteration); ``--no-e2e`` keeps the model
and peer rows only.

    mimkit bench --smoke                           # CPU, tiny shapes, < 1 min
    mimkit bench --out runs/bench --budget-s 420   # the GPU suite (benchmarks/gpu_suite.sh)
    mimkit bench --compile-mode reduce-overhead --methods mae --no-e2e   # ViT-B/16 and the peer as CUDA graphs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimkit.config.schema import COMPILE_MODES
from mimkit.errors import ConfigError, DataError

REFERENCE = "mae"
"""The method the others are measured against: the Hugging Face peer implements it, the end-to-end rows
train it, and the FLOP-predicted img/s ratios divide by its img/s."""
CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# tiny shapes of --smoke (ViT 32/2 on 32x32 RGB, patch 4: 64 patches, so a preset's 20 visible fit)
SMOKE_MODEL = [
    "model.encoder.img_size=32", "model.encoder.patch_size=4", "model.encoder.in_chans=3",
    "model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=32", "model.decoder.depth=1", "model.decoder.num_heads=2",
]


def method_names() -> tuple[str, ...]:
    """The registered methods (:data:`mimkit.methods.METHODS`), imported when needed: the command line
    builds this parser for every command."""
    from mimkit.methods import METHODS

    return tuple(METHODS)


@dataclass
class Plan:
    """What one bench run does."""

    device: torch.device
    smoke: bool
    batch: int
    steps: int
    warmup: int
    precision: str
    compile: bool
    methods: tuple[str, ...]
    jpegs: int
    jpeg_dir: Path | None
    workers: int
    fmnist_batch: int
    budget_s: float | None
    peer: bool
    out: Path | None
    compile_mode: str = "default"  # torch.compile's mode of the compiled rows (train.compile_mode's values)
    e2e: bool = True  # the trainer rows (image folder input paths, Fashion-MNIST workload)
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    @property
    def dtype(self) -> torch.dtype | None:
        from mimkit.train.loop import autocast_dtype

        return autocast_dtype(self.precision, self.device)

    @property
    def cudagraphs(self) -> bool:
        """The compiled rows replay CUDA graphs (each step is then marked as a new iteration)."""
        from mimkit.config.schema import CUDAGRAPH_COMPILE_MODES

        return self.compile_mode in CUDAGRAPH_COMPILE_MODES

    def left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - (time.perf_counter() - self.t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, the whole process


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, iters: int = 20) -> float:
    """Achieved FLOP/s of ``n x n @ n x n`` in ``dtype`` (best of three timed batches of ``iters``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / iters)
    return 2 * n**3 / best


def method_config(name: str, smoke: bool, extra: list[str] | None = None):
    """Method ``name``'s ViT-B preset as the bench runs it: offline (the method's ``offline_overrides``),
    at ``SMOKE_MODEL`` shapes with its ``smoke_overrides`` when ``smoke``, then ``extra``."""
    from mimkit.config import load_config
    from mimkit.methods import METHODS

    over = [*(SMOKE_MODEL if smoke else []), *METHODS[name].preset_overrides(smoke), *(extra or [])]
    return load_config(CONFIGS / f"{name}_vit_base_imagenet.yaml", over)


def _timed_steps(step, plan: Plan, warmup: int, steps: int) -> float:
    """Seconds per step: ``warmup`` untimed steps (compilation), then ``steps`` timed with one sync."""
    for i in range(warmup):
        step(i)
    _sync(plan.device)
    t = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(plan.device)
    return (time.perf_counter() - t) / steps


def _compile(module, plan: Plan, compiled: bool | None = None):
    """``module`` compiled as the trainer compiles it (``plan.compile_mode``) when ``compiled`` (default:
    ``plan.compile``)."""
    if not (plan.compile if compiled is None else compiled):
        return module
    from mimkit.train.precision import compile_kwargs

    return torch.compile(module, **compile_kwargs(plan.compile_mode))


def _mark_step(plan: Plan, compiled: bool) -> None:
    """A new CUDA-graph iteration before a compiled step's forward (as the trainer marks its steps)."""
    if compiled and plan.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()


def model_row(plan: Plan, name: str, ceiling: float | None, compiled: bool) -> dict:
    """img/s, FLOPs, TFLOP/s, MFU and peak memory of one method's training step on device-resident images."""
    from mimkit.flops import count_flops
    from mimkit.methods import Progress
    from mimkit.train.loop import build_method
    from mimkit.train.optim import param_groups
    from mimkit.train.step import build_adamw

    cfg = method_config(name, plan.smoke)
    torch.manual_seed(0)
    model = build_method(cfg).to(plan.device)
    model.train()
    enc = cfg.model.encoder
    images = torch.randn(plan.batch, enc.in_chans, enc.img_size, enc.img_size, device=plan.device)
    # mid-run progress: schedules (SBAM's random-masking start, EMA momentum) are in their main phase
    prog = Progress(500, 1000, 50.0, 100.0)
    opt = build_adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.95), 1e-8, None, plan.device)
    dtype = plan.dtype
    run = _compile(model, plan, compiled)  # as the trainer compiles

    def fwd_bwd(m):
        with torch.autocast(plan.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = m(images, prog).loss
        loss.backward()

    flops = count_flops(lambda: fwd_bwd(model), grad=True)
    opt.zero_grad(set_to_none=True)

    def step(i):
        _mark_step(plan, compiled)
        fwd_bwd(run)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(prog)

    _reset_peak(plan.device)
    t_compile = time.perf_counter()
    sec = _timed_steps(step, plan, plan.warmup, plan.steps)
    wall = time.perf_counter() - t_compile
    mode = "compiled" if compiled else "eager"
    row = _speed_row("model", f"{name} (model only, {mode})", plan, plan.batch / sec, flops / plan.batch, ceiling,
                     wall=wall)
    row.update(method=name, mode=mode)
    return row


def _speed_row(kind, name, plan, img_s, flop_per_img, ceiling, wall=None, batch=None) -> dict:
    row = {"kind": kind, "name": name, "img_per_s": img_s, "batch": batch or plan.batch,
           "gflop_per_img": flop_per_img / 1e9 if flop_per_img else None}
    if flop_per_img:
        row["tflops"] = flop_per_img * img_s / 1e12
        row["mfu"] = row["tflops"] * 1e12 / ceiling if ceiling else None
    row["peak_gib"] = _peak_gib(plan.device)
    if wall is not None:
        row["wall_s"] = wall
    return row


def hf_peer_row(plan: Plan, ceiling: float | None) -> dict | None:
    """Hugging Face ``ViTMAEForPreTraining`` at MAE's shapes, batch and precision (same optimizer, compile)."""
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError:
        plan.notes.append("peer skipped: transformers is not installed (pip install transformers)")
        return None
    from mimkit.flops import count_flops
    from mimkit.train.optim import param_groups
    from mimkit.train.step import build_adamw

    cfg = method_config(REFERENCE, plan.smoke)
    e, d = cfg.model.encoder, cfg.model.decoder
    hf_cfg = ViTMAEConfig(
        hidden_size=e.embed_dim, num_hidden_layers=e.depth, num_attention_heads=e.num_heads,
        intermediate_size=int(e.embed_dim * e.mlp_ratio), image_size=e.img_size, patch_size=e.patch_size,
        num_channels=e.in_chans, decoder_hidden_size=d.embed_dim, decoder_num_hidden_layers=d.depth,
        decoder_num_attention_heads=d.num_heads, decoder_intermediate_size=int(d.embed_dim * d.mlp_ratio),
        mask_ratio=cfg.method.masking.ratio, norm_pix_loss=cfg.method.norm_target, layer_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(hf_cfg).to(plan.device)
    model.train()
    images = torch.randn(plan.batch, e.in_chans, e.img_size, e.img_size, device=plan.device)
    opt = build_adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.95), 1e-8, None, plan.device)
    dtype = plan.dtype
    run = _compile(model, plan)

    def fwd_bwd(m):
        with torch.autocast(plan.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = m(pixel_values=images).loss
        loss.backward()

    flops = count_flops(lambda: fwd_bwd(model), grad=True)
    opt.zero_grad(set_to_none=True)

    def step(i):
        _mark_step(plan, plan.compile)
        fwd_bwd(run)
        opt.step()
        opt.zero_grad(set_to_none=True)

    _reset_peak(plan.device)
    t = time.perf_counter()
    sec = _timed_steps(step, plan, plan.warmup, plan.steps)
    import transformers

    return _speed_row("peer", f"Hugging Face ViTMAEForPreTraining {transformers.__version__} (model only)", plan,
                      plan.batch / sec, flops / plan.batch, ceiling, wall=time.perf_counter() - t)


# ------------------------------------------------------------------------------------------------
# end to end: the trainer on files


def make_jpeg_folder(root: Path, n: int, smoke: bool, workers: int = 0) -> Path:
    """``n`` JPEG files of mixed sizes (photo-like: smooth colour fields with grain, quality 90) under
    ``root`` (written once: reused when ``root`` holds ``n`` files; another count is removed first, so
    the folder never holds more files than asked for)."""
    root.mkdir(parents=True, exist_ok=True)
    old = list(root.glob("*.jpg"))
    if len(old) == n:
        return root
    for f in old:
        f.unlink()
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    jobs = [(str(root / f"{i:06d}.jpg"), i, smoke) for i in range(n)]
    chunks = [jobs[i:i + 256] for i in range(0, n, 256)]
    with ProcessPoolExecutor(max_workers=max(1, workers or (os.cpu_count() or 1))) as pool:
        for _ in tqdm(pool.map(_write_jpegs, chunks), total=len(chunks), desc="writing JPEG files", unit="chunk",
                      disable=n < 2048):
            pass
    return root


SIZES = ((500, 375), (375, 500), (640, 480), (480, 640), (800, 600), (333, 500), (500, 333), (1024, 768))


def _write_jpegs(jobs) -> None:
    import numpy as np
    from PIL import Image

    for path, i, smoke in jobs:
        rng = np.random.default_rng(i)
        w, h = (48, 40) if smoke else SIZES[i % len(SIZES)]
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(small, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def trainer_row(plan: Plan, name: str, preset: str | Path, overrides: list[str], ceiling: float | None,
                flop_per_img: float | None, batch: int) -> dict:
    """Run :class:`~mimkit.train.Trainer` for ``3 x window`` steps and report its logged img/s (median of the
    windows after the first, which holds compilation and warm-up)."""
    from mimkit.config import load_config
    from mimkit.train import Trainer

    window = max(2, plan.steps)
    steps = plan.warmup + 2 * window if plan.smoke else 3 * window
    with tempfile.TemporaryDirectory(prefix="mimkit-bench-") as tmp:
        over = [
            *overrides, f"data.batch_size={batch}", f"train.out_dir={tmp}", f"train.max_steps={steps}",
            "train.epochs=1000", f"train.log_every_steps={window}", "train.ckpt_every_steps=1000000000",
            "train.tensorboard=false", "train.progress_bar=false", "eval.knn_at_end=false",
            "eval.picture_at_end=false", f"train.precision={plan.precision}", f"train.compile={str(plan.compile).lower()}",
            f"train.compile_mode={plan.compile_mode}", f"train.device={plan.device}", "optim.warmup_epochs=1",
        ]
        cfg = load_config(preset, over)
        _reset_peak(plan.device)
        t = time.perf_counter()
        trainer = Trainer(cfg)
        trainer.save = lambda *a, **k: Path(tmp) / "checkpoint.pt"  # the bench measures steps, not writes
        trainer.train()
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        ips = [r["img_per_s"] for r in recs if "img_per_s" in r][1:]
        return _speed_row("e2e", name, plan, statistics.median(ips), flop_per_img, ceiling,
                          wall=time.perf_counter() - t, batch=batch)


def e2e_rows(plan: Plan, ceiling: float | None, ref_flop: float | None) -> list:
    """The input paths for an image folder (the ``REFERENCE`` method's training), as thunks in priority order."""
    from mimkit.data.gpu import gpu_decode_available

    folder = plan.jpeg_dir or Path(tempfile.gettempdir()) / f"mimkit-bench-jpegs-{plan.jpegs}{'-smoke' if plan.smoke else ''}"
    ref = CONFIGS / f"{REFERENCE}_vit_base_imagenet.yaml"
    model = SMOKE_MODEL if plan.smoke else []
    base = [*model, f"data.dataset={folder}", "data.in_memory=false", *(["train.num_threads=1"] if plan.smoke else [])]
    rows = []

    def jpegs():
        make_jpeg_folder(folder, plan.jpegs, plan.smoke, plan.workers)

    def pil():
        jpegs()
        return trainer_row(plan, f"{REFERENCE}, JPEG folder, PIL workers", ref,
                           [*base, f"data.num_workers={plan.workers}"], ceiling, ref_flop, plan.batch)

    rows.append((f"e2e {REFERENCE} jpeg pil", pil))
    if gpu_decode_available(plan.device):
        def gpu():
            jpegs()
            return trainer_row(plan, f"{REFERENCE}, JPEG folder, GPU decode (nvjpeg)", ref,
                               [*base, "data.decode=gpu", f"data.num_workers={min(plan.workers, 8)}"], ceiling,
                               ref_flop, plan.batch)

        rows.insert(0, (f"e2e {REFERENCE} jpeg gpu-decode", gpu))
    else:
        plan.notes.append(f"GPU JPEG decoding not measured: not available on {plan.device}")

    def shards():  # tar shards (mimkit data prepare)
        jpegs()
        out = folder.with_name(folder.name + "-shards")
        if not (out / "index.json").is_file():
            from mimkit.data.shards import prepare_shards

            prepare_shards(folder, out, resize=32 if plan.smoke else 256, workers=max(1, plan.workers),
                           progress=False)
        return trainer_row(plan, f"{REFERENCE}, uint8 shards (mimkit data prepare), augmented on the device", ref,
                           [*model, f"data.dataset={out}", "data.in_memory=false", *(base[-1:] if plan.smoke else []),
                            f"data.num_workers={min(plan.workers, 8)}"], ceiling, ref_flop, plan.batch)

    rows.insert(0, (f"e2e {REFERENCE} shards", shards))
    return rows


def fmnist_row(plan: Plan, ceiling: float | None) -> dict | None:
    from mimkit.data.fashion_mnist import find_fashion_mnist
    from mimkit.flops import count_flops
    from mimkit.methods import Progress
    from mimkit.train.loop import build_method

    try:
        find_fashion_mnist()
    except DataError:  # a bench machine without the data set (and often without network): a note, not a failure
        plan.notes.append("Fashion-MNIST row skipped: the data set is not installed (apt install dataset-fashion-mnist, "
                          "set $MIMKIT_DATA, or run mimkit.data.download_fashion_mnist())")
        return None
    preset = CONFIGS / f"{REFERENCE}_fashion_mnist.yaml"
    from mimkit.config import load_config

    cfg = load_config(preset, [])
    model = build_method(cfg)
    x = torch.randn(8, 1, 28, 28)
    flop = count_flops(lambda: model(x, Progress(0, 10, 0.0, 1.0)).loss.backward(), grad=True) / 8
    over = ["data.limit=512", "train.num_threads=1"] if plan.smoke else []
    return trainer_row(plan, f"{REFERENCE}, Fashion-MNIST workload (ViT 192/6, in memory, on the device)", preset,
                       over, ceiling, flop, plan.fmnist_batch)


# ------------------------------------------------------------------------------------------------
# report


def markdown(result: dict) -> str:
    env = result["env"]
    mode = "" if not env["compile"] or env.get("compile_mode", "default") == "default" else f" ({env['compile_mode']})"
    lines = [
        f"mimkit bench on {env['device_name']} ({env['device']}), torch {env['torch']}, precision {env['precision']}, "
        f"compile {env['compile']}{mode}, batch {env['batch']}{' (SMOKE: tiny shapes, not a measurement)' if env['smoke'] else ''}",
        "",
        "| row | img/s | GFLOP/img | TFLOP/s | MFU | peak GiB | wall s |",
        "|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, int | float) else "—"

    for r in result["rows"]:
        if r["kind"] == "ceiling":
            lines.append(f"| {r['name']} | — | — | {f(r['tflops'], '.1f')} | 100 % | — | — |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "—"
        lines.append(f"| {r['name']} | {f(r['img_per_s'], ',.0f')} | {f(r.get('gflop_per_img'), '.2f')} | "
                     f"{f(r.get('tflops'), '.2f')} | {mfu} | {f(r.get('peak_gib'), '.2f')} | {f(r.get('wall_s'), '.0f')} |")
    for k, v in result.get("ratios", {}).items():
        lines.append(f"\n{k}: {v:.2f}")
    if result["skipped"]:
        lines.append(f"\nnot run (budget): {', '.join(result['skipped'])}")
    for n in result["notes"]:
        lines.append(f"\nnote: {n}")
    lines.append(f"\ntotal wall time: {result['wall_s']:.0f} s")
    return "\n".join(lines) + "\n"


def run(plan: Plan) -> dict:
    from tqdm import tqdm

    dev = plan.device
    ceiling = None
    tasks: list = []

    def ceiling_row():
        nonlocal ceiling
        dtype = plan.dtype or torch.float32
        n = 256 if plan.smoke else (8192 if dev.type == "cuda" else 2048)
        ceiling = matmul_ceiling(dev, dtype, n, iters=5 if plan.smoke or dev.type == "cpu" else 20)
        return {"kind": "ceiling", "name": f"matmul {n}^3 {str(dtype).replace('torch.', '')} (ceiling)",
                "tflops": ceiling / 1e12}

    ref_flop: dict = {}

    def model(name, compiled):
        def go():
            r = model_row(plan, name, ceiling, compiled)
            if name == REFERENCE:
                ref_flop["v"] = r["gflop_per_img"] * 1e9
            return r

        return go

    # priority order: what the targets need first; with --budget-s the tail is what gets dropped.
    # Every method runs eager right after the peer (seconds each, no compilation), so the FLOP-ratio
    # check has all of them even when the end-to-end rows' compilations (30-80 s each on the H200 run of
    # 2026-12-04, where a 240 s budget reached no eager row in the old order) use up the budget;
    # compiled rows of the other methods come last.
    tasks.append(("ceiling", ceiling_row))
    if REFERENCE in plan.methods:
        tasks.append((f"model {REFERENCE}", model(REFERENCE, plan.compile)))
    if plan.peer:
        tasks.append(("peer hf", lambda: hf_peer_row(plan, ceiling)))
    if plan.compile:
        tasks += [(f"model {m} eager", model(m, False)) for m in plan.methods]
    else:  # eager only: the other methods' rows are the eager rows, before the end-to-end rows too
        tasks += [(f"model {m}", model(m, False)) for m in plan.methods if m != REFERENCE]
    if plan.e2e:
        tasks.append(("e2e paths", None))  # expanded below, once the reference method's FLOPs are known
        tasks.append(("e2e fashion-mnist", lambda: fmnist_row(plan, ceiling)))
    if plan.compile:
        tasks += [(f"model {m} compiled", model(m, True)) for m in plan.methods if m != REFERENCE]

    bar = tqdm(total=len(tasks), desc="mimkit bench", unit="row", mininterval=1.0 if sys.stderr.isatty() else 10.0)
    i = 0
    while i < len(tasks):
        label, fn = tasks[i]
        if fn is None:
            extra = e2e_rows(plan, ceiling, ref_flop.get("v"))
            tasks[i:i + 1] = extra
            bar.total = len(tasks)
            continue
        i += 1
        bar.set_postfix_str(label)
        if plan.left() <= 0:
            plan.skipped.append(label)
            bar.update(1)
            continue
        torch._dynamo.reset()  # rows share methods' code objects: no guards or recompile counts carry over
        try:
            row = fn()
        except Exception as e:  # one row failing must not lose the others; the error is in the table
            row = {"kind": "error", "name": label, "img_per_s": None, "error": f"{type(e).__name__}: {e}"[:300]}
            plan.notes.append(f"{label} failed: {row['error']}")
        if row is not None:
            plan.rows.append(row)
            print(f"  {label}: " + (f"{row['img_per_s']:,.0f} img/s" if row.get("img_per_s") else
                                    f"{row.get('tflops', 0):.2f} TFLOP/s" if row["kind"] == "ceiling" else "failed"),
                  file=sys.stderr, flush=True)
        bar.update(1)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    result = {
        "env": {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                (platform.processor() or platform.machine()), "torch": torch.__version__, "precision": plan.precision,
                "compile": plan.compile, "compile_mode": plan.compile_mode, "batch": plan.batch, "smoke": plan.smoke, "steps": plan.steps,
                "warmup": plan.warmup, "threads": torch.get_num_threads(), "jpegs": plan.jpegs},
        "rows": plan.rows, "skipped": plan.skipped, "notes": plan.notes, "wall_s": time.perf_counter() - plan.t0,
    }
    models = [r for r in plan.rows if r["kind"] == "model" and r.get("img_per_s")]
    peer = next((r for r in plan.rows if r["kind"] == "peer" and r.get("img_per_s")), None)
    ratios = {}
    for mode in ("compiled", "eager"):
        ref = next((r for r in models if r["method"] == REFERENCE and r["mode"] == mode), None)
        if ref is None:
            continue
        if peer is not None and mode == ("compiled" if plan.compile else "eager"):
            ratios[f"{REFERENCE} / Hugging Face peer (model only, same precision and compile)"] = \
                ref["img_per_s"] / peer["img_per_s"]
        for r in models:
            if r["mode"] == mode and r is not ref and r.get("gflop_per_img"):
                # 1.0: as fast as its FLOPs predict from the reference's img/s; above 1: slower (target <= 1.2)
                expect = ref["img_per_s"] * ref["gflop_per_img"] / r["gflop_per_img"]
                ratios[f"{r['method']} ({mode}): FLOP-predicted img/s / measured"] = expect / r["img_per_s"]
    result["ratios"] = ratios
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="training speed of every method (model only and end to end) with a peer",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps: checks the bench in seconds")
    p.add_argument("--device", default="auto", help="auto (cuda when visible), cuda or cpu")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="eager steps (default: torch.compile on GPU, eager on CPU)")
    p.add_argument("--compile", dest="compile", action="store_true", help="torch.compile also on CPU")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled rows, as train.compile_mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--batch", type=int, default=None, help="per-step batch (default 256; smoke 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke 1)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the registered methods (default: all)")
    p.add_argument("--jpegs", type=int, default=None, help="JPEG files for the end-to-end rows (default 20000; smoke 64)")
    p.add_argument("--jpeg-dir", default=None, help="where the JPEG files are written (default: the temp dir)")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: CPU count, max 16)")
    p.add_argument("--fmnist-batch", type=int, default=None, help="Fashion-MNIST batch (default 512; smoke 16)")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip the Hugging Face peer")
    p.add_argument("--no-e2e", dest="e2e", action="store_false",
                   help="skip the trainer rows (image folder input paths, Fashion-MNIST workload): model rows only")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting rows after this many seconds")
    p.add_argument("--out", default=None, help="directory for bench.json and bench.md")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from mimkit.train.distributed import pick_device

    try:
        device = pick_device(args.device)
    except RuntimeError as e:
        raise ConfigError(f"--device {args.device}: {e}".replace("train.device=cpu", "--device cpu")) from e
    known = method_names()
    methods = known if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in known]
    if bad:
        raise ConfigError(f"--methods: unknown {', '.join(bad)}; choose from {','.join(known)}")
    smoke = args.smoke
    if smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: a second thread only waits (and starves on a shared machine)
    plan = Plan(
        device=device, smoke=smoke, batch=args.batch or (8 if smoke else 256), steps=args.steps or (2 if smoke else 20),
        warmup=args.warmup if args.warmup is not None else (1 if smoke else 5), precision=args.precision,
        compile=args.compile if args.compile is not None else device.type == "cuda", methods=methods,
        jpegs=args.jpegs or (64 if smoke else 20000), jpeg_dir=Path(args.jpeg_dir) if args.jpeg_dir else None,
        workers=args.workers if args.workers is not None else (0 if smoke else min(16, os.cpu_count() or 1)),
        fmnist_batch=args.fmnist_batch or (16 if smoke else 512), budget_s=args.budget_s, peer=args.peer,
        out=Path(args.out) if args.out else None, compile_mode=args.compile_mode, e2e=args.e2e,
    )
    result = run(plan)
    table = markdown(result)
    print(table)
    if plan.out is not None:
        plan.out.mkdir(parents=True, exist_ok=True)
        (plan.out / "bench.json").write_text(json.dumps(result, indent=2))
        (plan.out / "bench.md").write_text(table)
        print(f"wrote {plan.out / 'bench.json'} and {plan.out / 'bench.md'}", file=sys.stderr)
    errors = [r for r in result["rows"] if r["kind"] == "error"]
    return 1 if errors else 0


if __name__ == "__main__":  # python -m mimkit.bench [options]: as `mimkit bench`
    _parser = argparse.ArgumentParser(prog="python -m mimkit.bench")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(main(_args))
