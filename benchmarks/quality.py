"""Quality per budget on Fashion-MNIST: weighted kNN top-1 (k=20, T=0.07, the training monitor's settings) of
the default pretraining run against raw pixels, mean-centred pixels and random-init features, all scored by the
same kNN code in the same script, plus the run's images/s and wall time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from twist_hf import TwistConfig, TwistModel
from twist_hf.data import fashion_mnist_arrays
from twist_hf.evaluation import image_features, knn_evaluate

REPO = Path(__file__).resolve().parent.parent
KNN_K, KNN_TEMPERATURE, NUM_CLASSES = 20, 0.07, 10


def knn_top1(bank: torch.Tensor, bank_labels: np.ndarray, queries: torch.Tensor, query_labels: np.ndarray) -> float:
    metrics = knn_evaluate(
        bank.float(),
        torch.tensor(bank_labels),
        queries.float(),
        torch.tensor(query_labels),
        NUM_CLASSES,
        ks=(KNN_K,),
        temperature=KNN_TEMPERATURE,
    )
    return metrics["knn_top1"]


def pixel_features(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)


def baselines(max_train: int | None, max_test: int | None) -> dict[str, float]:
    """kNN top-1 of raw pixels, mean-centred pixels and a random-init fmnist-resnet's features."""
    train_images, train_labels = fashion_mnist_arrays("train")
    test_images, test_labels = fashion_mnist_arrays("test")
    train_images, train_labels = train_images[:max_train], train_labels[:max_train]
    test_images, test_labels = test_images[:max_test], test_labels[:max_test]
    bank, queries = pixel_features(train_images), pixel_features(test_images)
    mean = bank.mean(dim=0, keepdim=True)
    torch.manual_seed(0)
    random_model = TwistModel(TwistConfig.from_preset("fmnist-resnet")).eval()
    return {
        "raw_pixels": knn_top1(bank, train_labels, queries, test_labels),
        "mean_centred_pixels": knn_top1(bank - mean, train_labels, queries - mean, test_labels),
        "random_init_fmnist_resnet": knn_top1(
            image_features(random_model, train_images, train_labels).features,
            train_labels,
            image_features(random_model, test_images, test_labels).features,
            test_labels,
        ),
    }


def default_run(output_dir: Path, extra_arguments: list[str], timeout_s: float) -> dict:
    """`python recipes/pretrain.py` (the default recipe) and its all_results.json, with the wall time."""
    command = [
        sys.executable,
        str(REPO / "recipes" / "pretrain.py"),
        "--output_dir",
        str(output_dir),
        "--overwrite_output_dir",
        "--report_to",
        "none",
        *extra_arguments,
    ]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
    wall_s = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"The default run failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    results = json.loads((output_dir / "all_results.json").read_text())
    return {
        "command": " ".join(command[1:]),
        "wall_s": wall_s,
        "knn_top1": results["knn_top1"],
        "train_images_per_second": results["train_images_per_second"],
        "train_runtime_s": results["train_runtime"],
    }


def run(
    output_dir: Path,
    with_training: bool,
    max_train: int | None = None,
    max_test: int | None = None,
    extra_arguments: tuple[str, ...] = (),
    timeout_s: float = 1800,
) -> dict:
    results = {
        "knn": f"weighted cosine kNN, k={KNN_K}, T={KNN_TEMPERATURE}",
        "train_samples": max_train or 60000,
        "test_samples": max_test or 10000,
        "baselines_knn_top1": baselines(max_train, max_test),
    }
    if with_training:
        run_results = default_run(output_dir, list(extra_arguments), timeout_s)
        results["default_run"] = run_results
        results["gain_over_best_baseline"] = run_results["knn_top1"] - max(results["baselines_knn_top1"].values())
    return results
