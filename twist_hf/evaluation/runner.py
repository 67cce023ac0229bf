"""Run the requested evaluation protocols on one model and dataset, then write results and figures."""

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from twist_hf.accelerator import fresh_accelerator
from twist_hf.data import BUILTIN_FASHION_MNIST_NAMES, decode_image

from .arguments import ClusterArguments, EvalArguments, KnnArguments, LinearArguments, SemiArguments
from .clustering import cluster_metrics, hungarian_match, matched_class_probabilities, matched_predictions
from .data import LabelledSplits, class_balanced_subset, decoded_rows, load_labelled_splits, subset_from_file
from .features import FeatureModel, FeatureSet, extract_features, load_feature_model
from .finetune import (
    LinearProbeRecipe,
    linear_probe_on_images,
    linear_probe_recipe,
    per_process_batch_size,
    semi_supervised_finetune,
)
from .knn import knn_evaluate
from .linear import linear_probe_on_features
from .plots import plot_confusion_matrix, plot_top3_predictions, plot_training_curves
from .reporting import save_eval_results, update_model_card

logger = logging.getLogger(__name__)

# Semi-supervised recipes of the paper per label fraction: (epochs, backbone lr, unscaled).
SEMI_RECIPES = {0.01: (20, 0.04), 0.1: (20, 0.02), 1.0: (30, 0.01)}
# Batch of the fast feature-cache probe (one process), unless --linear_batch_size says otherwise.
FAST_LINEAR_BATCH = 256
HUB_DATASET_IDS = dict.fromkeys(BUILTIN_FASHION_MNIST_NAMES, "zalando-datasets/fashion_mnist")


def run_evaluation(
    eval_args: EvalArguments,
    knn_args: KnnArguments | None = None,
    linear_args: LinearArguments | None = None,
    semi_args: SemiArguments | None = None,
    cluster_args: ClusterArguments | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Evaluate eval_args.model with every requested protocol; returns the metrics (no `eval_` prefix).

    `skipped_images` (only when some were) is the most undecodable images any one pass over the data met.
    """
    knn_args, linear_args = knn_args or KnnArguments(), linear_args or LinearArguments()
    semi_args, cluster_args = semi_args or SemiArguments(), cluster_args or ClusterArguments()
    accelerator = accelerator or fresh_accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    if eval_args.reproduces:
        logger.info("reproduces: %s", eval_args.reproduces)
    feature_model, processor = load_feature_model(eval_args.model)
    protocols = _applicable_protocols(eval_args, feature_model)
    linear_recipe = linear_probe_recipe(
        feature_model,
        linear_args.linear_epochs,
        linear_args.linear_batch_size,
        linear_args.linear_base_lr,
        linear_args.linear_cls_blocks,
    )
    _check_batches_split(protocols, linear_args, linear_recipe, semi_args, accelerator.num_processes)
    splits = _load_splits(eval_args)
    output_dir = Path(eval_args.output_dir or _default_output_dir(eval_args.model))
    needed = _splits_with_frozen_features(protocols, linear_args, linear_recipe)
    features, skipped = _extract_splits(eval_args, needed, feature_model, processor, splits, accelerator)
    metrics: dict[str, float] = {}
    if "knn" in protocols:
        metrics |= _run_knn(features, splits, knn_args)
    if "linear" in protocols:
        metrics |= _run_linear(
            eval_args, linear_args, linear_recipe, features, feature_model, processor, splits, accelerator
        )
        skipped = max(skipped, metrics.pop("skipped_images"))
    if "cluster" in protocols:
        metrics |= cluster_metrics(features["test"].logits, features["test"].labels, splits.num_classes)
    if "semi" in protocols:
        semi_metrics, semi_skipped = _run_semi(eval_args, semi_args, processor, splits, accelerator)
        metrics |= semi_metrics
        skipped = max(skipped, semi_skipped)
    if skipped:
        logger.warning("Skipped %d undecodable images; they count in no accuracy.", skipped)
        metrics["skipped_images"] = skipped
    if accelerator.is_main_process:
        _write_outputs(eval_args, cluster_args, metrics, features, splits, output_dir)
    accelerator.wait_for_everyone()
    return metrics


def _load_splits(eval_args: EvalArguments) -> LabelledSplits:
    """The labelled train and test splits the evaluation arguments name."""
    return load_labelled_splits(
        eval_args.dataset,
        eval_args.train_split,
        eval_args.test_split,
        eval_args.image_column,
        eval_args.label_column,
        eval_args.dataset_config,
        eval_args.max_train_samples,
        eval_args.max_test_samples,
    )


def _splits_with_frozen_features(
    protocols: Sequence[str], linear_args: LinearArguments, linear_recipe: LinearProbeRecipe
) -> list[str]:
    """The splits whose frozen features are extracted once and shared: kNN and the fast probe on one feature read
    train and test, the head's cluster metrics test; the paper's probe, the fast probe on a ViT's last CLS tokens
    and fine-tuning make their own."""
    fast_linear = "linear" in protocols and linear_args.linear_mode == "fast"
    needs_train = "knn" in protocols or (fast_linear and linear_recipe.cls_blocks == 1)
    return (["train"] if needs_train else []) + (["test"] if needs_train or "cluster" in protocols else [])


def _applicable_protocols(eval_args: EvalArguments, feature_model: FeatureModel) -> tuple[str, ...]:
    """The requested protocols; `cluster` needs a TWIST head (an error if asked for, skipped under `all`)."""
    if feature_model.has_head:
        return eval_args.protocols
    if eval_args.protocol == "cluster":
        raise ValueError(
            f"The cluster protocol uses the TWIST head's class distribution, but {eval_args.model} is a "
            f"{feature_model.model.config.model_type!r} model without a trained one. Use a TWIST model with "
            "its head, or another protocol."
        )
    if "cluster" in eval_args.protocols:
        logger.warning("%s has no TWIST head: skipping the cluster protocol.", eval_args.model)
    return tuple(p for p in eval_args.protocols if p != "cluster")


def _check_batches_split(
    protocols: tuple[str, ...],
    linear_args: LinearArguments,
    linear_recipe: LinearProbeRecipe,
    semi_args: SemiArguments,
    num_processes: int,
) -> None:
    """Fail before any data is read when a global batch does not split evenly over the processes."""
    if "linear" in protocols and linear_args.linear_mode == "paper":
        linear_recipe.per_process_batch_size(num_processes)
    if "semi" in protocols:
        per_process_batch_size(semi_args.semi_batch_size, num_processes, "--semi_batch_size")


def _extract_splits(
    eval_args: EvalArguments,
    names: Sequence[str],
    feature_model: FeatureModel,
    processor,
    splits: LabelledSplits,
    accelerator: Accelerator,
) -> tuple[dict[str, FeatureSet], int]:
    """Frozen features of the named splits, and how many undecodable images they had.

    Those rows are dropped from the features and from `splits` too, so that both stay row-aligned.
    """
    features, skipped = {}, 0
    for name in names:
        extracted = extract_features(
            feature_model,
            getattr(splits, name),
            processor,
            splits.image_column,
            splits.label_column,
            eval_args.batch_size,
            eval_args.num_workers,
            accelerator,
            description=f"{name} features",
        )
        kept = decoded_rows(extracted.labels)
        skipped += int((~kept).sum())
        if not kept.all():
            setattr(splits, name, getattr(splits, name).select(kept.nonzero().flatten().tolist()))
            extracted = FeatureSet(
                extracted.features[kept],
                None if extracted.logits is None else extracted.logits[kept],
                extracted.labels[kept],
            )
        features[name] = extracted
    return features, skipped


def _run_knn(features: dict[str, FeatureSet], splits: LabelledSplits, knn_args: KnnArguments) -> dict[str, float]:
    """kNN accuracies for every k in knn_args."""
    train, test = features["train"], features["test"]
    return knn_evaluate(
        train.features,
        train.labels,
        test.features,
        test.labels,
        splits.num_classes,
        knn_args.knn_k,
        knn_args.knn_temperature,
        knn_args.knn_chunk_size,
    )


def _run_linear(
    eval_args: EvalArguments,
    linear_args: LinearArguments,
    recipe: LinearProbeRecipe,
    features: dict[str, FeatureSet],
    feature_model: FeatureModel,
    processor,
    splits: LabelledSplits,
    accelerator: Accelerator,
) -> dict[str, float]:
    """The fast feature-cache probe or the authors' image probe, as linear_args.linear_mode says; both on the
    backbone's linear-probe features (a ViT's last 4 CLS tokens). Includes `skipped_images` of its passes."""
    if linear_args.linear_mode == "paper":
        logger.info(
            "Linear probe: %s; global batch %d, %d epochs.", recipe.rule, recipe.global_batch_size, recipe.epochs
        )
        return linear_probe_on_images(feature_model, splits, processor, recipe, eval_args.num_workers, accelerator)
    skipped = 0
    if recipe.cls_blocks > 1:
        probe_model = feature_model.with_cls_blocks(recipe.cls_blocks)
        features, skipped = _extract_splits(eval_args, ("train", "test"), probe_model, processor, splits, accelerator)
    train, test = features["train"], features["test"]
    device = accelerator.device
    return linear_probe_on_features(
        train.features.to(device),
        train.labels.to(device),
        test.features.to(device),
        test.labels.to(device),
        splits.num_classes,
        linear_args.linear_lrs,
        linear_args.linear_epochs,
        linear_args.linear_batch_size or FAST_LINEAR_BATCH,
        linear_args.linear_val_fraction,
        eval_args.seed,
    ) | {"linear_feature_size": train.features.shape[1], "skipped_images": skipped}


def _run_semi(
    eval_args: EvalArguments,
    semi_args: SemiArguments,
    processor,
    splits: LabelledSplits,
    accelerator: Accelerator,
) -> tuple[dict[str, float], int]:
    """Fine-tune once per label subset (each image list, else each fraction): last and best top-1, top-5, the
    lrs and batch used; and the most undecodable images one fine-tune met."""
    metrics: dict[str, float] = {}
    skipped = 0
    for name, indices in _label_subsets(eval_args, semi_args, splits).items():
        default_epochs, default_backbone_lr = semi_recipe(len(indices) / len(splits.train))
        epochs = semi_args.semi_epochs or default_epochs
        backbone_lr = semi_args.semi_backbone_lr or default_backbone_lr
        logger.info(
            "Semi-supervised %s (%d images): %d epochs, global batch %d, backbone lr %g, head lr %g (unscaled).",
            name,
            len(indices),
            epochs,
            semi_args.semi_batch_size,
            backbone_lr,
            semi_args.semi_head_lr,
        )
        torch.manual_seed(eval_args.seed)
        result = semi_supervised_finetune(
            eval_args.model,
            splits,
            processor,
            indices,
            epochs,
            backbone_lr,
            semi_args.semi_head_lr,
            semi_args.semi_batch_size,
            eval_args.num_workers,
            accelerator,
        )
        skipped = max(skipped, result.pop("skipped_images"))
        metrics |= {f"semi_{name}_{key}": value for key, value in result.items()}
    return metrics, skipped


def _label_subsets(eval_args: EvalArguments, semi_args: SemiArguments, splits: LabelledSplits) -> dict[str, np.ndarray]:
    """Training-row indices per subset named `{pct}pct`: one per image list in semi_subset_files (after the
    share of train it holds, 2 digits), else one class-balanced seeded subset per fraction."""
    if not semi_args.semi_subset_files:
        labels = np.asarray(splits.train[splits.label_column])
        return {
            f"{fraction * 100:g}pct": class_balanced_subset(labels, fraction, eval_args.seed)
            for fraction in semi_args.semi_label_fractions
        }
    subsets = [
        subset_from_file(splits.train, path, splits.image_column, semi_args.semi_id_column)
        for path in semi_args.semi_subset_files
    ]
    named = {f"{100 * len(indices) / len(splits.train):.2g}pct": indices for indices in subsets}
    if len(named) < len(subsets):
        raise ValueError(
            f"Two of --semi_subset_files {semi_args.semi_subset_files} hold the same share of the training "
            "split; list each subset once."
        )
    return named


def semi_recipe(label_fraction: float) -> tuple[int, float]:
    """(epochs, backbone lr) of the paper's recipe for the standard fraction nearest on a log scale."""
    nearest = min(SEMI_RECIPES, key=lambda f: abs(math.log(f) - math.log(label_fraction)))
    return SEMI_RECIPES[nearest]


def _write_outputs(
    eval_args: EvalArguments,
    cluster_args: ClusterArguments,
    metrics: dict[str, float],
    features: dict[str, FeatureSet],
    splits: LabelledSplits,
    output_dir: Path,
) -> None:
    """eval_results.json, the model card's model-index, and the figures."""
    save_eval_results(metrics, output_dir)
    if eval_args.update_model_card and os.path.isdir(eval_args.model):
        update_model_card(eval_args.model, metrics, _card_dataset_id(eval_args))
    if eval_args.figures and "cluster_acc" in metrics:
        cluster_figures(
            features["test"],
            lambda chosen: [decode_image(value) for value in splits.test.select(chosen)[splits.image_column]],
            splits.class_names,
            cluster_args.cluster_figure_images,
            eval_args.seed,
            output_dir,
        )
    if eval_args.training_log is not None:
        plot_training_curves(eval_args.training_log, output_dir / "training_curves.png")


def _card_dataset_id(eval_args: EvalArguments) -> str:
    """The evaluation dataset as the model card names it: --dataset_name, a Hub id, or the folder's name."""
    if eval_args.dataset_name is not None:
        return eval_args.dataset_name
    if os.path.isdir(eval_args.dataset):
        return Path(eval_args.dataset).resolve().name
    return HUB_DATASET_IDS.get(eval_args.dataset, eval_args.dataset)


def cluster_figures(
    test: FeatureSet,
    images: Callable[[np.ndarray], Sequence],
    class_names: Sequence[str],
    count: int,
    seed: int,
    output_dir: Path,
) -> list[Path]:
    """top3_predictions.png on a seeded sample of `count` test images (`images(indices)` gives them) and the
    Hungarian-matched confusion_matrix.png of the head."""
    clusters = test.logits.argmax(dim=1).numpy()
    labels = test.labels.numpy()
    cluster_to_label = hungarian_match(clusters, labels, test.logits.shape[1], len(class_names))
    chosen = np.sort(np.random.default_rng(seed).choice(len(labels), size=min(count, len(labels)), replace=False))
    probabilities = matched_class_probabilities(test.logits[chosen].softmax(dim=1), cluster_to_label)
    # With more clusters than classes much of the mass sits in unmatched ones: show the distribution over the classes.
    probabilities = probabilities / probabilities.sum(dim=1, keepdim=True)
    top3 = plot_top3_predictions(
        images(chosen), probabilities, labels[chosen].tolist(), class_names, output_dir / "top3_predictions.png"
    )
    predictions = matched_predictions(clusters, cluster_to_label)
    confusion = plot_confusion_matrix(labels, predictions, class_names, output_dir / "confusion_matrix.png")
    return [top3, confusion]


def _default_output_dir(model: str) -> str:
    """The model folder itself, or eval_outputs/<hub id with / as __> for a Hub model."""
    return model if os.path.isdir(model) else os.path.join("eval_outputs", model.replace("/", "__"))
