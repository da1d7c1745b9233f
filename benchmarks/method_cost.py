"""What each method costs per training step against MAE, and whether its FLOPs explain it (zoo, item 4).

For every Fashion-MNIST preset (``configs/*_fashion_mnist.yaml`` and ``configs/compose/``), built as
``mimkit pretrain`` builds it (the method's ``offline_overrides`` replace files it would read, e.g. CAE
v2's teacher file by a random teacher of the same shape, which costs the same), one training step on a
fixed batch of Fashion-MNIST images already in memory: the method's forward (its own masking, targets
and teacher) under the preset's precision (``train.precision: auto`` = bf16 autocast on a CPU with bf16
instructions), backward, AdamW and ``after_step``. The step of each method is interleaved with an MAE
step in one process (MAE, method, MAE, method, ...), so both see the same machine load; the ratio of
the medians is the measured cost. FLOPs per image are counted on the same step with torch's
``FlopCounterMode`` (:func:`mimkit.flops.count_flops`, forward + backward); the predicted cost is the
FLOP ratio, and ``measured / predicted`` says how far a method's step is from what its arithmetic
predicts (> 1: slower than its FLOPs).

    python benchmarks/method_cost.py                       # every preset, batch 256, 2 threads
    python benchmarks/method_cost.py --configs configs/pcae_fashion_mnist.yaml --rounds 20
    python benchmarks/method_cost.py --smoke               # tiny shapes, seconds: checks the script
"""

from __future__ import annotations

import argparse
import glob
import statistics
import time
from pathlib import Path

import torch
from _common import write_rows

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "configs" / "mae_fashion_mnist.yaml"
SMOKE = ["model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
         "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2"]


def build(config: Path, smoke: bool):
    from mimkit.config import load_config
    from mimkit.methods import METHODS
    from mimkit.train.loop import build_method

    name = load_config(config).method.name
    overrides = METHODS[name].preset_overrides(smoke=smoke) + (SMOKE if smoke else [])
    if smoke and name == "cae_v2":
        overrides += ["method.teacher_vit.embed_dim=32", "method.teacher_vit.depth=2", "method.teacher_vit.num_heads=2"]
    cfg = load_config(config, overrides)
    return cfg, build_method(cfg)


class Stepper:
    def __init__(self, cfg, model, images, device):
        from mimkit.methods.base import Progress
        from mimkit.train.optim import param_groups
        from mimkit.train.precision import autocast_dtype
        from mimkit.train.step import fused_adamw_supported

        self.model = model.to(device).train()
        if hasattr(model, "set_input_normalisation"):
            model.set_input_normalisation(tuple(cfg.data.mean or (0.286,)), tuple(cfg.data.std or (0.353,)))
        self.images = images
        self.dtype = autocast_dtype(cfg.train.precision, device)
        self.device = device
        self.opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                                     fused=fused_adamw_supported(device))
        self.progress = Progress(step=1, total_steps=1000, epoch=0.01, total_epochs=3)
        self.times: list[float] = []

    def forward_backward(self):
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.model(self.images, self.progress)
        out.loss.backward()

    def step(self, record: bool):
        t0 = time.perf_counter()
        self.forward_backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.after_step(self.progress)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if record:
            self.times.append(time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=None, help="default: every Fashion-MNIST preset and composition")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.smoke:
        args.batch, args.rounds, args.warmup = 8, 2, 1
    configs = [Path(c) for c in args.configs] if args.configs else sorted(
        Path(p) for p in glob.glob(str(ROOT / "configs" / "*_fashion_mnist.yaml"))
        + glob.glob(str(ROOT / "configs" / "compose" / "*_fashion_mnist.yaml")))
    from mimkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

    raw, _ = load_fashion_mnist(split="train")
    images = ((raw[: args.batch].float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]).to(device)
    from mimkit.flops import count_flops

    def flops_per_image(stepper) -> float:
        stepper.model.zero_grad(set_to_none=True)
        n = count_flops(stepper.forward_backward, grad=True)
        stepper.model.zero_grad(set_to_none=True)
        return n / args.batch

    torch.manual_seed(0)
    ref_cfg, ref_model = build(REFERENCE, args.smoke)
    rows = []
    for config in configs:
        torch.manual_seed(0)
        cfg, model = build(config, args.smoke)
        torch.manual_seed(0)
        mae = Stepper(ref_cfg, build(REFERENCE, args.smoke)[1], images, device)
        other = Stepper(cfg, model, images, device)
        f_mae, f_other = flops_per_image(mae), flops_per_image(other)
        for r in range(args.warmup + args.rounds):
            mae.step(r >= args.warmup)
            other.step(r >= args.warmup)
        t_mae, t_other = statistics.median(mae.times), statistics.median(other.times)
        measured, predicted = t_other / t_mae, f_other / f_mae
        row = {"config": str(config.relative_to(ROOT)), "method": cfg.method.name,
               "precision": str(other.dtype or "fp32").replace("torch.", ""), "step_s": t_other, "mae_step_s": t_mae,
               "gflop_per_img": f_other / 1e9, "mae_gflop_per_img": f_mae / 1e9, "measured_ratio": measured,
               "flop_ratio": predicted, "measured_over_predicted": measured / predicted}
        rows.append(row)
        print(f"{row['config']:50s} {row['precision']:8s} step {t_other * 1e3:7.1f} ms (MAE {t_mae * 1e3:6.1f}) "
              f"x{measured:4.2f}  GFLOP/img {f_other / 1e9:6.3f} (MAE {f_mae / 1e9:5.3f}) x{predicted:4.2f}  "
              f"measured/predicted {measured / predicted:4.2f}", flush=True)
    meta = {"batch": args.batch, "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
            "device": str(device), "torch": torch.__version__, "smoke": args.smoke}
    write_rows(args.json, meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
