"""Data loading for TWIST pretraining and evaluation: Fashion-MNIST from the Debian IDX files, any
Hugging Face image dataset, robust image decoding, per-rank sharding and seeded per-epoch shuffling."""

from __future__ import annotations

import gzip
import io
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from glob import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import huggingface_hub.constants
import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps

if TYPE_CHECKING:
    import datasets

# Re-exported for callers of this module; defined once in configuration_twist.
from .configuration_twist import FASHION_MNIST_MEAN as FASHION_MNIST_MEAN
from .configuration_twist import FASHION_MNIST_STD as FASHION_MNIST_STD

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The names that select the built-in Fashion-MNIST (`is_fashion_mnist`); the first is the canonical one.
BUILTIN_FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist")
# datasets' builders that read local files given by data_dir / data_files.
LOCAL_FILE_BUILDERS = ("imagefolder", "parquet", "webdataset", "arrow")

_IDX_FILE_PREFIX = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MISSING_FASHION_MNIST_HINT = (
    "Install the Debian package with `sudo apt-get install dataset-fashion-mnist` "
    "(or run scripts/setup.sh), or pass the folder that holds the IDX files as `root`."
)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST from the IDX files
# --------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Parse one (optionally gzip-compressed) IDX file into a numpy array, validating its header."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist. {_MISSING_FASHION_MNIST_HINT}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is only {len(raw)} bytes long; it is truncated or not an IDX file.")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"IDX file {path} has magic number {magic}, expected {expected_magic}; "
            "it is not the kind of IDX file asked for (images 2051, labels 2049) or it is corrupt."
        )
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_bytes = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected_bytes:
        raise ValueError(
            f"IDX file {path} holds {len(raw)} bytes but its header {shape} announces {expected_bytes}; "
            "the file is truncated or corrupt, reinstall it."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_mnist_paths(split: str, root: str | os.PathLike) -> tuple[Path, Path]:
    """Return the (images, labels) IDX paths of one split, checking the split name and the folder."""
    if split not in _IDX_FILE_PREFIX:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}.")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {root} does not exist. {_MISSING_FASHION_MNIST_HINT}")
    prefix = _IDX_FILE_PREFIX[split]
    return root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"


@lru_cache(maxsize=4)
def _cached_fashion_mnist_arrays(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _fashion_mnist_paths(split, root)
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC).astype(np.int64)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path} should hold uint8 images (N, H, W), got {images.dtype} {images.shape}.")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{labels_path} holds {labels.shape} labels for {images.shape[0]} images.")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def fashion_mnist_arrays(
    split: Literal["train", "test"] = "train", root: str | os.PathLike = FASHION_MNIST_ROOT
) -> tuple[np.ndarray, np.ndarray]:
    """Return Fashion-MNIST as read-only (uint8 images (N, 28, 28), int64 labels (N,)) for the fast path."""
    return _cached_fashion_mnist_arrays(split, str(Path(root).resolve()))


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@lru_cache(maxsize=4)
def _cached_fashion_mnist_dataset(split: str, root: str) -> datasets.Dataset:
    import datasets

    images, labels = _cached_fashion_mnist_arrays(split, root)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))}
    )
    columns = {"image": [{"bytes": _png_bytes(image), "path": None} for image in images], "label": labels}
    return datasets.Dataset.from_dict(columns, features=features, split=datasets.NamedSplit(split))


def load_fashion_mnist(
    split: Literal["train", "test"] = "train", root: str | os.PathLike = FASHION_MNIST_ROOT
) -> datasets.Dataset:
    """Load Fashion-MNIST as a `datasets.Dataset` with an `image` (PNG) and a `label` (ClassLabel) column."""
    return _cached_fashion_mnist_dataset(split, str(Path(root).resolve()))


def channel_mean_std(images: np.ndarray | torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 images (N, H, W) or (N, C, H, W), for normalisation.

    Computed exactly from 256-bin histograms, so it needs no float copy of the images."""
    pixels = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4):
        raise ValueError(f"Expected uint8 images (N, H, W) or (N, C, H, W), got {pixels.dtype} {pixels.shape}.")
    channels = [pixels] if pixels.ndim == 3 else [pixels[:, channel] for channel in range(pixels.shape[1])]
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in channels:
        histogram = np.bincount(channel.ravel(), minlength=256).astype(np.float64)
        mean = float(histogram @ levels / histogram.sum())
        means.append(mean)
        stds.append(float(np.sqrt(histogram @ (levels - mean) ** 2 / (histogram.sum() - 1))))
    return tuple(means), tuple(stds)


# --------------------------------------------------------------------------------------------
# Any Hugging Face image dataset
# --------------------------------------------------------------------------------------------


class DatasetLoadError(ValueError):
    """Raised when a dataset cannot be found or loaded; the message says what was tried and how to fix it."""


def _check_local_path(path: str, argument: str, hint: str) -> None:
    """Raise FileNotFoundError early when a local path (or glob pattern) matches nothing."""
    if "://" in path:
        return
    if not glob(os.path.expanduser(path), recursive=True):
        raise FileNotFoundError(f"{argument}={path!r} does not exist (or the pattern matches no file). {hint}")


def _check_builder_arguments(name: str, data_dir: str | None, data_files: str | Sequence[str] | dict | None) -> None:
    """Validate the local paths a file-format builder (imagefolder, parquet, ...) needs before datasets runs.

    For Hub ids, data_dir and data_files are paths inside the dataset repository and are not checked here."""
    if name not in LOCAL_FILE_BUILDERS:
        return
    if name == "imagefolder" and data_dir is None and data_files is None:
        raise ValueError(
            "load_image_dataset('imagefolder') needs data_dir= (a folder with one sub-folder per class, "
            "or train/ and test/ split folders) or data_files=."
        )
    if name == "parquet" and data_files is None and data_dir is None:
        raise ValueError("load_image_dataset('parquet') needs data_files= (a path, glob or list of .parquet files).")
    if data_dir is not None:
        _check_local_path(str(data_dir), "data_dir", "Pass an existing folder of images.")
    if data_files is not None:
        for path in _flatten_data_files(data_files):
            _check_local_path(str(path), "data_files", "Pass existing files or a glob that matches some.")


def _flatten_data_files(data_files: str | Sequence[str] | dict) -> list[str]:
    if isinstance(data_files, (str, os.PathLike)):
        return [str(data_files)]
    if isinstance(data_files, dict):
        return [path for value in data_files.values() for path in _flatten_data_files(value)]
    return [str(path) for path in data_files]


def _load_builtin_fashion_mnist(
    split: str, data_dir: str | None, streaming: bool
) -> datasets.Dataset | datasets.IterableDataset:
    split = {"t10k": "test"}.get(split, split)
    dataset = load_fashion_mnist(split, root=data_dir or FASHION_MNIST_ROOT)
    return dataset.to_iterable_dataset() if streaming else dataset


def is_fashion_mnist(name: str | None) -> bool:
    """Whether a dataset name selects the built-in Fashion-MNIST (read from its IDX files, no re-encoding)."""
    return name in BUILTIN_FASHION_MNIST_NAMES


def load_image_dataset(
    name: str,
    *,
    config_name: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    data_files: str | Sequence[str] | dict | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of an image dataset: a Hub id, a local folder, "imagefolder", "parquet" or "fashion-mnist".

    Raises early, with a message naming what was tried, when the dataset, split or paths do not exist.
    """
    import datasets

    if is_fashion_mnist(name):
        return _load_builtin_fashion_mnist(split, data_dir, streaming)
    _check_builder_arguments(name, data_dir, data_files)
    tried = (
        f"load_dataset({name!r}, name={config_name!r}, split={split!r}, data_dir={data_dir!r}, "
        f"data_files={data_files!r}, streaming={streaming})"
    )
    try:
        return datasets.load_dataset(
            name,
            config_name,
            split=split,
            data_dir=data_dir,
            data_files=data_files,
            streaming=streaming,
            cache_dir=cache_dir,
        )
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetsError) as error:
        raise DatasetLoadError(
            f"Could not load dataset: {tried} failed with {type(error).__name__}: {error}. "
            "Check the Hub id (https://huggingface.co/datasets/<id>), your network or HF_HUB_OFFLINE/HF_TOKEN; "
            "for local data use name='imagefolder' with data_dir=, or name='parquet' with data_files=; "
            "the built-in Fashion-MNIST is name='fashion-mnist'."
        ) from error
    except ValueError as error:
        raise DatasetLoadError(
            f"Could not load dataset: {tried} failed with {error}. Check the split name (e.g. 'train', "
            "'test', 'validation', or a slice like 'train[:10%]') and the config name of the dataset."
        ) from error


def find_image_column(features: datasets.Features, name: str | None = None) -> str:
    """Return the name of the image column: `name` if given and present, else the first `datasets.Image` column."""
    import datasets

    if name is not None:
        if name not in features:
            raise KeyError(f"Image column {name!r} not in the dataset; its columns are {list(features)}.")
        return name
    image_columns = [column for column, feature in features.items() if isinstance(feature, datasets.Image)]
    if not image_columns:
        raise KeyError(
            f"No datasets.Image column found among {dict(features)}; pass the image column name explicitly "
            "(e.g. --image-column img) or cast it with dataset.cast_column(name, datasets.Image())."
        )
    return image_columns[0]


def find_label_column(features: datasets.Features, name: str | None = None) -> str | None:
    """Return the label column: `name` if given, else the first ClassLabel column, else an integer `label(s)`."""
    import datasets

    if name is not None:
        if name not in features:
            raise KeyError(f"Label column {name!r} not in the dataset; its columns are {list(features)}.")
        return name
    class_labels = [column for column, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if class_labels:
        return class_labels[0]
    for column in ("label", "labels", "fine_label", "class", "target"):
        feature = features.get(column)
        if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
            return column
    return None


def with_undecoded_images(
    dataset: datasets.Dataset | datasets.IterableDataset, image_column: str
) -> datasets.Dataset | datasets.IterableDataset:
    """Switch the image column to raw {bytes, path} so that bad files reach `decode_image` instead of crashing."""
    import datasets

    return dataset.cast_column(image_column, datasets.Image(decode=False))


# --------------------------------------------------------------------------------------------
# Robust decoding
# --------------------------------------------------------------------------------------------


@dataclass
class SkippedImageCounter:
    """Counts images that could not be decoded, by reason, with a few example keys for the run report."""

    max_examples: int = 10
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def record(self, reason: str, key: Any = None) -> None:
        """Count one skipped image; `key` (index or path) is kept for the first `max_examples` skips."""
        self.reasons[reason] += 1
        if key is not None and len(self.examples) < self.max_examples:
            self.examples.append(f"{key}: {reason}")

    def merge(self, other: SkippedImageCounter | dict[str, int]) -> None:
        """Add the counts of another counter (or of a batch's `skipped` dict, e.g. from a worker process)."""
        reasons = other.reasons if isinstance(other, SkippedImageCounter) else other
        self.reasons.update(reasons)
        if isinstance(other, SkippedImageCounter):
            self.examples.extend(other.examples[: max(0, self.max_examples - len(self.examples))])

    def summary(self) -> str:
        """One line for logs: how many images were skipped and why."""
        if not self.count:
            return "no images skipped"
        reasons = ", ".join(f"{reason}: {number}" for reason, number in self.reasons.most_common())
        examples = f" (e.g. {'; '.join(self.examples[:3])})" if self.examples else ""
        return f"skipped {self.count} undecodable images ({reasons}){examples}"


_IMAGE_VALUE_TYPES = (PILImage.Image, np.ndarray, bytes, bytearray, memoryview, str, os.PathLike, dict)


@dataclass(frozen=True)
class ImageLimits:
    """What an image value inside a dataset may be: local paths only inside `roots` (None: any local regular
    file), URLs only with `allow_remote`, at most `max_bytes` encoded and `max_pixels` decoded."""

    roots: tuple[str, ...] | None = None
    allow_remote: bool = False
    max_bytes: int = 64 * 2**20
    # 50 megapixels (e.g. 8660 x 5773) covers camera photos; decoded, that is 150 MB of RGB per loader worker.
    max_pixels: int = 50_000_000

    def allows_path(self, path: str) -> bool:
        if self.roots is None:
            return True
        real = os.path.realpath(path)
        return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots)


DEFAULT_IMAGE_LIMITS = ImageLimits()
_image_limits = DEFAULT_IMAGE_LIMITS


@contextmanager
def using_image_limits(limits: ImageLimits) -> Iterator[None]:
    """Make `limits` this process's default for decoding while the block runs (DataLoader workers forked in it
    inherit them); the previous default comes back afterwards."""
    global _image_limits
    previous, _image_limits = _image_limits, limits
    try:
        yield
    finally:
        _image_limits = previous


def dataset_roots(
    data_dir: str | None, data_files: str | Sequence[str] | dict | None, extra: Sequence[str] = ()
) -> tuple[str, ...]:
    """The folders a dataset's image paths may point into: data_dir, the folders of data_files, `extra`, and
    the datasets and Hub caches (where downloaded datasets keep their files)."""
    import datasets

    folders = [datasets.config.HF_DATASETS_CACHE, huggingface_hub.constants.HF_HUB_CACHE, *extra]
    if data_dir is not None:
        folders.append(data_dir)
    for pattern in _flatten_data_files(data_files) if data_files is not None else []:
        if "://" not in pattern:
            folders.append(_glob_base(pattern))
    return tuple(os.path.realpath(os.path.expanduser(str(folder))) for folder in folders)


def _glob_base(pattern: str) -> str:
    """The folder of a file path, or of a glob up to its first wildcard part."""
    parts = Path(os.path.expanduser(pattern)).parts
    for index, part in enumerate(parts):
        if any(char in part for char in "*?["):
            return str(Path(*parts[:index])) if index else "."
    return str(Path(*parts).parent)


class ImageRefused(Exception):
    """An image value outside the limits; its message is the reason it is skipped."""


def _open_image(value: Any, limits: ImageLimits) -> PILImage.Image:
    """Open `value` (one of `_IMAGE_VALUE_TYPES`) lazily, without decoding the pixels, within `limits`."""
    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, np.ndarray):
        return PILImage.fromarray(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) > limits.max_bytes:
            raise ImageRefused("over byte limit")
        return PILImage.open(io.BytesIO(value))
    if isinstance(value, (str, os.PathLike)):
        return PILImage.open(io.BytesIO(_read_image_file(str(value), limits)))
    return _open_image(value["bytes"] if value.get("bytes") is not None else value["path"], limits)


def _read_image_file(path: str, limits: ImageLimits) -> bytes:
    """The bytes of a local file inside the data roots, or of a URL when remote images are allowed."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    if "://" in path:
        if not limits.allow_remote:
            raise ImageRefused("remote URL not allowed")
        with fsspec.open(path, "rb") as handle:
            return _read_capped(handle, limits.max_bytes)
    if not limits.allows_path(path):
        raise ImageRefused("outside data roots")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ImageRefused("not a regular file")
    with open(path, "rb") as handle:
        return _read_capped(handle, limits.max_bytes)


def _read_capped(handle, max_bytes: int) -> bytes:
    data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageRefused("over byte limit")
    return data


def _high_bit_depth_to_8bit(image: PILImage.Image) -> PILImage.Image:
    """Map 16/32-bit integer and float grayscale images onto 0..255 (16-bit by its full range)."""
    pixels = np.asarray(image)
    if image.mode.startswith("I;16"):
        return PILImage.fromarray((pixels.astype(np.uint32) >> 8).astype(np.uint8))
    return PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def to_rgb(image: PILImage.Image, alpha: Literal["white", "drop"] = "white") -> PILImage.Image:
    """Convert any PIL mode to RGB; transparent images are composited on white or have their alpha dropped."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        if alpha == "drop":
            return image.convert("RGB")
        background = PILImage.new("RGBA", image.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(
    value: Any,
    counter: SkippedImageCounter | None = None,
    key: Any = None,
    alpha: Literal["white", "drop"] = "white",
    limits: ImageLimits | None = None,
) -> PILImage.Image | None:
    """Decode an image to RGB (EXIF orientation applied), or return None and count it when it is unreadable
    or outside `limits`."""
    image, reason = decode_image_or_reason(value, alpha=alpha, limits=limits)
    if reason is not None and counter is not None:
        counter.record(reason, key)
    return image


def decode_image_or_reason(
    value: Any, alpha: Literal["white", "drop"] = "white", limits: ImageLimits | None = None
) -> tuple[PILImage.Image | None, str | None]:
    """Decode like `decode_image`, returning (image, None) or (None, why it was skipped). `limits` (default:
    the process's, see `set_image_limits`) decide which paths are read and how large an image may be."""
    limits = limits or _image_limits
    if value is None or (isinstance(value, dict) and value.get("bytes") is None and value.get("path") is None):
        return None, "missing value"
    if not isinstance(value, _IMAGE_VALUE_TYPES):
        raise TypeError(
            f"Cannot decode an image from {type(value).__name__}; expected bytes, a path, a numpy array, "
            "a PIL image or datasets' {'bytes', 'path'} dict."
        )
    try:
        image = _open_image(value, limits)
        if image.width * image.height > limits.max_pixels:
            return None, "over pixel limit"
        image.load()
        return to_rgb(ImageOps.exif_transpose(image), alpha=alpha), None
    except ImageRefused as refused:
        return None, str(refused)
    except PILImage.DecompressionBombError:
        return None, "decompression bomb"
    except FileNotFoundError:
        return None, "missing file"
    except PILImage.UnidentifiedImageError:
        return None, "unidentified format"
    except Exception as error:  # noqa: BLE001 - any failure on untrusted bytes means "skip this image"
        return None, "truncated" if "truncated" in str(error).lower() else f"corrupt ({type(error).__name__})"


# --------------------------------------------------------------------------------------------
# Torch datasets over Hugging Face datasets, with skipping of bad images
# --------------------------------------------------------------------------------------------


class DecodedImageDataset(torch.utils.data.Dataset):
    """Map-style torch view of a HF dataset: items are {"pixel_values", "label"}, or {"skipped": reason}
    for an undecodable image. Use `collate_skipping_bad_images` as the DataLoader's collate_fn: it drops
    the skipped items and reports them in the batch, which works across DataLoader worker processes.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: Callable[[PILImage.Image], Any] | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
    ) -> None:
        self.image_column = find_image_column(dataset.features, image_column)
        self.label_column = find_label_column(dataset.features, label_column)
        self.dataset = with_undecoded_images(dataset, self.image_column)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _decoded_example(self.dataset[index], self.image_column, self.label_column, self.transform)


class DecodedIterableImageDataset(torch.utils.data.IterableDataset):
    """Iterable torch view of a (streaming) HF dataset, with the same skipping behaviour as DecodedImageDataset."""

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        transform: Callable[[PILImage.Image], Any] | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
    ) -> None:
        if dataset.features is None:
            raise ValueError("The streaming dataset has unknown features; pass image_column= explicitly.")
        self.image_column = find_image_column(dataset.features, image_column)
        self.label_column = find_label_column(dataset.features, label_column)
        self.dataset = with_undecoded_images(dataset, self.image_column)
        self.transform = transform

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for example in self.dataset:
            yield _decoded_example(example, self.image_column, self.label_column, self.transform)


def _decoded_example(
    example: dict[str, Any],
    image_column: str,
    label_column: str | None,
    transform: Callable[[PILImage.Image], Any] | None,
) -> dict[str, Any]:
    """Decode one example to {"pixel_values", "label"}; an unreadable image gives {"skipped": reason}."""
    image, reason = decode_image_or_reason(example[image_column])
    if image is None:
        return {"skipped": reason}
    label = example[label_column] if label_column is not None else -1
    return {"pixel_values": transform(image) if transform is not None else image, "label": label}


def collate_skipping_bad_images(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decodable examples of a batch and count the skipped ones in `batch["skipped"]` (reason -> n)."""
    good = [example for example in batch if "skipped" not in example]
    skipped = dict(Counter(example["skipped"] for example in batch if "skipped" in example))
    collated = torch.utils.data.default_collate(good) if good else {}
    return {**collated, "skipped": skipped}


def decode_to_uint8_array(
    dataset: datasets.Dataset,
    size: int,
    image_column: str | None = None,
    label_column: str | None = None,
    counter: SkippedImageCounter | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a small map-style dataset into uint8 (N, 3, size, size) and int64 labels for the in-memory fast path.

    Images are resized (bicubic) to size x size; undecodable ones are skipped and counted.
    """
    image_column = find_image_column(dataset.features, image_column)
    label_column = find_label_column(dataset.features, label_column)
    raw = with_undecoded_images(dataset, image_column)
    images, labels = [], []
    for index, example in enumerate(raw):
        image = decode_image(example[image_column], counter, index)
        if image is None:
            continue
        if image.size != (size, size):
            image = image.resize((size, size), PILImage.Resampling.BICUBIC)
        images.append(np.asarray(image).transpose(2, 0, 1))
        labels.append(example[label_column] if label_column is not None else -1)
    if not images:
        raise ValueError(
            f"None of the {len(dataset)} images could be decoded; check the image column {image_column!r}."
        )
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Sharding and shuffling
# --------------------------------------------------------------------------------------------


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size and world_size >= 1, got rank={rank}, world_size={world_size}.")


def shard_for_rank(
    dataset: datasets.Dataset | datasets.IterableDataset, rank: int, world_size: int
) -> datasets.Dataset | datasets.IterableDataset:
    """Return this rank's disjoint shard: every `world_size`-th sample from `rank` for map-style (so the global
    batch of step k is samples [k * global batch, (k + 1) * global batch) at any world size), shards or 1-in-N
    for iterable."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    _check_rank(rank, world_size)
    if isinstance(dataset, datasets.IterableDataset):
        return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return dataset.shard(num_shards=world_size, index=rank, contiguous=False)


def epoch_seed(seed: int, epoch: int) -> int:
    """Derive a 32-bit seed that is the same on every rank for a given (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def shuffled_shard_for_epoch(
    dataset: datasets.Dataset | datasets.IterableDataset,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    buffer_size: int = 10_000,
) -> datasets.Dataset | datasets.IterableDataset:
    """Shuffle with a seed shared by all ranks and new each epoch, then take this rank's shard.

    Every epoch the shards stay disjoint and cover the dataset, and each rank sees a fresh mix of samples.
    Iterable datasets use datasets' shard-order + buffer shuffle, re-seeded through `set_epoch`.
    """
    import datasets

    _check_rank(rank, world_size)
    if isinstance(dataset, datasets.IterableDataset):
        shard = shard_for_rank(dataset.shuffle(seed=seed, buffer_size=buffer_size), rank, world_size)
        shard.set_epoch(epoch)
        return shard
    return shard_for_rank(dataset.shuffle(seed=epoch_seed(seed, epoch)), rank, world_size)


def rank_epoch_indices(num_samples: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """Indices of this rank's samples for an epoch of the in-memory fast path: every `world_size`-th entry of a
    shared seeded permutation from `rank` on, in equal disjoint parts (the last num_samples % world_size are left
    out). Step k's global batch is then entries [k * global batch, (k + 1) * global batch) of the permutation
    whatever the world size, so an elastic run resumed on another number of workers continues the same epoch."""
    _check_rank(rank, world_size)
    if num_samples < world_size:
        raise ValueError(f"Cannot split {num_samples} samples over {world_size} ranks; use fewer ranks.")
    permutation = np.random.default_rng(epoch_seed(seed, epoch)).permutation(num_samples)
    return permutation[rank : num_samples // world_size * world_size : world_size]


def in_memory_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield this rank's full (uint8 images, int64 labels) batches for one epoch of the in-memory fast path.

    Every rank gets the same number of batches (the last partial batch is dropped), as DDP needs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if len(images) != len(labels):
        raise ValueError(f"Got {len(images)} images but {len(labels)} labels; they must match one to one.")
    indices = rank_epoch_indices(len(images), rank, world_size, seed, epoch)
    for start in range(0, len(indices) - batch_size + 1, batch_size):
        batch = np.sort(indices[start : start + batch_size])
        yield torch.from_numpy(images[batch]), torch.from_numpy(labels[batch])
