"""Fashion-MNIST numbers of a trained TWIST model against raw pixels and a random-init network, in one run.

Every column goes through the project's own protocols (twist_hf.evaluation): weighted kNN, the fast linear
probe, 1% / 10% semi-supervised fine-tuning and unsupervised classification (NMI / AMI / ARI / ACC), on the
full train / test splits held in memory. Writes fmnist_results.md / .json and the figures to --output.

    python benchmarks/fmnist_eval.py --model <trained TWIST folder> [--output docs/] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from sklearn.cluster import KMeans
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoConfig

from twist_hf import TwistModel
from twist_hf.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_arrays
from twist_hf.evaluation import (
    FeatureSet,
    class_balanced_subset,
    cluster_figures,
    cluster_metrics,
    image_features,
    knn_evaluate,
    linear_probe_on_features,
    load_classifier,
    load_feature_model,
    plot_training_curves,
    semi_recipe,
)
from twist_hf.evaluation.finetune import finetune_classifier
from twist_hf.transforms import BatchedMultiCrop, batched_eval_transform

logger = logging.getLogger("fmnist_eval")

COLUMNS = {"twist": "TWIST (trained)", "random": "random init", "pixels": "raw pixels"}
LABEL_FRACTIONS = {"1pct": 0.01, "10pct": 0.1}
SEMI_HEAD_LR = 0.2
SEMI_BATCH_SIZE = 256
# Fine-tuning augmentation: random crop (the fmnist recipe's global-crop scale) + horizontal flip only.
FINETUNE_CROP_SCALE = (0.35, 1.0)
EXTRACTION_BATCH_SIZE = 512
# (section, metric key, row label) of the results table, top to bottom.
TABLE_ROWS = (
    ("kNN k=20, T=0.07", "knn_k20_top1", "top-1"),
    ("kNN k=200, T=0.07", "knn_k200_top1", "top-1"),
    ("linear probe (frozen)", "linear_top1", "top-1"),
    ("linear probe (frozen)", "linear_top5", "top-5"),
    ("semi-supervised, 1% labels", "semi_1pct_top1", "top-1"),
    ("semi-supervised, 10% labels", "semi_10pct_top1", "top-1"),
    ("unsupervised classification", "cluster_nmi", "NMI"),
    ("unsupervised classification", "cluster_ami", "AMI"),
    ("unsupervised classification", "cluster_ari", "ARI"),
    ("unsupervised classification", "cluster_acc", "ACC (Hungarian)"),
)
PARTS = ("features", "knn", "linear", "semi_1pct", "semi_10pct", "cluster")


@dataclass(frozen=True)
class BenchmarkSettings:
    """Data sizes and training lengths: the full protocol, or a quick smoke-test version of it."""

    max_train_samples: int | None
    max_test_samples: int | None
    linear_epochs: int
    semi_epochs: int | None
    kmeans_restarts: int
    figure_images: int = 16
    seed: int = 0


FULL = BenchmarkSettings(
    max_train_samples=None, max_test_samples=None, linear_epochs=100, semi_epochs=None, kmeans_restarts=3
)
QUICK = BenchmarkSettings(
    max_train_samples=1000, max_test_samples=200, linear_epochs=3, semi_epochs=1, kmeans_restarts=1
)


@dataclass
class FmnistData:
    """Fashion-MNIST in memory: uint8 images (N, 28, 28) and int64 labels (N,) per split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_fmnist(settings: BenchmarkSettings) -> FmnistData:
    """Both splits from the IDX files, cut to the first max_*_samples rows when the settings say so."""
    train_images, train_labels = fashion_mnist_arrays("train")
    test_images, test_labels = fashion_mnist_arrays("test")
    train_rows, test_rows = slice(settings.max_train_samples), slice(settings.max_test_samples)
    return FmnistData(
        torch.tensor(train_images[train_rows]),
        torch.tensor(train_labels[train_rows]),
        torch.tensor(test_images[test_rows]),
        torch.tensor(test_labels[test_rows]),
        list(FASHION_MNIST_CLASSES),
    )


class PartTimer:
    """Wall and process CPU seconds of each named part of each column (CPU time shows how shared the
    machine was: on an idle one, wall ~ CPU / threads)."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {column: {} for column in COLUMNS}
        self.cpu_seconds: dict[str, dict[str, float]] = {column: {} for column in COLUMNS}

    @contextmanager
    def part(self, column: str, part: str) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        logger.info("%s: %s ...", COLUMNS[column], part)
        yield
        self.seconds[column][part] = time.perf_counter() - start
        self.cpu_seconds[column][part] = time.process_time() - cpu_start
        logger.info(
            "%s: %s done in %.1f s (%.1f CPU s)",
            COLUMNS[column],
            part,
            self.seconds[column][part],
            self.cpu_seconds[column][part],
        )


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------


def network_pixels(images: torch.Tensor, config) -> torch.Tensor:
    """The network's evaluation input for uint8 images: resized to its image_size, normalised, 3 channels."""
    return batched_eval_transform(images, config.image_size, config.image_mean, config.image_std)


def pixel_features(images: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
    """Flattened pixels normalised with the Fashion-MNIST mean and std: (N, H x W), no logits."""
    pixels = batched_eval_transform(images, images.shape[-1], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    return FeatureSet(pixels[:, 0].flatten(1).contiguous(), None, labels)


# ------------------------------------------------------------------------------------------------
# Protocols
# ------------------------------------------------------------------------------------------------


def knn_metrics(train: FeatureSet, test: FeatureSet, num_classes: int) -> dict[str, float]:
    """Weighted cosine kNN (k = 20 and 200, T = 0.07) of the test features against the train features."""
    return knn_evaluate(train.features, train.labels, test.features, test.labels, num_classes)


def linear_metrics(
    train: FeatureSet, test: FeatureSet, num_classes: int, settings: BenchmarkSettings
) -> dict[str, float]:
    """The fast linear probe (several lrs at once, best on a held-out 10% of train) scored on test."""
    return linear_probe_on_features(
        train.features,
        train.labels,
        test.features,
        test.labels,
        num_classes,
        epochs=settings.linear_epochs,
        seed=settings.seed,
    )


def label_subsets(labels: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    """Seeded class-balanced training-row indices for each label fraction (1% and 10%)."""
    return {name: class_balanced_subset(labels.numpy(), fraction, seed) for name, fraction in LABEL_FRACTIONS.items()}


def pixel_semi_metrics(
    train: FeatureSet, test: FeatureSet, indices: np.ndarray, num_classes: int, settings: BenchmarkSettings
) -> dict[str, float]:
    """Semi-supervised baseline on pixels: a linear classifier trained on the labelled rows only."""
    subset = torch.as_tensor(indices)
    metrics = linear_metrics(
        FeatureSet(train.features[subset], None, train.labels[subset]), test, num_classes, settings
    )
    return {"top1": metrics["linear_top1"], "top5": metrics["linear_top5"]}


class AugmentedBatches:
    """Collate (image, label) rows into a randomly cropped and flipped, normalised training batch."""

    def __init__(self, config, seed: int):
        self.augment = BatchedMultiCrop(
            mean=config.image_mean,
            std=config.image_std,
            global_size=config.image_size,
            global_scale=FINETUNE_CROP_SCALE,
            jitter_probability=0.0,
            grayscale_probability=0.0,
            solarize_probabilities=(0.0, 0.0, 0.0),
            seed=seed,
        )

    def __call__(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        images, labels = (torch.stack(column) for column in zip(*rows, strict=True))
        return {"pixel_values": self.augment(images)[0], "labels": labels}


class EvaluationBatches:
    """Collate (image, label) rows into a normalised evaluation batch for the network."""

    def __init__(self, config):
        self.config = config

    def __call__(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        images, labels = (torch.stack(column) for column in zip(*rows, strict=True))
        return {"pixel_values": network_pixels(images, self.config), "labels": labels}


def finetune_metrics(
    model_dir: str,
    data: FmnistData,
    indices: np.ndarray,
    label_fraction: float,
    settings: BenchmarkSettings,
    accelerator: Accelerator,
) -> dict[str, float]:
    """The semi-supervised recipe (docs/method.md §7.1) on in-memory images: backbone + classifier, top-1/5 on test.

    Epochs and backbone lr follow the paper's recipe for the fraction (20 epochs, 0.04 / 0.02), head lr 0.2,
    both per 256 images; augmentation is a batched random crop + flip.
    """
    recipe_epochs, backbone_lr = semi_recipe(label_fraction)
    torch.manual_seed(settings.seed)
    classifier = load_classifier(model_dir, data.class_names)
    subset = torch.as_tensor(indices)
    train_loader = DataLoader(
        TensorDataset(data.train_images[subset], data.train_labels[subset]),
        batch_size=SEMI_BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(settings.seed),
        collate_fn=AugmentedBatches(classifier.config, settings.seed),
    )
    test_loader = DataLoader(
        TensorDataset(data.test_images, data.test_labels),
        batch_size=EXTRACTION_BATCH_SIZE,
        collate_fn=EvaluationBatches(classifier.config),
    )
    epochs = settings.semi_epochs or recipe_epochs
    return finetune_classifier(classifier, train_loader, test_loader, epochs, backbone_lr, SEMI_HEAD_LR, accelerator)


def kmeans_cluster_logits(
    train: FeatureSet, test: FeatureSet, num_clusters: int, settings: BenchmarkSettings
) -> torch.Tensor:
    """K-means fitted on the train features; test logits = minus the distance to each centroid (N, K)."""
    kmeans = KMeans(n_clusters=num_clusters, n_init=settings.kmeans_restarts, random_state=settings.seed)
    kmeans.fit(train.features.numpy())
    return -torch.as_tensor(kmeans.transform(test.features.numpy()), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Columns
# ------------------------------------------------------------------------------------------------


def evaluate_network(
    column: str,
    model_dir: str,
    data: FmnistData,
    subsets: dict[str, np.ndarray],
    settings: BenchmarkSettings,
    timer: PartTimer,
    accelerator: Accelerator,
) -> tuple[dict[str, float], FeatureSet]:
    """Every protocol on one saved TWIST network; also returns its test FeatureSet (for the figures)."""
    feature_model, _ = load_feature_model(model_dir)
    if not feature_model.has_head:
        raise ValueError(
            f"{model_dir} has no trained TWIST head, so the clustering protocol cannot run; pass a folder "
            "saved by TWIST pretraining (recipes/pretrain.py)."
        )
    with timer.part(column, "features"):
        train, test = (
            image_features(feature_model, images, labels, with_logits=True, batch_size=EXTRACTION_BATCH_SIZE)
            for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels))
        )
    metrics = frozen_feature_metrics(column, train, test, data, settings, timer)
    with timer.part(column, "cluster"):
        metrics |= cluster_metrics(test.logits, test.labels, data.num_classes)
    metrics |= semi_supervised_metrics(
        column,
        subsets,
        timer,
        lambda indices, fraction: finetune_metrics(model_dir, data, indices, fraction, settings, accelerator),
    )
    return metrics, test


def evaluate_pixels(
    data: FmnistData, subsets: dict[str, np.ndarray], settings: BenchmarkSettings, timer: PartTimer
) -> dict[str, float]:
    """Every protocol on raw pixels: linear classifiers stand in for fine-tuning, k-means for the head."""
    with timer.part("pixels", "features"):
        train = pixel_features(data.train_images, data.train_labels)
        test = pixel_features(data.test_images, data.test_labels)
    metrics = frozen_feature_metrics("pixels", train, test, data, settings, timer)
    with timer.part("pixels", "cluster"):
        logits = kmeans_cluster_logits(train, test, data.num_classes, settings)
        metrics |= cluster_metrics(logits, test.labels, data.num_classes)
    metrics |= semi_supervised_metrics(
        "pixels",
        subsets,
        timer,
        lambda indices, _: pixel_semi_metrics(train, test, indices, data.num_classes, settings),
    )
    return metrics


def semi_supervised_metrics(
    column: str,
    subsets: dict[str, np.ndarray],
    timer: PartTimer,
    fine_tune: Callable[[np.ndarray, float], dict[str, float]],
) -> dict[str, float]:
    """semi_<subset>_top1/top5 of `fine_tune(indices, label_fraction)` on each labelled subset, each timed."""
    metrics = {}
    for name, indices in subsets.items():
        with timer.part(column, f"semi_{name}"):
            accuracy = fine_tune(indices, LABEL_FRACTIONS[name])
        metrics |= {f"semi_{name}_top1": accuracy["top1"], f"semi_{name}_top5": accuracy["top5"]}
    return metrics


def frozen_feature_metrics(
    column: str,
    train: FeatureSet,
    test: FeatureSet,
    data: FmnistData,
    settings: BenchmarkSettings,
    timer: PartTimer,
) -> dict[str, float]:
    """kNN and linear probe on one column's frozen features."""
    with timer.part(column, "knn"):
        metrics = knn_metrics(train, test, data.num_classes)
    with timer.part(column, "linear"):
        metrics |= linear_metrics(train, test, data.num_classes, settings)
    return metrics


def save_random_init_copy(model_dir: str, destination: Path, seed: int) -> str:
    """Save a seeded random-init TwistModel with model_dir's config, so it runs through the same code."""
    torch.manual_seed(seed)
    TwistModel(AutoConfig.from_pretrained(model_dir)).save_pretrained(destination)
    return str(destination)


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


def draw_figures(
    model_dir: str, test: FeatureSet, data: FmnistData, settings: BenchmarkSettings, output: Path
) -> list[Path]:
    """top3_predictions.png and confusion_matrix.png from the trained head (Hungarian-matched), and
    training_curves.png when the model folder has a log.jsonl."""
    figures = cluster_figures(
        test,
        lambda chosen: [PIL.Image.fromarray(data.test_images[i].numpy()) for i in chosen],
        data.class_names,
        settings.figure_images,
        settings.seed,
        output,
    )
    log = Path(model_dir) / "log.jsonl"
    if log.is_file():
        figures.append(plot_training_curves(log, output / "training_curves.png"))
    return figures


def results_markdown(results: dict, figures: list[Path]) -> str:
    """The results page: metric table (columns = models), per-part wall times, and the figures."""
    metrics, seconds, cpu = results["metrics"], results["wall_time_s"], results["cpu_time_s"]
    header = "| protocol | metric | " + " | ".join(COLUMNS.values()) + " |"
    lines = [
        "# Fashion-MNIST evaluation",
        "",
        (
            f"Model `{results['model']}`, measured {results['date']} in one run of `{results['command']}` "
            f"({results['total_wall_time_s'] / 60:.1f} min on {results['hardware']})."
        ),
        (
            f"Train / test images: {results['train_images']:,} / {results['test_images']:,}. "
            "All numbers are percentages on the test split."
        ),
        "",
        header,
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for section, key, row in TABLE_ROWS:
        cells = " | ".join(_percent(metrics[column].get(key)) for column in COLUMNS)
        lines.append(f"| {section} | {row} | {cells} |")
    lines += ["", *_protocol_notes(results), "", "Time per part, wall seconds (process CPU seconds):", ""]
    lines += ["| part | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for part in PARTS:
        cells = " | ".join(f"{seconds[c].get(part, 0.0):.1f} ({cpu[c].get(part, 0.0):.0f})" for c in COLUMNS)
        lines.append(f"| {part} | {cells} |")
    lines.append("")
    captions = {
        "top3_predictions.png": "Top-3 predictions of the trained TWIST head: probabilities of the "
        "Hungarian-matched clusters, renormalised over the 10 classes; title = ground truth, green when the "
        "top prediction is right",
        "confusion_matrix.png": "Confusion matrix of the trained head after Hungarian matching",
        "training_curves.png": "Pretraining curves from the model's log.jsonl",
    }
    for figure in figures:
        lines += [f"![{captions[figure.name]}]({figure.name})", "", f"*{captions[figure.name]}.*", ""]
    return "\n".join(lines)


def _protocol_notes(results: dict) -> list[str]:
    """How each column runs each protocol, so the table can be read without the code."""
    settings = results["settings"]
    return [
        (
            "- kNN: weighted cosine kNN on frozen features, votes exp(cos / 0.07). Linear probe: SGD on "
            f"standardised frozen features, {settings['linear_epochs']} epochs, 7 learning rates, best on a "
            "held-out 10% of train."
        ),
        (
            "- Semi-supervised (networks): fine-tune backbone + a new linear classifier on a seeded "
            "class-balanced 1% / 10% of the train labels, backbone lr 0.04 / 0.02, head lr 0.2 (per 256 "
            f"images), epochs: {settings['semi_epochs'] or 20}, SGD momentum 0.9, cosine, random crop + flip. "
            "Raw pixels: the linear probe trained on those labels only."
        ),
        (
            f"- Unsupervised classification: argmax of the TWIST head (K = {results['num_head_classes']}) as "
            "the class; raw pixels: k-means with 10 clusters fitted on train. ACC after Hungarian matching "
            "(samples in clusters left unmatched count as wrong)."
        ),
        f"- Random init: the same architecture and config, seeded (seed {settings['seed']}).",
    ]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def run_benchmark(model_dir: str, output: Path, settings: BenchmarkSettings, command: str) -> dict:
    """Evaluate the three columns, then write fmnist_results.{md,json} and the figures into `output`."""
    _check_model_dir(model_dir)
    start = time.perf_counter()
    data = load_fmnist(settings)
    timer, accelerator = PartTimer(), Accelerator()
    output.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, dict[str, float]] = {}
    subsets = label_subsets(data.train_labels, settings.seed)
    metrics["twist"], twist_test = evaluate_network("twist", model_dir, data, subsets, settings, timer, accelerator)
    with tempfile.TemporaryDirectory(prefix="fmnist-random-init-") as random_dir:
        random_model = save_random_init_copy(model_dir, Path(random_dir), settings.seed)
        metrics["random"], _ = evaluate_network("random", random_model, data, subsets, settings, timer, accelerator)
    metrics["pixels"] = evaluate_pixels(data, subsets, settings, timer)
    figures = draw_figures(model_dir, twist_test, data, settings, output)
    results = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": model_dir,
        "command": command,
        "hardware": _hardware(),
        "train_images": len(data.train_labels),
        "test_images": len(data.test_labels),
        "num_head_classes": int(twist_test.logits.shape[1]),
        "settings": settings.__dict__,
        "columns": COLUMNS,
        "metrics": metrics,
        "wall_time_s": timer.seconds,
        "cpu_time_s": timer.cpu_seconds,
        "total_wall_time_s": time.perf_counter() - start,
    }
    (output / "fmnist_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / "fmnist_results.md").write_text(results_markdown(results, figures))
    return results


def _hardware() -> str:
    """Where the run happened, for the results page: CPU cores and torch threads."""
    return f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"


def _check_model_dir(model_dir: str) -> None:
    """Refuse a --model that is not a saved TWIST folder, saying what is expected."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise SystemExit(
            f"--model {model_dir} is not a saved model folder (no config.json); pass the output_dir of "
            "recipes/pretrain.py."
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "twist":
        raise SystemExit(f"--model {model_dir} holds a {model_type!r} model; this benchmark needs a TWIST model.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Folder of a trained TWIST model (pretrain output_dir).")
    parser.add_argument("--output", default="docs", help="Folder for the results and figures (default: docs).")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"Smoke test: {QUICK.max_train_samples} train / {QUICK.max_test_samples} test images, short training.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice); 1 is faster on a heavily shared machine.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/fmnist_eval.py --model {} --output {}{}".format(
        args.model, args.output, " --quick" if args.quick else ""
    )
    results = run_benchmark(args.model, Path(args.output), settings, command)
    print((Path(args.output) / "fmnist_results.md").read_text())
    logger.info("total wall time %.1f s", results["total_wall_time_s"])


if __name__ == "__main__":
    main()
