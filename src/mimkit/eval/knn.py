"""Nearest-neighbour evaluation.

* :func:`knn_accuracy` — DINO's weighted kNN: train features are the bank, cosine similarity,
  top-``k`` neighbours vote with weight ``exp(sim / T)`` (k=20, T=0.07).
* :func:`loo_1nn_accuracy` — Latent MIM's protocol: leave-one-out 1-NN inside the evaluation set
  (the best neighbour other than the query itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``(N_test, C)`` from a weighted vote of the ``k`` most cosine-similar train items.

    ``train_feats (N, D)``, ``train_labels (N,)`` int64, ``test_feats (M, D)``.
    """
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError("train features and labels differ in length")
    if (train_labels < 0).any():
        raise ValueError("kNN needs labelled train data; found labels < 0 (unlabelled images)")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_feats.shape[0])
    bank = F.normalize(train_feats.float(), dim=1)
    out = []
    for i in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[i : i + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weight = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, dtype=weight.dtype)
        votes.scatter_add_(1, train_labels[idx], weight)
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent of :func:`knn_predict`."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return 100.0 * (scores.argmax(1) == test_labels).float().mean().item()


def loo_1nn_accuracy(feats: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> float:
    """Leave-one-out 1-NN accuracy in percent within one set (cosine; self excluded)."""
    x = F.normalize(feats.float(), dim=1)
    correct = 0
    for i in range(0, x.shape[0], chunk):
        sim = x[i : i + chunk] @ x.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + i] = -float("inf")
        nn_idx = sim.argmax(1)
        correct += int((labels[nn_idx] == labels[i : i + chunk]).sum())
    return 100.0 * correct / x.shape[0]
