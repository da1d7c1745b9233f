"""Golden loss curves: the first steps of every preset on a fixed tiny batch, with a hand-written loop.

Each preset in ``configs/`` is trained for ``STEPS`` optimizer steps on one fixed batch of seeded
random images (fp32, CPU, fixed lr, fixed seed); the losses are stored in ``tests/golden/<preset>.json``
and compared by ``tests/test_golden.py``.

What pins what: this hand loop (plain AdamW, constant lr, no accumulation, no autocast, ``after_step``
after every step) pins each *method's* numerics (forward, masks, targets, loss, EMA update) for
*every* preset, independently of the trainer. It does not exercise ``mimkit.train``: the lr schedule,
gradient accumulation, precision / autocast, the trainer's ``after_step`` timing and its data loader
are pinned by the Trainer curves of ``tests/golden_trainer.py`` (``tests/golden/trainer/``), which
run the real ``Trainer`` for MAE, Latent MIM and PCAE and are the reference for ``train/``. A change
to a method moves these curves (and those Trainer curves of the same method); a change to the trainer
alone must move only the Trainer curves.

A change that moves these numbers must say why in the commit that makes it, and rewrite the files with::

    python tests/golden_curves.py --write            # all presets
    python tests/golden_curves.py --write mae_fashion_mnist

The ``*_vit_base_imagenet`` presets (and the ``*_vit_small_imagenet`` / ``*_vit_tiny_imagenet`` ones, see
``IMAGENET_SUFFIXES``) keep their method section but run a small encoder on 56x56 RGB
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

# the ImageNet recipes that run on SMALL_VIT (the 14x14 grid of ViT/16 at 224)
IMAGENET_SUFFIXES = ("_vit_base_imagenet", "_vit_small_imagenet", "_vit_tiny_imagenet")

# golden-only overrides (what the method's own offline/smoke preset does not say)
EXTRA = {
    # depth 3 (not SMALL_VIT's 2): all three drop stages (after blocks [0, 1, 2]) with the published token
    # counts 147 -> 73 -> 36 -> 18 on the 14x14 grid (at depth 2 the stages would be capped to two)
    "pcae_vit_base_imagenet": ["model.encoder.depth=3"],
    # a regressor half the encoder's width, as CAE v2 Tiny's 96 of 192: the Linear + LN projection runs
    "cae_v2_vit_tiny_imagenet": ["model.decoder.embed_dim=16"],
}


def presets() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def overrides_for(name: str) -> list[str]:
    """SMALL_VIT for the ViT-B recipes, then the method's own offline overrides (CAE's codebook and CAE
    v2's teacher files do not exist offline; :meth:`mimkit.methods.Method.preset_overrides`), with its
    smoke overrides for the ViT-B recipes, then :data:`EXTRA`."""
    from mimkit.config import read_yaml
    from mimkit.methods import METHODS

    imagenet = name.endswith(IMAGENET_SUFFIXES)
    method = read_yaml(ROOT / "configs" / f"{name}.yaml").get("method", {}).get("name", "mae")
    return [*(SMALL_VIT if imagenet else []), *METHODS[method].preset_overrides(smoke=imagenet), *EXTRA.get(name, [])]


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
