"""Evaluation protocols end to end on tiny models and a tiny real Fashion-MNIST subset."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from twist_hf import TwistConfig, TwistForImageClassification, TwistModel
from twist_hf.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from twist_hf.evaluation import (
    ClusterArguments,
    EvalArguments,
    KnnArguments,
    LinearArguments,
    SemiArguments,
    extract_features,
    labelled_splits_from,
    linear_probe_on_images,
    load_feature_model,
    run_evaluation,
    semi_supervised_finetune,
    subset_from_file,
)
from twist_hf.evaluation.finetune import backbone_and_head_groups, linear_probe_recipe

REPO = Path(__file__).resolve().parents[1]
TRAIN_ROWS, TEST_ROWS = 120, 40
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and 2-thread spin-waits crawl on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fashion_test_split():
    """The real Fashion-MNIST test split (10k images); small subsets of it serve as train and test."""
    return load_fashion_mnist("test")


@pytest.fixture(scope="module")
def splits(fashion_test_split):
    return labelled_splits_from(
        fashion_test_split.select(range(TRAIN_ROWS)), fashion_test_split.select(range(1000, 1000 + TEST_ROWS))
    )


@pytest.fixture(scope="module")
def two_class_splits(fashion_test_split):
    """32 trousers and sneakers, used as both train and test: a fine-tune must fit them."""
    labels = np.asarray(fashion_test_split["label"])
    rows = np.flatnonzero((labels == 1) | (labels == 7))[:32]
    return labelled_splits_from(fashion_test_split.select(rows), fashion_test_split.select(rows))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, fashion_test_split):
    """An imagefolder tree (split/class/file.png) of real Fashion-MNIST images."""
    root = tmp_path_factory.mktemp("fmnist_folder")
    for split, rows in (("train", range(TRAIN_ROWS)), ("test", range(1000, 1000 + TEST_ROWS))):
        for row in rows:
            example = fashion_test_split[row]
            folder = root / split / FASHION_MNIST_CLASSES[example["label"]].replace("/", "_")
            folder.mkdir(parents=True, exist_ok=True)
            example["image"].save(folder / f"{split}_{row:05d}.png")
    return root


def save_tiny_twist(folder: Path, **overrides) -> Path:
    torch.manual_seed(0)
    TwistModel(TwistConfig.from_preset("tiny-resnet", **overrides)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def twist_dir(tmp_path_factory):
    """A tiny TWIST model (K = 16 head classes, 16 px input) with its image processor."""
    return save_tiny_twist(tmp_path_factory.mktemp("tiny_twist"))


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    """A tiny plain Hugging Face ResNet (no TWIST head) with an image processor."""
    folder = tmp_path_factory.mktemp("tiny_resnet")
    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def quick_args(model: Path, dataset: Path, protocol: str, output_dir: Path, **overrides) -> EvalArguments:
    return EvalArguments(
        model=str(model),
        dataset=str(dataset),
        protocol=protocol,
        output_dir=str(output_dir),
        batch_size=32,
        num_workers=0,
        update_model_card=False,
        **overrides,
    )


def test_features_come_back_in_dataset_order_whatever_the_batch_size(twist_dir, splits):
    model, processor = load_feature_model(str(twist_dir))
    small = extract_features(model, splits.test, processor, batch_size=7)
    large = extract_features(model, splits.test, processor, batch_size=64)
    assert small.features.shape == (TEST_ROWS, 16) and small.logits.shape == (TEST_ROWS, 16)
    assert small.labels.tolist() == splits.test["label"]
    torch.testing.assert_close(small.features, large.features)
    torch.testing.assert_close(small.logits, large.logits)


def test_a_plain_hf_backbone_gives_pooled_features_and_no_head_logits(resnet_dir, splits):
    model, processor = load_feature_model(str(resnet_dir))
    result = extract_features(model, splits.test.select(range(5)), processor)
    assert result.features.shape == (5, 16) and result.logits is None


def test_an_untrained_pooler_is_replaced_by_the_cls_token(tmp_path, splits):
    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.update({"image_size": 16, "patch_size": 8, "num_labels": 3})
    ViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    model, processor = load_feature_model(str(tmp_path))
    assert not model.use_pooler
    pixels = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        features, logits = model(pixels)
        expected = model.model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(features, expected)
    assert logits is None


def test_knn_and_fast_linear_protocols_end_to_end(twist_dir, image_folder, tmp_path):
    args = quick_args(twist_dir, image_folder, "knn", tmp_path)
    metrics = run_evaluation(args, KnnArguments(knn_k=[5, 20]))
    assert set(metrics) == {f"knn_k{k}_top{n}" for k in (5, 20) for n in (1, 5)} | {"knn_top1", "knn_top5"}
    assert 0.1 < metrics["knn_top1"] <= 1.0  # random tiny features still beat the 10-class chance level
    args.protocol = "linear"
    linear = run_evaluation(args, linear_args=LinearArguments(linear_epochs=5, linear_batch_size=32))
    assert 0.0 <= linear["linear_top1"] <= linear["linear_top5"] <= 1.0
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["eval_knn_k5_top1"] == metrics["knn_k5_top1"] and "eval_linear_best_lr" in saved


def test_paper_linear_probe_on_images_fits_two_easy_classes(twist_dir, two_class_splits):
    model, processor = load_feature_model(str(twist_dir))
    torch.manual_seed(0)
    recipe = linear_probe_recipe(model, epochs=40, global_batch_size=64, base_lr=0.5)
    metrics = linear_probe_on_images(model, two_class_splits, processor, recipe)
    assert metrics["linear_top1"] > 0.8 and metrics["linear_best_top1"] >= metrics["linear_top1"]


def test_semi_supervised_fine_tuning_fits_two_easy_classes(twist_dir, two_class_splits):
    _, processor = load_feature_model(str(twist_dir))
    torch.manual_seed(0)
    metrics = semi_supervised_finetune(
        str(twist_dir),
        two_class_splits,
        processor,
        np.arange(32),
        epochs=10,
        backbone_lr=0.0625,
        head_lr=0.5,
        global_batch_size=32,
    )
    assert metrics["top1"] > 0.85 and metrics["best_top1"] >= metrics["top1"]


def test_backbone_and_classifier_get_their_own_learning_rates(twist_dir):
    classifier = AutoModelForImageClassification.from_pretrained(twist_dir, num_labels=10)
    assert isinstance(classifier, TwistForImageClassification)
    backbone, head = backbone_and_head_groups(classifier, backbone_lr=0.04, head_lr=0.2)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in classifier.twist.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in classifier.classifier.parameters()}
    assert (backbone["lr"], head["lr"]) == (0.04, 0.2)


def test_semi_protocol_runs_one_fine_tune_per_label_fraction(twist_dir, image_folder, tmp_path):
    args = quick_args(twist_dir, image_folder, "semi", tmp_path)
    metrics = run_evaluation(args, semi_args=SemiArguments(semi_label_fractions=[0.1, 0.5], semi_epochs=1))
    accuracies = {f"semi_{pct}pct_{key}" for pct in (10, 50) for key in ("top1", "top5", "best_top1")}
    assert accuracies <= set(metrics) and all(0.0 <= metrics[key] <= 1.0 for key in accuracies)


def test_a_subset_file_selects_images_by_file_name(image_folder, tmp_path):
    train = labelled_splits_from(*(_imagefolder_split(image_folder, s) for s in ("train", "test"))).train
    (tmp_path / "subset.txt").write_text("train_00003.png\nsome/dir/train_00007.png\n\n")
    rows = subset_from_file(train, str(tmp_path / "subset.txt"), "image")
    paths = [Path(p["path"]).name for p in train.cast_column("image", _undecoded())["image"]]
    assert sorted(paths[i] for i in rows) == ["train_00003.png", "train_00007.png"]
    (tmp_path / "bad.txt").write_text("train_00003.png\nmissing.png\n")
    with pytest.raises(ValueError, match="1 ids from .* are not in the training split"):
        subset_from_file(train, str(tmp_path / "bad.txt"), "image")


def _imagefolder_split(root: Path, split: str):
    from datasets import load_dataset

    return load_dataset("imagefolder", data_dir=str(root), split=split)


def _undecoded():
    from datasets import Image

    return Image(decode=False)


def test_cluster_protocol_scores_the_head_and_draws_its_figures(twist_dir, image_folder, tmp_path):
    args = quick_args(twist_dir, image_folder, "cluster", tmp_path)
    metrics = run_evaluation(args, cluster_args=ClusterArguments(cluster_figure_images=8))
    assert set(metrics) == {"cluster_nmi", "cluster_ami", "cluster_ari", "cluster_acc", "cluster_top5_acc"}
    assert 0.0 <= metrics["cluster_acc"] <= metrics["cluster_top5_acc"] <= 1.0
    from PIL import Image

    assert Image.open(tmp_path / "top3_predictions.png").size == (4 * 500, 2 * 200)
    assert Image.open(tmp_path / "confusion_matrix.png").size[0] >= 600


def test_cluster_protocol_needs_a_twist_head(resnet_dir, image_folder, tmp_path):
    with pytest.raises(ValueError, match="cluster protocol uses the TWIST head"):
        run_evaluation(quick_args(resnet_dir, image_folder, "cluster", tmp_path))


def test_a_twist_checkpoint_without_its_head_gives_features_but_no_logits(tmp_path, image_folder, splits):
    TwistModel(TwistConfig.from_preset("tiny-resnet"), add_head=False).save_pretrained(tmp_path / "backbone")
    model, processor = load_feature_model(str(tmp_path / "backbone"))
    result = extract_features(model, splits.test.select(range(3)), processor)
    assert result.features.shape == (3, 16) and result.logits is None
    with pytest.raises(ValueError, match="without a trained one"):
        run_evaluation(quick_args(tmp_path / "backbone", image_folder, "cluster", tmp_path))


def test_cluster_protocol_needs_at_least_as_many_head_classes_as_labels(image_folder, tmp_path):
    small_head = save_tiny_twist(tmp_path / "k4", num_classes=4)
    with pytest.raises(ValueError, match="K=4 classes but the dataset has 10 labels"):
        run_evaluation(quick_args(small_head, image_folder, "cluster", tmp_path))


def test_labelled_protocols_reject_a_dataset_without_labels(splits):
    with pytest.raises(ValueError, match="no label column 'label'.*need labels"):
        labelled_splits_from(splits.train.remove_columns("label"), splits.test)


def test_string_labels_get_one_shared_numbering(splits):
    names = FASHION_MNIST_CLASSES
    as_text = [
        s.cast_column("label", _string()).map(lambda r: {"label": names[int(r["label"])]})
        for s in (splits.train, splits.test)
    ]
    relabelled = labelled_splits_from(*as_text)
    assert relabelled.class_names == sorted(set(relabelled.class_names))
    first = relabelled.train[0]["label"]
    assert relabelled.class_names[first] == names[splits.train[0]["label"]]


def _string():
    from datasets import Value

    return Value("string")


def test_all_protocols_on_a_plain_backbone_skip_clustering(resnet_dir, image_folder, tmp_path):
    args = quick_args(resnet_dir, image_folder, "all", tmp_path)
    metrics = run_evaluation(
        args,
        KnnArguments(knn_k=[10]),
        LinearArguments(linear_epochs=2),
        SemiArguments(semi_label_fractions=[0.1], semi_epochs=1),
    )
    assert {"knn_top1", "linear_top1", "semi_10pct_top1"} <= set(metrics)
    assert not any(key.startswith("cluster") for key in metrics)


def test_command_line_with_yaml_config_writes_results_card_and_figures(twist_dir, image_folder, tmp_path):
    model = shutil.copytree(twist_dir, tmp_path / "model")
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1), "lr": 0.1}) + "\n" for s in range(5)))
    config = tmp_path / "eval.yaml"
    config.write_text(f"dataset: {image_folder}\nprotocol: knn\nbatch_size: 16\nnum_workers: 0\nknn_k: [3]\n")
    command = [sys.executable, str(REPO / "recipes" / "evaluate.py"), "--config", str(config)]
    command += ["--model", str(model), "--protocol", "cluster", "--training_log", str(log)]
    done = run_to_completion(command)
    printed = json.loads(done.stdout[done.stdout.index("{") :])
    assert set(printed) == {f"eval_cluster_{m}" for m in ("nmi", "ami", "ari", "acc", "top5_acc")}
    assert json.loads((model / "eval_results.json").read_text()) == printed
    card = (model / "README.md").read_text()
    assert "model-index" in card and "cluster_nmi" in card and "fmnist_folder" in card
    for figure in ("top3_predictions.png", "confusion_matrix.png", "training_curves.png"):
        assert (model / figure).stat().st_size > 0


DISTRIBUTED_SCRIPT = """
import sys, torch
from accelerate import PartialState
from twist_hf.data import load_fashion_mnist
from twist_hf.evaluation import extract_features, load_feature_model
model, processor = load_feature_model(sys.argv[1])
dataset = load_fashion_mnist("test").select(range(13))
result = extract_features(model, dataset, processor, batch_size=4, num_workers=0)
if PartialState().is_main_process:
    torch.save({"features": result.features, "logits": result.logits, "labels": result.labels}, sys.argv[2])
"""


def run_to_completion(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command in its own session; on timeout kill the whole group (workers included), then fail."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD_ENV,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{command} did not finish within {timeout} s")
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_extract_the_same_features_in_the_same_order(twist_dir, tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(textwrap.dedent(DISTRIBUTED_SCRIPT))
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    run_to_completion([*launcher, str(script), str(twist_dir), str(tmp_path / "two.pt")])
    model, processor = load_feature_model(str(twist_dir))
    one = extract_features(model, load_fashion_mnist("test").select(range(13)), processor, batch_size=4)
    two = torch.load(tmp_path / "two.pt")
    assert two["labels"].tolist() == one.labels.tolist() and len(one.labels) == 13
    torch.testing.assert_close(two["features"], one.features)
    torch.testing.assert_close(two["logits"], one.logits)
