"""PhotoMultiCropTransform, the fast photograph path the augmentation benchmark measures: its views, its exact
hue shift, its reduced-size decode rule, and that its views match the classic pipeline's distribution."""

from __future__ import annotations

import io
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms import functional as TF

from twist_hf.transforms import IMAGENET_MEAN, IMAGENET_STD, PhotoMultiCropTransform, adjust_hue_lut

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.fixture(scope="module")
def china() -> Image.Image:
    return Image.open(load_sample_images().filenames[0]).convert("RGB")


def test_views_shapes_and_normalisation(china):
    views = PhotoMultiCropTransform(global_size=64, local_size=24, num_local_crops=3)(china)
    assert [tuple(view.shape) for view in views] == [(3, 64, 64)] * 2 + [(3, 24, 24)] * 3
    assert all(view.dtype == torch.float32 for view in views)
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert all(low - 1e-5 <= view.min() and view.max() <= high + 1e-5 for view in views)


def test_grayscale_and_bytes_inputs_work(china):
    transform = PhotoMultiCropTransform(global_size=32, local_size=16, num_local_crops=1)
    buffer = io.BytesIO()
    china.convert("L").save(buffer, format="PNG")
    assert [tuple(view.shape) for view in transform(buffer.getvalue())] == [(3, 32, 32)] * 2 + [(3, 16, 16)]


@pytest.mark.parametrize("hue", [-0.1, -0.013, 0.0, 0.05, 0.1, 0.5])
def test_hue_lookup_table_equals_torchvision(china, hue):
    crop = china.resize((64, 48))
    assert np.array_equal(np.asarray(adjust_hue_lut(crop, hue)), np.asarray(TF.adjust_hue(crop, hue)))


def test_max_reduction_keeps_the_smallest_crop_above_its_size():
    transform = PhotoMultiCropTransform(num_local_crops=6)
    # Locals: smallest side sqrt(0.05 * 1411^2 * 3/4) = 273.2 px for 96 px -> 2.85 (globals allow 3.45).
    assert transform.max_reduction(1411, 1411) == pytest.approx(math.sqrt(0.05 * 1411**2 * 0.75) / 96)
    # 640x427: sqrt(0.05 * 640 * 427 * 3/4) = 101.2 px -> 1.054, too little for JPEG's 1/2 scale.
    assert transform.max_reduction(640, 427) == pytest.approx(math.sqrt(0.05 * 640 * 427 * 0.75) / 96)
    assert transform.max_reduction(100, 100) == 1.0


def test_jpeg_decodes_reduced_only_when_allowed(china):
    transform = PhotoMultiCropTransform(num_local_crops=6)
    big = china.resize((1600, 1067))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    decoded = transform.decode(buffer.getvalue())
    assert decoded.size == (800, 534)  # factor 2.63 allows JPEG's 1/2 scale, not 1/4
    buffer = io.BytesIO()
    china.save(buffer, format="JPEG", quality=90)
    assert transform.decode(buffer.getvalue()).size == china.size


def test_views_match_the_classic_pipeline_in_distribution(china):
    """Per-view mean and spread of pixel values over many draws agree with torchvision's PIL pipeline."""
    from augmentation import ClassicMultiCrop

    buffer = io.BytesIO()
    china.save(buffer, format="PNG")
    data = buffer.getvalue()
    ours = PhotoMultiCropTransform(global_size=48, local_size=24, num_local_crops=2)
    classic = ClassicMultiCrop(num_local=2, global_size=48, local_size=24, pil_blur=True)
    random.seed(0)
    torch.manual_seed(0)
    draws = 150
    ours_stats = torch.stack([torch.stack([v.mean(), v.std()]) for _ in range(draws) for v in ours(data)])
    classic_stats = torch.stack([torch.stack([v.mean(), v.std()]) for _ in range(draws) for v in classic(data)])
    assert torch.allclose(ours_stats.mean(0), classic_stats.mean(0), atol=0.05)
    assert torch.allclose(ours_stats.std(0), classic_stats.std(0), rtol=0.15)
