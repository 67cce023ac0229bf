"""Generated JPEG photographs-alike for the ingest tests and benchmarks: smooth colour gradients with noise, of
varied sizes, written as an imagefolder, parquet shards (ImageNet-1k's Hub layout) or WebDataset tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth random colour field with a little noise: compresses and decodes like a photograph."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, field.shape, dtype=np.int16)
    return Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def photo_jpegs(count: int, sizes: tuple[int, int], seed: int = 0) -> list[tuple[bytes, int]]:
    """`count` (JPEG bytes, label in {0, 1}) with sides drawn in `sizes`."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = (int(side) for side in rng.integers(sizes[0], sizes[1] + 1, 2))
        images.append((jpeg_bytes(synthetic_photo(rng, height, width)), index % 2))
    return images


def write_image_folder(root: Path, splits: dict[str, int], sizes: tuple[int, int] = (48, 160)) -> Path:
    """An imagefolder root/<split>/<class>/<n>.jpg with `splits[split]` images each."""
    for offset, (split, count) in enumerate(splits.items()):
        for index, (data, label) in enumerate(photo_jpegs(count, sizes, seed=offset)):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:05d}.jpg").write_bytes(data)
    return root


def write_parquet_shards(root: Path, count: int, shards: int, sizes: tuple[int, int] = (48, 160)) -> list[str]:
    """ImageNet-1k's Hub layout: train-0000n-of-0000N.parquet with `image` {bytes, path} and a ClassLabel `label`,
    the features in the parquet metadata as `datasets` writes them."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = photo_jpegs(count, sizes)
    paths = []
    for shard in range(shards):
        rows = images[shard::shards]
        table = {
            "image": [{"bytes": data, "path": f"{shard}-{index}.JPEG"} for index, (data, _) in enumerate(rows)],
            "label": [label for _, label in rows],
        }
        path = root / f"train-{shard:05d}-of-{shards:05d}.parquet"
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
        paths.append(str(path))
    return paths


def write_webdataset_shards(root: Path, count: int, shards: int, sizes: tuple[int, int] = (48, 160)) -> list[str]:
    """WebDataset tar shards: <key>.jpg and <key>.cls per sample."""
    root.mkdir(parents=True, exist_ok=True)
    images = photo_jpegs(count, sizes)
    paths = []
    for shard in range(shards):
        path = root / f"shard-{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index, (data, label) in list(enumerate(images))[shard::shards]:
                for suffix, payload in (("jpg", data), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths
