"""MultiCropTransform against the authors' pipeline that the augmentation benchmark measures it against: its
Pillow colour operations equal torchvision's, and its views match the authors' views in distribution."""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms import functional as TF

from twist_hf.transforms import (
    MultiCropTransform,
    adjust_brightness_lut,
    adjust_contrast_lut,
    adjust_hue_lut,
    adjust_saturation,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.fixture(scope="module")
def china() -> Image.Image:
    return Image.open(load_sample_images().filenames[0]).convert("RGB")


@pytest.mark.parametrize("hue", [-0.1, -0.013, 0.0, 0.05, 0.1, 0.5])
def test_hue_lookup_table_equals_torchvision(china, hue):
    crop = china.resize((64, 48))
    assert np.array_equal(np.asarray(adjust_hue_lut(crop, hue)), np.asarray(TF.adjust_hue(crop, hue)))


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
