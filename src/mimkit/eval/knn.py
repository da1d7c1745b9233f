"""Nearest-neighbour evaluation.

* :func:`knn_predict` / :func:`knn_accuracy` — DINO's weighted kNN classifier (``eval_knn.py``): train
  features are the bank, cosine similarity, the top-``k`` neighbours vote with weight ``exp(sim / T)``
  (k=20, T=0.07).
* :func:`knn_eval` — the same for several ``k`` at once (DINO reports 10, 20, 100 and 200) with top-1
  and top-5, from one similarity pass: queries go through in chunks, each chunk's similarities against
  the whole bank are computed on the bank's device (a GPU when there is one) and only the ``max(k)``
  best neighbours are kept.
* :func:`loo_1nn_accuracy` — Latent MIM's protocol: leave-one-out 1-NN inside the evaluation set (the
  best neighbour other than the query itself). Latent MIM measures it on features *without* the
  encoder's final LayerNorm; :func:`mimkit.eval.protocols.run_knn` does so by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)


def bank_ks(k: int, ks: Sequence[int], n_bank: int) -> tuple[int, list[int], list[int]]:
    """``(k, ks, dropped)``: the headline ``k`` and every ``k`` measured from one pass (``ks`` with ``k``)
    on a bank of ``n_bank`` items. A ``k`` beyond the bank would measure the bank size again under a
    false name: such ``k`` are dropped and the headline ``k`` becomes the bank size (``mimkit eval knn``'s
    and the run's kNN alike)."""
    ks = sorted({*(int(x) for x in ks), int(k)})
    dropped = [kk for kk in ks if kk > n_bank]
    if dropped:
        k = min(k, n_bank)
        ks = sorted({kk for kk in ks if kk <= n_bank} | {k})
    return k, ks, dropped


def _check(train_feats, train_labels):
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError("train features and labels differ in length")
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one train item")
    if (train_labels < 0).any():
        raise ValueError("kNN needs labelled train data; found labels < 0 (unlabelled images)")


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    device: str | torch.device | None = None,
    show_progress: bool = False,
) -> dict[int, torch.Tensor]:
    """``{k: class scores (N_test, C)}`` of DINO's weighted vote for every ``k`` in ``ks``, from one pass.

    ``device``: where the bank lives and similarities are computed (default: the features' device).
    ``k`` larger than the bank is clipped to the bank size."""
    _check(train_feats, train_labels)
    from mimkit.eval.features import progress

    num_classes = num_classes or int(train_labels.max()) + 1
    device = torch.device(device) if device is not None else train_feats.device
    ks = sorted({int(k) for k in ks})
    if ks[0] < 1:
        raise ValueError(f"k must be at least 1, got {ks[0]}")
    kmax = min(ks[-1], train_feats.shape[0])
    bank = F.normalize(train_feats.to(device, torch.float32), dim=1)
    labels = train_labels.to(device)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    starts = range(0, test_feats.shape[0], chunk)
    for i in progress(starts, len(starts), "kNN", enabled=None if show_progress else False, unit="chunk"):
        q = F.normalize(test_feats[i : i + chunk].to(device, torch.float32), dim=1)
        sim, idx = (q @ bank.T).topk(kmax, dim=1)  # sorted, best first
        weight = (sim / temperature).exp()
        nbr = labels[idx]
        for k in ks:  # the first k of the sorted neighbours vote
            kk = min(k, kmax)
            votes = torch.zeros(q.shape[0], num_classes, dtype=weight.dtype, device=device)
            out[k].append(votes.scatter_add_(1, nbr[:, :kk], weight[:, :kk]).cpu())
    return {k: torch.cat(v) if v else torch.empty(0, num_classes) for k, v in out.items()}


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    device: str | torch.device | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Class scores ``(N_test, C)`` from a weighted vote of the ``k`` most cosine-similar train items.

    ``train_feats (N, D)``, ``train_labels (N,)`` int64, ``test_feats (M, D)``.
    """
    return knn_scores(train_feats, train_labels, test_feats, (k,), temperature, num_classes, chunk, device,
                      show_progress)[k]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percent of rows whose label is among the ``k`` highest scores (ties: lowest index first)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return 100.0 * (top == labels[:, None]).any(1).float().mean().item()


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 20, temperature: float = 0.07,
                 device=None, show_progress: bool = False) -> float:
    """Top-1 accuracy in percent of :func:`knn_predict`."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes, device=device,
                         show_progress=show_progress)
    return topk_accuracy(scores, test_labels, 1)


def knn_eval(train_feats, train_labels, test_feats, test_labels, ks: Sequence[int] = DEFAULT_KS,
             temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024, device=None,
             show_progress: bool = False) -> dict[int, dict[str, float]]:
    """``{k: {"top1": %, "top5": %}}`` for every ``k`` in ``ks`` from one similarity pass."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_feats, train_labels, test_feats, ks, temperature, num_classes, chunk, device,
                        show_progress)
    return {k: {"top1": topk_accuracy(s, test_labels, 1), "top5": topk_accuracy(s, test_labels, 5)}
            for k, s in scores.items()}


def loo_1nn_accuracy(feats: torch.Tensor, labels: torch.Tensor, chunk: int = 1024, device=None) -> float:
    """Leave-one-out 1-NN accuracy in percent within one set (cosine; self excluded)."""
    device = torch.device(device) if device is not None else feats.device
    x = F.normalize(feats.to(device, torch.float32), dim=1)
    labels = labels.to(device)
    correct = 0
    for i in range(0, x.shape[0], chunk):
        sim = x[i : i + chunk] @ x.T
        rows = torch.arange(sim.shape[0], device=device)
        sim[rows, rows + i] = -float("inf")
        nn_idx = sim.argmax(1)
        correct += int((labels[nn_idx] == labels[i : i + chunk]).sum())
    return 100.0 * correct / x.shape[0]
