"""A k-means codebook over per-patch normalized pixel patches: CAE's offline stand-in for DALL-E tokens.

CAE predicts, for every masked patch, the id of a discrete visual token (DALL-E's dVAE, vocabulary
8192). Without the DALL-E weights, the closest offline task is to predict the id of the nearest
centroid of a k-means codebook fitted on the training data's patches. Patches
are cut in :func:`mimkit.nn.patch.patchify`'s layout from the images *as the method sees them*
(normalized with the data mean/std) and normalized per patch (MAE's norm-pix), so a code describes a
patch's shape, not its brightness or contrast.

Fit once, then train::

    python -m mimkit.codebook fit --dataset fashion_mnist --patch 4 --k 512 --out runs/codebook_fmnist.pt
    mimkit pretrain configs/cae_fashion_mnist.yaml method.target=codebook \\
        method.codebook_path=runs/codebook_fmnist.pt method.codebook_size=512

The file is ``torch.save({"centroids": (K, P) float32, "patch_size": p, "in_chans": C, "meta": {...}})``.
Fitting is Lloyd's algorithm with k-means++ seeding on a random sample of patches, in batched torch ops
(distances by ``|x|^2 - 2 x.c + |c|^2`` in chunks); empty clusters are re-seeded with the points that
are farthest from their centroid.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mimkit.nn.codebook import FIT_COMMAND, Codebook, patch_vectors  # noqa: F401 - re-exported


def _nearest(x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor | None = None,
             chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (N, P)`` -> (nearest centroid id ``(N,)`` long, its squared distance ``(N,)``), in chunks."""
    c_sq = (centroids * centroids).sum(1) if c_sq is None else c_sq
    ids, dists = [], []
    for i in range(0, len(x), chunk):
        xc = x[i : i + chunk]
        d = (xc * xc).sum(1, keepdim=True) - 2 * xc @ centroids.T + c_sq[None]
        best = d.min(1)
        ids.append(best.indices)
        dists.append(best.values.clamp_min(0))
    if not ids:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(ids), torch.cat(dists)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator, candidates: int = 2048) -> torch.Tensor:
    """k-means++ seeding on a subsample of ``x``: each next centroid drawn with probability
    proportional to the squared distance to the nearest chosen one."""
    n = len(x)
    pool = x[torch.randperm(n, generator=generator)[: min(n, max(candidates, 8 * k))]]
    first = int(torch.randint(len(pool), (1,), generator=generator))
    cents = [pool[first]]
    d2 = ((pool - pool[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if float(total) <= 0:  # fewer distinct points than codes: duplicate at random
            idx = int(torch.randint(len(pool), (1,), generator=generator))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=generator))
        cents.append(pool[idx])
        d2 = torch.minimum(d2, ((pool - pool[idx]) ** 2).sum(1))
    return torch.stack(cents)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, tol: float = 1e-4) -> tuple[torch.Tensor, dict]:
    """Lloyd's k-means on ``x (N, P)`` -> (centroids ``(k, P)``, info). Stops early when the mean
    squared distance improves by less than ``tol`` (relative)."""
    if len(x) < k:
        raise ValueError(f"k-means needs at least k={k} points, got {len(x)}; lower --k or use more images")
    g = torch.Generator().manual_seed(seed)
    cents = _kmeans_pp(x, k, g)
    history = []
    for _ in range(iters):
        ids, d2 = _nearest(x, cents)
        history.append(float(d2.mean()))
        sums = torch.zeros_like(cents).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=k).to(x.dtype)
        new = sums / counts.clamp_min(1)[:, None]
        empty = counts == 0
        if bool(empty.any()):  # re-seed empty clusters with the worst-fitted points
            far = torch.topk(d2, int(empty.sum())).indices
            new[empty] = x[far]
        cents = new
        if len(history) > 1 and history[-2] - history[-1] < tol * history[-2]:
            break
    ids, d2 = _nearest(x, cents)
    history.append(float(d2.mean()))
    used = int((torch.bincount(ids, minlength=k) > 0).sum())
    return cents, {"mse_history": history, "iters": len(history) - 1, "codes_used": used, "n_points": len(x)}




def fit_codebook(images: torch.Tensor, patch_size: int, k: int, iters: int = 20, sample: int = 200_000,
                 seed: int = 0, mean=None, std=None, batch: int = 4096) -> tuple[Codebook, dict]:
    """Fit a :class:`Codebook` of ``k`` codes on the patches of ``images``.

    ``images``: uint8 ``(N, C, H, W)`` (normalized with ``mean``/``std`` first, as the training data
    is) or already-normalized float. ``sample``: at most this many patches, drawn at random (seeded),
    enter k-means. Returns ``(codebook, info)``."""
    from mimkit.eval.features import normalize_images

    g = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    per_image = (h // patch_size) * (w // patch_size)
    n_img = min(n, max(1, -(-sample // per_image)))
    chosen = torch.randperm(n, generator=g)[:n_img]
    vecs = []
    for i in range(0, n_img, batch):
        x = images[chosen[i : i + batch]]
        if x.dtype == torch.uint8:
            if mean is None or std is None:
                raise ValueError("fit_codebook needs mean and std for uint8 images")
            x = normalize_images(x, mean, std)
        vecs.append(patch_vectors(x, patch_size).flatten(0, 1))
    x = torch.cat(vecs)
    if len(x) > sample:
        x = x[torch.randperm(len(x), generator=g)[:sample]]
    cents, info = kmeans(x, k, iters=iters, seed=seed)
    info.update(k=k, patch_size=patch_size, images=int(n_img), seed=seed)
    return Codebook(cents, patch_size), info


def _fit_command(args) -> int:
    from mimkit.eval.data import load_split, resolve_norm

    torch.set_num_threads(args.threads) if args.threads else None
    img_size = args.img_size or (28 if args.dataset in ("fashion_mnist", "fashion-mnist", "fmnist") else 224)
    images, _, info = load_split(args.dataset, "train", img_size, args.in_chans, args.limit, args.seed)
    mean, std, _ = resolve_norm(None, args.in_chans, args.mean, args.std)
    t0 = time.perf_counter()
    book, fit = fit_codebook(images, args.patch, args.k, iters=args.iters, sample=args.sample, seed=args.seed,
                             mean=mean, std=std)
    meta = {**fit, "dataset": info, "mean": list(mean), "std": list(std), "img_size": img_size,
            "seconds": round(time.perf_counter() - t0, 1)}
    path = book.save(args.out, meta)
    print(f"wrote {path}: {args.k} codes of {args.patch}x{args.patch}x{args.in_chans} patches, "
          f"{fit['codes_used']} used, mean squared distance {fit['mse_history'][-1]:.4f} after {fit['iters']} "
          f"iterations ({meta['seconds']} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimkit.codebook", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit a k-means codebook on a data set's training patches")
    f.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist or an image folder")
    f.add_argument("--patch", type=int, required=True, help="patch size (the encoder's)")
    f.add_argument("--k", type=int, default=512, help="number of codes")
    f.add_argument("--out", required=True, help="output file, e.g. runs/codebook_fmnist.pt")
    f.add_argument("--img-size", type=int, default=None, help="image side (default 28 for fashion_mnist, else 224)")
    f.add_argument("--in-chans", type=int, default=1, help="channels (1 for fashion_mnist, 3 for RGB folders)")
    f.add_argument("--mean", type=float, nargs="+", default=None, help="data mean (default: by channel count)")
    f.add_argument("--std", type=float, nargs="+", default=None, help="data std (default: by channel count)")
    f.add_argument("--limit", type=int, default=None, help="use a seeded random subset of the training images")
    f.add_argument("--sample", type=int, default=200_000, help="patches entering k-means")
    f.add_argument("--iters", type=int, default=20)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=None)
    f.set_defaults(func=_fit_command)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
