"""Model cards: Hub metadata and model-index written with huggingface_hub's card classes, merged results."""

import pytest
from huggingface_hub import ModelCard

from twist_hf import TwistConfig
from twist_hf.model_card import add_eval_results, model_config_summary, write_model_card

MODEL_ID = "test-user/twist-fmnist"


def _write(folder, eval_results):
    return write_model_card(
        folder,
        model_id=MODEL_ID,
        config_summary={"backbone": "resnet (fmnist-resnet)", "num_classes": 10, "tau": 0.5},
        training_summary={
            "recipe": "fmnist",
            "dataset": "fashion_mnist",
            "epochs": 3,
            "wall time": "0:05:12",
        },
        eval_results=eval_results,
    )


def test_card_metadata_is_what_the_hub_reads(tmp_path):
    card = ModelCard.load(_write(tmp_path, [("image-classification", "fashion_mnist", "accuracy", 0.8123)]))
    data = card.data
    assert data.library_name == "transformers"
    assert data.license == "apache-2.0"
    assert data.pipeline_tag == "image-feature-extraction"
    assert data.tags == ["twist", "self-supervised", "image-feature-extraction"]
    assert data.datasets == ["fashion_mnist"]
    assert data.model_name == "twist-fmnist"
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.metric_type, result.metric_value) == (
        "image-classification",
        "fashion_mnist",
        "accuracy",
        0.8123,
    )
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"] == [{"type": "accuracy", "value": 0.8123}]


def test_card_body_has_every_section_the_numbers_and_the_citation(tmp_path):
    text = ModelCard.load(_write(tmp_path, [("image-clustering", "fashion_mnist", "nmi", 0.61)])).text
    for heading in (
        "## Model description",
        "## Training",
        "## Evaluation",
        "## How to use",
        "## Limitations",
        "## Citation",
    ):
        assert heading in text
    assert "| image-clustering | fashion_mnist | nmi | 0.61 |" in text
    assert "| wall time | 0:05:12 |" in text and "| tau | 0.5 |" in text
    assert f'AutoModel.from_pretrained("{MODEL_ID}", trust_remote_code=True)' in text
    assert 'pipeline("image-feature-extraction"' in text and "AutoModelForImageClassification" in text
    assert "arXiv:2110.07402" in text
    assert "Wang, Feng and Kong, Tao and Zhang, Rufeng and Liu, Huaping and Li, Hang" in text


def test_a_card_without_results_says_so(tmp_path):
    card = ModelCard.load(_write(tmp_path, []))
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "No evaluation results yet." in card.text


def test_add_eval_results_replaces_same_metric_and_keeps_the_rest(tmp_path):
    _write(
        tmp_path,
        [
            ("image-classification", "fashion_mnist", "accuracy", 0.80),
            ("image-clustering", "fashion_mnist", "nmi", 0.55),
        ],
    )
    add_eval_results(
        tmp_path,
        [
            ("image-classification", "fashion_mnist", "accuracy", 0.85),
            ("image-classification", "cifar10", "accuracy", 0.7),
        ],
    )
    card = ModelCard.load(tmp_path / "README.md")
    values = {(r.task_type, r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values == {
        ("image-classification", "fashion_mnist", "accuracy"): 0.85,
        ("image-clustering", "fashion_mnist", "nmi"): 0.55,
        ("image-classification", "cifar10", "accuracy"): 0.7,
    }
    assert card.data.datasets == ["fashion_mnist", "cifar10"]
    assert "| image-classification | fashion_mnist | accuracy | 0.85 |" in card.text
    assert "| accuracy | 0.8 |" not in card.text
    assert card.text.count("<!-- eval-table:start -->") == 1
    assert card.data.library_name == "transformers", "the rest of the metadata survives"


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_model_card first"):
        add_eval_results(tmp_path, [("image-classification", "fashion_mnist", "accuracy", 0.8)])
    with pytest.raises(ValueError, match=r"\(task, dataset, metric, value\)"):
        _write(tmp_path, [("image-classification", "fashion_mnist", 0.8)])


def test_model_config_summary_of_a_resnet_and_a_vit():
    assert model_config_summary(TwistConfig.from_preset("tiny-resnet", tau=0.4)) == {
        "Backbone": "resnet",
        "Image size": 16,
        "TWIST classes (K)": 16,
        "Head hidden size (H)": 32,
        "Head norm / last norm": "batch_norm / bunch",
        "tau, lam1, lam2": "0.4, 0.0, 1.0",
        "Bunch size": 8,
    }
    vit = model_config_summary(TwistConfig.from_preset("vit-s16", last_norm="none"))
    assert vit["Backbone"] == "timm_wrapper (vit_small_patch16_224)" and "Bunch size" not in vit
