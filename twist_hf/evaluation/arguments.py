"""Typed evaluation arguments, parsed from the command line and optionally a YAML file underneath it."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

from ..cli import parse_with_config
from ..configuration_twist import check_choice

PROTOCOLS = ("knn", "linear", "semi", "cluster")


@dataclass
class EvalArguments:
    """What to evaluate, on which data, and where the results go."""

    model: str = field(metadata={"help": "Model folder or Hub id: a TWIST model or any HF vision model."})
    dataset: str = field(metadata={"help": "Hub dataset id, an image folder (class subfolders), or fashion-mnist."})
    protocol: Literal["knn", "linear", "semi", "cluster", "all"] = field(
        default="all", metadata={"help": "Protocol to run; `all` runs every one that applies to the model."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where eval_results.json and figures go (default: the model folder or eval_outputs/<id>)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset name for the model card (default: the Hub id or folder name)."},
    )
    train_split: str = field(default="train", metadata={"help": "Split the classifiers are fitted on."})
    test_split: str = field(default="test", metadata={"help": "Split the accuracies are reported on."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})
    batch_size: int = field(default=256, metadata={"help": "Per-process batch size for feature extraction."})
    num_workers: int = field(default=4, metadata={"help": "DataLoader worker processes."})
    seed: int = field(default=0, metadata={"help": "Seed of held-out splits, label subsets and training."})
    update_model_card: bool = field(
        default=True, metadata={"help": "Write the metrics into the model folder's README.md model-index."}
    )
    figures: bool = field(default=True, metadata={"help": "Draw the top-3 and confusion-matrix figures (cluster)."})
    training_log: str | None = field(
        default=None, metadata={"help": "A pretraining log.jsonl to draw as training_curves.png."}
    )

    def __post_init__(self) -> None:
        check_choice("--protocol", self.protocol, (*PROTOCOLS, "all"))
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(
                f"Need --batch_size >= 1 and --num_workers >= 0, got {self.batch_size}, {self.num_workers}."
            )

    @property
    def protocols(self) -> tuple[str, ...]:
        """The protocols this run asks for, in the order they run."""
        return PROTOCOLS if self.protocol == "all" else (self.protocol,)


@dataclass
class KnnArguments:
    """Weighted cosine kNN on frozen features."""

    knn_k: list[int] = field(default_factory=lambda: [20, 200], metadata={"help": "Numbers of neighbours."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Vote weight exp(cosine / T)."})
    knn_chunk_size: int = field(default=1024, metadata={"help": "Test rows per similarity chunk (bounds memory)."})


@dataclass
class LinearArguments:
    """Linear probe: `fast` on cached features (several lrs at once) or `paper` on augmented images."""

    linear_mode: Literal["fast", "paper"] = field(default="fast", metadata={"help": "Probe on features or images."})
    linear_lrs: list[float] = field(
        default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
        metadata={"help": "fast: learning rates trained together; the best on a held-out split is reported."},
    )
    linear_epochs: int = field(default=100, metadata={"help": "Training epochs (both modes)."})
    linear_batch_size: int = field(default=256, metadata={"help": "Per-process training batch size."})
    linear_val_fraction: float = field(default=0.1, metadata={"help": "fast: held-out share of train for lr choice."})
    linear_base_lr: float = field(default=0.2, metadata={"help": "paper: lr per 256 images (SGD, momentum 0.9)."})

    def __post_init__(self) -> None:
        check_choice("--linear_mode", self.linear_mode, ("fast", "paper"))


@dataclass
class SemiArguments:
    """Semi-supervised fine-tuning on a labelled subset of train (backbone and head at separate lrs)."""

    semi_label_fractions: list[float] = field(
        default_factory=lambda: [0.01, 0.1],
        metadata={"help": "Class-balanced seeded label fractions to run."},
    )
    semi_subset_file: str | None = field(
        default=None, metadata={"help": "File listing the labelled image ids/paths; replaces the fractions."}
    )
    semi_id_column: str | None = field(
        default=None,
        metadata={"help": "Column with the ids named in the subset file (default: image file name)."},
    )
    semi_epochs: int | None = field(default=None, metadata={"help": "Override the recipe's epochs (20/20/30)."})
    semi_backbone_lr: float | None = field(
        default=None, metadata={"help": "Override the recipe's backbone lr per 256 images (0.04/0.02/0.01)."}
    )
    semi_head_lr: float = field(default=0.2, metadata={"help": "Classifier lr per 256 images."})
    semi_batch_size: int = field(default=256, metadata={"help": "Per-process fine-tuning batch size."})

    def __post_init__(self) -> None:
        bad = [f for f in self.semi_label_fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"--semi_label_fractions must lie in (0, 1], got {bad}.")


@dataclass
class ClusterArguments:
    """Unsupervised classification with the TWIST head."""

    cluster_figure_images: int = field(default=16, metadata={"help": "Images in the top-3 predictions figure."})


ARGUMENT_CLASSES = (EvalArguments, KnnArguments, LinearArguments, SemiArguments, ClusterArguments)


def parse_evaluation_arguments(
    argv: Sequence[str] | None = None,
) -> tuple[EvalArguments, KnnArguments, LinearArguments, SemiArguments, ClusterArguments]:
    """Parse `argv`; with `--config file.yaml` its values become the defaults that flags then override."""
    return parse_with_config(HfArgumentParser(ARGUMENT_CLASSES), argv, "python recipes/evaluate.py")
