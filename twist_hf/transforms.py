"""TWIST augmentations: the paper's multi-crop / two-view transform (OpenCV on uint8, per image), a fast
batched version for small in-memory images (one affine grid_sample per view), and evaluation transforms."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2.functional import equalize

from .configuration_twist import IMAGENET_MEAN, IMAGENET_STD

CROP_RATIO = (3 / 4, 4 / 3)
PRETRAINING_GLOBAL_SCALE = (0.4, 1.0)
PRETRAINING_LOCAL_SCALE = (0.05, 0.4)
# The harder crops of the self-labeling phase (docs/method.md §4.2).
SELF_LABELING_GLOBAL_SCALE = (0.14, 1.0)
SELF_LABELING_LOCAL_SCALE = (0.05, 0.14)
# Per view: global 0, global 1, then every local crop (docs/method.md §5).
BLUR_PROBABILITIES = (1.0, 0.1, 0.5)
SOLARIZE_PROBABILITIES = (0.0, 0.2, 0.0)
# Not in the paper: histogram equalisation after the jitter (Pillow's ImageOps.equalize), off unless a recipe asks.
EQUALIZE_PROBABILITIES = (0.0, 0.0, 0.0)
# Brightness, contrast, saturation, hue (docs/method.md §5).
COLOUR_JITTER = (0.4, 0.4, 0.2, 0.1)
_RANDOM_RESIZED_CROP_ATTEMPTS = 10
_GRAYSCALE_WEIGHTS = (0.299, 0.587, 0.114)
_LEVELS = np.arange(256, dtype=np.float64)
_SOLARIZE_TABLE = np.where(_LEVELS >= 128, 255 - _LEVELS, _LEVELS).astype(np.uint8)  # threshold 128, as Pillow


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {scale}.")
    return float(scale[0]), float(scale[1])


def _check_probability(name: str, probability: float) -> float:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {probability}.")
    return float(probability)


def check_view_probabilities(name: str, probabilities: Sequence[float]) -> tuple[float, float, float]:
    """Per-view probabilities (global view 0, global view 1, every local crop), each in [0, 1]."""
    if len(probabilities) != 3:
        raise ValueError(f"{name} needs 3 probabilities (global view 0, global view 1, locals), got {probabilities}.")
    first, second, local = (_check_probability(name, probability) for probability in probabilities)
    return first, second, local


def _view_probability(probabilities: tuple[float, float, float], view: int) -> float:
    """Probability for view `view`: views 0 and 1 are the global crops, the rest are local crops."""
    return probabilities[min(view, 2)]


def _blur_kernel_size(size: int) -> int:
    """Odd kernel of about 10% of the crop size (23 at 224 px, 9 at 96 px), at least 3."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


# --------------------------------------------------------------------------------------------
# Per-image transform (OpenCV geometry and colour on uint8, one float conversion per resolution)
# --------------------------------------------------------------------------------------------


class MultiCropLaw:
    """The validated parameters of TWIST's multi-crop augmentation (docs/method.md §5), one place for both the
    per-image `MultiCropTransform` and the batched `twist_hf.gpu_augment.DeviceMultiCrop`.

    Views [global0, global1, *locals]: random-resized crop, flip, colour jitter (0.4, 0.4, 0.2, 0.1) in random
    order with p=0.8, histogram equalisation (not in the paper: off unless `equalize_probabilities` asks), grayscale
    p=0.2, Gaussian blur sigma in [0.1, 2] with p 1.0 / 0.1 / 0.5 for global0 / global1 / locals, solarization p 0 /
    0.2 / 0, normalisation. num_local_crops=0 gives the two-view law.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local_crops: int = 0,
        global_scale: Sequence[float] = PRETRAINING_GLOBAL_SCALE,
        local_scale: Sequence[float] = PRETRAINING_LOCAL_SCALE,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ratio: Sequence[float] = CROP_RATIO,
        flip_probability: float = 0.5,
        jitter: Sequence[float] = COLOUR_JITTER,
        jitter_probability: float = 0.8,
        grayscale_probability: float = 0.2,
        blur_probabilities: Sequence[float] = BLUR_PROBABILITIES,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_probabilities: Sequence[float] = SOLARIZE_PROBABILITIES,
        equalize_probabilities: Sequence[float] = EQUALIZE_PROBABILITIES,
    ) -> None:
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}.")
        if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
            raise ValueError(f"mean and std need 1 or 3 values each and std > 0, got mean={mean}, std={std}.")
        blur = check_view_probabilities("blur_probabilities", blur_probabilities)
        solarize = check_view_probabilities("solarize_probabilities", solarize_probabilities)
        equalize = check_view_probabilities("equalize_probabilities", equalize_probabilities)
        self.sizes = [global_size] * 2 + [local_size] * num_local_crops
        self.scales = [_check_scale("global_scale", global_scale)] * 2
        self.scales += [_check_scale("local_scale", local_scale)] * num_local_crops
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_probability = _check_probability("flip_probability", flip_probability)
        self.jitter = check_jitter("jitter", jitter)
        self.jitter_probability = _check_probability("jitter_probability", jitter_probability)
        self.grayscale_probability = _check_probability("grayscale_probability", grayscale_probability)
        self.blur_probabilities = [_view_probability(blur, view) for view in range(len(self.sizes))]
        self.blur_sigma = _check_scale_range("blur_sigma", blur_sigma)
        self.solarize_probabilities = [_view_probability(solarize, view) for view in range(len(self.sizes))]
        self.equalize_probabilities = [_view_probability(equalize, view) for view in range(len(self.sizes))]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def num_views(self) -> int:
        return len(self.sizes)


class MultiCropTransform(MultiCropLaw):
    """Turn one image into TWIST's views [global0, global1, *locals] (`MultiCropLaw`), as fast as one core allows.

    Crops with torchvision's box law; resizes each box with OpenCV (area averaging when shrinking, the closest to
    Pillow's antialiased bicubic; bicubic when enlarging); colour jitter, grayscale, Gaussian blur and solarize as
    OpenCV operations on uint8 (one thread); one float conversion per resolution. Takes a PIL image (best opened but
    not yet decoded: JPEGs then decode at a reduced size when every sampled crop keeps at least its output size),
    a HWC array or a (C)HW uint8 tensor.
    """

    def __call__(self, image: PILImage.Image | torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        """Return the 2 + num_local_crops float views (3, size, size) of `image`."""
        cv2.setNumThreads(1)  # one core per data-loader worker; process-wide, so set in the worker itself
        image = _as_pil(image)
        boxes = [self.sample_box(image.size, view) for view in range(len(self.sizes))]
        image, boxes = self.decode(image, boxes)
        pixels = np.asarray(image)
        crops = [self._view(pixels, box, view) for view, box in enumerate(boxes)]
        views: list[torch.Tensor] = []
        for start, end in _same_size_runs(self.sizes):
            views.extend(self._normalise(crops[start:end]).unbind(0))
        return views

    def sample_box(self, image_size: tuple[int, int], view: int) -> tuple[float, float, float, float]:
        """One RandomResizedCrop box (top, left, height, width) for view `view` of a (width, height) image."""
        width, height = image_size
        return random_resized_crop_box(height, width, self.scales[view], self.ratio)

    def draft_reduction(self, boxes: list[tuple[float, float, float, float]]) -> float:
        """How much the image may shrink before some crop's shorter side would fall below its output size."""
        return min(min(height, width) / size for (_, _, height, width), size in zip(boxes, self.sizes))

    def decode(
        self, image: PILImage.Image, boxes: list[tuple[float, float, float, float]]
    ) -> tuple[PILImage.Image, list[tuple[float, float, float, float]]]:
        """Decode `image` as RGB, a not yet decoded JPEG at the largest reduction (1/2, 1/4, 1/8) that leaves every
        crop at least its output size (so no crop gets upsampled that would not have been); boxes follow."""
        reduction = self.draft_reduction(boxes)
        if reduction >= 2 and image.format == "JPEG" and getattr(image, "tile", None):
            full_width, full_height = image.size
            factor = 2 ** min(3, int(math.log2(reduction)))
            image.draft("RGB", (math.ceil(full_width / factor), math.ceil(full_height / factor)))
            x_scale, y_scale = image.size[0] / full_width, image.size[1] / full_height
            boxes = [(top * y_scale, left * x_scale, h * y_scale, w * x_scale) for top, left, h, w in boxes]
        return (image if image.mode == "RGB" else image.convert("RGB")), boxes

    def _view(self, pixels: np.ndarray, box: tuple[float, float, float, float], view: int) -> np.ndarray:
        """One view's crop, uint8 HWC; a grayscale draw stays single-channel (HW) until `_normalise`."""
        crop = crop_resize(pixels, box, self.sizes[view])
        if random.random() < self.flip_probability:
            crop = cv2.flip(crop, 1)
        if random.random() < self.jitter_probability:
            crop = colour_jitter(crop, *self.jitter)
        if self.equalize_probabilities[view] and random.random() < self.equalize_probabilities[view]:
            crop = equalize(torch.from_numpy(crop).permute(2, 0, 1)).permute(1, 2, 0).contiguous().numpy()
        if random.random() < self.grayscale_probability:
            crop = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
        if random.random() < self.blur_probabilities[view]:
            crop = gaussian_blur(crop, random.uniform(*self.blur_sigma))
        if random.random() < self.solarize_probabilities[view]:
            crop = cv2.LUT(crop, _SOLARIZE_TABLE)
        return crop

    def _normalise(self, crops: list[np.ndarray]) -> torch.Tensor:
        """Same-size uint8 crops (HWC or HW) -> normalised float (N, 3, S, S), one conversion for all of them."""
        size = crops[0].shape[0]
        planar = torch.empty((len(crops), 3, size, size), dtype=torch.uint8)
        for index, crop in enumerate(crops):  # stack and transpose the bytes in one copy; grayscale broadcasts
            pixels = torch.from_numpy(crop)
            planar[index] = pixels.permute(2, 0, 1) if crop.ndim == 3 else pixels
        return planar.float().mul_(1 / (self.std * 255)).add_(-self.mean / self.std)


def crop_resize(pixels: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The box (top, left, height, width; edges rounded to whole pixels) of a uint8 HWC image resized to size x size:
    area averaging when both sides shrink (closest to Pillow's antialiased bicubic, within ~2 levels on average),
    bicubic otherwise."""
    top, left, height, width = (round(value) for value in box)
    roi = pixels[top : top + max(height, 1), left : left + max(width, 1)]
    shrinking = roi.shape[0] >= size and roi.shape[1] >= size
    return cv2.resize(roi, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a uint8 image with standard deviation `sigma` (Pillow's GaussianBlur radius), kernel out to
    3 sigma, edges replicated as Pillow does."""
    kernel_size = 2 * math.ceil(3 * sigma) + 1
    return cv2.GaussianBlur(pixels, (kernel_size, kernel_size), sigma, borderType=cv2.BORDER_REPLICATE)


def check_jitter(name: str, jitter: Sequence[float]) -> tuple[float, float, float, float]:
    """Colour-jitter strengths (brightness, contrast, saturation, hue): factors uniform in [1 - s, 1 + s]."""
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise ValueError(f"{name} is (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, got {jitter}.")
    brightness, contrast, saturation, hue = (float(strength) for strength in jitter)
    return brightness, contrast, saturation, hue


def _as_pil(image: PILImage.Image | torch.Tensor | np.ndarray) -> PILImage.Image:
    """PIL images pass through untouched (still undecoded); uint8 HWC/HW arrays and (C)HW tensors are wrapped."""
    if isinstance(image, PILImage.Image):
        return image
    if isinstance(image, torch.Tensor):
        if image.ndim == 3 and image.shape[0] not in (1, 3):
            raise ValueError(f"Expected 1 or 3 channels, got {image.shape[0]} (shape {tuple(image.shape)}).")
        image = (image.permute(1, 2, 0) if image.ndim == 3 else image).numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image, got {image.dtype}; convert with (x * 255).round().astype(uint8).")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    return PILImage.fromarray(np.ascontiguousarray(image))


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box law (area fraction uniform in `scale`, log aspect uniform in `ratio`,
    10 tries, then the clamped centre crop) drawn with Python's `random`: (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_RANDOM_RESIZED_CROP_ATTEMPTS):
        target_area = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top, left = random.randint(0, height - crop_h), random.randint(0, width - crop_w)
            return float(top), float(left), float(crop_h), float(crop_w)
    return _centre_crop_box(height, width, ratio)


def colour_jitter(crop: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float) -> np.ndarray:
    """torchvision's ColorJitter on a uint8 RGB image (HWC array): factors uniform in [max(0, 1 - s), 1 + s] (hue in
    [-h, h]), applied in a random order."""
    factors = (
        random.uniform(max(0.0, 1 - brightness), 1 + brightness),
        random.uniform(max(0.0, 1 - contrast), 1 + contrast),
        random.uniform(max(0.0, 1 - saturation), 1 + saturation),
        random.uniform(-hue, hue),
    )
    for operation in random.sample(range(4), 4):
        crop = _COLOUR_OPERATIONS[operation](crop, factors[operation])
    return crop


def adjust_brightness_lut(image: np.ndarray, factor: float) -> np.ndarray:
    """Pillow's brightness (blend with black: v * factor, clipped) of a uint8 image as one lookup table."""
    return cv2.LUT(np.asarray(image), _linear_lut(factor, 0.0))


def adjust_contrast_lut(image: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's PIL contrast (blend with the rounded mean luma) of a uint8 image as one lookup table."""
    pixels = np.asarray(image)
    mean = int(cv2.mean(_luma(pixels))[0] + 0.5)
    return cv2.LUT(pixels, _linear_lut(factor, (1 - factor) * mean))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Pillow's colour enhancement (blend with the luma image), as torchvision's PIL `adjust_saturation`."""
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        return pixels
    grey = cv2.cvtColor(_luma(pixels), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(pixels, factor, grey, 1.0 - factor, 0.0)


def _luma(pixels: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of a uint8 RGB image (Pillow's "L" conversion), or the image itself when single-channel."""
    return pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)


def _linear_lut(factor: float, offset: float) -> np.ndarray:
    """Table of v -> clip(round(factor * v + offset), 0, 255), uint8."""
    return np.clip(np.floor(_LEVELS * factor + (offset + 0.5)), 0, 255).astype(np.uint8)


def _to_uint8_rgb(image: PILImage.Image | torch.Tensor | Any) -> torch.Tensor:
    """Convert a PIL image, HWC numpy array or (C)HW tensor to a uint8 RGB tensor (3, H, W)."""
    if isinstance(image, PILImage.Image) and image.mode != "RGB":
        image = image.convert("RGB")
    tensor = v2.functional.to_image(image)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"Expected a uint8 image, got {tensor.dtype}; convert with (x * 255).round().to(torch.uint8).")
    if tensor.shape[0] not in (1, 3):
        raise ValueError(f"Expected 1 or 3 channels, got {tensor.shape[0]} (shape {tuple(tensor.shape)}); drop alpha.")
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


def eval_transform(
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_fraction: float = 0.875,
) -> v2.Compose:
    """Feature-extraction transform: bicubic resize to size / crop_fraction, centre crop, normalise.

    Use crop_fraction=1.0 for small images such as Fashion-MNIST, whose objects fill the frame."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
    return v2.Compose(
        [
            v2.Lambda(_to_uint8_rgb),
            v2.Resize(round(size / crop_fraction), interpolation=InterpolationMode.BICUBIC),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


# --------------------------------------------------------------------------------------------
# Batched transform for small in-memory images
# --------------------------------------------------------------------------------------------


def _uint8_batch_to_float(images: torch.Tensor) -> torch.Tensor:
    """Check a uint8 batch (B, H, W) or (B, C, H, W) with C in {1, 3} and scale it to float (B, C, H, W)."""
    if images.dtype != torch.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"Expected uint8 images (B, H, W) or (B, C, H, W), got {images.dtype} {tuple(images.shape)}.")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"Expected 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)}).")
    return images.float().div_(255.0)


def _normalised_three_channels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalise and return (B, 3, S, S); grayscale stays one channel in memory (`expand`) when it can."""
    if pixels.shape[1] == 1 and mean.numel() == 1 and std.numel() == 1:
        return ((pixels - mean) / std).expand(-1, 3, -1, -1)
    pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
    return (pixels - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def batched_eval_transform(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Fast eval path for in-memory uint8 images: resize (bilinear, antialiased) to size, normalise, 3 channels."""
    pixels = _uint8_batch_to_float(images)
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean_tensor = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device)
    std_tensor = torch.tensor(std, dtype=pixels.dtype, device=pixels.device)
    return _normalised_three_channels(pixels, mean_tensor, std_tensor)


def sample_crop_boxes(
    batch_size: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw one RandomResizedCrop box (top, left, height, width) per sample of a batch of equal-size images."""
    sizes = torch.tensor([[height, width]], dtype=torch.float32).expand(batch_size, 2)
    return sample_crop_boxes_for_sizes(sizes, scale, ratio, generator)


def sample_crop_boxes_for_sizes(
    sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Draw one RandomResizedCrop box (top, left, height, width) per image of `sizes` (B, 2: height, width), as
    float (B, 4) on the CPU.

    Same law as torchvision: area fraction uniform in `scale`, log aspect ratio uniform in `ratio`, up to
    10 tries per sample, then a centre crop with the aspect ratio clamped into `ratio`.
    """
    batch_size = sizes.shape[0]
    height, width = sizes.float().unbind(dim=1)
    shape = (batch_size, _RANDOM_RESIZED_CROP_ATTEMPTS)
    area = (height * width).unsqueeze(1)
    target_area = area * torch.empty(shape).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(shape).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    valid = (crop_w > 0) & (crop_w <= width.unsqueeze(1)) & (crop_h > 0) & (crop_h <= height.unsqueeze(1))
    first_valid = valid.int().argmax(dim=1, keepdim=True)
    crop_w = crop_w.gather(1, first_valid).squeeze(1)
    crop_h = crop_h.gather(1, first_valid).squeeze(1)
    found = valid.any(dim=1)
    top = torch.floor(torch.rand(batch_size, generator=generator) * (height - crop_h + 1))
    left = torch.floor(torch.rand(batch_size, generator=generator) * (width - crop_w + 1))
    boxes = torch.stack([top, left, crop_h, crop_w], dim=1)
    return torch.where(found.unsqueeze(1), boxes, _centre_crop_boxes(height, width, ratio))


def _centre_crop_boxes(height: torch.Tensor, width: torch.Tensor, ratio: tuple[float, float]) -> torch.Tensor:
    """RandomResizedCrop's fallback per image: the largest centred box whose aspect ratio lies within `ratio`."""
    in_ratio = width / height
    crop_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    crop_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    top, left = (
        torch.div(height - crop_h, 2, rounding_mode="floor"),
        torch.div(width - crop_w, 2, rounding_mode="floor"),
    )
    return torch.stack([top, left, crop_h, crop_w], dim=1)


def _centre_crop_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """RandomResizedCrop's fallback for one image (see `_centre_crop_boxes`)."""
    box = _centre_crop_boxes(torch.tensor([float(height)]), torch.tensor([float(width)]), ratio)
    top, left, crop_h, crop_w = box[0].tolist()
    return top, left, crop_h, crop_w


def crop_flip_resize(
    pixels: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    mode: Literal["bilinear", "bicubic"] = "bilinear",
) -> torch.Tensor:
    """Crop each sample's box, flip it horizontally where `flips`, and resize to size x size, in one
    grid_sample. Output pixel centres map onto the box like a half-pixel resize (align_corners=False)."""
    height, width = pixels.shape[-2:]
    top, left, crop_h, crop_w = boxes.to(pixels.device, pixels.dtype).unbind(dim=1)
    sign = 1.0 - 2.0 * flips.to(pixels.device, pixels.dtype)
    theta = torch.zeros(pixels.shape[0], 2, 3, dtype=pixels.dtype, device=pixels.device)
    theta[:, 0, 0] = sign * crop_w / width
    theta[:, 0, 2] = (2 * left + crop_w) / width - 1
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = (2 * top + crop_h) / height - 1
    grid = F.affine_grid(theta, [pixels.shape[0], pixels.shape[1], size, size], align_corners=False)
    return F.grid_sample(pixels, grid, mode=mode, padding_mode="border", align_corners=False)


def _grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) of RGB or grayscale pixels, with torchvision's weights."""
    if pixels.shape[1] == 1:
        return pixels
    weights = torch.tensor(_GRAYSCALE_WEIGHTS, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels * weights).sum(dim=1, keepdim=True)


def _blend(pixels: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * pixels + (1 - factor) * other, clamped to [0, 1], with a per-sample factor (B,)."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * pixels + (1 - factor) * other).clamp_(0.0, 1.0)


def gaussian_blur_per_sample(pixels: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (reflect padding), as two grouped convolutions."""
    batch, channels, height, width = pixels.shape
    offsets = torch.arange(kernel_size, dtype=pixels.dtype, device=pixels.device) - kernel_size // 2
    kernels = torch.exp(-(offsets**2) / (2 * sigma.to(pixels).view(-1, 1) ** 2))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = pixels.reshape(1, batch * channels, height, width)
    pad = kernel_size // 2
    flat = F.conv2d(
        F.pad(flat, (0, 0, pad, pad), mode="reflect"),
        kernels.view(-1, 1, kernel_size, 1),
        groups=flat.shape[1],
    )
    flat = F.conv2d(
        F.pad(flat, (pad, pad, 0, 0), mode="reflect"),
        kernels.view(-1, 1, 1, kernel_size),
        groups=flat.shape[1],
    )
    return flat.view(batch, channels, height, width)


class BatchedMultiCrop:
    """All TWIST views of a whole uint8 batch at once, for small in-memory images (Fashion-MNIST, CIFAR).

    Per sample and view, with parameters from a seeded torch.Generator: RandomResizedCrop-law crop box,
    horizontal flip and resize in one grid_sample; with probability `jitter_probability` brightness,
    contrast and (RGB only) saturation jitter; optional histogram equalisation; grayscale (RGB only); optional
    Gaussian blur and solarization; the three optional ones with per-view probabilities (global0, global1, locals);
    normalisation. Hue jitter is left out. Blur is off by default: it wipes out 28-32 px images (small-image SSL
    recipes drop it).
    Returns [global0, global1, *locals], each float (B, 3, S, S), on the input's device.
    """

    def __init__(
        self,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        global_size: int,
        local_size: int | None = None,
        num_local_crops: int = 0,
        global_scale: Sequence[float] = PRETRAINING_GLOBAL_SCALE,
        local_scale: Sequence[float] = PRETRAINING_LOCAL_SCALE,
        ratio: Sequence[float] = CROP_RATIO,
        flip_probability: float = 0.5,
        jitter_strength: Sequence[float] = COLOUR_JITTER[:3],
        jitter_probability: float = 0.8,
        grayscale_probability: float = 0.2,
        blur_probabilities: Sequence[float] = (0.0, 0.0, 0.0),
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_probabilities: Sequence[float] = SOLARIZE_PROBABILITIES,
        equalize_probabilities: Sequence[float] = EQUALIZE_PROBABILITIES,
        interpolation: Literal["bilinear", "bicubic"] = "bilinear",
        seed: int = 0,
    ) -> None:
        if num_local_crops < 0 or (num_local_crops > 0 and local_size is None):
            raise ValueError(f"num_local_crops={num_local_crops} needs to be >= 0, and local_size set when > 0.")
        if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
            raise ValueError(f"mean and std need 1 or 3 values each and std > 0, got mean={mean}, std={std}.")
        if len(jitter_strength) != 3 or min(jitter_strength) < 0:
            raise ValueError(f"jitter_strength is (brightness, contrast, saturation) >= 0, got {jitter_strength}.")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}.")
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.sizes = [global_size, global_size] + [local_size] * num_local_crops
        self.scales = [_check_scale("global_scale", global_scale)] * 2 + [
            _check_scale("local_scale", local_scale)
        ] * num_local_crops
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_probability = _check_probability("flip_probability", flip_probability)
        self.jitter_strength = tuple(float(strength) for strength in jitter_strength)
        self.jitter_probability = _check_probability("jitter_probability", jitter_probability)
        self.grayscale_probability = _check_probability("grayscale_probability", grayscale_probability)
        self.blur_probabilities = check_view_probabilities("blur_probabilities", blur_probabilities)
        self.blur_sigma = _check_scale_range("blur_sigma", blur_sigma)
        self.solarize_probabilities = check_view_probabilities("solarize_probabilities", solarize_probabilities)
        self.equalize_probabilities = check_view_probabilities("equalize_probabilities", equalize_probabilities)
        self.interpolation = interpolation
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_views(self) -> int:
        return len(self.sizes)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Return the views of a uint8 batch (B, H, W) or (B, C, H, W); `generator` overrides the own one."""
        generator = generator if generator is not None else self.generator
        pixels = _uint8_batch_to_float(images)
        return [self._view(pixels, view, generator) for view in range(self.num_views)]

    def _view(self, pixels: torch.Tensor, view: int, generator: torch.Generator) -> torch.Tensor:
        batch, _, height, width = pixels.shape
        boxes = sample_crop_boxes(batch, height, width, self.scales[view], self.ratio, generator)
        flips = _bernoulli(batch, self.flip_probability, generator)
        crops = crop_flip_resize(pixels, boxes, flips, self.sizes[view], self.interpolation)
        if self.interpolation == "bicubic":
            crops = crops.clamp_(0.0, 1.0)
        crops = self._colour_jitter(crops, generator)
        crops = _random_equalize(crops, _view_probability(self.equalize_probabilities, view), generator)
        crops = self._random_grayscale(crops, generator)
        crops = self._random_blur(crops, _view_probability(self.blur_probabilities, view), generator)
        crops = _random_solarize(crops, _view_probability(self.solarize_probabilities, view), generator)
        return _normalised_three_channels(crops, self.mean.to(crops.device), self.std.to(crops.device))

    def _colour_jitter(self, crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Brightness, contrast, then (RGB) saturation, each factor uniform in [1 - s, 1 + s], on chosen samples."""
        batch = crops.shape[0]
        chosen = _bernoulli(batch, self.jitter_probability, generator)
        if not chosen.any():
            return crops
        brightness, contrast, saturation = (
            torch.where(chosen, _uniform_factor(batch, strength, generator), 1.0).to(crops.device)
            for strength in self.jitter_strength
        )
        crops = (crops * brightness.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
        crops = _blend(crops, _grayscale(crops).mean(dim=(1, 2, 3), keepdim=True), contrast)
        if crops.shape[1] == 3:
            crops = _blend(crops, _grayscale(crops), saturation)
        return crops

    def _random_grayscale(self, crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        chosen = _bernoulli(crops.shape[0], self.grayscale_probability, generator)
        if crops.shape[1] == 1 or not chosen.any():
            return crops
        chosen = chosen.to(crops.device).view(-1, 1, 1, 1)
        return torch.where(chosen, _grayscale(crops).expand_as(crops), crops)

    def _random_blur(self, crops: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
        chosen = _bernoulli(crops.shape[0], probability, generator)
        sigma = torch.empty(crops.shape[0]).uniform_(*self.blur_sigma, generator=generator)
        if not chosen.any():
            return crops
        kernel_size = min(2 * math.ceil(3 * self.blur_sigma[1]) + 1, (crops.shape[-1] - 1) // 2 * 2 + 1)
        index = chosen.nonzero().squeeze(1).to(crops.device)
        crops = crops.clone()
        crops[index] = gaussian_blur_per_sample(crops[index], sigma[chosen], kernel_size)
        return crops


def _check_scale_range(name: str, value_range: Sequence[float]) -> tuple[float, float]:
    if len(value_range) != 2 or not 0 < value_range[0] <= value_range[1]:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {value_range}.")
    return float(value_range[0]), float(value_range[1])


def _bernoulli(batch: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean (B,) on the CPU, True with `probability`."""
    return torch.rand(batch, generator=generator) < probability


def _uniform_factor(batch: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Jitter factors uniform in [max(0, 1 - strength), 1 + strength], like torchvision's ColorJitter."""
    return torch.empty(batch).uniform_(max(0.0, 1.0 - strength), 1.0 + strength, generator=generator)


def _random_solarize(crops: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Invert pixels of uint8 value >= 128 (torchvision's threshold) on samples chosen with `probability`;
    the float threshold sits halfway to 127 so interpolation round-off cannot flip a pixel's side."""
    chosen = _bernoulli(crops.shape[0], probability, generator)
    if not chosen.any():
        return crops
    return torch.where(chosen.to(crops.device).view(-1, 1, 1, 1), solarize(crops), crops)


def _random_equalize(crops: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Histogram-equalise samples chosen with `probability` (no draw when it is 0)."""
    chosen = bernoulli_unless_zero(crops.shape[0], probability, generator)
    if not chosen.any():
        return crops
    return torch.where(chosen.to(crops.device).view(-1, 1, 1, 1), equalize(crops), crops)


def bernoulli_unless_zero(batch: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean (B,) on the CPU, True with `probability`; draws nothing when it is 0, so laws without an optional
    operation keep their random streams."""
    return _bernoulli(batch, probability, generator) if probability else torch.zeros(batch, dtype=torch.bool)


def solarize(pixels: torch.Tensor) -> torch.Tensor:
    """Invert float pixels in [0, 1] whose uint8 value is >= 128 (torchvision's and Pillow's threshold)."""
    return torch.where(pixels >= 127.5 / 255, 1.0 - pixels, pixels)


def _same_size_runs(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of equal consecutive sizes."""
    runs, start = [], 0
    for index in range(1, len(sizes) + 1):
        if index == len(sizes) or sizes[index] != sizes[start]:
            runs.append((start, index))
            start = index
    return runs


def adjust_hue_lut(image: np.ndarray, hue_factor: float) -> np.ndarray:
    """torchvision's PIL `adjust_hue` (shift of the HSV hue byte, wrapping) on a uint8 RGB image, with OpenCV's
    full-range HSV (its rounding differs from Pillow's by at most a few levels)."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor must be in [-0.5, 0.5], got {hue_factor}.")
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        return pixels
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV_FULL)
    cv2.LUT(hsv, _hue_table(int(np.int8(hue_factor * 255))), dst=hsv)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def _hue_table(shift: int) -> np.ndarray:
    """Three-band lookup table (1, 256, 3) that adds `shift` to the hue byte (mod 256) and keeps S and V."""
    table = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    table[:, 0] = (np.arange(256) + shift) % 256
    return table.reshape(1, 256, 3)


_COLOUR_OPERATIONS = (adjust_brightness_lut, adjust_contrast_lut, adjust_saturation, adjust_hue_lut)
