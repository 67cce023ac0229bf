"""DeviceMultiCrop (batched views on the tensors' device, here the CPU): each operation against the per-image
one at fixed parameters, its parameter law against MultiCropTransform's, seeding and resuming."""

from __future__ import annotations

import math
import random
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_images
from torchvision.transforms import functional as TF

from twist_hf.gpu_augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    DeviceMultiCrop,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    colour_jitter,
    crop_resize,
    random_gaussian_blur,
)
from twist_hf.transforms import (
    MultiCropTransform,
    adjust_brightness_lut,
    adjust_contrast_lut,
    adjust_hue_lut,
    solarize,
)
from twist_hf.transforms import adjust_saturation as pillow_saturation


@pytest.fixture(scope="module")
def china() -> Image.Image:
    return Image.open(load_sample_images().filenames[0]).convert("RGB")


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def random_images(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 60, 80), (1, 50, 40), (3, 72, 72)]
    return [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for shape in shapes]


# ---------------------------------------------------------------- operations at fixed parameters


def test_crop_resize_matches_pillows_bicubic_resize(china):
    boxes = torch.tensor([[30.0, 50.0, 300.0, 280.0], [10.0, 10.0, 60.0, 50.0]])
    crops = crop_resize([as_tensor(china)] * 2, boxes, 64) * 255
    for crop, (top, left, height, width) in zip(crops, boxes.tolist()):
        expected = as_tensor(china.resize((64, 64), Image.BICUBIC, box=(left, top, left + width, top + height)))
        difference = (crop - expected.float()).abs()
        assert difference.mean() < 1.0 and difference.quantile(0.99) < 4  # edge handling differs slightly


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.3])
def test_colour_operations_equal_torchvision_at_a_fixed_factor(factor):
    pixels = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    factors = torch.full((3,), factor)
    for ours, theirs in (
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ):
        torch.testing.assert_close(
            ours(pixels, factors), torch.stack([theirs(p, factor) for p in pixels]), atol=1e-4, rtol=0
        )
    hue = factor - 1.0  # -0.4, 0, 0.3
    expected = torch.stack([TF.adjust_hue(p, hue) for p in pixels])
    torch.testing.assert_close(adjust_hue(pixels, torch.full((3,), hue)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("factor", [0.7, 1.3])
def test_colour_operations_match_the_per_image_pillow_ones(china, factor):
    """Same factor, same result within uint8 rounding (hue: within the one-byte hue quantisation of OpenCV's HSV)."""
    crop = china.resize((64, 48))
    pixels = as_tensor(crop).float().unsqueeze(0) / 255
    hue = factor - 1.0
    pairs = (
        (adjust_brightness(pixels, torch.tensor([factor])), adjust_brightness_lut(crop, factor), 1),
        (adjust_contrast(pixels, torch.tensor([factor])), adjust_contrast_lut(crop, factor), 2),
        (adjust_saturation(pixels, torch.tensor([factor])), pillow_saturation(crop, factor), 2),
        (adjust_hue(pixels, torch.tensor([hue])), adjust_hue_lut(crop, hue), 8),
    )
    for ours, per_image, max_levels in pairs:
        difference = (ours[0] * 255 - as_tensor(per_image).float()).abs()
        assert difference.mean() < 1.0 and difference.max() <= max_levels


def test_jitter_applies_each_samples_order():
    """Brightness 1.4 then contrast 0.5 differs from the reverse order (clipping); each sample gets its own."""
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([[1.4, 0.5, 1.0, 0.0]] * 2)
    order = torch.tensor([[BRIGHTNESS, CONTRAST, SATURATION, HUE], [CONTRAST, BRIGHTNESS, SATURATION, HUE]])
    jittered = colour_jitter(pixels, torch.tensor([True, True]), factors, order)
    first = TF.adjust_contrast(TF.adjust_brightness(pixels[0], 1.4), 0.5)
    second = TF.adjust_brightness(TF.adjust_contrast(pixels[1], 0.5), 1.4)
    torch.testing.assert_close(
        jittered, torch.stack([first, second]), atol=1e-4, rtol=0
    )  # luma weights 0.299 vs 0.2989
    assert (first - TF.adjust_brightness(TF.adjust_contrast(pixels[0], 0.5), 1.4)).abs().max() > 0.1
    untouched = colour_jitter(pixels, torch.tensor([False, False]), factors, order)
    torch.testing.assert_close(untouched, pixels)


def test_blur_uses_each_samples_sigma_like_torchvisions_gaussian_blur():
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 1.0, 2.0])
    blurred = random_gaussian_blur(pixels, torch.tensor([True, True, False]), sigma, max_sigma=2.0)
    for sample in range(2):
        expected = TF.gaussian_blur(pixels[sample], kernel_size=[13, 13], sigma=[sigma[sample].item()] * 2)
        torch.testing.assert_close(blurred[sample], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(blurred[2], pixels[2])


def test_solarize_equals_pillows(china):
    crop = china.resize((40, 30))
    ours = solarize(as_tensor(crop).float() / 255) * 255
    torch.testing.assert_close(ours, as_tensor(ImageOps.solarize(crop, threshold=128)).float(), atol=1e-3, rtol=0)


# ---------------------------------------------------------------- the whole transform


def test_views_shapes_range_and_grayscale_inputs():
    transform = DeviceMultiCrop(global_size=32, local_size=16, num_local_crops=3)
    views = transform(random_images())
    assert [tuple(view.shape) for view in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 3
    low = min((0 - m) / s for m, s in zip(transform.mean.flatten(), transform.std.flatten()))
    high = max((1 - m) / s for m, s in zip(transform.mean.flatten(), transform.std.flatten()))
    for view in views:
        assert view.dtype == torch.float32 and low - 1e-5 <= view.min() and view.max() <= high + 1e-5


def test_same_seed_same_views_and_sample_then_apply_resumes_exactly():
    transform = DeviceMultiCrop(global_size=24, local_size=12, num_local_crops=2)
    images = random_images()
    first = transform(images, torch.Generator().manual_seed(7))
    again = transform(images, torch.Generator().manual_seed(7))
    other = transform(images, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.float32)
    parameters = transform.sample(sizes, torch.Generator().manual_seed(7))  # e.g. drawn in a data worker
    assert all(torch.equal(a, b) for a, b in zip(transform.apply(images, parameters), first))


def identity_geometry(size: int, **photometric) -> DeviceMultiCrop:
    """Full-image, unflipped, unnormalised views of size x size images, with only the given photometric operations."""
    off = {"jitter_probability": 0.0, "grayscale_probability": 0.0, "blur_probabilities": (0, 0, 0)}
    off["solarize_probabilities"] = (0, 0, 0)
    geometry = {"global_size": size, "global_scale": (1, 1), "ratio": (1, 1), "flip_probability": 0.0}
    return DeviceMultiCrop(**geometry, **off, **photometric, mean=(0.0,), std=(1.0,))


def test_full_crops_without_photometric_ops_are_the_resized_images():
    transform = identity_geometry(20)
    images = [torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8) for _ in range(2)]
    torch.testing.assert_close(transform(images)[0], torch.stack(images).float() / 255, atol=1e-5, rtol=0)


def test_equalize_equals_pillows_where_drawn():
    transform = identity_geometry(32, equalize_probabilities=(0.5, 0.0, 0.0))
    # 32 x 32: Pillow's equalisation leaves images of fewer than 2 x 255 pixels as they are (its step is 0)
    images = [torch.randint(90, 150, (3, 32, 32), dtype=torch.uint8) for _ in range(32)]
    sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.float32)
    first, second = transform.sample(sizes, torch.Generator().manual_seed(0))
    assert 0 < first.equalize.sum() < len(images) and not second.equalize.any()
    views = transform.apply(images, [first, second])
    for index, image in enumerate(images):
        original = Image.fromarray(image.permute(1, 2, 0).numpy())
        expected = ImageOps.equalize(original) if first.equalize[index] else original
        assert first.equalize[index] == (np.array(expected) != np.array(original)).any()
        expected = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(views[0][index], expected, atol=1e-5, rtol=0)


def test_parameters_without_equalisation_draw_nothing_for_it():
    sizes = torch.tensor([[20.0, 30.0]]).expand(16, 2)
    plain = DeviceMultiCrop(num_local_crops=1).sample(sizes, torch.Generator().manual_seed(1))
    local_only = DeviceMultiCrop(num_local_crops=1, equalize_probabilities=(0, 0, 1))
    equalized = local_only.sample(sizes, torch.Generator().manual_seed(1))
    for view in (0, 1):
        assert all(
            torch.equal(getattr(plain[view], f.name), getattr(equalized[view], f.name)) for f in fields(plain[view])
        )
    assert equalized[2].equalize.all() and not plain[2].equalize.any()


def test_rejects_bad_images():
    transform = DeviceMultiCrop(global_size=8)
    with pytest.raises(ValueError, match="uint8"):
        transform([torch.rand(3, 10, 10)])
    with pytest.raises(ValueError, match="drop alpha"):
        transform([torch.zeros(4, 10, 10, dtype=torch.uint8)])


# ---------------------------------------------------------------- same law as the per-image path


def test_parameters_follow_the_per_image_law():
    """Crop-area histograms against MultiCropTransform's boxes; jitter factors, order, probabilities, sigmas."""
    device_crop = DeviceMultiCrop(num_local_crops=1)
    per_image = MultiCropTransform(num_local_crops=1)
    draws = 6000
    sizes = torch.tensor([[375.0, 500.0]]).expand(draws, 2)
    global_view, _, local_view = device_crop.sample(sizes, torch.Generator().manual_seed(0))
    random.seed(0)
    for view, parameters in ((0, global_view), (2, local_view)):
        per_image_boxes = torch.tensor([per_image.sample_box((500, 375), view) for _ in range(draws)])
        scale = per_image.scales[view]
        histograms = [
            torch.histc(boxes[:, 2] * boxes[:, 3] / (500 * 375), bins=10, min=scale[0], max=scale[1]) / draws
            for boxes in (parameters.boxes, per_image_boxes)
        ]
        torch.testing.assert_close(histograms[0], histograms[1], atol=0.02, rtol=0)
    for parameters, blur, solarize_probability in ((global_view, 1.0, 0.0), (local_view, 0.5, 0.0)):
        rates = [parameters.flip, parameters.jitter, parameters.grayscale, parameters.blur, parameters.solarize]
        expected = torch.tensor([0.5, 0.8, 0.2, blur, solarize_probability])
        torch.testing.assert_close(torch.stack([rate.float().mean() for rate in rates]), expected, atol=0.02, rtol=0)
    factors = global_view.jitter_factors
    assert factors.min(0).values.tolist() == pytest.approx([0.6, 0.6, 0.8, -0.1], abs=0.01)
    assert factors.max(0).values.tolist() == pytest.approx([1.4, 1.4, 1.2, 0.1], abs=0.01)
    torch.testing.assert_close(factors.std(0), torch.tensor([0.8, 0.8, 0.4, 0.2]) / math.sqrt(12), atol=0.01, rtol=0)
    first_operation = torch.bincount(global_view.jitter_order[:, 0], minlength=4) / draws  # random order
    torch.testing.assert_close(first_operation, torch.full((4,), 0.25), atol=0.03, rtol=0)
    sigma = global_view.blur_sigma
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and sigma.mean().item() == pytest.approx(1.05, abs=0.02)
    second_view = device_crop.sample(sizes[:2000], torch.Generator().manual_seed(1))[1]
    assert second_view.blur.float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert second_view.solarize.float().mean().item() == pytest.approx(0.2, abs=0.025)


def test_views_match_the_per_image_path_in_distribution(china):
    """Per-view mean and spread of the views over many draws agree with MultiCropTransform's (within 4 standard
    errors for the means)."""
    image = china.resize((160, 107))
    settings = {"global_size": 48, "local_size": 24, "num_local_crops": 2}
    random.seed(0)
    per_image = MultiCropTransform(**settings)
    per_image_stats = torch.stack([torch.stack([v.mean(), v.std()]) for _ in range(300) for v in per_image(image)])
    device_views = DeviceMultiCrop(**settings)([as_tensor(image)] * 300, torch.Generator().manual_seed(0))
    device_stats = torch.cat([torch.stack([v.mean(dim=(1, 2, 3)), v.std(dim=(1, 2, 3))], dim=1) for v in device_views])
    standard_error = ((per_image_stats.var(0) + device_stats.var(0)) / len(device_stats)).sqrt()
    assert ((per_image_stats.mean(0) - device_stats.mean(0)).abs() < 4 * standard_error).all()
    torch.testing.assert_close(per_image_stats.std(0), device_stats.std(0), rtol=0.15, atol=0)
