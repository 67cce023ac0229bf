"""benchmarks/fmnist_eval.py: pixel features and k-means by hand, the results page, and a --quick run end to end."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from twist_hf import TwistConfig, TwistModel
from twist_hf.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from twist_hf.evaluation import FeatureSet, cluster_metrics, linear_probe_on_features

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "fmnist_eval.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("fmnist_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fmnist_eval"] = module
    spec.loader.exec_module(module)
    return module


fmnist_eval = _load_script()


def test_pixel_features_are_flattened_normalised_pixels():
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    features = fmnist_eval.pixel_features(images, torch.tensor([3])).features
    expected = (torch.tensor([[0.0, 1.0, 0.2, 0.4]]) - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    torch.testing.assert_close(features, expected)


def test_kmeans_on_separated_blobs_scores_perfectly():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 10
    labels = torch.arange(3).repeat_interleave(20)
    points = centres[labels] + 0.1 * torch.randn(60, 3, generator=generator)
    blobs = FeatureSet(points, None, labels)
    logits = fmnist_eval.kmeans_cluster_logits(blobs, blobs, 3, fmnist_eval.QUICK)
    metrics = cluster_metrics(logits, labels, 3)
    assert metrics["cluster_acc"] == 1.0
    assert metrics["cluster_nmi"] == pytest.approx(1.0)
    assert logits.argmax(dim=1).tolist() == logits.softmax(dim=1).argmax(dim=1).tolist()


def test_linear_probe_on_one_labelled_image_per_class():
    """1% of a quick subset is a single image per class: the held-out split cannot be stratified."""
    features = torch.eye(10).repeat(2, 1)
    labels = torch.arange(10).repeat(2)
    metrics = linear_probe_on_features(features, labels, torch.eye(10), torch.arange(10), 10, epochs=30)
    assert metrics["linear_top1"] >= 0.9


def test_results_page_lists_every_protocol_and_column(tmp_path):
    metrics = {key: 0.5 for _, key, _ in fmnist_eval.TABLE_ROWS}
    results = {
        "date": "2026-01-01T00:00:00",
        "model": "/models/twist",
        "command": "python benchmarks/fmnist_eval.py --model /models/twist",
        "hardware": "2 CPU cores",
        "train_images": 60000,
        "test_images": 10000,
        "num_head_classes": 256,
        "settings": fmnist_eval.FULL.__dict__,
        "metrics": {"twist": metrics, "random": metrics, "pixels": {"knn_k20_top1": 0.25}},
        "wall_time_s": {column: {"knn": 1.25} for column in fmnist_eval.COLUMNS},
        "cpu_time_s": {column: {"knn": 2.0} for column in fmnist_eval.COLUMNS},
        "total_wall_time_s": 90.0,
    }
    page = fmnist_eval.results_markdown(results, [tmp_path / "top3_predictions.png"])
    assert "| protocol | metric | TWIST (trained) | random init | raw pixels |" in page
    assert "| kNN k=20, T=0.07 | top-1 | 50.0 | 50.0 | 25.0 |" in page
    assert "| unsupervised classification | ACC (Hungarian) | 50.0 | 50.0 | n/a |" in page
    assert "| knn | 1.2 (2) | 1.2 (2) | 1.2 (2) |" in page
    assert "![Top-3 predictions" in page and "(top3_predictions.png)" in page
    assert "1.5 min" in page and "`/models/twist`" in page


def test_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        fmnist_eval.main(["--model", str(tmp_path), "--output", str(tmp_path / "out"), "--quick"])


@pytest.mark.slow
def test_quick_run_writes_results_and_figures(tmp_path):
    model_dir, output = tmp_path / "model", tmp_path / "docs"
    torch.manual_seed(1)
    TwistModel(TwistConfig.from_preset("tiny-resnet")).save_pretrained(model_dir)
    log = [{"step": 10, "loss": 1.5, "lr": 0.1}, {"step": 20, "loss": 1.2, "lr": 0.05, "knn_top1": 0.4}]
    (model_dir / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log))
    command = [sys.executable, str(SCRIPT), "--model", str(model_dir), "--output", str(output), "--quick"]
    finished = subprocess.run(
        [*command, "--threads", "1"], check=False, cwd=REPO, capture_output=True, text=True, timeout=400
    )
    assert finished.returncode == 0, finished.stderr[-3000:]

    results = json.loads((output / "fmnist_results.json").read_text())
    for column in fmnist_eval.COLUMNS:
        for _, key, _ in fmnist_eval.TABLE_ROWS:
            assert -1.0 <= results["metrics"][column][key] <= 1.0, (column, key)
        assert set(results["wall_time_s"][column]) == set(fmnist_eval.PARTS)
    # Raw pixels separate Fashion-MNIST classes far above chance even on the quick subset.
    assert results["metrics"]["pixels"]["knn_k20_top1"] > 0.6
    assert results["metrics"]["twist"] != results["metrics"]["random"]
    assert (results["train_images"], results["test_images"]) == (1000, 200)

    page = (output / "fmnist_results.md").read_text()
    assert page.count("\n| ") == 1 + len(fmnist_eval.TABLE_ROWS) + 1 + len(fmnist_eval.PARTS)
    for figure in ("top3_predictions.png", "confusion_matrix.png", "training_curves.png"):
        assert f"({figure})" in page
    assert PIL.Image.open(output / "top3_predictions.png").size == (2000, 800)
    assert PIL.Image.open(output / "confusion_matrix.png").size == (800, 800)
    assert PIL.Image.open(output / "training_curves.png").size == (1500, 400)
    assert np.asarray(PIL.Image.open(output / "top3_predictions.png").convert("L")).std() > 10
