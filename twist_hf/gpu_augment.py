"""TWIST's multi-crop views computed batched on the tensors' device (the accelerator in training, the CPU in tests).

Data workers only decode images and draw every random parameter on the CPU (`DeviceMultiCrop.sample`, from image
sizes alone, same laws as `MultiCropTransform`); `DeviceMultiCrop.apply` then crops, resizes (bicubic,
antialiased), flips, colour-jitters (brightness, contrast, saturation, hue in a random order per sample),
optionally equalises histograms, grayscales, blurs (one sigma per sample), solarizes and normalises whole batches
where the images are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import equalize

from .transforms import (
    MultiCropLaw,
    _bernoulli,
    _blend,
    _grayscale,
    bernoulli_unless_zero,
    gaussian_blur_per_sample,
    sample_crop_boxes_for_sizes,
    solarize,
)

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass
class ViewParameters:
    """Every random choice of one view for a batch of B images, drawn on the CPU (tensors of length B)."""

    boxes: torch.Tensor  # (B, 4) float: top, left, height, width in source pixels
    flip: torch.Tensor  # (B,) bool
    jitter: torch.Tensor  # (B,) bool: colour jitter applied
    jitter_factors: torch.Tensor  # (B, 4) brightness, contrast, saturation, hue factors
    jitter_order: torch.Tensor  # (B, 4) long: a permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE per sample
    grayscale: torch.Tensor  # (B,) bool
    blur: torch.Tensor  # (B,) bool
    blur_sigma: torch.Tensor  # (B,) float
    solarize: torch.Tensor  # (B,) bool
    equalize: torch.Tensor  # (B,) bool: histogram equalisation after the jitter

    def select(self, index: torch.Tensor) -> ViewParameters:
        """The parameters of the samples at `index` (e.g. to split a batch)."""
        return ViewParameters(**{field.name: getattr(self, field.name)[index] for field in fields(self)})


class DeviceMultiCrop(MultiCropLaw):
    """Batched multi-crop views [global0, global1, *locals] of decoded uint8 images, on their device.

    Same law and constructor arguments as `twist_hf.transforms.MultiCropTransform` (`MultiCropLaw`), plus `seed`.
    `sample(sizes, generator)` draws the parameters on the CPU; `apply(images, parameters)` computes the views,
    float (B, 3, S, S) each, on the images' device; `__call__` does both. Same generator state, same views: pass
    `torch.Generator().manual_seed(f(seed, epoch, step))` per step to resume exactly.
    """

    def __init__(self, *args, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, images: Sequence[torch.Tensor] | torch.Tensor, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Views of uint8 images ((C, H, W) each, C in {1, 3}, sizes may differ); `generator` overrides the own."""
        sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.float32)
        return self.apply(images, self.sample(sizes, generator if generator is not None else self.generator))

    def sample(self, sizes: torch.Tensor, generator: torch.Generator) -> list[ViewParameters]:
        """Every view's random parameters for images of `sizes` (B, 2: height, width), drawn on the CPU."""
        return [self._sample_view(sizes, view, generator) for view in range(self.num_views)]

    def _sample_view(self, sizes: torch.Tensor, view: int, generator: torch.Generator) -> ViewParameters:
        batch = sizes.shape[0]
        brightness, contrast, saturation, hue = self.jitter
        low = torch.tensor([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
        high = torch.tensor([1 + brightness, 1 + contrast, 1 + saturation, hue])
        return ViewParameters(
            boxes=sample_crop_boxes_for_sizes(sizes, self.scales[view], self.ratio, generator),
            flip=_bernoulli(batch, self.flip_probability, generator),
            jitter=_bernoulli(batch, self.jitter_probability, generator),
            jitter_factors=low + (high - low) * torch.rand(batch, 4, generator=generator),
            jitter_order=torch.argsort(torch.rand(batch, 4, generator=generator), dim=1),
            grayscale=_bernoulli(batch, self.grayscale_probability, generator),
            blur=_bernoulli(batch, self.blur_probabilities[view], generator),
            blur_sigma=torch.empty(batch).uniform_(*self.blur_sigma, generator=generator),
            solarize=_bernoulli(batch, self.solarize_probabilities[view], generator),
            equalize=bernoulli_unless_zero(batch, self.equalize_probabilities[view], generator),
        )

    def apply(
        self, images: Sequence[torch.Tensor] | torch.Tensor, parameters: Sequence[ViewParameters]
    ) -> list[torch.Tensor]:
        """The views of `images` with the given parameters, float (B, 3, S, S) each, on the images' device.

        `images` is a list of uint8 (C, H, W) or a padded uint8 batch (B, C, H, W) whose true sizes went to `sample`."""
        _check_images(images)
        return [
            self._view(images, view_parameters, self.sizes[view]) for view, view_parameters in enumerate(parameters)
        ]

    def _view(self, images: Sequence[torch.Tensor], parameters: ViewParameters, size: int) -> torch.Tensor:
        device = images[0].device
        crops = crop_resize(images, parameters.boxes, size)
        crops = torch.where(parameters.flip.to(device).view(-1, 1, 1, 1), crops.flip(-1), crops)
        crops = colour_jitter(crops, parameters.jitter, parameters.jitter_factors, parameters.jitter_order)
        if parameters.equalize.any():
            crops = torch.where(parameters.equalize.to(device).view(-1, 1, 1, 1), equalize(crops), crops)
        crops = torch.where(
            parameters.grayscale.to(device).view(-1, 1, 1, 1), _grayscale(crops).expand_as(crops), crops
        )
        crops = random_gaussian_blur(crops, parameters.blur, parameters.blur_sigma, self.blur_sigma[1])
        crops = torch.where(parameters.solarize.to(device).view(-1, 1, 1, 1), solarize(crops), crops)
        return (crops - self.mean.to(device)) / self.std.to(device)


def _check_images(images: Sequence[torch.Tensor] | torch.Tensor) -> None:
    if len(images) == 0:
        raise ValueError("Need at least one image.")
    for image in images:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"Expected uint8 images (C, H, W) with C in {{1, 3}}, got {image.dtype} {tuple(image.shape)}; "
                "decode to uint8 and drop alpha first."
            )


def crop_resize(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut each image's box (top, left, height, width; integers) and resize it to size x size, bicubic and
    antialiased like Pillow's resize, as float RGB in [0, 1] (B, 3, size, size)."""
    crops = []
    for image, (top, left, height, width) in zip(images, boxes.long().tolist()):
        region = image[:, top : top + height, left : left + width].unsqueeze(0).float()
        crop = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        crops.append(crop.expand(-1, 3, -1, -1))
    return torch.cat(crops).clamp_(0.0, 255.0).div_(255.0)


def colour_jitter(
    crops: torch.Tensor, chosen: torch.Tensor, factors: torch.Tensor, order: torch.Tensor
) -> torch.Tensor:
    """torchvision's ColorJitter on float RGB (B, 3, H, W) in [0, 1]: on the `chosen` samples, brightness,
    contrast, saturation and hue with per-sample `factors` (B, 4), in each sample's `order` (B, 4)."""
    operations = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation}
    operations[HUE] = adjust_hue
    crops = crops.clone()
    for position in range(4):
        for operation, adjust in operations.items():
            index = (chosen & (order[:, position] == operation)).nonzero().squeeze(1)
            if index.numel():
                on_device = index.to(crops.device)
                crops[on_device] = adjust(crops[on_device], factors[index, operation].to(crops.device))
    return crops


def adjust_brightness(crops: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample brightness: pixels * factor, clamped."""
    return (crops * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(crops: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample contrast: blend with the sample's mean luma."""
    return _blend(crops, _grayscale(crops).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(crops: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample saturation: blend with the luma image."""
    return _blend(crops, _grayscale(crops), factor)


def adjust_hue(crops: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample hue shift by `factor` (fraction of the colour circle, in [-0.5, 0.5]) in HSV, like torchvision."""
    hue, saturation, value = _rgb_to_hsv(crops)
    return _hsv_to_rgb(torch.remainder(hue + factor.view(-1, 1, 1), 1.0), saturation, value)


def _rgb_to_hsv(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in [0, 1), saturation, value of float RGB (B, 3, H, W), each (B, H, W)."""
    red, green, blue = crops.unbind(dim=1)
    value, _ = crops.max(dim=1)
    chroma = value - crops.min(dim=1).values
    grey = chroma == 0
    saturation = chroma / torch.where(value == 0, torch.ones_like(value), value)
    divisor = torch.where(grey, torch.ones_like(chroma), chroma)
    red_c, green_c, blue_c = ((value - channel) / divisor for channel in (red, green, blue))
    hue = torch.where(
        value == red,
        blue_c - green_c,
        torch.where(value == green, 2.0 + red_c - blue_c, 4.0 + green_c - red_c),
    )
    hue = torch.remainder(torch.where(grey, torch.zeros_like(hue), hue) / 6.0, 1.0)
    return hue, saturation, value


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Float RGB (B, 3, H, W) of hue in [0, 1), saturation and value (B, H, W)."""
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.long() % 6
    p = (value * (1.0 - saturation)).clamp_(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp_(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp_(0.0, 1.0)
    # Channel values per sector 0..5 (stacked on dim 1), picked by each pixel's sector.
    red = torch.stack([value, q, p, p, t, value], dim=1)
    green = torch.stack([t, value, value, q, p, p], dim=1)
    blue = torch.stack([p, p, t, value, value, q], dim=1)
    index = sector.unsqueeze(1)
    return torch.cat([channel.gather(1, index) for channel in (red, green, blue)], dim=1)


def random_gaussian_blur(
    crops: torch.Tensor, chosen: torch.Tensor, sigma: torch.Tensor, max_sigma: float
) -> torch.Tensor:
    """Gaussian blur of the `chosen` samples, each with its own sigma (kernel truncated at 3 * max_sigma)."""
    index = chosen.nonzero().squeeze(1)
    if index.numel() == 0:
        return crops
    kernel_size = min(2 * math.ceil(3 * max_sigma) + 1, (crops.shape[-1] - 1) // 2 * 2 + 1)
    on_device = index.to(crops.device)
    crops = crops.clone()
    crops[on_device] = gaussian_blur_per_sample(crops[on_device], sigma[index], kernel_size)
    return crops
