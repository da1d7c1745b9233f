"""Few-shot transfer: k-shot logistic regression on frozen features, repeated random draws.

Latent MIM reports mean ± std over repeated draws but not the shots or the classifier;
this follows the suggestion there: for each draw, ``shots`` training images per class are sampled
(without replacement, seeded), features are standardised with the support set's mean/std, and a
scikit-learn ``LogisticRegression(C, max_iter)`` is fitted and tested on the whole test set.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_support(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``shots`` random items of every class present in ``labels`` (sorted by class)."""
    idx = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(f"class {c} has only {len(members)} training images, fewer than {shots} shots")
        idx.append(rng.choice(members, size=shots, replace=False))
    return np.concatenate(idx)


def draw_supports(labels, shots: int, draws: int, seed: int = 0) -> list[np.ndarray]:
    """The support sets :func:`fewshot_logreg` draws (same seed -> same sets), as train indices; lets a
    caller encode only these images."""
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    rng = np.random.default_rng(seed)
    return [sample_support(labels, shots, rng) for _ in range(draws)]


def fewshot_logreg(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    shots: int = 10,
    draws: int = 5,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
    supports: list[np.ndarray] | None = None,
) -> dict:
    """``{"mean", "std", "accs": [% per draw], "shots", "draws", "seed"}``; ``std`` is the sample
    standard deviation (ddof=1; 0 for one draw). Same seed -> same numbers. ``supports``: the draws'
    indices into ``train_feats`` (e.g. :func:`draw_supports` remapped onto the few encoded images);
    default: drawn here from ``train_labels``."""
    from sklearn.linear_model import LogisticRegression

    xtr = train_feats.double().cpu().numpy()
    ytr = train_labels.cpu().numpy()
    xte = test_feats.double().cpu().numpy()
    yte = test_labels.cpu().numpy()
    if supports is None:
        supports = draw_supports(ytr, shots, draws, seed)
    accs = []
    for sup in supports:
        if len(np.unique(ytr[sup])) < 2:
            raise ValueError(f"few-shot needs at least 2 classes in the training labels, the support set has "
                             f"{len(np.unique(ytr[sup]))}; evaluate on a data set with 2 or more classes")
        mu = xtr[sup].mean(0)
        sd = xtr[sup].std(0)
        sd[sd < 1e-12] = 1.0
        clf = LogisticRegression(C=C, max_iter=max_iter)
        clf.fit((xtr[sup] - mu) / sd, ytr[sup])
        accs.append(100.0 * float((clf.predict((xte - mu) / sd) == yte).mean()))
    arr = np.asarray(accs)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "accs": accs,
        "shots": shots,
        "draws": draws,
        "seed": seed,
    }
