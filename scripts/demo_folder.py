"""Write a small folder of non-square colour images for the "continue pretraining on your own images" demo.

Each image is ``H x W`` RGB (default 32 x 48): a Fashion-MNIST garment, tinted with a random colour, on a
light background of another random colour, at a random horizontal position. Images go to
``OUT/<class name>/<index>.png`` (class sub-folders, so ``mimkit`` reads labels too).

    python scripts/demo_folder.py runs/demo_images --n 2000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=2000, help="number of images")
    ap.add_argument("--size", type=int, nargs=2, default=[32, 48], metavar=("H", "W"))
    ap.add_argument("--split", default="train", help="Fashion-MNIST split the garments come from")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from PIL import Image
    from tqdm import tqdm

    from mimkit.data import FASHION_MNIST_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist(None, args.split)
    h, w = args.size
    if h < 28 or w < 28:
        raise SystemExit(f"--size {h} {w}: both sides must be >= 28 (the garments are 28x28)")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(images), generator=g)[: args.n]
    garment = images[idx, 0].float() / 255  # (n, 28, 28)
    n = len(idx)
    fg = torch.rand(n, 3, 1, 1, generator=g) * 0.8  # garment colour
    bg = 0.7 + 0.3 * torch.rand(n, 3, 1, 1, generator=g)  # light background colour
    top = torch.randint(0, h - 28 + 1, (n,), generator=g)
    left = torch.randint(0, w - 28 + 1, (n,), generator=g)
    alpha = torch.zeros(n, 1, h, w)
    rows = top[:, None] + torch.arange(28)  # (n, 28)
    cols = left[:, None] + torch.arange(28)
    alpha[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]] = garment
    canvas = (bg * (1 - alpha) + fg * alpha).clamp(0, 1).mul(255).round().to(torch.uint8)  # (n, 3, h, w)
    out = Path(args.out)
    names = [c.replace("/", "-").replace(" ", "_") for c in FASHION_MNIST_CLASSES]
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
    arr = canvas.permute(0, 2, 3, 1).numpy()
    for i in tqdm(range(n), desc="writing PNGs", unit="img"):
        Image.fromarray(arr[i]).save(out / names[int(labels[idx[i]])] / f"{i:05d}.png")
    print(f"wrote {n} {h}x{w} RGB images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
