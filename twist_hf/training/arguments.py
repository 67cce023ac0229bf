"""Typed pretraining options: YAML recipe + command-line overrides, parsed by `HfArgumentParser`.

Options that Hugging Face's `TrainingArguments` also has keep its names and meaning.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from transformers import HfArgumentParser

from ..cli import parse_with_config, read_yaml_options
from ..configuration_twist import TWIST_PRESETS, TwistConfig, check_choice
from ..data import DEFAULT_IMAGE_LIMITS, ImageLimits, dataset_roots
from ..hub import HUB_STRATEGIES
from ..transforms import (
    COLOUR_JITTER,
    EQUALIZE_PROBABILITIES,
    PRETRAINING_GLOBAL_SCALE,
    PRETRAINING_LOCAL_SCALE,
    SELF_LABELING_GLOBAL_SCALE,
    SELF_LABELING_LOCAL_SCALE,
    SOLARIZE_PROBABILITIES,
    check_jitter,
    check_view_probabilities,
)

OPTIMIZERS = ("lars", "adamw", "sgd")
AUGMENTATION_BACKENDS = ("batched", "per_image", "gpu", "ray_data")
SAVE_STRATEGIES = ("steps", "epoch", "no")
EVAL_STRATEGIES = ("no", "epoch")
LAUNCHERS = ("ray", "local")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
CROP_SCALES = ("global_crop_scale", "local_crop_scale", "self_label_global_crop_scale", "self_label_local_crop_scale")


@dataclass
class ModelArguments:
    """Which TWIST network to train: a preset, optionally with overrides or starting weights."""

    model_preset: str = field(default="fmnist-resnet", metadata={"help": f"One of {', '.join(TWIST_PRESETS)}."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from these TWIST weights (folder or Hub id) instead of a preset."}
    )
    num_classes: int | None = field(default=None, metadata={"help": "K; default: the preset's."})
    head_hidden_size: int | None = field(default=None, metadata={"help": "H; default: the preset's."})
    bunch_size: int | None = field(default=None, metadata={"help": "Samples per last-norm bunch."})
    last_norm: str | None = field(default=None, metadata={"help": "'bunch', 'global' or 'none'."})
    tau: float | None = field(default=None, metadata={"help": "Temperature of the entropy terms (> 0)."})
    lam1: float | None = field(default=None, metadata={"help": "Sharpness weight is 1 + lam1."})
    lam2: float | None = field(default=None, metadata={"help": "Diversity weight."})
    head_dropout: float | None = field(default=None, metadata={"help": "Dropout in the projection head."})
    sync_batch_norm: bool | None = field(default=None, metadata={"help": "Synchronise batch norms across ranks."})
    backbone_overrides: dict | str | None = field(
        default=None, metadata={"help": "JSON dict merged into the preset's backbone_config."}
    )

    def __post_init__(self):
        if isinstance(self.backbone_overrides, str):
            try:
                self.backbone_overrides = json.loads(self.backbone_overrides)
            except json.JSONDecodeError as error:
                raise ValueError(f"backbone_overrides must be a JSON object: {error}") from error
        if self.model_name_or_path is None:
            check_choice("model_preset", self.model_preset, tuple(TWIST_PRESETS))

    def config_overrides(self) -> dict:
        """The TwistConfig fields this run sets explicitly."""
        names = (
            "num_classes",
            "head_hidden_size",
            "bunch_size",
            "last_norm",
            "tau",
            "lam1",
            "lam2",
            "head_dropout",
            "sync_batch_norm",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def build_config(self) -> TwistConfig:
        """The model config: preset (or pretrained config) + overrides, validated."""
        if self.model_name_or_path is not None:
            return TwistConfig.from_pretrained(self.model_name_or_path, **self.config_overrides())
        preset = TwistConfig.from_preset(self.model_preset)
        backbone = {
            "model_type": preset.backbone_config.model_type,
            **TWIST_PRESETS[self.model_preset]["backbone_config"],
            **(self.backbone_overrides or {}),
        }
        return TwistConfig.from_preset(self.model_preset, backbone_config=backbone, **self.config_overrides())


@dataclass
class DataArguments:
    """What to train on and how to augment it (docs/method.md §5)."""

    dataset_name: str = field(
        default="fashion-mnist",
        metadata={"help": "'fashion-mnist' (Debian package files), a Hub dataset id, 'imagefolder' or 'parquet'."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder for 'imagefolder'."})
    data_files: str | None = field(default=None, metadata={"help": "File(s) or glob for 'parquet'."})
    train_split: str = field(default="train", metadata={"help": "Split to pretrain on."})
    eval_split: str | None = field(default="test", metadata={"help": "Labelled split for kNN (None: skip)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; found automatically."})
    label_column: str | None = field(default=None, metadata={"help": "Label column for kNN; found automatically."})
    streaming: bool = field(default=False, metadata={"help": "Stream the training split (per_image backend)."})
    augmentation_backend: str = field(
        default="batched",
        metadata={
            "help": "'batched': decode the split once into memory and augment whole batches (small images); "
            "'per_image': MultiCropTransform (OpenCV) per image in DataLoader workers (any size, streaming); "
            "'gpu': workers decode, the views are made batched on the training device; "
            "'ray_data': decoding and augmentation as Ray Data tasks on any CPU of the cluster (--launcher ray)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N kNN test images."})
    global_crop_size: int | None = field(default=None, metadata={"help": "Default: the model's image_size."})
    local_crop_size: int = field(default=96, metadata={"help": "Side of the local crops."})
    num_local_crops: int = field(default=0, metadata={"help": "Local crops per image (0 = two-view)."})
    global_crop_scale: list[float] = field(default_factory=lambda: list(PRETRAINING_GLOBAL_SCALE))
    local_crop_scale: list[float] = field(default_factory=lambda: list(PRETRAINING_LOCAL_SCALE))
    self_label_global_crop_scale: list[float] = field(
        default_factory=lambda: list(SELF_LABELING_GLOBAL_SCALE),
        metadata={"help": "Global crops of the self-labeling phase (the paper's harder 0.14-1)."},
    )
    self_label_local_crop_scale: list[float] = field(
        default_factory=lambda: list(SELF_LABELING_LOCAL_SCALE),
        metadata={"help": "Local crops of the self-labeling phase (the paper's 0.05-0.14)."},
    )
    colour_jitter: list[float] = field(
        default_factory=lambda: list(COLOUR_JITTER),
        metadata={
            "help": "Colour-jitter strengths (brightness, contrast, saturation, hue), applied with probability 0.8; "
            "the batched backend leaves hue out."
        },
    )
    solarize_probabilities: list[float] = field(
        default_factory=lambda: list(SOLARIZE_PROBABILITIES),
        metadata={"help": "Solarization probability of global view 0, global view 1 and each local crop."},
    )
    equalize_probabilities: list[float] = field(
        default_factory=lambda: list(EQUALIZE_PROBABILITIES),
        metadata={
            "help": "Histogram-equalisation probability (after the jitter) of global view 0, global view 1 and each "
            "local crop; not in the paper."
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per rank."})
    image_roots: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Folders that image paths inside the dataset may point into, besides data_dir, the folders "
            "of data_files and the datasets cache. Paths elsewhere are skipped and counted."
        },
    )
    allow_remote_images: bool = field(
        default=False, metadata={"help": "Fetch image paths that are URLs (http://, s3://, ...); off: skipped."}
    )
    max_image_bytes: int = field(
        default=DEFAULT_IMAGE_LIMITS.max_bytes, metadata={"help": "Skip encoded images larger than this."}
    )
    max_image_pixels: int = field(
        default=DEFAULT_IMAGE_LIMITS.max_pixels,
        metadata={"help": "Skip images with more pixels (width x height) than this, before decoding them."},
    )

    def __post_init__(self):
        _check_ranges(self, DATA_RANGES)
        check_choice("augmentation_backend", self.augmentation_backend, AUGMENTATION_BACKENDS)
        if self.streaming and self.augmentation_backend != "per_image":
            raise ValueError(
                f"streaming needs augmentation_backend='per_image' (the {self.augmentation_backend} backend "
                "indexes the split by step)."
            )
        for name in CROP_SCALES:
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must be two numbers 0 < min <= max <= 1, got {getattr(self, name)}.")
        check_jitter("colour_jitter", self.colour_jitter)
        check_view_probabilities("solarize_probabilities", self.solarize_probabilities)
        check_view_probabilities("equalize_probabilities", self.equalize_probabilities)

    def image_limits(self) -> ImageLimits:
        """What image paths and sizes the dataset's images may have (see `twist_hf.data.ImageLimits`)."""
        return ImageLimits(
            roots=dataset_roots(self.data_dir, self.data_files, self.image_roots),
            allow_remote=self.allow_remote_images,
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
        )


@dataclass
class TwistTrainingArguments:
    """Optimisation, schedules, checkpoints, logging and the Hub (names as in HF TrainingArguments)."""

    output_dir: str | None = field(default=None, metadata={"help": "Default: outputs/twist-<dataset>-<time>."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow a non-empty output_dir."})
    num_train_epochs: float = field(default=8.0, metadata={"help": "Total epochs, self-labeling included."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0: total optimiser steps, overriding epochs."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Images per worker per step."})
    global_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images per step over all workers, kept when an elastic run resizes (each worker gets it / "
            "workers; replaces per_device_train_batch_size). Needed with --num_workers MIN-MAX."
        },
    )
    learning_rate: float = field(default=0.5, metadata={"help": "Base lr for a global batch of 256 (scaled)."})
    scale_lr_by_batch: bool = field(default=True, metadata={"help": "lr = learning_rate x global batch / 256."})
    min_lr_ratio: float = field(default=0.001, metadata={"help": "Cosine decays to this fraction of the lr."})
    weight_decay: float = field(default=1.5e-6, metadata={"help": "Weight decay at the start."})
    weight_decay_end: float | None = field(default=None, metadata={"help": "Cosine target of weight decay."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps (overrides warmup_ratio)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up as a fraction of the steps."})
    warmup_epochs: float | None = field(
        default=None,
        metadata={"help": "Warm-up in epochs; default 10 (3 if <= 20 epochs, 5 if <= 50): docs/method.md §6.1."},
    )
    optim: str = field(default="lars", metadata={"help": f"One of {', '.join(OPTIMIZERS)}."})
    momentum: float = field(default=0.9, metadata={"help": "SGD/LARS momentum."})
    lars_eta: float = field(default=1e-3, metadata={"help": "LARS trust coefficient."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    seed: int = 42
    bf16: bool = field(
        default=False,
        metadata={
            "help": "bf16 mixed precision through Accelerate; fp32 (with a warning) on a CPU without AMX or "
            "AVX512-BF16, where bf16 is emulated and slow."
        },
    )
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision with loss scaling."})
    channels_last: bool = field(default=False, metadata={"help": "channels_last memory format for CNNs."})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model."})
    momentum_teacher: bool = field(default=False, metadata={"help": "Momentum-encoder variant (ViT recipes)."})
    teacher_momentum: float = field(default=0.996, metadata={"help": "EMA momentum at the start (cosine to 1)."})
    self_label_epochs: float = field(default=0.0, metadata={"help": "Final epochs of the self-labeling phase."})
    self_label_learning_rate: float = field(default=0.05, metadata={"help": "Base lr of the self-labeling phase."})
    self_label_warmup_epochs: float = field(default=5.0, metadata={"help": "lr warm-up of the self-labeling phase."})
    self_label_quantile: list[float] = field(default_factory=lambda: [0.5, 0.6])
    logging_steps: int = field(default=50, metadata={"help": "Log (progress, trackers, log.jsonl) every N steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "'steps', 'epoch' or 'no'."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps with save_strategy=steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep the last N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint folder, a Hub repo pushed with hub_strategy=checkpoint, "
            "or 'latest' for the newest checkpoint in output_dir."
        },
    )
    eval_strategy: str = field(default="no", metadata={"help": "'epoch': kNN on the eval split every epoch."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the kNN monitor."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Temperature of the kNN vote weights."})
    cluster_monitor: bool = field(
        default=False,
        metadata={"help": "Also score the head's argmax as a clustering of the eval split (cluster_nmi/acc/ami/ari)."},
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Accelerate trackers ('tensorboard', 'wandb', ...) or 'none'."},
    )
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_strategy: str = field(default="every_save", metadata={"help": f"One of {', '.join(HUB_STRATEGIES)}."})
    hub_token: str | None = field(default=None, metadata={"help": "Default: the environment/login token."})
    hub_private_repo: bool = False
    hub_revision: str | None = None
    hub_push_timeout: float = field(
        default=600.0,
        metadata={"help": "Deadline of each Hub push, in seconds; a push past it is abandoned and retried."},
    )

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = os.path.join("outputs", f"twist-{time.strftime('%Y%m%d-%H%M%S')}")
        # Absolute, because Ray Train workers run in a working directory of their own.
        self.output_dir = os.path.abspath(self.output_dir)
        _check_ranges(self, TRAINING_RANGES)
        check_choice("optim", self.optim, OPTIMIZERS)
        check_choice("save_strategy", self.save_strategy, SAVE_STRATEGIES)
        check_choice("eval_strategy", self.eval_strategy, EVAL_STRATEGIES)
        check_choice("hub_strategy", self.hub_strategy, HUB_STRATEGIES)
        if self.bf16 and self.fp16:
            raise ValueError("Choose one of bf16 and fp16.")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError("Set num_train_epochs > 0 or max_steps > 0.")
        low, high = self.self_label_quantile
        if not 0 <= low <= high <= 1:
            raise ValueError(f"self_label_quantile must be two numbers 0 <= min <= max <= 1, got {[low, high]}.")
        if not 0 <= self.self_label_epochs < max(self.num_train_epochs, 1e-9) and self.max_steps <= 0:
            raise ValueError("self_label_epochs must be >= 0 and smaller than num_train_epochs.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs --hub_model_id (e.g. my-org/twist-r50).")
        if self.report_to in (["none"], ["None"]):
            self.report_to = []

    def per_device_batch(self, world_size: int) -> int:
        """Images per worker among `world_size`: the global batch's share if one is set (it must divide)."""
        if self.global_train_batch_size is None:
            return self.per_device_train_batch_size
        share, rest = divmod(self.global_train_batch_size, world_size)
        if rest or share == 0:
            raise ValueError(
                f"global_train_batch_size {self.global_train_batch_size} does not split into {world_size} equal "
                "per-worker batches."
            )
        return share


@dataclass
class LaunchArguments:
    """Where the per-worker loop runs: a Ray Train cluster (default) or this process."""

    launcher: str = field(
        default="ray",
        metadata={
            "help": "'ray' (Ray Train workers) or 'local' (this process, or each process of `accelerate launch`)."
        },
    )
    # `int | str | None` parses as a string: "2" or "2-4" (None is refused).
    num_workers: int | str | None = field(
        default=2,
        metadata={
            "help": "Ray Train workers (one process each): N, or MIN-MAX (YAML also [MIN, MAX]) for an elastic run "
            "that Ray resizes as nodes come and go, with a fixed --global_train_batch_size."
        },
    )
    use_gpu: bool = field(default=False, metadata={"help": "One GPU per worker."})
    resources_per_worker: dict | str | None = field(
        default=None, metadata={"help": 'JSON, e.g. {"CPU": 4, "GPU": 1}; default 1 CPU (or 1 GPU).'}
    )
    storage_path: str | None = field(
        default=None,
        metadata={"help": "Ray checkpoint storage: a folder or pyarrow URI (s3://, gs://); default <output_dir>/ray."},
    )
    max_failures: int = field(default=3, metadata={"help": "Worker failures to recover from (-1: no limit)."})
    placement_strategy: str = field(
        default="PACK",
        metadata={
            "help": "How Ray places the workers on the cluster's nodes: 'PACK' (fill nodes first), 'SPREAD' (one "
            "per node where possible), or the STRICT_ variants (fail instead of bending the rule)."
        },
    )
    ray_address: str | None = field(
        default=None, metadata={"help": "Cluster to join; default $RAY_ADDRESS or a new local instance."}
    )
    ray_dashboard: bool = field(
        default=True,
        metadata={
            "help": "Start the Ray dashboard with a new local instance. Its processes take about a tenth of a core: "
            "turn it off on a small machine whose cores all train."
        },
    )

    def __post_init__(self):
        check_choice("launcher", self.launcher, LAUNCHERS)
        check_choice("placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)
        if isinstance(self.resources_per_worker, str):
            try:
                self.resources_per_worker = json.loads(self.resources_per_worker)
            except json.JSONDecodeError as error:
                raise ValueError(f"resources_per_worker must be a JSON object: {error}") from error
        _check_ranges(self, LAUNCH_RANGES)
        self.num_workers = _normalised_num_workers(self.num_workers)

    @property
    def min_workers(self) -> int:
        return self.worker_counts.start

    @property
    def max_workers(self) -> int:
        return self.worker_counts.stop - 1

    @property
    def is_elastic(self) -> bool:
        return isinstance(self.num_workers, str)

    @property
    def worker_counts(self) -> range:
        """Every number of workers the run may have."""
        if isinstance(self.num_workers, int):
            return range(self.num_workers, self.num_workers + 1)
        low, high = (int(part) for part in self.num_workers.split("-"))
        return range(low, high + 1)


def _normalised_num_workers(value) -> int | str:
    """A fixed count as an int, an elastic range as "MIN-MAX" (from 2, "2", "2-4", [2, 4] or (2, 4))."""
    text = "-".join(str(part) for part in value) if isinstance(value, (list, tuple)) else str(value)
    parts = text.replace(" ", "").split("-")
    if not (1 <= len(parts) <= 2 and all(part.isdigit() for part in parts)):
        raise ValueError(
            f"num_workers must be a number of workers (e.g. 4) or a range MIN-MAX (e.g. 2-4; YAML also [2, 4]), "
            f"got {value!r}."
        )
    low, high = int(parts[0]), int(parts[-1])
    if not 1 <= low <= high:
        raise ValueError(f"num_workers must be at least 1, and MIN <= MAX in a range MIN-MAX; got {value!r}.")
    return low if low == high else f"{low}-{high}"


@dataclass
class PretrainArguments:
    """Everything one pretraining run needs, passed as one picklable object to every worker."""

    model: ModelArguments
    data: DataArguments
    training: TwistTrainingArguments
    launch: LaunchArguments

    def for_world_size(self, world_size: int) -> PretrainArguments:
        """These arguments as one of `world_size` workers sees them: its share of the global batch."""
        training = replace(self.training, per_device_train_batch_size=self.training.per_device_batch(world_size))
        return replace(self, training=training)

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.model),
            "data": asdict(self.data),
            "training": _without_token(self.training),
            "launch": asdict(self.launch),
        }


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TwistTrainingArguments, LaunchArguments)


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric option: low/high bounds, each inclusive unless `*_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'greater than' if self.low_open else 'at least'} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_ONE, POSITIVE, NON_NEGATIVE = Range(1), Range(0, low_open=True), Range(0)
FRACTION, MOMENTUM = Range(0, 1), Range(0, 1, high_open=True)
DATA_RANGES = {
    "max_train_samples": AT_LEAST_ONE,
    "max_eval_samples": AT_LEAST_ONE,
    "global_crop_size": AT_LEAST_ONE,
    "local_crop_size": AT_LEAST_ONE,
    "num_local_crops": NON_NEGATIVE,
    "dataloader_num_workers": NON_NEGATIVE,
    "max_image_bytes": AT_LEAST_ONE,
    "max_image_pixels": AT_LEAST_ONE,
}
TRAINING_RANGES = {
    "num_train_epochs": NON_NEGATIVE,
    "per_device_train_batch_size": AT_LEAST_ONE,
    "global_train_batch_size": AT_LEAST_ONE,
    "learning_rate": POSITIVE,
    "min_lr_ratio": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "weight_decay_end": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,
    "warmup_ratio": FRACTION,
    "warmup_epochs": NON_NEGATIVE,
    "momentum": MOMENTUM,
    "lars_eta": POSITIVE,
    "adam_beta1": MOMENTUM,
    "adam_beta2": MOMENTUM,
    "max_grad_norm": NON_NEGATIVE,
    "teacher_momentum": FRACTION,
    "self_label_learning_rate": POSITIVE,
    "self_label_warmup_epochs": NON_NEGATIVE,
    "logging_steps": AT_LEAST_ONE,
    "save_steps": AT_LEAST_ONE,
    "save_total_limit": AT_LEAST_ONE,
    "knn_k": AT_LEAST_ONE,
    "knn_temperature": POSITIVE,
    "hub_push_timeout": POSITIVE,
}
LAUNCH_RANGES = {"max_failures": Range(-1)}  # num_workers: `_normalised_num_workers`


def _check_ranges(arguments, ranges: dict[str, Range]) -> None:
    """One clear error for the first option (left at None: not set) outside its allowed range."""
    for name, allowed in ranges.items():
        value = getattr(arguments, name)
        if value is not None and not allowed.allows(value):
            raise ValueError(f"--{name} must be {allowed}, got {value!r}.")


def _without_token(training: TwistTrainingArguments) -> dict:
    values = asdict(training)
    values["hub_token"] = None
    return values


RECIPE_SECTIONS = ("model", "data", "training", "launch")


def read_recipe(path: str | os.PathLike) -> dict:
    """A recipe YAML as a flat dict of option -> value (sections, if any, are merged)."""
    return read_yaml_options(path, RECIPE_SECTIONS)


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(ARGUMENT_CLASSES, description="TWIST pretraining (Ray Train + Accelerate).")


def parse_pretrain_args(argv: Sequence[str] | None = None) -> PretrainArguments:
    """`--config recipe.yaml` sets defaults, other flags override them; unknown names are errors."""
    parsed = parse_with_config(make_parser(), argv, "python recipes/pretrain.py", RECIPE_SECTIONS)
    return PretrainArguments(*parsed)


def arguments_from_dict(values: dict) -> PretrainArguments:
    """Rebuild the arguments from `PretrainArguments.to_dict()` (e.g. a saved training_args.json)."""
    return PretrainArguments(
        model=ModelArguments(**values["model"]),
        data=DataArguments(**values["data"]),
        training=TwistTrainingArguments(**values["training"]),
        launch=LaunchArguments(**values["launch"]),
    )
