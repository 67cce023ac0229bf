"""Model cards (`README.md`) for TWIST models on the Hugging Face Hub, with a `model-index` of results."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedConfig

CARD_FILE = "README.md"
TAGS = ["twist", "self-supervised", "image-feature-extraction"]
EVAL_TABLE_START = "<!-- eval-table:start -->"
EVAL_TABLE_END = "<!-- eval-table:end -->"
CITATION = """@article{wang2021twist,
  title   = {Self-Supervised Learning by Estimating Twin Class Distributions},
  author  = {Wang, Feng and Kong, Tao and Zhang, Rufeng and Liu, Huaping and Li, Hang},
  journal = {arXiv preprint arXiv:2110.07402},
  year    = {2021}
}"""

EvalRow = tuple[str, str, str, float]


def write_model_card(
    folder: str | Path,
    *,
    model_id: str,
    config_summary: Mapping[str, Any],
    training_summary: Mapping[str, Any],
    eval_results: Sequence[EvalRow] = (),
) -> Path:
    """Write `folder/README.md`: Hub metadata (with a `model-index` of `eval_results`, each a
    (task, dataset, metric, value) row), what the model is, how it was trained, results, usage, citation."""
    results = [_to_eval_result(row) for row in eval_results]
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag="image-feature-extraction",
        tags=list(TAGS),
        datasets=_datasets(training_summary, results),
        model_name=_model_name(model_id),
        eval_results=results or None,
    )
    body = _card_body(model_id, config_summary, training_summary, results)
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    path = Path(folder) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path


def model_config_summary(config: PreTrainedConfig) -> dict[str, Any]:
    """The model rows of every TWIST card (trained or converted), so that all cards describe a model alike."""
    summary = {
        "Backbone": _backbone_name(config.backbone_config),
        "Image size": config.image_size,
        "TWIST classes (K)": config.num_classes,
        "Head hidden size (H)": config.head_hidden_size,
        "Head norm / last norm": f"{config.head_norm} / {config.last_norm}",
        "tau, lam1, lam2": f"{config.tau}, {config.lam1}, {config.lam2}",
    }
    if config.last_norm == "bunch":
        summary["Bunch size"] = config.bunch_size
    return summary


def _backbone_name(backbone_config: PreTrainedConfig) -> str:
    architecture = getattr(backbone_config, "architecture", None)  # timm_wrapper configs name the timm model
    return f"{backbone_config.model_type} ({architecture})" if architecture else backbone_config.model_type


def add_eval_results(folder: str | Path, eval_results: Sequence[EvalRow]) -> Path:
    """Merge (task, dataset, metric, value) rows into the card's `model-index` and evaluation table; a row
    for a (task, dataset, metric) already in the card replaces the old value."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No model card at {path}: write one with write_model_card first.")
    card = ModelCard.load(path)
    merged = _merge(card.data.eval_results or [], [_to_eval_result(row) for row in eval_results])
    card.data.eval_results = merged
    card.data.model_name = card.data.model_name or _model_name(path.parent.name)
    card.data.datasets = list(dict.fromkeys([*(card.data.datasets or []), *(r.dataset_type for r in merged)]))
    card.text = _replace_eval_table(card.text, merged)
    card.save(path)
    return path


def _to_eval_result(row: EvalRow) -> EvalResult:
    if len(row) != 4:
        raise ValueError(f"An evaluation result is (task, dataset, metric, value), got {row!r}.")
    task, dataset, metric, value = row
    return EvalResult(
        task_type=task,
        dataset_type=dataset,
        dataset_name=dataset,
        metric_type=metric,
        metric_value=float(value),
    )


def _merge(old: Iterable[EvalResult], new: Iterable[EvalResult]) -> list[EvalResult]:
    merged = list(old)
    for result in new:
        merged = [kept for kept in merged if not kept.is_equal_except_value(result)] + [result]
    return merged


def _model_name(model_id: str) -> str:
    return model_id.split("/")[-1]


def _datasets(training_summary: Mapping[str, Any], results: Iterable[EvalResult]) -> list[str]:
    trained_on = training_summary.get("dataset")
    names = [trained_on] if isinstance(trained_on, str) else list(trained_on or [])
    names += [result.dataset_type for result in results]
    return list(dict.fromkeys(names))


def _eval_table(results: Sequence[EvalResult]) -> str:
    if not results:
        return f"{EVAL_TABLE_START}\nNo evaluation results yet.\n{EVAL_TABLE_END}"
    rows = [f"| {r.task_type} | {r.dataset_name} | {r.metric_type} | {r.metric_value:.4g} |" for r in results]
    table = "\n".join(["| Task | Dataset | Metric | Value |", "|---|---|---|---|", *rows])
    return f"{EVAL_TABLE_START}\n{table}\n{EVAL_TABLE_END}"


def _replace_eval_table(text: str, results: Sequence[EvalResult]) -> str:
    pattern = re.compile(re.escape(EVAL_TABLE_START) + ".*?" + re.escape(EVAL_TABLE_END), re.DOTALL)
    if pattern.search(text) is None:
        return f"{text.rstrip()}\n\n## Evaluation\n\n{_eval_table(results)}\n"
    return pattern.sub(lambda _: _eval_table(results), text)


def _key_value_table(values: Mapping[str, Any], header: str) -> str:
    rows = [f"| {key} | {value} |" for key, value in values.items()]
    return "\n".join([f"| {header} | Value |", "|---|---|", *rows]) if rows else "Not recorded."


def _card_body(
    model_id: str,
    config_summary: Mapping[str, Any],
    training_summary: Mapping[str, Any],
    results: Sequence[EvalResult],
) -> str:
    name = _model_name(model_id)
    return f"""# {name}

## Model description

A [TWIST](https://arxiv.org/abs/2110.07402) model: a vision backbone and a classification head trained
without labels, by making the class distributions predicted for two augmented views of an image agree,
each prediction sharp and the classes used evenly across the batch. For an image it returns
`pooler_output`, the backbone's features (use them for linear probing, k-NN or fine-tuning), and `logits`
over the TWIST classes, whose softmax is the image's distribution over self-supervised classes (use its
argmax for clustering).

{_key_value_table(config_summary, "Setting")}

## Training

{_key_value_table(training_summary, "Item")}

## Evaluation

{_eval_table(results)}

## How to use

With the `twist-hf` package installed, `import twist_hf` registers the model with the Auto classes:

```python
import torch
import twist_hf  # noqa: F401
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{model_id}")
model = AutoModel.from_pretrained("{model_id}").eval()
inputs = processor(images=Image.open("image.png").convert("RGB"), return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
features = outputs.pooler_output                 # (batch, feature size)
class_distribution = outputs.logits.softmax(-1)  # (batch, number of TWIST classes)
```

Without the package, the modelling code stored in this repo is used:

```python
model = AutoModel.from_pretrained("{model_id}", trust_remote_code=True)
```

As a pipeline:

```python
from transformers import pipeline

extractor = pipeline("image-feature-extraction", model="{model_id}", trust_remote_code=True)
features = extractor("image.png")
```

Fine-tuning for classification (a new linear classifier on top of the pretrained backbone):

```python
import twist_hf  # noqa: F401
from transformers import AutoModelForImageClassification  # or twist_hf.TwistForImageClassification

model = AutoModelForImageClassification.from_pretrained("{model_id}", num_labels=10)
```

## Limitations

- The TWIST classes are learned without labels: they need not match any human labelling, and the number of
  classes is a training choice. Map them to labels (e.g. by Hungarian matching) before reading them as such.
- Features reflect the training data and augmentations; expect lower quality on images far from them
  (other resolutions, domains or colour statistics), and inherit any bias of the training images.
- The numbers above come from the evaluation protocols described in the paper, run on the datasets listed;
  they are not guarantees on other data.

## Citation

```bibtex
{CITATION}
```
"""
