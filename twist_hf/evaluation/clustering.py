"""Unsupervised classification: the TWIST head's argmax as a cluster, scored against the labels."""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    confusion_matrix,
    normalized_mutual_info_score,
)

from .metrics import topk_accuracy

UNMATCHED = -1


def hungarian_match(clusters: np.ndarray, labels: np.ndarray, num_clusters: int, num_labels: int) -> np.ndarray:
    """Best one-to-one map cluster -> label (maximising agreements); clusters left over map to -1."""
    if num_clusters < num_labels:
        raise ValueError(
            f"The head has K={num_clusters} classes but the dataset has {num_labels} labels; one-to-one "
            "matching needs K >= number of labels. Evaluate a model pretrained with num_classes >= "
            f"{num_labels}."
        )
    counts = confusion_matrix(labels, clusters, labels=np.arange(max(num_clusters, num_labels)))
    label_index, cluster_index = linear_sum_assignment(counts[:num_labels, :num_clusters], maximize=True)
    cluster_to_label = np.full(num_clusters, UNMATCHED, dtype=np.int64)
    cluster_to_label[cluster_index] = label_index
    return cluster_to_label


def matched_predictions(clusters: np.ndarray, cluster_to_label: np.ndarray) -> np.ndarray:
    """Labels predicted through the matching; samples in unmatched clusters get -1 (always wrong)."""
    return cluster_to_label[clusters]


def matched_class_probabilities(probabilities: torch.Tensor, cluster_to_label: np.ndarray) -> torch.Tensor:
    """(N, C) probabilities of the labels, each read from the cluster matched to it (every label has one)."""
    matched_clusters = np.flatnonzero(cluster_to_label != UNMATCHED)
    cluster_of_label = matched_clusters[np.argsort(cluster_to_label[matched_clusters])]
    return probabilities[:, torch.as_tensor(cluster_of_label, device=probabilities.device)]


def cluster_metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """NMI, AMI, ARI, Hungarian-matched accuracy and matched top-5 accuracy of the head's argmax."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (N, K) and labels (N,); got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    clusters = logits.argmax(dim=1).cpu().numpy()
    truth = labels.cpu().numpy()
    cluster_to_label = hungarian_match(clusters, truth, logits.shape[1], num_labels)
    probabilities = logits.float().softmax(dim=1)
    matched_scores = matched_class_probabilities(probabilities, cluster_to_label)
    return {
        "cluster_nmi": float(normalized_mutual_info_score(truth, clusters)),
        "cluster_ami": float(adjusted_mutual_info_score(truth, clusters)),
        "cluster_ari": float(adjusted_rand_score(truth, clusters)),
        "cluster_acc": float((matched_predictions(clusters, cluster_to_label) == truth).mean()),
        "cluster_top5_acc": topk_accuracy(matched_scores, labels, (5,))[5],
    }
