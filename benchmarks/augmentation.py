"""Multi-crop augmentation throughput per worker process (1 thread) on JPEG photographs of ImageNet's average
size: the authors' pipeline (PIL decode, torchvision transforms on PIL images, PIL blur, docs/method.md §5) against
`twist_hf.transforms.MultiCropTransform`, both starting from the encoded file bytes (decoding is part of a data
loader's work) and ending in normalised float views. Wall-clock and process (CPU) time are both reported: on a
shared machine the CPU time of this one thread is the less noisy measure of per-core throughput."""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import interleaved_seconds, rates, ratio, summarise, time_repeated
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from twist_hf.transforms import (
    BLUR_PROBABILITIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRETRAINING_GLOBAL_SCALE,
    PRETRAINING_LOCAL_SCALE,
    SOLARIZE_PROBABILITIES,
    MultiCropTransform,
)

# Colour photographs (and one grayscale) shipped with scikit-image; scikit-learn adds china.jpg and flower.jpg.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "camera.png",
)
# ImageNet-1k's average image is about 500x375 (landscape; portraits are 375x500), stored as JPEG.
PHOTO_SIZE = (500, 375)
JPEG_QUALITY = 90
AUTHORS = "authors (torchvision on PIL, PIL blur)"
OURS = "ours (MultiCropTransform)"


def photograph_files() -> list[Path]:
    """Paths of the bundled real photographs (scikit-learn's load_sample_images, scikit-image's data folder)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    skimage_dir = Path(skimage.data.__file__).parent
    return [Path(name) for name in load_sample_images().filenames] + [skimage_dir / name for name in SKIMAGE_PHOTOS]


def imagenet_like_jpeg(path: Path) -> bytes:
    """The photograph resized (bicubic, centre-cropped to fill) to ImageNet's average size in its orientation,
    encoded as a quality-90 JPEG."""
    image = Image.open(path).convert("RGB")
    size = PHOTO_SIZE if image.width >= image.height else PHOTO_SIZE[::-1]
    buffer = io.BytesIO()
    ImageOps.fit(image, size, Image.BICUBIC).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class PILGaussianBlur:
    """The authors' GaussianBlur: Pillow's filter with radius sigma ~ U(0.1, 2)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class PILSolarization:
    """The authors' Solarization: Pillow's ImageOps.solarize (threshold 128)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image)


def authors_view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> T.Compose:
    """One view of the authors' pipeline (torchvision v1 on PIL images, docs/method.md §5)."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PILGaussianBlur()], p=blur_p),
            T.RandomApply([PILSolarization()], p=solarize_p),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class AuthorsMultiCrop:
    """Decode with PIL, then every view through its own torchvision pipeline."""

    def __init__(self, num_local: int, global_size: int = 224, local_size: int = 96):
        blur, solarize = BLUR_PROBABILITIES, SOLARIZE_PROBABILITIES
        self.views = [
            authors_view(global_size, PRETRAINING_GLOBAL_SCALE, blur[0], solarize[0]),
            authors_view(global_size, PRETRAINING_GLOBAL_SCALE, blur[1], solarize[1]),
        ]
        self.views += [
            authors_view(local_size, PRETRAINING_LOCAL_SCALE, blur[2], solarize[2]) for _ in range(num_local)
        ]

    def __call__(self, data: bytes) -> list[torch.Tensor]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return [view(image) for view in self.views]


class OursMultiCrop:
    """twist_hf.transforms.MultiCropTransform on the opened, not yet decoded image (as a dataset column gives it)."""

    def __init__(self, num_local: int, global_size: int = 224, local_size: int = 96):
        self.transform = MultiCropTransform(global_size, local_size, num_local)

    def __call__(self, data: bytes) -> list[torch.Tensor]:
        return self.transform(Image.open(io.BytesIO(data)))


def pipelines(num_local: int, global_size: int, local_size: int) -> dict:
    return {
        AUTHORS: AuthorsMultiCrop(num_local, global_size, local_size),
        OURS: OursMultiCrop(num_local, global_size, local_size),
    }


def cpu_timed(call: Callable[[], object], cpu_seconds: list[float]) -> Callable[[], None]:
    """`call`, appending the process (CPU) time of each call to `cpu_seconds`."""

    def timed() -> None:
        started = time.process_time()
        call()
        cpu_seconds.append(time.process_time() - started)

    return timed


def run(
    warmup: int,
    reps: int,
    num_local: int = 6,
    global_size: int = 224,
    local_size: int = 96,
    max_images: int | None = None,
) -> dict:
    """Images/s of each pipeline over all photographs (one rep = one pass over them, pipelines in turns), on
    one thread, by wall-clock and by process time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        files = photograph_files()[:max_images]
        blobs = [imagenet_like_jpeg(path) for path in files]
        sizes = {path.name: Image.open(io.BytesIO(blob)).size for path, blob in zip(files, blobs)}
        random.seed(0)
        torch.manual_seed(0)
        passes = {
            name: (lambda pipeline=pipeline: [pipeline(blob) for blob in blobs])
            for name, pipeline in pipelines(num_local, global_size, local_size).items()
        }
        for one_pass in passes.values():
            time_repeated(one_pass, warmup=warmup, reps=1)
        cpu_seconds: dict[str, list[float]] = {name: [] for name in passes}
        seconds = interleaved_seconds({name: cpu_timed(call, cpu_seconds[name]) for name, call in passes.items()}, reps)
        results = {
            name: {
                "img_per_s": summarise(rates(seconds[name], len(blobs))),
                "img_per_cpu_s": summarise(rates(cpu_seconds[name], len(blobs))),
            }
            for name in passes
        }
    finally:
        torch.set_num_threads(threads)
    for result in results.values():
        result["speedup_vs_authors"] = ratio(result["img_per_s"], results[AUTHORS]["img_per_s"])
        result["speedup_vs_authors_cpu"] = ratio(result["img_per_cpu_s"], results[AUTHORS]["img_per_cpu_s"])
    return {
        "views": f"2x{global_size} + {num_local}x{local_size}",
        "threads": 1,
        "images": sizes,
        "jpeg_quality": JPEG_QUALITY,
        "pipelines": results,
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-images", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.warmup, args.reps, max_images=args.max_images), indent=2))
