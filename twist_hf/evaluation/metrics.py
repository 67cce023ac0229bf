"""Top-k accuracy shared by the kNN, linear, semi-supervised and clustering protocols."""

from collections.abc import Sequence

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose true label is among the k highest-scoring classes, for each k.

    k is capped at the number of classes, so top-5 on a 3-class problem is 1.0, as in scikit-learn.
    """
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"scores must be (N, C) and labels (N,) with the same N; got {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if scores.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one sample; the evaluation split is empty.")
    max_k = min(max(ks), scores.shape[1])
    top = scores.topk(max_k, dim=1).indices
    hits = top == labels.to(top.device).unsqueeze(1)
    return {k: hits[:, : min(k, max_k)].any(dim=1).sum().item() / len(labels) for k in ks}
