"""TWIST evaluation protocols: kNN, linear probe, semi-supervised fine-tuning, unsupervised classification.

Every name below is loaded from its module on first use: the training loop's kNN monitor imports `knn` and
`features` without the dependencies of every other protocol (scikit-learn, SciPy, matplotlib): importing the loop
took 9.8 s with them, 7.0 s without, in every Ray Train worker."""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module of this package that defines it.
_EXPORTS = {
    "ClusterArguments": "arguments",
    "EvalArguments": "arguments",
    "FeatureModel": "features",
    "FeatureSet": "features",
    "KnnArguments": "arguments",
    "LabelledSplits": "data",
    "LinearArguments": "arguments",
    "SemiArguments": "arguments",
    "StackedLinearProbes": "linear",
    "class_balanced_subset": "data",
    "cluster_figures": "runner",
    "cluster_metrics": "clustering",
    "extract_features": "features",
    "gather_in_order": "features",
    "hungarian_match": "clustering",
    "image_features": "features",
    "knn_class_votes": "knn",
    "knn_evaluate": "knn",
    "labelled_splits_from": "data",
    "linear_probe_on_features": "linear",
    "linear_probe_on_images": "finetune",
    "load_classifier": "finetune",
    "load_feature_model": "features",
    "load_labelled_splits": "data",
    "matched_class_probabilities": "clustering",
    "matched_predictions": "clustering",
    "parse_evaluation_arguments": "arguments",
    "plot_confusion_matrix": "plots",
    "plot_top3_predictions": "plots",
    "plot_training_curves": "plots",
    "read_training_log": "plots",
    "run_evaluation": "runner",
    "save_eval_results": "reporting",
    "semi_recipe": "runner",
    "semi_supervised_finetune": "finetune",
    "subset_from_file": "data",
    "topk_accuracy": "metrics",
    "train_linear_probes": "linear",
    "training_augmentation": "data",
    "update_model_card": "reporting",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
