"""Evaluation outputs: `eval_results.json` and the model card's `model-index` block."""

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from twist_hf.model_card import CARD_FILE, add_eval_results
from twist_hf.outputs import EVAL_RESULTS_FILE

TASK_TYPE = "image-classification"
# Bookkeeping values and repeats (knn_top1/5 copy the best k's) that stay out of the model card.
NOT_FOR_CARD = ("linear_val_top1", "linear_best_lr", "knn_top1", "knn_top5", "skipped_images")
# Suffixes of the settings a protocol reports next to its accuracies (lrs, batch sizes, feature width, epoch).
SETTING_SUFFIXES = ("_lr", "_batch_size", "_batch_size_per_process", "_feature_size", "_best_epoch")


def save_eval_results(metrics: dict[str, float], output_dir: str | Path) -> Path:
    """Merge `metrics` (prefixed `eval_`) into output_dir/eval_results.json, keeping earlier keys."""
    path = Path(output_dir) / EVAL_RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({f"eval_{key}": value for key, value in metrics.items()})
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


def update_model_card(model_dir: str | Path, metrics: dict[str, float], dataset_id: str) -> Path:
    """Merge the metrics into model_dir/README.md's model-index (one entry per metric key, newer values win).

    A minimal card is created first when the folder has none.
    """
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        _minimal_card(Path(model_dir).resolve().name).save(path)
    rows = [
        (TASK_TYPE, dataset_id, key, round(float(value), 4))
        for key, value in metrics.items()
        if key not in NOT_FOR_CARD and not key.endswith(SETTING_SUFFIXES)
    ]
    return add_eval_results(model_dir, rows)


def _minimal_card(model_name: str) -> ModelCard:
    """A bare card (metadata + title) for a model folder that has none yet."""
    data = ModelCardData(library_name="transformers", pipeline_tag="image-feature-extraction", model_name=model_name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {model_name}\n")
