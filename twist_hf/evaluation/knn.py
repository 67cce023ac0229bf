"""Weighted cosine k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol)."""

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .metrics import topk_accuracy

logger = logging.getLogger(__name__)

KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.07


def knn_class_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Per-class vote sums (M, C) for each k: every neighbour votes exp(cosine / T) for its label.

    Test rows are processed `chunk_size` at a time so memory stays O(chunk_size x N_train).
    """
    _check_knn_inputs(train_features, train_labels, test_features, ks, temperature, chunk_size)
    max_k = min(max(ks), train_features.shape[0])
    if max_k < max(ks):
        logger.warning("Only %d training samples: kNN with k > %d uses all of them.", max_k, max_k)
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device)
    votes: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for chunk in test_features.float().to(train.device).split(chunk_size):
        similarity = F.normalize(chunk, dim=1) @ train.T
        top_similarity, top_index = similarity.topk(max_k, dim=1)
        weights = (top_similarity / temperature).exp()
        neighbour_labels = labels[top_index]
        for k in ks:
            kk = min(k, max_k)
            chunk_votes = torch.zeros(chunk.shape[0], num_classes, device=train.device)
            votes[k].append(chunk_votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk]))
    return {k: torch.cat(parts) for k, parts in votes.items()}


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Top-1 / top-5 kNN accuracy for each k, keyed `knn_k{k}_top{1,5}`, plus `knn_top1/5` of the best k."""
    votes = knn_class_votes(train_features, train_labels, test_features, num_classes, ks, temperature, chunk_size)
    metrics: dict[str, float] = {}
    for k, class_votes in votes.items():
        accuracy = topk_accuracy(class_votes, test_labels, (1, 5))
        metrics[f"knn_k{k}_top1"] = accuracy[1]
        metrics[f"knn_k{k}_top5"] = accuracy[5]
    best_k = max(ks, key=lambda k: metrics[f"knn_k{k}_top1"])
    metrics["knn_top1"] = metrics[f"knn_k{best_k}_top1"]
    metrics["knn_top5"] = metrics[f"knn_k{best_k}_top5"]
    return metrics


def _check_knn_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    chunk_size: int,
) -> None:
    """Raise a ValueError naming the first malformed kNN input."""
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("kNN features must be 2-D (samples, dims); flatten them first.")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"Train features have {train_features.shape[1]} dims but test features "
            f"{test_features.shape[1]}; extract both with the same model."
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}.")
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training sample.")
    if not ks or min(ks) < 1:
        raise ValueError(f"kNN k values must be positive integers, got {list(ks)}.")
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(f"kNN needs temperature > 0 and chunk_size >= 1, got {temperature}, {chunk_size}.")
