"""TWIST evaluation protocols: kNN, linear probe, semi-supervised fine-tuning, unsupervised classification."""

from .arguments import (
    ClusterArguments,
    EvalArguments,
    KnnArguments,
    LinearArguments,
    SemiArguments,
    parse_evaluation_arguments,
)
from .clustering import cluster_metrics, hungarian_match, matched_class_probabilities, matched_predictions
from .data import (
    LabelledSplits,
    class_balanced_subset,
    labelled_splits_from,
    load_labelled_splits,
    subset_from_file,
    training_augmentation,
)
from .features import FeatureModel, FeatureSet, extract_features, gather_in_order, image_features, load_feature_model
from .finetune import linear_probe_on_images, load_classifier, semi_supervised_finetune
from .knn import knn_class_votes, knn_evaluate
from .linear import StackedLinearProbes, linear_probe_on_features, train_linear_probes
from .metrics import topk_accuracy
from .plots import plot_confusion_matrix, plot_top3_predictions, plot_training_curves, read_training_log
from .reporting import save_eval_results, update_model_card
from .runner import cluster_figures, run_evaluation, semi_recipe

__all__ = [
    "ClusterArguments",
    "EvalArguments",
    "FeatureModel",
    "FeatureSet",
    "KnnArguments",
    "LabelledSplits",
    "LinearArguments",
    "SemiArguments",
    "StackedLinearProbes",
    "class_balanced_subset",
    "cluster_figures",
    "cluster_metrics",
    "extract_features",
    "gather_in_order",
    "hungarian_match",
    "image_features",
    "knn_class_votes",
    "knn_evaluate",
    "labelled_splits_from",
    "linear_probe_on_features",
    "linear_probe_on_images",
    "load_classifier",
    "load_feature_model",
    "load_labelled_splits",
    "matched_class_probabilities",
    "matched_predictions",
    "parse_evaluation_arguments",
    "plot_confusion_matrix",
    "plot_top3_predictions",
    "plot_training_curves",
    "read_training_log",
    "run_evaluation",
    "save_eval_results",
    "semi_recipe",
    "semi_supervised_finetune",
    "subset_from_file",
    "topk_accuracy",
    "train_linear_probes",
    "training_augmentation",
    "update_model_card",
]
