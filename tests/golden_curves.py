"""Golden loss curves: the first steps of every preset on a fixed tiny batch.

Each preset in ``configs/`` is trained for ``STEPS`` optimizer steps on one fixed batch of seeded
random images (fp32, CPU, fixed lr, fixed seed); the losses are stored in ``tests/golden/<preset>.json``
and compared by ``tests/test_golden.py``. A change that moves these numbers must say why in the commit
that makes it, and rewrite the files with::

    python tests/golden_curves.py --write            # all presets
    python tests/golden_curves.py --write mae_fashion_mnist

The ``*_vit_base_imagenet`` presets keep their method section but run a small encoder on 56x56 RGB
images with patch 4 (the 14x14 grid of ViT-B/16 at 224, so token counts such as Latent MIM's 20
visible of 196 are the published ones); see ``SMALL_VIT``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
STEPS = 20
BATCH = 8

SMALL_VIT = [
    "model.encoder.img_size=56", "model.encoder.patch_size=4", "model.encoder.in_chans=3",
    "model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=32", "model.decoder.depth=1", "model.decoder.num_heads=2",
]

# extra overrides per preset (kept small: only what makes the run cheap)
EXTRA = {
    "latent_mim_vit_base_imagenet": ["method.projector.hidden_dim=64"],
    # depth 3 (not SMALL_VIT's 2): all three drop stages (after blocks [0, 1, 2]) with the published token
    # counts 147 -> 73 -> 36 -> 18 on the 14x14 grid (at depth 2 the stages would be capped to two)
    "pcae_vit_base_imagenet": ["model.encoder.depth=3"],
    # CAE / CAE v2: the presets' codebook / teacher files do not exist offline: pixel target, random teacher
    "cae_vit_base_imagenet": ["method.target=pixel"],
    "cae_v2_fashion_mnist": ["method.teacher_path=null", "method.teacher_random_init=true"],
    "cae_v2_vit_base_imagenet": [
        "method.teacher_path=null", "method.teacher_random_init=true", "method.teacher_vit.img_size=28",
        "method.teacher_vit.patch_size=4", "method.teacher_vit.in_chans=3", "method.teacher_vit.embed_dim=16",
        "method.teacher_vit.depth=1", "method.teacher_vit.num_heads=2",
    ],
}


def presets() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def overrides_for(name: str) -> list[str]:
    base = SMALL_VIT if name.endswith("_vit_base_imagenet") else []
    return [*base, *EXTRA.get(name, [])]


def run_preset(name: str, steps: int = STEPS, batch: int = BATCH, seed: int = 0) -> list[float]:
    """Losses of ``steps`` optimizer steps of preset ``name`` on one fixed seeded batch."""
    from mimkit.config import load_config
    from mimkit.methods import Progress
    from mimkit.train.loop import build_method
    from mimkit.train.optim import param_groups

    cfg = load_config(ROOT / "configs" / f"{name}.yaml", overrides_for(name))
    torch.manual_seed(seed)
    model = build_method(cfg)
    model.train()
    enc = cfg.model.encoder
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(batch, enc.in_chans, enc.img_size, enc.img_size, generator=g)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for step in range(steps):
        out = model(images, Progress(step, steps, step / steps, 1.0))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(Progress(step + 1, steps, (step + 1) / steps, 1.0))
        losses.append(float(out.loss.detach()))
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite tests/golden/<preset>.json")
    parser.add_argument("names", nargs="*", help="presets (default: all files under configs/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    GOLDEN.mkdir(exist_ok=True)
    for name in args.names or presets():
        losses = run_preset(name)
        print(name, " ".join(f"{v:.5f}" for v in losses))
        if args.write:
            rec = {"preset": name, "overrides": overrides_for(name), "steps": STEPS, "batch": BATCH, "losses": losses}
            (GOLDEN / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
