"""MultiCropTransform against the authors' pipeline that the augmentation benchmark measures it against: its
OpenCV operations match torchvision's and Pillow's within stated tolerances, and its views match the authors' views
in distribution."""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from sklearn.datasets import load_sample_images
from torchvision.transforms import functional as TF

from twist_hf.transforms import (
    MultiCropTransform,
    adjust_brightness_lut,
    adjust_contrast_lut,
    adjust_hue_lut,
    adjust_saturation,
    crop_resize,
    gaussian_blur,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.fixture(scope="module")
def china() -> Image.Image:
    return Image.open(load_sample_images().filenames[0]).convert("RGB")


def level_differences(ours: np.ndarray, theirs: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(ours).astype(int) - np.asarray(theirs).astype(int))


@pytest.mark.parametrize("hue", [-0.1, -0.013, 0.0, 0.05, 0.1, 0.5])
def test_hue_matches_torchvision_within_one_hue_byte(china, hue):
    """OpenCV's and Pillow's HSV bytes round differently: a quarter level on average, a few levels at most (one
    hue byte is up to 6 levels on a saturated pixel)."""
    crop = china.resize((64, 48))
    difference = level_differences(adjust_hue_lut(crop, hue), TF.adjust_hue(crop, hue))
    assert difference.mean() < 0.3 and difference.max() <= 6


@pytest.mark.parametrize("factor", [0.6, 0.93, 1.0, 1.4])
def test_lookup_table_brightness_contrast_and_saturation_match_torchvision_within_rounding(china, factor):
    crop = china.resize((64, 48))
    for ours, theirs in (
        (adjust_brightness_lut, TF.adjust_brightness),
        (adjust_contrast_lut, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ):
        difference = np.abs(np.asarray(ours(crop, factor)).astype(int) - np.asarray(theirs(crop, factor)).astype(int))
        assert difference.max() <= 1, ours.__name__


@pytest.mark.parametrize(
    ("box", "size"),
    [((30, 50, 300, 280), 224), ((0, 0, 427, 427), 224), ((5, 7, 280, 260), 96), ((100, 100, 70, 80), 96)],
    ids=["shrink-1.3x", "shrink-1.9x", "shrink-2.8x", "enlarge"],
)
def test_crop_resize_is_close_to_pillows_antialiased_bicubic(china, box, size):
    """Area averaging (shrinking) and bicubic (enlarging) against the authors' Pillow bicubic resize: under 2
    levels on average, at worst a sharp edge placed differently."""
    top, left, height, width = box
    theirs = china.resize((size, size), Image.BICUBIC, box=(left, top, left + width, top + height))
    difference = level_differences(crop_resize(np.asarray(china), box, size), theirs)
    assert difference.mean() < 2.0 and np.percentile(difference, 99) <= 12
    same_size = crop_resize(np.asarray(china), (10, 10, 96, 96), 96)
    assert np.array_equal(same_size, np.asarray(china)[10:106, 10:106])


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_gaussian_blur_is_close_to_pillows(china, sigma):
    """A true Gaussian (3 sigma kernel) against Pillow's three box blurs of the same sigma: half a level on
    average, a few levels inside, more only at the border."""
    crop = china.resize((96, 96))
    difference = level_differences(gaussian_blur(np.asarray(crop), sigma), crop.filter(ImageFilter.GaussianBlur(sigma)))
    assert difference.mean() < 0.5 and difference[8:-8, 8:-8].max() <= 5 and difference.max() <= 16


def test_views_match_the_authors_pipeline_in_distribution(china):
    """Per-view mean and spread of pixel values over many draws agree with the authors' pipeline (means within
    4 standard errors)."""
    from augmentation import AuthorsMultiCrop

    buffer = io.BytesIO()
    china.resize((160, 107)).save(buffer, format="JPEG", quality=90)  # small: many cheap draws
    data = buffer.getvalue()
    ours = MultiCropTransform(global_size=48, local_size=24, num_local_crops=2)
    authors = AuthorsMultiCrop(num_local=2, global_size=48, local_size=24)
    random.seed(0)
    torch.manual_seed(0)
    draws = 300
    ours_stats = torch.stack(
        [torch.stack([v.mean(), v.std()]) for _ in range(draws) for v in ours(Image.open(io.BytesIO(data)))]
    )
    authors_stats = torch.stack([torch.stack([v.mean(), v.std()]) for _ in range(draws) for v in authors(data)])
    standard_error = ((ours_stats.var(0) + authors_stats.var(0)) / len(ours_stats)).sqrt()
    assert ((ours_stats.mean(0) - authors_stats.mean(0)).abs() < 4 * standard_error).all()
    assert torch.allclose(ours_stats.std(0), authors_stats.std(0), rtol=0.15)


def test_benchmark_reports_wall_and_cpu_rates_against_the_authors():
    from augmentation import AUTHORS, OURS, run

    results = run(warmup=0, reps=2, num_local=1, global_size=32, local_size=16, max_images=2)
    assert results["views"] == "2x32 + 1x16" and len(results["images"]) == 2
    authors, ours = results["pipelines"][AUTHORS], results["pipelines"][OURS]
    assert authors["speedup_vs_authors"] == authors["speedup_vs_authors_cpu"] == 1
    for pipeline in (authors, ours):
        assert pipeline["img_per_s"]["reps"] == pipeline["img_per_cpu_s"]["reps"] == 2
        assert 0 < pipeline["img_per_s"]["median"] and 0 < pipeline["img_per_cpu_s"]["median"]
    assert ours["speedup_vs_authors_cpu"] == ours["img_per_cpu_s"]["median"] / authors["img_per_cpu_s"]["median"]
