"""Tests for twist_hf.data: the IDX reader on the real Fashion-MNIST files, loading HF datasets from
generated image folders and parquet files, robust decoding, and per-rank sharding and shuffling."""

import gzip
import io
import itertools

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from twist_hf.configuration_twist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from twist_hf.data import (
    FASHION_MNIST_CLASSES,
    DatasetLoadError,
    DecodedImageDataset,
    DecodedIterableImageDataset,
    SkippedImageCounter,
    channel_mean_std,
    collate_skipping_bad_images,
    decode_image,
    decode_to_uint8_array,
    fashion_mnist_arrays,
    find_image_column,
    find_label_column,
    in_memory_batches,
    is_fashion_mnist,
    load_fashion_mnist,
    load_image_dataset,
    rank_epoch_indices,
    read_idx,
    shard_for_rank,
    shuffled_shard_for_epoch,
)
from twist_hf.training.arguments import DataArguments
from twist_hf.training.data import load_split


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def truncated_png() -> bytes:
    """The first half of a PNG of noise: a valid header, then the pixel data stops."""
    noise = np.random.default_rng(0).integers(0, 255, (16, 16), np.uint8)
    data = png_bytes(Image.fromarray(noise))
    return data[: len(data) // 2]


def write_idx(path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as handle:
        handle.write(header + payload)


# ---------------------------------------------------------------- Fashion-MNIST IDX files


def test_fashion_mnist_arrays_match_known_facts():
    train_images, train_labels = fashion_mnist_arrays("train")
    test_images, test_labels = fashion_mnist_arrays("test")
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28) and test_labels.dtype == np.int64
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    assert train_labels[0] == 9 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert not train_images.flags.writeable


def test_fashion_mnist_mean_std_constants_match_the_training_images():
    mean, std = channel_mean_std(fashion_mnist_arrays("train")[0])
    assert mean[0] == pytest.approx(FASHION_MNIST_MEAN[0], abs=1e-4)
    assert std[0] == pytest.approx(FASHION_MNIST_STD[0], abs=1e-4)


def test_load_fashion_mnist_gives_image_and_class_label_features():
    dataset = load_fashion_mnist("test")
    images, labels = fashion_mnist_arrays("test")
    assert len(dataset) == 10000
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset.features["label"].names == list(FASHION_MNIST_CLASSES)
    example = dataset[0]
    assert example["label"] == labels[0] == 9
    np.testing.assert_array_equal(np.asarray(example["image"]), images[0])


def test_read_idx_parses_a_hand_written_file(tmp_path):
    path = tmp_path / "tiny-images-idx3-ubyte.gz"
    write_idx(path, 2051, (2, 2, 3), bytes(range(12)))
    np.testing.assert_array_equal(read_idx(path, 2051), np.arange(12, dtype=np.uint8).reshape(2, 2, 3))


def test_read_idx_rejects_wrong_magic_and_truncated_files(tmp_path):
    labels_file = tmp_path / "labels.gz"
    write_idx(labels_file, 2049, (3,), bytes([1, 2, 3]))
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        read_idx(labels_file, 2051)
    truncated = tmp_path / "truncated.gz"
    write_idx(truncated, 2051, (2, 2, 3), bytes(range(7)))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(truncated, 2051)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_arrays("train", root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_arrays("train", root=tmp_path)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        fashion_mnist_arrays("validation")


def tiny_fashion_mnist(folder, pixel: int) -> str:
    """IDX files of a 2-image Fashion-MNIST in `folder` (both splits), every pixel `pixel` (labels 3 and 7)."""
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, (2, 28, 28), bytes([pixel]) * 2 * 28 * 28)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, (2,), bytes([3, 7]))
    return str(folder)


@pytest.mark.parametrize("name", ["fashion-mnist", "fashion_mnist"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_split_reads_fashion_mnist_from_data_dir_by_either_name(tmp_path, name, split):
    data = DataArguments(dataset_name=name, data_dir=tiny_fashion_mnist(tmp_path, pixel=9))
    loaded = load_split(data, split, 28)
    # The fast path hands out the cached IDX arrays themselves: no PNG round trip.
    assert loaded.images is fashion_mnist_arrays(split, root=tmp_path)[0]
    assert loaded.images.shape == (2, 28, 28) and (loaded.images == 9).all()
    np.testing.assert_array_equal(loaded.labels, [3, 7])


def test_load_split_of_an_unknown_fashion_mnist_split_is_a_clear_error(tmp_path):
    data = DataArguments(dataset_name="fashion-mnist", data_dir=tiny_fashion_mnist(tmp_path, pixel=1))
    with pytest.raises(ValueError, match="Fashion-MNIST split must be 'train' or 'test', got 'validation'"):
        load_split(data, "validation", 28)


def test_both_fashion_mnist_spellings_are_recognised_and_nothing_else():
    assert is_fashion_mnist("fashion-mnist") and is_fashion_mnist("fashion_mnist")
    assert not is_fashion_mnist("zalando-datasets/fashion_mnist") and not is_fashion_mnist(None)


def test_channel_mean_std_against_hand_computation():
    images = np.array([[[0, 255]], [[255, 255]]], dtype=np.uint8)  # (2, 1, 2): pixels 0, 1, 1, 1
    mean, std = channel_mean_std(images)
    assert mean == pytest.approx((0.75,))
    assert std == pytest.approx((np.sqrt((0.75**2 + 3 * 0.25**2) / 3),))
    rgb = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    rgb[:, 1] = 255
    assert channel_mean_std(rgb) == (pytest.approx((0.0, 1.0, 0.0)), pytest.approx((0.0, 0.0, 0.0)))


# ---------------------------------------------------------------- any HF image dataset


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Class folders cat/ (3 PNG) and dog/ (2 JPEG) of small solid-colour images."""
    root = tmp_path_factory.mktemp("imagefolder")
    for name, colour, count, suffix in (("cat", (200, 10, 10), 3, "png"), ("dog", (10, 10, 200), 2, "jpg")):
        (root / name).mkdir()
        for index in range(count):
            Image.new("RGB", (12, 10), colour).save(root / name / f"{index}.{suffix}")
    return root


def test_load_image_dataset_from_an_image_folder(image_folder):
    dataset = load_image_dataset("imagefolder", data_dir=str(image_folder))
    assert len(dataset) == 5
    assert find_image_column(dataset.features) == "image"
    assert find_label_column(dataset.features) == "label"
    assert dataset.features["label"].names == ["cat", "dog"]
    assert sorted(dataset["label"]) == [0, 0, 0, 1, 1]
    assert dataset[0]["image"].size == (12, 10)


def test_streaming_image_folder_decodes_through_the_iterable_wrapper(image_folder):
    stream = load_image_dataset("imagefolder", data_dir=str(image_folder), streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    items = list(DecodedIterableImageDataset(stream, transform=pil_to_chw_tensor))
    assert sorted(item["label"] for item in items) == [0, 0, 0, 1, 1]
    assert all(item["pixel_values"].shape == (3, 10, 12) for item in items)


def test_load_image_dataset_from_parquet_keeps_the_image_feature(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["a", "b"])})
    images = [png_bytes(Image.new("L", (5, 4), value)) for value in (0, 100, 200)]
    source = datasets.Dataset.from_dict({"img": images, "fine": [0, 1, 1]}, features=features)
    source.to_parquet(str(tmp_path / "data.parquet"))
    dataset = load_image_dataset("parquet", data_files=str(tmp_path / "*.parquet"), cache_dir=str(tmp_path / "c"))
    assert find_image_column(dataset.features) == "img"
    assert find_label_column(dataset.features) == "fine"
    assert dataset["fine"] == [0, 1, 1]
    assert np.asarray(dataset[1]["img"]).tolist() == [[100] * 5] * 4


def test_load_image_dataset_builtin_fashion_mnist_streaming():
    dataset = load_image_dataset("fashion-mnist", split="test", streaming=True)
    assert isinstance(dataset, datasets.IterableDataset)
    assert next(iter(dataset))["label"] == 9


def test_load_image_dataset_errors_name_what_was_tried(tmp_path, monkeypatch, image_folder):
    with pytest.raises(FileNotFoundError, match="data_dir=.*does not exist"):
        load_image_dataset("imagefolder", data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs data_dir="):
        load_image_dataset("imagefolder")
    with pytest.raises(FileNotFoundError, match="data_files=.*matches no file"):
        load_image_dataset("parquet", data_files=str(tmp_path / "*.parquet"))
    with pytest.raises(DatasetLoadError, match="split"):
        load_image_dataset("imagefolder", data_dir=str(image_folder), split="validation")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetLoadError, match="someone/no-such-dataset.*Check the Hub id"):
        load_image_dataset("someone/no-such-dataset")
    with pytest.raises(DatasetLoadError, match="data_dir='inside/the/repo'"):  # a repo path, not local
        load_image_dataset("someone/no-such-dataset", data_dir="inside/the/repo")


def test_find_columns_by_type_by_name_and_with_clear_errors():
    features = datasets.Features(
        {"id": datasets.Value("string"), "photo": datasets.Image(), "labels": datasets.Value("int64")}
    )
    assert find_image_column(features) == "photo"
    assert find_label_column(features) == "labels"
    assert find_label_column(datasets.Features({"photo": datasets.Image()})) is None
    with pytest.raises(KeyError, match=r"'picture' not in the dataset; its columns are \['id', 'photo', 'labels'\]"):
        find_image_column(features, "picture")
    with pytest.raises(KeyError, match="No datasets.Image column"):
        find_image_column(datasets.Features({"id": datasets.Value("string")}))


# ---------------------------------------------------------------- robust decoding


def test_decode_converts_grayscale_palette_rgba_and_cmyk_to_rgb():
    gray = decode_image(png_bytes(Image.new("L", (3, 2), 77)))
    assert gray.mode == "RGB" and np.asarray(gray).tolist() == [[[77, 77, 77]] * 3] * 2
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert np.asarray(decode_image(png_bytes(palette)))[0, 0].tolist() == [10, 20, 30]
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(100, 50, 0, 0), (100, 50, 0, 255), (100, 50, 0, 102)])  # alpha 0, 1, 0.4
    on_white = np.asarray(decode_image(png_bytes(rgba)))[0].tolist()
    assert on_white[0] == [255, 255, 255] and on_white[1] == [100, 50, 0]
    assert on_white[2] == pytest.approx([0.4 * 100 + 0.6 * 255, 0.4 * 50 + 0.6 * 255, 0.6 * 255], abs=1)
    assert np.asarray(decode_image(png_bytes(rgba), alpha="drop"))[0, 0].tolist() == [100, 50, 0]
    cmyk = decode_image(png_bytes(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), format="JPEG"))
    red, green, blue = np.asarray(cmyk)[0, 0].tolist()
    assert cmyk.mode == "RGB" and red > 240 and green < 15 and blue < 15


def test_decode_maps_16_bit_grayscale_by_its_full_range():
    image = Image.fromarray(np.array([[0, 256 * 100, 65535]], dtype=np.uint16))
    assert np.asarray(decode_image(png_bytes(image)))[0, :, 0].tolist() == [0, 100, 255]


def test_decode_skips_and_counts_corrupt_truncated_and_missing_images(tmp_path):
    counter = SkippedImageCounter()
    good = png_bytes(Image.new("RGB", (16, 16), (1, 2, 3)))
    noisy_jpeg = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)), "JPEG")
    assert decode_image(good, counter) is not None
    assert decode_image(b"definitely not an image", counter, key="a") is None
    assert decode_image(good[: len(good) // 2], counter, key="b") is None
    assert decode_image({"bytes": noisy_jpeg[:300], "path": "c.jpg"}, counter, key="c") is None
    assert decode_image({"bytes": None, "path": str(tmp_path / "gone.png")}, counter) is None
    assert decode_image(None, counter) is None
    assert counter.count == 5
    assert counter.reasons == {
        "unidentified format": 1,
        "truncated": 2,
        "missing file": 1,
        "missing value": 1,
    }
    assert counter.examples == ["a: unidentified format", "b: truncated", "c: truncated"]
    assert "skipped 5 undecodable images" in counter.summary()
    with pytest.raises(TypeError, match="Cannot decode an image from int"):
        decode_image(3)


def pil_to_chw_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.fixture()
def dataset_with_bad_images():
    good = [png_bytes(Image.new("L", (4, 4), value)) for value in (10, 20, 30)]
    images = [good[0], b"garbage", good[1], truncated_png(), good[2]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    return datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1, 1]}, features=features)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_skips_bad_images_and_reports_them_from_worker_processes(dataset_with_bad_images, num_workers):
    loader = torch.utils.data.DataLoader(
        DecodedImageDataset(dataset_with_bad_images, transform=pil_to_chw_tensor),
        batch_size=5,
        num_workers=num_workers,
        collate_fn=collate_skipping_bad_images,
    )
    counter = SkippedImageCounter()
    batches = list(loader)
    for batch in batches:
        counter.merge(batch["skipped"])
    assert counter.reasons == {"unidentified format": 1, "truncated": 1}
    assert sum(len(batch.get("label", [])) for batch in batches) == 3
    pixels = torch.cat([batch["pixel_values"] for batch in batches if "pixel_values" in batch])
    assert pixels.shape == (3, 3, 4, 4) and pixels[:, :, 0, 0].tolist() == [[10] * 3, [20] * 3, [30] * 3]


def test_iterable_dataset_skips_bad_images(dataset_with_bad_images):
    items = list(DecodedIterableImageDataset(dataset_with_bad_images.to_iterable_dataset()))
    assert [item.get("skipped") for item in items] == [None, "unidentified format", None, "truncated", None]
    assert [item["label"] for item in items if "label" in item] == [0, 0, 1]


def test_decode_to_uint8_array_resizes_and_skips(dataset_with_bad_images):
    counter = SkippedImageCounter()
    images, labels = decode_to_uint8_array(dataset_with_bad_images, size=8, counter=counter)
    assert images.shape == (3, 3, 8, 8) and images.dtype == np.uint8
    assert images[:, 0, 4, 4].tolist() == [10, 20, 30] and labels.tolist() == [0, 0, 1]
    assert counter.count == 2


# ---------------------------------------------------------------- sharding and shuffling


def collect_ids(dataset) -> list[int]:
    return [example["id"] for example in dataset]


@pytest.fixture()
def numbered_dataset():
    return datasets.Dataset.from_dict({"id": list(range(103))})


def test_map_style_shards_are_disjoint_balanced_and_cover_the_dataset(numbered_dataset):
    shards = [collect_ids(shard_for_rank(numbered_dataset, rank, 4)) for rank in range(4)]
    assert sorted(itertools.chain(*shards)) == list(range(103))
    assert sorted(len(shard) for shard in shards) == [25, 26, 26, 26]


@pytest.mark.parametrize("num_shards", [4, 3])
def test_iterable_shards_are_disjoint_and_cover_the_dataset(numbered_dataset, num_shards):
    iterable = numbered_dataset.to_iterable_dataset(num_shards=num_shards)
    shards = [collect_ids(shard_for_rank(iterable, rank, 2)) for rank in range(2)]
    assert sorted(itertools.chain(*shards)) == list(range(103))


def test_bad_rank_is_rejected(numbered_dataset):
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_for_rank(numbered_dataset, 2, 2)


@pytest.mark.parametrize("iterable", [False, True])
def test_epoch_shuffle_is_seeded_disjoint_and_changes_each_epoch(numbered_dataset, iterable):
    dataset = numbered_dataset.to_iterable_dataset(num_shards=4) if iterable else numbered_dataset

    def epoch(seed, number):
        return [
            collect_ids(shuffled_shard_for_epoch(dataset, rank, 2, seed, number, buffer_size=16)) for rank in (0, 1)
        ]

    first = epoch(seed=1, number=0)
    assert sorted(first[0] + first[1]) == list(range(103))
    assert epoch(seed=1, number=0) == first
    assert epoch(seed=1, number=1) != first
    assert epoch(seed=2, number=0) != first
    assert first[0] != sorted(first[0])


def test_rank_epoch_indices_give_equal_disjoint_reproducible_parts():
    parts = [rank_epoch_indices(10, rank, 3, seed=0, epoch=5) for rank in range(3)]
    assert [len(part) for part in parts] == [3, 3, 3]
    assert len(set(np.concatenate(parts).tolist())) == 9
    np.testing.assert_array_equal(parts[1], rank_epoch_indices(10, 1, 3, seed=0, epoch=5))
    assert not np.array_equal(parts[1], rank_epoch_indices(10, 1, 3, seed=0, epoch=6))
    with pytest.raises(ValueError, match="Cannot split 2 samples over 3 ranks"):
        rank_epoch_indices(2, 0, 3, seed=0, epoch=0)


def test_in_memory_batches_cover_an_epoch_once_per_rank_in_full_batches():
    images = np.arange(22 * 2 * 2, dtype=np.uint8).reshape(22, 2, 2)
    labels = np.arange(22, dtype=np.int64)
    seen = []
    for rank in (0, 1):
        batches = list(in_memory_batches(images, labels, 4, rank=rank, world_size=2, seed=3, epoch=1))
        assert len(batches) == 2  # 11 samples per rank -> 2 full batches of 4
        for batch_images, batch_labels in batches:
            assert batch_images.dtype == torch.uint8 and batch_images.shape == (4, 2, 2)
            assert torch.equal(batch_images[:, 0, 0], (batch_labels * 4).to(torch.uint8))
            seen.extend(batch_labels.tolist())
    assert len(set(seen)) == 16
    with pytest.raises(ValueError, match="must match one to one"):
        next(in_memory_batches(images, labels[:3], 4))
