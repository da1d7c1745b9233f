"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this directory
is on ``sys.path``): the mean ± std cells of their tables and the Fashion-MNIST logistic-regression probe."""

from __future__ import annotations

import statistics
from pathlib import Path


def fmt_mean_std(values, digits: int = 2) -> str:
    """``"m ± s"`` over the seeds' values (``None`` skipped), the value alone for one seed, ``—`` for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def fmnist_linear_probes(checkpoint: Path, limit_train: int | None, limit_test: int | None) -> dict:
    """The standard logistic-regression linear probe (standardized features + scikit-learn
    LogisticRegression) on the frozen encoder's cls token and mean-pooled patches after the final
    LayerNorm, on the first ``limit_train`` / ``limit_test`` Fashion-MNIST images:
    ``{"linear_cls": %, "linear_mean": %}``."""
    from mimkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
    from mimkit.eval.features import extract_features
    from mimkit.eval.linear import logistic_probe
    from mimkit.interop import load_encoder

    enc = load_encoder(checkpoint)
    (trx, try_), (tex, tey) = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    trx, try_, tex, tey = trx[:limit_train], try_[:limit_train], tex[:limit_test], tey[:limit_test]
    kw = dict(pool=["cls", "mean"], mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    ftr, fte = extract_features(enc, trx, **kw), extract_features(enc, tex, **kw)
    return {f"linear_{p}": logistic_probe(ftr[p], try_, fte[p], tey)["top1"] for p in ("cls", "mean")}


def write_rows(path: str | None, meta: dict, rows: list[dict]) -> None:
    """``{"meta": ..., "rows": ...}`` as JSON at ``path`` (nothing when ``path`` is None)."""
    import json

    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


# kernel (GPU) or aten op (CPU) name -> what it computes; first match wins (attention before matmul:
# cuDNN's attention kernels carry "wgmma" in their names too)
KERNEL_CATEGORIES = (
    # CPU: the batched products are the explicit attention path's (profile_step.split_flops counts them so)
    ("attention", ("sdpa", "flash", "fmha", "attention", "softmax", "aten::bmm", "aten::baddbmm")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "splitk", "cublas", "triton_tem_", "aten::mm", "aten::addmm",
                "aten::matmul", "aten::linear")),  # triton_tem_: inductor's GEMM templates (max-autotune)
    ("layer norm", ("layer_norm", "layernorm")),
    ("optimizer / grad norm", ("adam", "multi_tensor", "foreach")),
    ("fused element-wise (triton)", ("triton_",)),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "aten::cat", "aten::index", "gather", "scatter")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for cat, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def kernel_profile(prof, steps: int, cuda: bool, top: int = 15) -> dict:
    """Per-step time of a ``torch.profiler`` run of ``steps`` steps: on a GPU the CUDA kernels (user
    annotations such as ``ProfilerStep#`` and ``Optimizer.step#`` excluded: their device spans cover the
    kernels inside them), on a CPU the aten ops' self time; by category (:data:`KERNEL_CATEGORIES`) and
    the ``top`` names, with kernel launches and aten ops per step."""
    ka = prof.key_averages()
    dev_type = torch_device_type(cuda)

    def kernel(e) -> bool:
        if getattr(e, "is_user_annotation", False) or e.key.startswith("ProfilerStep") or "#" in e.key:
            return False
        if cuda:
            return getattr(e, "device_type", None) == dev_type
        return e.key.startswith("aten::")

    def us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = [e for e in ka if kernel(e) and us(e) > 0]
    total = sum(us(e) for e in events)
    cats: dict[str, float] = {}
    for e in events:
        c = kernel_category(e.key)
        cats[c] = cats.get(c, 0.0) + us(e)
    launch_keys = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
    return {
        "kernel_ms_per_step": total / steps / 1e3,
        "kernel_launches_per_step": sum(e.count for e in ka if e.key in launch_keys) / steps,
        "aten_ops_per_step": sum(e.count for e in ka if e.key.startswith("aten::")) / steps,
        "by_category_ms_per_step": {c: round(v / steps / 1e3, 4) for c, v in sorted(cats.items(), key=lambda x: -x[1])},
        "top (name, calls/step, ms/step, category)": [
            f"{e.key[:80]} | {e.count / steps:g} | {us(e) / steps / 1e3:.3f} | {kernel_category(e.key)}"
            for e in sorted(events, key=lambda e: -us(e))[:top]],
    }


def torch_device_type(cuda: bool):
    import torch

    return torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU


def emit_json(result: dict, out_dir: str | None, name: str) -> None:
    """Print ``result`` as JSON and, with ``out_dir``, write it there as ``name`` (the folder made first)."""
    import json

    text = json.dumps(result, indent=1)
    print(text)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / name).write_text(text)
