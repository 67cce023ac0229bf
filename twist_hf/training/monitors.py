"""What the run measures on held-out data at the end of an epoch and of the run: the weighted kNN top-1 of the
backbone features, and the head's clustering scores (NMI, ACC, AMI, ARI). Every monitor follows `Monitor`;
features come from `twist_hf.evaluation.features.image_features`, split over the ranks."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator

from ..configuration_twist import TwistConfig
from ..evaluation.features import image_features
from ..evaluation.knn import knn_evaluate
from ..modeling_twist import TwistModel
from .arguments import PretrainArguments
from .data import LabelledImages, load_split

CLUSTER_METRICS = ("cluster_nmi", "cluster_acc", "cluster_ami", "cluster_ari")


class Monitor(Protocol):
    """Scores of the model on held-out data; every rank calls `evaluate` and gets the same dict."""

    def evaluate(self, model: TwistModel, accelerator: Accelerator) -> dict[str, float]: ...


class KnnMonitor:
    """Weighted kNN top-1/top-5 of the backbone features: memory bank = train split, queries = eval split."""

    def __init__(self, bank: LabelledImages, queries: LabelledImages, k: int, temperature: float):
        _require_labels(bank, "train")
        _require_labels(queries, "eval")
        self.bank, self.queries, self.k, self.temperature = bank, queries, k, temperature

    def evaluate(self, model: TwistModel, accelerator: Accelerator) -> dict[str, float]:
        bank = image_features(model, self.bank.images, self.bank.labels, accelerator=accelerator)
        queries = image_features(model, self.queries.images, self.queries.labels, accelerator=accelerator)
        num_classes = int(max(bank.labels.max(), queries.labels.max())) + 1
        metrics = knn_evaluate(
            bank.features,
            bank.labels,
            queries.features,
            queries.labels,
            num_classes,
            ks=(self.k,),
            temperature=self.temperature,
        )
        return {"knn_top1": metrics["knn_top1"], "knn_top5": metrics["knn_top5"]}


class ClusterMonitor:
    """The head's argmax as a clustering of the eval split, scored against its labels (Hungarian-matched ACC)."""

    def __init__(self, queries: LabelledImages, num_classes: int):
        _require_labels(queries, "eval")
        self.queries = queries
        self.num_labels = int(queries.labels.max()) + 1
        if num_classes < self.num_labels:
            raise ValueError(
                f"The cluster monitor matches the head's {num_classes} classes one-to-one to the eval split's "
                f"{self.num_labels} labels; set num_classes >= {self.num_labels} or turn --cluster_monitor off."
            )

    def evaluate(self, model: TwistModel, accelerator: Accelerator) -> dict[str, float]:
        from ..evaluation.clustering import cluster_metrics  # scikit-learn and SciPy only where the head is scored

        outputs = image_features(
            model, self.queries.images, self.queries.labels, with_logits=True, accelerator=accelerator
        )
        scores = cluster_metrics(outputs.logits, outputs.labels, num_labels=self.num_labels)
        return {name: scores[name] for name in CLUSTER_METRICS}


def _require_labels(split: LabelledImages, role: str) -> None:
    if len(split.labels) == 0 or (np.asarray(split.labels) < 0).any():
        raise ValueError(
            f"The monitors need labels in the {role} split; pass --label_column, or --eval_split '' to train "
            "without monitors."
        )


def build_monitors(args: PretrainArguments, config: TwistConfig) -> list[Monitor]:
    """The kNN monitor whenever there is an eval split, and the cluster monitor when asked (`cluster_monitor`)."""
    data, training = args.data, args.training
    if not data.eval_split:
        return []
    queries = load_split(data, data.eval_split, config.image_size, max_samples=data.max_eval_samples)
    bank = load_split(data, data.train_split, config.image_size, max_samples=data.max_train_samples)
    monitors: list[Monitor] = [KnnMonitor(bank, queries, training.knn_k, training.knn_temperature)]
    if training.cluster_monitor:
        monitors.append(ClusterMonitor(queries, config.num_classes))
    return monitors


@torch.no_grad()
def monitor_metrics(monitors: list[Monitor], model: TwistModel, accelerator: Accelerator) -> dict[str, float]:
    """Every monitor's scores in one dict."""
    return {name: value for monitor in monitors for name, value in monitor.evaluate(model, accelerator).items()}
