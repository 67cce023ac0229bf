"""Evaluation outputs and configuration: figures, eval_results.json, model card, YAML + CLI arguments."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from twist_hf.evaluation import (
    EvalArguments,
    parse_evaluation_arguments,
    plot_confusion_matrix,
    plot_top3_predictions,
    plot_training_curves,
    read_training_log,
    save_eval_results,
    update_model_card,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "eval"
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]


def png_size(path: Path) -> tuple[int, int]:
    with PIL.Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_top3_figure_has_the_documented_pixel_size(tmp_path):
    images = [PIL.Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)) for i in range(6)]
    probabilities = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    path = plot_top3_predictions(images, probabilities, [0, 1, 2, 3, 4, 0], NAMES, tmp_path / "top3.png", columns=4)
    assert png_size(path) == (4 * 500, 2 * 200)


def test_top3_figure_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="as many images"):
        plot_top3_predictions([PIL.Image.new("L", (8, 8))], torch.rand(2, 5), [0, 1], NAMES, tmp_path / "x.png")


def test_confusion_matrix_adds_an_unmatched_column_when_needed(tmp_path):
    """7 classes: 0.5 x 7 + 3 = 6.5 inches; the unmatched column makes it 8 columns, 7 inches (at 100 dpi)."""
    names = [f"c{i}" for i in range(7)]
    labels = np.arange(14) % 7
    all_matched = plot_confusion_matrix(labels, labels, names, tmp_path / "matched.png")
    assert png_size(all_matched) == (650, 650)
    some_unmatched = plot_confusion_matrix(labels, np.where(labels == 6, -1, labels), names, tmp_path / "cm.png")
    assert png_size(some_unmatched) == (700, 700)
    small = plot_confusion_matrix(np.arange(4), np.arange(4), NAMES[:4], tmp_path / "small.png")
    assert png_size(small) == (600, 600)  # never under 6 inches


def write_log(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_training_curves_draw_one_panel_per_group_that_has_data(tmp_path):
    records = [
        {"step": s, "loss": 3 - s / 10, "kl_loss": 0.1, "eh_loss": 1.0, "he_loss": 2.0, "lr": 0.01 * s}
        for s in range(20)
    ]
    records[9]["knn_top1"] = 0.5
    path = plot_training_curves(write_log(tmp_path / "log.jsonl", records), tmp_path / "curves.png")
    assert png_size(path) == (3 * 500, 400)
    without_knn = write_log(tmp_path / "log2.jsonl", [{"step": 0, "loss": 1.0, "lr": 0.1}])
    assert png_size(plot_training_curves(without_knn, tmp_path / "curves2.png")) == (2 * 500, 400)


def test_training_log_errors_name_the_problem(tmp_path):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"step": 0, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_training_log(bad_line)
    with pytest.raises(ValueError, match="no plottable keys"):
        plot_training_curves(write_log(tmp_path / "x.jsonl", [{"step": 0, "epoch": 1}]), tmp_path / "x.png")


def test_eval_results_json_uses_eval_prefix_and_keeps_earlier_protocols(tmp_path):
    save_eval_results({"knn_top1": 0.5}, tmp_path)
    path = save_eval_results({"linear_top1": 0.75, "knn_top1": 0.625}, tmp_path)
    assert json.loads(path.read_text()) == {"eval_knn_top1": 0.625, "eval_linear_top1": 0.75}


def test_model_card_gets_a_model_index_that_later_runs_update(tmp_path):
    update_model_card(tmp_path, {"knn_k20_top1": 0.5, "knn_top1": 0.5, "linear_best_lr": 0.1}, "my/dataset")
    update_model_card(tmp_path, {"knn_k20_top1": 0.75, "cluster_nmi": 0.25}, "my/dataset")
    card = ModelCard.load(tmp_path / "README.md")
    values = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert values == {"knn_k20_top1": 0.75, "cluster_nmi": 0.25}
    assert {result.dataset_type for result in card.data.eval_results} == {"my/dataset"}
    assert card.data.to_dict()["model-index"][0]["name"] == tmp_path.name


def test_yaml_config_is_parsed_then_command_line_flags_override_it(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"dataset": "some/dataset", "protocol": "knn", "knn_k": [5, 10], "batch_size": 8}))
    eval_args, knn_args, linear_args, semi_args, _ = parse_evaluation_arguments(
        ["--config", str(config), "--model", "m", "--batch_size", "32", "--linear_lrs", "0.5", "1.5"]
    )
    assert (eval_args.model, eval_args.dataset, eval_args.protocol) == ("m", "some/dataset", "knn")
    assert eval_args.batch_size == 32 and knn_args.knn_k == [5, 10]
    assert linear_args.linear_lrs == [0.5, 1.5] and semi_args.semi_label_fractions == [0.01, 0.1]


def test_yaml_config_errors_name_the_problem(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("dataset: d\nknn_neighbours: 5\n")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) in .*eval.yaml: knn_neighbours"):
        parse_evaluation_arguments(["--config", str(config), "--model", "m"])
    config.write_text("dataset: d\nprotocol: everything\n")
    with pytest.raises(ValueError, match="--protocol must be one of"):
        parse_evaluation_arguments(["--config", str(config), "--model", "m"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        parse_evaluation_arguments(["--config", str(tmp_path / "missing.yaml"), "--model", "m"])


@pytest.mark.parametrize("config", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_eval_config_parses(config):
    eval_args, *_ = parse_evaluation_arguments(["--config", str(config), "--model", "user/model"])
    assert isinstance(eval_args, EvalArguments) and eval_args.dataset and eval_args.protocol
    assert eval_args.reproduces, f"{config.name} must say which published number it reproduces (reproduces:)"


def test_transfer_configs_cover_the_papers_four_datasets():
    datasets = {yaml.safe_load(path.read_text())["dataset"] for path in CONFIG_DIR.glob("transfer-*.yaml")}
    assert datasets == {"tanganke/dtd", "timm/oxford-iiit-pet", "ethz/food101", "tanganke/sun397"}
