"""Multi-crop augmentation throughput per worker process (1 thread) on real photographs at native size:
the classic PIL-based torchvision pipeline of spec section 5 against ours, both starting from the encoded file
bytes (decoding is part of a data loader's work) and ending in normalised float views."""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch
from harness import interleaved_seconds, rates, ratio, summarise, time_repeated
from PIL import Image, ImageFilter
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
    PhotoMultiCropTransform,
    _blur_kernel_size,
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


def photograph_files() -> list[Path]:
    """Paths of the bundled real photographs (scikit-learn's load_sample_images, scikit-image's data folder)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    skimage_dir = Path(skimage.data.__file__).parent
    return [Path(name) for name in load_sample_images().filenames] + [skimage_dir / name for name in SKIMAGE_PHOTOS]


class PILGaussianBlur:
    """Gaussian blur as the reference TWIST code does it: Pillow's filter with radius sigma ~ U(0.1, 2)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def classic_view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float, pil_blur: bool) -> T.Compose:
    """One view of the classic torchvision (v1, PIL) pipeline of spec section 5."""
    blur = PILGaussianBlur() if pil_blur else T.GaussianBlur(_blur_kernel_size(size), sigma=(0.1, 2.0))
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([blur], p=blur_p),
            T.RandomSolarize(threshold=128, p=solarize_p),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ClassicMultiCrop:
    """Decode with PIL, then every view through its own torchvision v1 pipeline."""

    def __init__(self, num_local: int, global_size: int = 224, local_size: int = 96, pil_blur: bool = False):
        blur, solarize = BLUR_PROBABILITIES, SOLARIZE_PROBABILITIES
        self.views = [
            classic_view(global_size, PRETRAINING_GLOBAL_SCALE, blur[0], solarize[0], pil_blur),
            classic_view(global_size, PRETRAINING_GLOBAL_SCALE, blur[1], solarize[1], pil_blur),
        ]
        self.views += [
            classic_view(local_size, PRETRAINING_LOCAL_SCALE, blur[2], solarize[2], pil_blur) for _ in range(num_local)
        ]

    def __call__(self, data: bytes) -> list[torch.Tensor]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return [view(image) for view in self.views]


class TensorV2MultiCrop:
    """Decode with PIL, then twist_hf.transforms.MultiCropTransform (torchvision v2 on uint8 tensors)."""

    def __init__(self, num_local: int, global_size: int = 224, local_size: int = 96):
        self.transform = MultiCropTransform(global_size, local_size, num_local)

    def __call__(self, data: bytes) -> list[torch.Tensor]:
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB"))


class PhotoMultiCrop:
    """Ours: twist_hf.transforms.PhotoMultiCropTransform from the encoded bytes (reduced-size JPEG decode)."""

    def __init__(self, num_local: int, global_size: int = 224, local_size: int = 96):
        self.transform = PhotoMultiCropTransform(global_size, local_size, num_local)

    def __call__(self, data: bytes) -> list[torch.Tensor]:
        return self.transform(data)


def pipelines(num_local: int, global_size: int, local_size: int) -> dict:
    return {
        "classic-torchvision": ClassicMultiCrop(num_local, global_size, local_size),
        "classic-torchvision-pil-blur": ClassicMultiCrop(num_local, global_size, local_size, pil_blur=True),
        "ours-tensor-v2 (MultiCropTransform)": TensorV2MultiCrop(num_local, global_size, local_size),
        "ours (PhotoMultiCropTransform)": PhotoMultiCrop(num_local, global_size, local_size),
    }


def run(
    warmup: int,
    reps: int,
    num_local: int = 6,
    global_size: int = 224,
    local_size: int = 96,
    max_images: int | None = None,
) -> dict:
    """Images/s of each pipeline over all photographs (one rep = one pass over them, pipelines in turns), on
    one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        files = photograph_files()[:max_images]
        blobs = [path.read_bytes() for path in files]
        sizes = {path.name: Image.open(io.BytesIO(blob)).size for path, blob in zip(files, blobs)}
        random.seed(0)
        torch.manual_seed(0)
        passes = {
            name: (lambda pipeline=pipeline: [pipeline(blob) for blob in blobs])
            for name, pipeline in pipelines(num_local, global_size, local_size).items()
        }
        for one_pass in passes.values():
            time_repeated(one_pass, warmup=warmup, reps=1)
        seconds = interleaved_seconds(passes, reps)
        results = {name: {"img_per_s": summarise(rates(values, len(blobs)))} for name, values in seconds.items()}
    finally:
        torch.set_num_threads(threads)
    baseline = results["classic-torchvision"]["img_per_s"]
    pil_blur_baseline = results["classic-torchvision-pil-blur"]["img_per_s"]
    for result in results.values():
        result["speedup_vs_classic"] = ratio(result["img_per_s"], baseline)
        result["speedup_vs_classic_pil_blur"] = ratio(result["img_per_s"], pil_blur_baseline)
    return {"views": f"2x{global_size} + {num_local}x{local_size}", "threads": 1, "images": sizes, "pipelines": results}
