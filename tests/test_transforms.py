"""Tests for twist_hf.transforms: the per-image multi-crop transform (law, reduced decode), the batched
grid_sample multi-crop (checked against hand-computed crops, resizes and flips), and the evaluation transforms."""

import io
import math
import random

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import RandomResizedCrop

from twist_hf.transforms import (
    CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchedMultiCrop,
    MultiCropTransform,
    batched_eval_transform,
    crop_flip_resize,
    eval_transform,
    gaussian_blur_per_sample,
    sample_crop_boxes,
)

NO_PHOTOMETRIC = {
    "jitter_probability": 0.0,
    "grayscale_probability": 0.0,
    "solarize_probabilities": (0.0, 0.0, 0.0),
    "blur_probabilities": (0.0, 0.0, 0.0),
}


def random_uint8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised_range(mean, std) -> tuple[float, float]:
    return min((0 - m) / s for m, s in zip(mean, std)), max((1 - m) / s for m, s in zip(mean, std))


# ---------------------------------------------------------------- MultiCropTransform


def jpeg_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth JPEG (colour unless `mode` says otherwise), opened but not decoded."""
    rows = torch.linspace(0, 1, height).view(-1, 1, 1)
    cols = torch.linspace(0, 1, width).view(1, -1, 1)
    phase = torch.tensor([0.0, 2.0, 4.0]) + seed
    pixels = (127.5 + 127.5 * torch.sin(6 * rows + 4 * cols + phase)).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(random_uint8(40, 50, 3).numpy()),
        Image.fromarray(random_uint8(40, 50).numpy()),
        Image.fromarray(random_uint8(40, 50, 4).numpy(), mode="RGBA"),
        Image.fromarray(random_uint8(40, 50, 4).numpy(), mode="CMYK"),
        random_uint8(40, 50, 3).numpy(),
        random_uint8(3, 40, 50),
        random_uint8(40, 50),
    ],
    ids=["pil-rgb", "pil-gray", "pil-rgba", "pil-cmyk", "array-hwc", "tensor-chw", "tensor-hw"],
)
def test_multi_crop_gives_globals_then_locals_normalised(image):
    transform = MultiCropTransform(global_size=32, local_size=16, num_local_crops=3)
    views = transform(image)
    assert [tuple(view.shape) for view in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    low, high = normalised_range(IMAGENET_MEAN, IMAGENET_STD)
    for view in views:
        assert view.dtype == torch.float32
        assert low - 1e-5 <= view.min() and view.max() <= high + 1e-5


def test_two_view_transform_and_per_view_blur_and_solarize_probabilities():
    assert len(MultiCropTransform(global_size=16, num_local_crops=0)(random_uint8(3, 20, 20))) == 2
    transform = MultiCropTransform(global_size=16, local_size=8, num_local_crops=2)
    assert transform.blur_probabilities == [1.0, 0.1, 0.5, 0.5]
    assert transform.solarize_probabilities == [0.0, 0.2, 0.0, 0.0]
    assert (transform.jitter, transform.jitter_probability, transform.grayscale_probability) == (
        (0.4, 0.4, 0.2, 0.1),
        0.8,
        0.2,
    )


def test_multi_crop_with_everything_off_is_a_resize():
    transform = MultiCropTransform(
        global_size=20,
        global_scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_probability=0.0,
        mean=(0.0,),
        std=(1.0,),
        **NO_PHOTOMETRIC,
    )
    image = random_uint8(3, 20, 20)
    for view in transform(image):
        torch.testing.assert_close(view, image.float() / 255)


def identity_crop(flip_probability: float = 0.0, **photometric) -> MultiCropTransform:
    """A full-image, unnormalised view with only the given photometric operations switched on."""
    only = {**NO_PHOTOMETRIC, **photometric, "mean": (0.0,), "std": (1.0,)}
    return MultiCropTransform(
        global_size=40, global_scale=(1, 1), ratio=(1, 1), flip_probability=flip_probability, **only
    )


def test_solarize_grayscale_and_flip_equal_pillows():
    image = Image.fromarray(random_uint8(40, 40, 3).numpy())
    solarized = identity_crop(solarize_probabilities=(1, 1, 1))(image)[0]
    torch.testing.assert_close(solarized, as_view(ImageOps.solarize(image, threshold=128)))
    grayscale = identity_crop(grayscale_probability=1.0)(image)[0]
    assert ((grayscale - as_view(image.convert("L"))) * 255).abs().max() <= 1 + 1e-3  # OpenCV and Pillow round
    flipped = identity_crop(flip_probability=1.0)(image)[0]
    torch.testing.assert_close(flipped, as_view(image.transpose(Image.FLIP_LEFT_RIGHT)))


def test_per_image_equalize_equals_pillows():
    image = Image.fromarray(torch.randint(90, 150, (40, 40, 3), dtype=torch.uint8).numpy())
    equalized = identity_crop(equalize_probabilities=(1, 1, 1))(image)[0]
    torch.testing.assert_close(equalized, as_view(ImageOps.equalize(image)))
    assert equalized.max() - equalized.min() > 0.9  # the narrow 90-150 range now spans (nearly) all of 0-255
    everything = {"jitter_probability": 1.0, "grayscale_probability": 1.0, "solarize_probabilities": (1, 1, 1)}
    chained = identity_crop(equalize_probabilities=(1, 1, 1), blur_probabilities=(1, 1, 1), **everything)(image)
    assert chained[0].shape == (3, 40, 40)  # the operations after it take the equalised crop as it comes


def as_view(image: Image.Image) -> torch.Tensor:
    """A PIL image as the float view (3, H, W) in [0, 1] that the unnormalised transform gives."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    return pixels.float() / 255


def test_transform_runs_opencv_on_one_thread():
    cv2.setNumThreads(2)
    identity_crop()(random_uint8(3, 40, 40))
    assert cv2.getNumThreads() == 1


def test_multi_crop_rejects_bad_input():
    transform = MultiCropTransform(global_size=8)
    with pytest.raises(ValueError, match="uint8"):
        transform(torch.rand(3, 10, 10))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        transform(random_uint8(4, 10, 10))
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropTransform(global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="blur_probabilities needs 3"):
        MultiCropTransform(blur_probabilities=(1.0, 0.1))
    with pytest.raises(ValueError, match="hue <= 0.5"):
        MultiCropTransform(jitter=(0.4, 0.4, 0.2, 0.6))


def area_histogram(boxes: torch.Tensor, image_area: int, scale: tuple[float, float]) -> torch.Tensor:
    """Fraction of (top, left, height, width) boxes per tenth of the `scale` range of area fractions."""
    return torch.histc(boxes[:, 2] * boxes[:, 3] / image_area, bins=10, min=scale[0], max=scale[1]) / len(boxes)


def test_crop_boxes_of_the_per_image_path_follow_torchvisions_law():
    """Area-fraction histograms and aspect ratios match torchvision's RandomResizedCrop on a 4:3 image (where
    large crops often do not fit, so areas are not uniform)."""
    random.seed(0)
    torch.manual_seed(0)
    transform = MultiCropTransform(num_local_crops=1)
    canvas = Image.new("RGB", (400, 300))
    for view, scale in ((0, (0.4, 1.0)), (2, (0.05, 0.4))):
        ours = torch.tensor([transform.sample_box((400, 300), view) for _ in range(5000)])
        theirs = torch.tensor(
            [RandomResizedCrop.get_params(canvas, list(scale), list(CROP_RATIO)) for _ in range(5000)]
        )
        top, left, height, width = ours.unbind(dim=1)
        assert ((top >= 0) & (left >= 0) & (top + height <= 300) & (left + width <= 400)).all()
        torch.testing.assert_close(
            area_histogram(ours, 400 * 300, scale), area_histogram(theirs.float(), 400 * 300, scale), atol=0.02, rtol=0
        )
        log_aspect = torch.log(width / height)
        assert log_aspect.mean().item() == pytest.approx(torch.log(theirs[:, 3] / theirs[:, 2]).mean().item(), abs=0.02)


def view_statistics(transform: MultiCropTransform, image: Image.Image, draws: int) -> dict[str, torch.Tensor]:
    """Per view over `draws` calls: grayscale (channels equal), spread (std of pixels), mean brightness."""
    views = torch.stack([torch.stack(transform(image)) for _ in range(draws)])  # (draws, V, 3, S, S)
    grayscale = (views[:, :, 0] == views[:, :, 1]).flatten(2).all(dim=2) & (views[:, :, 1] == views[:, :, 2]).flatten(
        2
    ).all(dim=2)
    return {"grayscale": grayscale.float(), "spread": views.flatten(2).std(dim=2), "mean": views.flatten(2).mean(dim=2)}


def test_per_image_probabilities_follow_the_spec():
    """Seeded: grayscale p 0.2, blur p 1.0 / 0.1 / 0.5 (noise blurred with sigma >= 1.5 loses most of its spread),
    solarization p 0.2 on view 1 only (flips the mean of a dark image), flip p 0.5."""
    random.seed(0)
    noise = Image.fromarray(random_uint8(48, 48, 3).numpy())
    only = {**NO_PHOTOMETRIC, "mean": (0.0,), "std": (1.0,), "global_scale": (1, 1), "ratio": (1, 1)}
    grayscale = MultiCropTransform(global_size=48, num_local_crops=0, **{**only, "grayscale_probability": 0.2})
    assert view_statistics(grayscale, noise, 400)["grayscale"].mean().item() == pytest.approx(0.2, abs=0.04)
    blur = MultiCropTransform(
        global_size=48,
        local_size=48,
        num_local_crops=2,
        local_scale=(1, 1),
        blur_sigma=(1.5, 2.0),  # every blur visible
        **{**only, "blur_probabilities": (1, 0.1, 0.5)},
    )
    sharp_spread = torch.from_numpy(np.array(noise)).float().div(255).std().item()
    blurred = (view_statistics(blur, noise, 300)["spread"] < 0.6 * sharp_spread).float().mean(dim=0)
    torch.testing.assert_close(blurred, torch.tensor([1.0, 0.1, 0.5, 0.5]), atol=0.06, rtol=0)
    dark = Image.fromarray((random_uint8(48, 48, 3) // 4).numpy() + 128)  # all >= 128: solarized mean < 0.5
    solarize = MultiCropTransform(global_size=48, **{**only, "solarize_probabilities": (0, 0.2, 0)})
    solarized = (view_statistics(solarize, dark, 400)["mean"] < 0.5).float().mean(dim=0)
    torch.testing.assert_close(solarized, torch.tensor([0.0, 0.2]), atol=0.05, rtol=0)
    ramp = Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (48, 1)))
    flip = MultiCropTransform(global_size=48, **{**only, "flip_probability": 0.5})
    flipped = torch.stack([torch.stack(flip(ramp))[:, 0, 0, 0] > 0.5 for _ in range(400)]).float()
    assert flipped.mean().item() == pytest.approx(0.5, abs=0.05)


def test_per_image_brightness_jitter_factors_are_uniform_in_range():
    random.seed(0)
    grey = Image.new("RGB", (32, 32), (100, 100, 100))
    transform = MultiCropTransform(
        global_size=16, mean=(0.0,), std=(1.0,), **{**NO_PHOTOMETRIC, "jitter_probability": 0.8}, jitter=(0.4, 0, 0, 0)
    )
    factors = torch.stack([torch.stack(transform(grey))[:, 0, 0, 0] * 255 / 100 for _ in range(600)]).flatten()
    jittered = factors[(factors - 1).abs() > 1e-3]
    assert len(jittered) / len(factors) == pytest.approx(0.8, abs=0.04)
    assert jittered.min() >= 0.6 - 0.01 and jittered.max() <= 1.4 + 0.01
    assert jittered.mean().item() == pytest.approx(1.0, abs=0.02)
    assert jittered.std().item() == pytest.approx(0.8 / math.sqrt(12), abs=0.02)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_undecoded_jpeg_decodes_reduced_when_every_crop_keeps_its_size(mode):
    transform = MultiCropTransform(global_size=64, local_size=32, num_local_crops=2, global_scale=(0.9, 1.0))
    image = jpeg_image(1600, 1200, mode=mode)
    views = transform(image)
    # Smallest crops: global sqrt(0.9 * 1600 * 1200 * 3/4) ~ 1115 px -> 17x, local sqrt(0.05 * ... * 3/4) ~ 263 px
    # for 32 px -> 8.2x: JPEG's 1/8 scale is exact.
    assert image.size == (200, 150)
    assert [tuple(view.shape) for view in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2


def test_jpeg_keeps_full_resolution_when_a_crop_needs_it():
    transform = MultiCropTransform(global_size=224, local_size=96, num_local_crops=6)
    image = jpeg_image(500, 375)  # a global crop is at most 375 px high: < 2 x 224
    transform(image)
    assert image.size == (500, 375)


def test_reduction_follows_the_sampled_boxes():
    transform = MultiCropTransform(global_size=64, local_size=32, num_local_crops=1)
    big_boxes = [(0.0, 0.0, 600.0, 700.0), (10.0, 10.0, 520.0, 500.0), (5.0, 5.0, 140.0, 130.0)]
    assert transform.draft_reduction(big_boxes) == pytest.approx(130 / 32)
    image, boxes = transform.decode(jpeg_image(800, 600), big_boxes)
    assert image.size == (200, 150) and image.mode == "RGB"  # 4.06x allows 1/4
    assert boxes[2] == pytest.approx((1.25, 1.25, 35.0, 32.5))
    small_boxes = big_boxes[:2] + [(5.0, 5.0, 60.0, 60.0)]  # a 60 px crop for a 32 px view: 1.9x
    image, boxes = transform.decode(jpeg_image(800, 600), small_boxes)
    assert image.size == (800, 600) and boxes == small_boxes
    loaded = jpeg_image(800, 600)
    loaded.load()  # already decoded: nothing to reduce
    assert transform.decode(loaded, big_boxes)[0].size == (800, 600)


# ---------------------------------------------------------------- eval transforms


def test_eval_transform_resizes_centre_crops_and_normalises():
    image = Image.new("RGB", (40, 60), (255, 0, 51))
    output = eval_transform(32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))(image)
    assert output.shape == (3, 32, 32)
    torch.testing.assert_close(output[:, 5, 7], torch.tensor([2.0, -1.0, -0.3]))
    gradient = np.tile(np.arange(28, dtype=np.uint8), (28, 1))
    same_size = eval_transform(28, mean=(0.0,), std=(1.0,), crop_fraction=1.0)(Image.fromarray(gradient))
    torch.testing.assert_close(same_size[1], torch.from_numpy(gradient).float() / 255)


def test_batched_eval_transform_matches_hand_normalisation():
    images = random_uint8(4, 28, 28)
    output = batched_eval_transform(images, 28, mean=(0.25,), std=(0.5,))
    assert output.shape == (4, 3, 28, 28)
    torch.testing.assert_close(output[:, 2], (images.float() / 255 - 0.25) / 0.5)
    assert batched_eval_transform(images, 14, mean=(0.25,), std=(0.5,)).shape == (4, 3, 14, 14)


# ---------------------------------------------------------------- BatchedMultiCrop: geometry


def test_crop_flip_resize_reproduces_a_hand_cut_box():
    pixels = random_uint8(2, 1, 20, 24).float()
    boxes = torch.tensor([[4.0, 8.0, 10.0, 10.0], [0.0, 14.0, 10.0, 10.0]])  # top, left, height, width
    crops = crop_flip_resize(pixels, boxes, torch.tensor([False, True]), size=10)
    torch.testing.assert_close(crops[0], pixels[0, :, 4:14, 8:18], atol=1e-3, rtol=0)
    torch.testing.assert_close(crops[1], pixels[1, :, 0:10, 14:24].flip(-1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape", [(6, 28, 28), (6, 1, 28, 28), (6, 3, 28, 28)])
def test_full_scale_crops_without_flip_or_jitter_reproduce_the_input_resized(shape):
    images = random_uint8(*shape)
    pixels = images.float().div(255).reshape(6, -1, 28, 28)
    for size in (28, 14):
        transform = BatchedMultiCrop(
            mean=(0.0,),
            std=(1.0,),
            global_size=size,
            global_scale=(1, 1),
            flip_probability=0.0,
            **NO_PHOTOMETRIC,
        )
        views = transform(images)
        expected = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        expected = expected.expand(-1, 3, -1, -1)
        for view in views:
            torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


def test_flip_probability_one_flips_every_view():
    images = random_uint8(6, 28, 28)
    transform = BatchedMultiCrop(
        mean=(0.0,), std=(1.0,), global_size=28, global_scale=(1, 1), flip_probability=1.0, **NO_PHOTOMETRIC
    )
    torch.testing.assert_close(transform(images)[1][:, 0], images.float().div(255).flip(-1), atol=1e-5, rtol=0)


def test_crop_boxes_follow_the_random_resized_crop_law():
    generator = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(20000, 100, 100, (0.2, 0.6), CROP_RATIO, generator)
    top, left, height, width = boxes.unbind(dim=1)
    area = height * width / 100**2
    aspect = width / height
    assert ((top >= 0) & (left >= 0) & (top + height <= 100) & (left + width <= 100)).all()
    assert area.min() >= 0.2 - 0.02 and area.max() <= 0.6 + 0.02  # rounding of w and h to pixels
    assert area.mean().item() == pytest.approx(0.4, abs=0.005)  # uniform area fraction
    assert aspect.min() >= 3 / 4 - 0.03 and aspect.max() <= 4 / 3 + 0.03
    assert torch.log(aspect).mean().item() == pytest.approx(0.0, abs=0.01)  # log-uniform, symmetric
    assert (top.mean() + height.mean() / 2).item() == pytest.approx(50, abs=0.5)  # centred on average


def test_impossible_crops_fall_back_to_the_clamped_centre_crop():
    boxes = sample_crop_boxes(3, 100, 100, (1.0, 1.0), (2.0, 3.0), torch.Generator().manual_seed(0))
    # Square input, ratio >= 2 wanted: the fallback keeps the full width and height = round(100 / 2).
    assert boxes.tolist() == [[25.0, 0.0, 50.0, 100.0]] * 3


def test_local_crop_area_statistics_and_sizes():
    transform = BatchedMultiCrop(
        mean=(0.5,), std=(0.5,), global_size=28, local_size=12, num_local_crops=4, local_scale=(0.05, 0.4)
    )
    views = transform(random_uint8(64, 28, 28))
    assert [tuple(view.shape) for view in views] == [(64, 3, 28, 28)] * 2 + [(64, 3, 12, 12)] * 4
    boxes = sample_crop_boxes(20000, 28, 28, (0.05, 0.4), CROP_RATIO, torch.Generator().manual_seed(1))
    area = boxes[:, 2] * boxes[:, 3] / 28**2
    assert area.mean().item() == pytest.approx(0.225, abs=0.01)


# ---------------------------------------------------------------- BatchedMultiCrop: randomness


def make_default_crop(seed: int) -> BatchedMultiCrop:
    return BatchedMultiCrop(mean=(0.3,), std=(0.35,), global_size=28, local_size=12, num_local_crops=2, seed=seed)


def test_same_seed_gives_same_views_and_different_seeds_differ():
    images = random_uint8(16, 28, 28)
    first, again, other = (make_default_crop(seed)(images) for seed in (0, 0, 1))
    for view, same in zip(first, again):
        assert torch.equal(view, same)
    assert not torch.equal(first[0], other[0])
    transform = make_default_crop(0)
    assert not torch.equal(transform(images)[0], transform(images)[0])  # the generator advances
    assert not torch.equal(first[0], first[1])  # the two global views are different draws


def test_grayscale_input_gives_three_equal_channels_in_range():
    views = make_default_crop(0)(random_uint8(16, 28, 28))
    low, high = normalised_range((0.3,), (0.35,))
    for view in views:
        assert view.dtype == torch.float32
        assert torch.equal(view[:, 0], view[:, 2])
        assert low - 1e-5 <= view.min() and view.max() <= high + 1e-5


def test_rgb_grayscale_probability_one_makes_channels_equal():
    transform = BatchedMultiCrop(
        mean=(0.0,), std=(1.0,), global_size=16, **{**NO_PHOTOMETRIC, "grayscale_probability": 1}
    )
    view = transform(random_uint8(4, 3, 16, 16))[0]
    torch.testing.assert_close(view[:, 0], view[:, 1])


# ---------------------------------------------------------------- BatchedMultiCrop: photometric


def identity_geometry(size: int = 16, **photometric) -> BatchedMultiCrop:
    settings = {**NO_PHOTOMETRIC, **photometric}
    return BatchedMultiCrop(
        mean=(0.0,), std=(1.0,), global_size=size, global_scale=(1, 1), flip_probability=0.0, **settings
    )


def test_brightness_jitter_scales_each_image_by_one_factor_in_range():
    images = torch.randint(50, 150, (32, 16, 16), dtype=torch.uint8)
    view = identity_geometry(jitter_probability=1.0, jitter_strength=(0.4, 0.0, 0.0))(images)[0][:, 0]
    ratio = view / (images.float() / 255)
    per_image = ratio.flatten(1)
    torch.testing.assert_close(per_image.min(dim=1).values, per_image.max(dim=1).values, atol=1e-4, rtol=0)
    assert per_image.min() >= 0.6 - 1e-4 and per_image.max() <= 1.4 + 1e-4
    assert per_image[:, 0].std() > 0.05  # one factor per image, different across images


def test_contrast_jitter_scales_deviations_from_the_image_mean():
    images = torch.randint(90, 160, (8, 16, 16), dtype=torch.uint8)
    view = identity_geometry(jitter_probability=1.0, jitter_strength=(0.0, 0.5, 0.0))(images)[0][:, 0]
    pixels = images.float() / 255
    mean = pixels.mean(dim=(1, 2), keepdim=True)
    factor = ((view - mean) / (pixels - mean)).flatten(1).median(dim=1).values.view(-1, 1, 1)
    torch.testing.assert_close(view, (pixels - mean) * factor + mean, atol=1e-5, rtol=0)
    assert factor.min() >= 0.5 - 1e-4 and factor.max() <= 1.5 + 1e-4


def test_solarize_inverts_bright_pixels():
    images = random_uint8(4, 16, 16)
    view = identity_geometry(solarize_probabilities=(1.0, 1.0, 1.0))(images)[0][:, 0]
    pixels = images.float() / 255
    torch.testing.assert_close(view, torch.where(images >= 128, 1 - pixels, pixels), atol=1e-5, rtol=0)


def pillow_equalized(images: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageOps.equalize of each uint8 (H, W) image, as floats in [0, 1]."""
    equalized = [np.array(ImageOps.equalize(Image.fromarray(image.numpy()))) for image in images]
    return torch.from_numpy(np.stack(equalized)).float() / 255


def test_batched_equalize_equals_pillows_and_only_where_chosen():
    # 32 x 32: Pillow's equalisation leaves images of fewer than 2 x 255 pixels as they are (its step is 0)
    images = torch.randint(90, 150, (64, 32, 32), dtype=torch.uint8)
    for view in identity_geometry(32, equalize_probabilities=(1.0, 1.0, 1.0))(images):
        torch.testing.assert_close(view[:, 0], pillow_equalized(images), atol=1e-5, rtol=0)
    first, second = identity_geometry(32, equalize_probabilities=(0.5, 0.0, 0.0))(images)
    equalized = (first[:, 0] - images.float() / 255).flatten(1).abs().amax(dim=1) > 1e-5
    assert 0 < equalized.sum() < len(images)
    torch.testing.assert_close(first[equalized, 0], pillow_equalized(images[equalized]), atol=1e-5, rtol=0)
    torch.testing.assert_close(second[:, 0], images.float() / 255, atol=1e-5, rtol=0)


def test_batched_views_without_equalisation_draw_nothing_for_it():
    """A probability of 0 draws nothing, so recipes without equalisation keep their views (and results)."""
    images = random_uint8(8, 32, 32)
    law = {"mean": (0.0,), "std": (1.0,), "global_size": 28, "num_local_crops": 1, "local_size": 24}
    off, on = BatchedMultiCrop(**law), BatchedMultiCrop(**law, equalize_probabilities=(0.0, 0.0, 1.0))
    plain, equalized = off(images, torch.Generator().manual_seed(3)), on(images, torch.Generator().manual_seed(3))
    assert torch.equal(plain[0], equalized[0]) and torch.equal(plain[1], equalized[1])
    assert not torch.equal(plain[2], equalized[2])


def test_per_sample_gaussian_blur_matches_the_hand_kernel():
    delta = torch.zeros(2, 1, 9, 9)
    delta[:, :, 4, 4] = 1.0
    blurred = gaussian_blur_per_sample(delta, torch.tensor([1.0, 0.5]), kernel_size=5)
    for sample, sigma in enumerate((1.0, 0.5)):
        weights = torch.tensor([math.exp(-(x**2) / (2 * sigma**2)) for x in range(-2, 3)])
        weights = weights / weights.sum()
        torch.testing.assert_close(blurred[sample, 0, 2:7, 2:7], torch.outer(weights, weights))
    constant = torch.full((3, 3, 12, 12), 0.7)
    torch.testing.assert_close(gaussian_blur_per_sample(constant, torch.tensor([0.3, 1.0, 2.0]), 7), constant)


def test_blur_probability_one_blurs_every_global_view_zero_leaves_it_sharp():
    images = random_uint8(8, 28, 28)
    blurred = identity_geometry(blur_probabilities=(1.0, 0.0, 0.0))
    sharp_view = identity_geometry()(images)[0]
    first, second = blurred(images)
    assert (first[:, 0] - sharp_view[:, 0]).abs().flatten(1).max(dim=1).values.min() > 0.01
    torch.testing.assert_close(second, sharp_view, atol=1e-5, rtol=0)


def test_batched_multi_crop_rejects_bad_input_and_settings():
    transform = make_default_crop(0)
    with pytest.raises(ValueError, match="uint8"):
        transform(torch.rand(2, 28, 28))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        transform(random_uint8(2, 4, 28, 28))
    with pytest.raises(ValueError, match="local_size"):
        BatchedMultiCrop(mean=(0.5,), std=(0.5,), global_size=28, num_local_crops=2)
    with pytest.raises(ValueError, match="std > 0"):
        BatchedMultiCrop(mean=(0.5,), std=(0.0,), global_size=28)
