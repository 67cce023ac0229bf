"""Labelled image splits for evaluation: loading, label normalisation, label subsets and batching."""

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, Image
from torchvision.transforms import v2
from transformers import BaseImageProcessor

from twist_hf.data import decode_image_or_reason, load_image_dataset, with_undecoded_images

logger = logging.getLogger(__name__)

# A training file name of the Hub's ImageNet: `<synset>_<number>_<synset>.JPEG`.
_HUB_IMAGENET_NAME = re.compile(r"(?P<image_id>(?P<synset>n\d{8})_\d+)_(?P=synset)(?P<extension>\.\w+)")
# Label of a row whose image could not be decoded; such rows are dropped before any loss or score.
SKIPPED_LABEL = -1


@dataclass
class LabelledSplits:
    """Train and test splits with integer labels 0..C-1 and the class names they stand for."""

    train: Dataset
    test: Dataset
    class_names: list[str]
    image_column: str
    label_column: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_labelled_splits(
    dataset: str,
    train_split: str = "train",
    test_split: str = "test",
    image_column: str = "image",
    label_column: str = "label",
    dataset_config: str | None = None,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
) -> LabelledSplits:
    """Load `fashion-mnist`, an image folder (split/class sub-folders) or a Hub id as labelled splits."""
    name, data_dir = ("imagefolder", dataset) if os.path.isdir(dataset) else (dataset, None)
    train, test = (
        load_image_dataset(name, config_name=dataset_config, split=split, data_dir=data_dir)
        for split in (train_split, test_split)
    )
    return labelled_splits_from(
        _first(train, max_train_samples), _first(test, max_test_samples), image_column, label_column
    )


def labelled_splits_from(
    train: Dataset, test: Dataset, image_column: str = "image", label_column: str = "label"
) -> LabelledSplits:
    """Check both splits have the columns, give them one shared ClassLabel, keep only those two columns.

    Images stay undecoded until batching, so that one corrupt file is skipped and counted, as in training."""
    for split_name, split in (("train", train), ("test", test)):
        _check_columns(split, split_name, image_column, label_column)
    train, test, class_names = _shared_class_labels(
        _undecoded(train.select_columns([image_column, label_column]), image_column),
        _undecoded(test.select_columns([image_column, label_column]), image_column),
        label_column,
    )
    return LabelledSplits(train, test, class_names, image_column, label_column)


def _undecoded(split: Dataset, image_column: str) -> Dataset:
    """Image columns as raw {bytes, path}: the collator decodes them, skipping (not dying on) corrupt files."""
    return with_undecoded_images(split, image_column) if isinstance(split.features[image_column], Image) else split


def _check_columns(split: Dataset, split_name: str, image_column: str, label_column: str) -> None:
    """Raise a ValueError when the image or label column is missing from a split."""
    if image_column not in split.column_names:
        raise ValueError(
            f"The {split_name} split has no image column {image_column!r} (columns: {split.column_names}). "
            "Pass --image_column."
        )
    if label_column not in split.column_names:
        raise ValueError(
            f"The {split_name} split has no label column {label_column!r} (columns: "
            f"{split.column_names}); the knn, linear, semi and cluster protocols all need labels. "
            "Pass --label_column, or use a labelled dataset."
        )


def _first(split: Dataset, count: int | None) -> Dataset:
    """The first `count` rows (all when None), for quick runs."""
    return split if count is None else split.select(range(min(count, len(split))))


def _shared_class_labels(train: Dataset, test: Dataset, column: str) -> tuple[Dataset, Dataset, list[str]]:
    """Both splits with the same ClassLabel; raw (string or int) labels are numbered in sorted order."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return train, test, list(feature.names)
    values = sorted(set(train[column]) | set(test[column]))
    index = {value: i for i, value in enumerate(values)}
    class_label = ClassLabel(names=[str(value) for value in values])

    def encode(split: Dataset) -> Dataset:
        encoded = split.map(lambda batch: {column: [index[v] for v in batch[column]]}, batched=True)
        return encoded.cast_column(column, class_label)

    return encode(train), encode(test), class_label.names


def class_balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded subset with round(fraction x count) samples (at least 1) of every class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"Label fraction must be in (0, 1], got {fraction}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


def subset_from_file(dataset: Dataset, subset_file: str, image_column: str, id_column: str | None = None) -> np.ndarray:
    """Sorted indices of the rows named in `subset_file` (one image id or path per line, as the SimCLR lists:
    `n01440764_10026.JPEG`).

    Rows are matched by file name: the `id_column` value when given, else the image's file path. The Hub's
    ImageNet names its files `<id>_<synset>.JPEG` (`n01440764_10026_n01440764.JPEG`): that suffix is ignored.
    """
    wanted = {Path(line.strip()).name for line in Path(subset_file).read_text().splitlines() if line.strip()}
    if not wanted:
        raise ValueError(f"Subset file {subset_file} lists no image ids; put one id or path per line.")
    names = [_without_synset_suffix(name) for name in _row_names(dataset, image_column, id_column)]
    index = np.array([i for i, name in enumerate(names) if name in wanted], dtype=np.int64)
    missing = wanted - {names[i] for i in index}
    if missing:
        raise ValueError(
            f"{len(missing)} ids from {subset_file} are not in the training split, e.g. "
            f"{sorted(missing)[:3]}. Check the file matches this dataset, or pass --semi_id_column "
            "naming the column that holds the ids."
        )
    return index


def _without_synset_suffix(name: str) -> str:
    """`n01440764_10026_n01440764.JPEG` (the Hub's ImageNet) -> `n01440764_10026.JPEG`; other names unchanged."""
    match = _HUB_IMAGENET_NAME.fullmatch(name)
    return f"{match['image_id']}{match['extension']}" if match else name


def _row_names(dataset: Dataset, image_column: str, id_column: str | None) -> list[str]:
    """File name of every row: from the id column, or from the undecoded image's path."""
    if id_column is not None:
        if id_column not in dataset.column_names:
            raise ValueError(f"No id column {id_column!r} in the training split; it has {dataset.column_names}.")
        return [Path(str(value)).name for value in dataset[id_column]]
    paths = [image["path"] for image in dataset.cast_column(image_column, Image(decode=False))[image_column]]
    if any(path is None for path in paths):
        raise ValueError(
            "The training images carry no file paths, so a subset file cannot be matched to them. "
            "Pass --semi_id_column naming a column with the image ids."
        )
    return [Path(path).name for path in paths]


class ProcessorTransform:
    """Evaluation preprocessing of one image with the model's own Hugging Face image processor."""

    def __init__(self, processor: BaseImageProcessor):
        self.processor = processor

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        return self.processor(image, return_tensors="pt")["pixel_values"][0]


def training_augmentation(processor: BaseImageProcessor) -> v2.Compose:
    """Random resized crop + flip to the processor's output size, normalised with its mean and std."""
    probe = ProcessorTransform(processor)(PIL.Image.new("RGB", (256, 256)))
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(tuple(probe.shape[-2:]), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(processor.image_mean), std=list(processor.image_std)),
        ]
    )


class ImageClassificationCollator:
    """Collate dataset rows into {"pixel_values": (B,3,H,W), "labels": (B,)} with a per-image transform.

    An undecodable image keeps its place in the batch (so that batch sizes, and the padding Accelerate
    removes after a gather, stay exact) as a zero image labelled SKIPPED_LABEL; drop those rows with
    `decoded_rows` before training on or scoring the batch.
    """

    def __init__(self, transform, image_column: str = "image", label_column: str = "label"):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [self._decode(row[self.image_column]) for row in rows]
        pixels = [self.transform(image) for image in images if image is not None]
        if not pixels:
            pixels = [self.transform(PIL.Image.new("RGB", (32, 32)))]
        placeholder = torch.zeros_like(pixels[0])
        pixel_iter = iter(pixels)
        stacked = [placeholder if image is None else next(pixel_iter) for image in images]
        labels = [SKIPPED_LABEL if image is None else row[self.label_column] for image, row in zip(images, rows)]
        return {"pixel_values": torch.stack(stacked), "labels": torch.as_tensor(labels, dtype=torch.long)}

    @staticmethod
    def _decode(value) -> PIL.Image.Image | None:
        """The image in RGB, or None (logged with the reason) when it cannot be decoded."""
        image, reason = decode_image_or_reason(value)
        if reason is not None:
            where = value.get("path") if isinstance(value, dict) else None
            logger.warning("Skipping an undecodable image%s: %s.", f" ({where})" if where else "", reason)
        return image


def decoded_rows(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the batch rows whose image was decoded (the others carry SKIPPED_LABEL)."""
    return labels != SKIPPED_LABEL
