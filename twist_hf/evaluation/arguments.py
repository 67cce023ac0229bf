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
    reproduces: str | None = field(
        default=None,
        metadata={"help": "The published number this configuration reproduces; the run logs it first."},
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
    """Linear probe: `fast` on cached features (several lrs at once) or `paper` on augmented images.

    `paper` defaults are the authors', by backbone (docs/method.md §7.1): global batch 1024; ResNet lr 0.2
    not scaled with the batch; ViT lr 0.02 (ViT-S) / 0.0015 (ViT-B) x global batch / 256 on the CLS tokens of
    the last 4 blocks concatenated; SGD momentum 0.9, wd 0, cosine over 100 epochs; best and last top-1.
    """

    linear_mode: Literal["fast", "paper"] = field(default="fast", metadata={"help": "Probe on features or images."})
    linear_lrs: list[float] = field(
        default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
        metadata={"help": "fast: learning rates trained together; the best on a held-out split is reported."},
    )
    linear_epochs: int = field(default=100, metadata={"help": "Training epochs (both modes)."})
    linear_batch_size: int | None = field(
        default=None,
        metadata={"help": "Global training batch, split over the processes (default: paper 1024, fast 256)."},
    )
    linear_val_fraction: float = field(default=0.1, metadata={"help": "fast: held-out share of train for lr choice."})
    linear_base_lr: float | None = field(
        default=None,
        metadata={
            "help": "paper: lr (ResNet, used as is) or lr per 256 images (ViT); default: the authors' for the "
            "backbone (ResNet 0.2, ViT-S 0.02, ViT-B 0.0015)."
        },
    )
    linear_cls_blocks: int | None = field(
        default=None,
        metadata={"help": "ViT only: concatenate the CLS tokens of this many last blocks (default 4)."},
    )

    def __post_init__(self) -> None:
        check_choice("--linear_mode", self.linear_mode, ("fast", "paper"))
        _check_at_least_one(
            linear_epochs=self.linear_epochs,
            linear_batch_size=self.linear_batch_size,
            linear_cls_blocks=self.linear_cls_blocks,
        )
        if self.linear_base_lr is not None and self.linear_base_lr <= 0:
            raise ValueError(f"--linear_base_lr must be > 0, got {self.linear_base_lr}.")


@dataclass
class SemiArguments:
    """Semi-supervised fine-tuning on a labelled subset of train (backbone and head at separate lrs).

    Defaults are the authors': global batch 256 whatever the number of processes, backbone lr 0.04/0.02/0.01 and
    epochs 20/20/30 for 1%/10%/100% of the labels, head lr 0.2, both lrs unscaled, wd 0, cosine; best top-1.
    """

    semi_label_fractions: list[float] = field(
        default_factory=lambda: [0.01, 0.1],
        metadata={"help": "Class-balanced seeded label fractions to run (when no --semi_subset_files)."},
    )
    semi_subset_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Image lists (one file name per line, e.g. SimCLR's 1percent.txt / 10percent.txt), one "
            "fine-tune each; they replace the fractions."
        },
    )
    semi_id_column: str | None = field(
        default=None,
        metadata={"help": "Column with the ids named in the subset files (default: image file name)."},
    )
    semi_epochs: int | None = field(default=None, metadata={"help": "Override the recipe's epochs (20/20/30)."})
    semi_backbone_lr: float | None = field(
        default=None, metadata={"help": "Override the recipe's backbone lr (0.04/0.02/0.01), unscaled."}
    )
    semi_head_lr: float = field(default=0.2, metadata={"help": "Classifier lr, unscaled."})
    semi_batch_size: int = field(default=256, metadata={"help": "Global fine-tuning batch, split over the processes."})

    def __post_init__(self) -> None:
        bad = [f for f in self.semi_label_fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"--semi_label_fractions must lie in (0, 1], got {bad}.")
        _check_at_least_one(semi_epochs=self.semi_epochs, semi_batch_size=self.semi_batch_size)
        for name in ("semi_backbone_lr", "semi_head_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be > 0, got {value}.")


def _check_at_least_one(**options: int | None) -> None:
    """Raise a ValueError naming the first given option below 1."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")


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
