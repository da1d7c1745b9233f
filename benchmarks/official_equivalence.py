"""Check mimkit's MAE against facebookresearch/mae's ``models_mae.py`` (not a test: needs a checkout).

Builds the official model at several shapes, saves its state dict as an official pretraining
checkpoint, loads that file with :func:`mimkit.interop.mae_from_official`, feeds both the same images
and the same masking noise in fp32, and prints the loss / prediction / mask differences.

    python benchmarks/official_equivalence.py --mae-repo /path/to/facebookresearch/mae
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import official_model_class  # noqa: E402

from mimkit.interop import mae_from_official  # noqa: E402

SHAPES = [  # img, patch, chans, width, depth, heads, dec width, dec depth, dec heads
    (28, 4, 3, 192, 6, 3, 128, 2, 4),
    (32, 8, 3, 96, 2, 3, 64, 2, 4),
    (64, 16, 3, 768, 2, 12, 512, 2, 16),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mae-repo", required=True)
    ap.add_argument("--batch", type=int, default=6)
    args = ap.parse_args()
    import functools

    cls, module = official_model_class(args.mae_repo)
    torch.manual_seed(0)
    worst = 0.0
    for img, p, c, d, depth, h, dd, ddepth, dh in SHAPES:
        off = cls(img_size=img, patch_size=p, in_chans=c, embed_dim=d, depth=depth, num_heads=h,
                  decoder_embed_dim=dd, decoder_depth=ddepth, decoder_num_heads=dh, mlp_ratio=4,
                  norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), norm_pix_loss=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint.pth"
            torch.save({"model": off.state_dict()}, path)
            ours = mae_from_official(path, num_heads=h, decoder_num_heads=dh)
        x = torch.randn(args.batch, c, img, img)
        noise = torch.rand(args.batch, (img // p) ** 2)
        real_rand = module.torch.rand
        module.torch.rand = lambda *a, _n=noise, **k: _n.clone()  # the official random_masking draws torch.rand
        try:
            loss_off, pred_off, mask_off = off(x, mask_ratio=0.75)
        finally:
            module.torch.rand = real_rand
        out = ours(x, noise=noise)
        dl = (loss_off - out.loss).abs().item()
        dp = (pred_off - out.pred).abs().max().item()
        worst = max(worst, dl, dp)
        print(f"ViT {d}/{depth} patch {p} img {img}: loss official {loss_off.item():.8f} mimkit {out.loss.item():.8f} "
              f"|diff| {dl:.2e}; max |pred diff| {dp:.2e}; masks equal {torch.equal(mask_off, out.plan.mask)}")
    print(f"worst difference: {worst:.2e}")


if __name__ == "__main__":
    main()
