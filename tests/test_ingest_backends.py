"""The `gpu` augmentation backend on CPU tensors (decode and parameter draws in DataLoader workers, views made
batched where the model is) and the large-dataset formats: an imagefolder of JPEGs, ImageNet-style parquet
shards, WebDataset tar shards and streaming."""

import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from twist_hf.data import DecodedIterableImageDataset, epoch_seed, find_image_column, load_image_dataset
from twist_hf.device_ingest import StepBatches, draft_factor
from twist_hf.gpu_augment import DeviceMultiCrop
from twist_hf.training.device_views import DeviceViews

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
from ingest_data import jpeg_bytes, synthetic_photo, write_image_folder, write_parquet_shards, write_webdataset_shards
from pretrain import main
from tiny_run import tiny_run_args


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), {"train": 96, "test": 32})


def small_crops(**overrides) -> DeviceMultiCrop:
    return DeviceMultiCrop(**{"global_size": 32, "local_size": 16, "num_local_crops": 2, "seed": 0, **overrides})


def device_views(folder: Path, num_workers: int = 0, rank: int = 0, world_size: int = 1) -> DeviceViews:
    dataset = load_image_dataset("imagefolder", data_dir=str(folder), split="train")
    return DeviceViews(dataset, None, small_crops(), 8, rank, world_size, 3, num_workers, torch.device("cpu"))


def same_views(first: list[list[torch.Tensor]], second: list[list[torch.Tensor]]) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a, b) for step_a, step_b in zip(first, second) for a, b in zip(step_a, step_b)
    )


def test_device_views_resume_mid_epoch_with_the_same_views_in_any_number_of_loader_workers(jpeg_folder):
    views = device_views(jpeg_folder)
    assert views.steps_per_epoch == 12
    whole = list(views.epoch(1, stop_step=5))
    assert [tuple(view.shape) for view in whole[0]] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    assert same_views(list(views.epoch(1, skip_steps=3, stop_step=5)), whole[3:])
    assert same_views(list(device_views(jpeg_folder, num_workers=2).epoch(1, stop_step=5)), whole)
    assert not torch.equal(list(views.epoch(2, stop_step=1))[0][0], whole[0][0])
    other_rank = device_views(jpeg_folder, rank=1, world_size=2)
    assert not torch.equal(list(other_rank.epoch(1, stop_step=1))[0][0], whole[0][0])


def test_a_harder_transform_changes_only_the_crop_law(jpeg_folder):
    """The self-labeling phase's crops come through `transform=` (a per-image law turned into a device one)."""
    from twist_hf.transforms import MultiCropTransform

    views = device_views(jpeg_folder)
    law = MultiCropTransform(global_size=24, local_size=16, num_local_crops=2, global_scale=(0.14, 1.0))
    harder = list(views.epoch(0, transform=law, stop_step=1))[0]
    assert tuple(harder[0].shape) == (8, 3, 24, 24)


def test_reduced_jpeg_decode_keeps_every_crop_at_its_output_size_and_the_views_close():
    """A large JPEG decoded at a draft reduction: the boxes follow into the reduced pixels and the views stay
    close to those of the full-size decode with the same parameters."""
    data = jpeg_bytes(synthetic_photo(np.random.default_rng(0), 480, 640))
    crops = small_crops(num_local_crops=0)
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None}]}).cast_column(
        "image", datasets.Image(decode=False)
    )
    values = lambda first, end: dataset[first:end]["image"]  # noqa: E731
    batch = StepBatches(values, crops, 1, step_seed=5, start=0, stop=1, encoded_jpegs=False)[0]
    reference_parameters = crops.sample(torch.tensor([[480.0, 640.0]]), torch.Generator().manual_seed(epoch_seed(5, 0)))
    boxes = torch.stack([view.boxes[0] for view in reference_parameters])
    assert draft_factor(boxes, crops.sizes) >= 2 and batch.images[0].shape[1] < 480
    for view in batch.parameters:
        _, _, height, width = view.boxes[0].tolist()
        assert min(height, width) >= 32
    full = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    reduced_views = crops.apply(batch.images, batch.parameters)
    full_views = crops.apply([full], reference_parameters)
    for reduced, reference in zip(reduced_views, full_views):
        assert (reduced - reference).abs().mean() < 0.1


@pytest.mark.slow
def test_gpu_backend_trains_end_to_end_and_resumes_exactly(jpeg_folder, tmp_path):
    """recipes/pretrain.py with --augmentation_backend gpu on a JPEG imagefolder; resumed at step 4 of 8 (the
    second epoch starts at step 6) it ends with bit-identical weights."""
    options = tiny_run_args(
        launcher="local",
        dataset_name="imagefolder",
        data_dir=jpeg_folder,
        augmentation_backend="gpu",
        dataloader_num_workers=1,
        per_device_train_batch_size=16,
        bunch_size=16,
        max_train_samples=96,
        max_eval_samples=32,
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*options, "--output_dir", str(straight)]) == 0
    results = json.loads((straight / "all_results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 8 and "knn_top1" in results
    checkpoint = straight / "checkpoints" / "checkpoint-4"
    assert main([*options, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint)]) == 0
    first, second = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("layout", ["imagefolder", "parquet", "webdataset"])
@pytest.mark.parametrize("streaming", [False, True])
def test_large_dataset_formats_load_and_decode(tmp_path, layout, streaming):
    if layout == "imagefolder":
        name, options = "imagefolder", {"data_dir": str(write_image_folder(tmp_path, {"train": 12}))}
    elif layout == "parquet":
        name, options = "parquet", {"data_files": write_parquet_shards(tmp_path, 12, shards=3)}
    else:
        name, options = "webdataset", {"data_files": write_webdataset_shards(tmp_path, 12, shards=3)}
    dataset = load_image_dataset(name, split="train", streaming=streaming, **options)
    column = find_image_column(dataset.features)
    if streaming:
        examples = list(DecodedIterableImageDataset(dataset, lambda image: image.size))
        assert len(examples) == 12 and all("pixel_values" in example for example in examples)
        return
    assert len(dataset) == 12 and column in ("image", "jpg")
    views = DeviceViews(dataset, None, small_crops(), 4, 0, 1, 0, 0, torch.device("cpu"))
    assert views.steps_per_epoch == 3 and len(list(views.epoch(0))) == 3 and views.skipped.count == 0


def test_gpu_benchmark_feeds_jpegs_through_both_backends_without_ray_or_datasets():
    """benchmarks/gpu.py's JPEG section (per_image over plain files, gpu backend) where `ray` and `datasets`
    cannot be imported, on the CPU with the smoke sizes."""
    script = (
        "import sys; sys.modules.update(ray=None, datasets=None); sys.path.insert(0, 'benchmarks')\n"
        "import gpu, torch\n"
        "args = gpu.parse_args(['--device', 'cpu', '--tiny', '--loader-workers', '1'])\n"
        "rows = gpu.jpeg_backends(args, torch.device('cpu'), flops_per_step=10**9)\n"
        "assert set(rows) == {'workload', 'per_image', 'gpu, CPU draft decode'}, rows\n"
        "measured = [row for key, row in rows.items() if key != 'workload']\n"
        "assert all(row['img_per_s'] > 0 and 0 <= row['data_wait_fraction'] <= 1 for row in measured)\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
