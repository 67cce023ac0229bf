"""The `gpu` augmentation backend in training: each rank's shard of an epoch (`shuffled_shard_for_epoch`, as the
per-image backend) read step by step by `twist_hf.device_ingest.StepBatches` in DataLoader workers, the views made
on the training device by `views_on_device`."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from ..data import (
    SkippedImageCounter,
    decode_image_or_reason,
    epoch_seed,
    find_image_column,
    shuffled_shard_for_epoch,
    with_undecoded_images,
)
from ..device_ingest import StepBatches, keep_batch, views_on_device
from ..gpu_augment import DeviceMultiCrop
from ..transforms import MultiCropLaw


def device_crops(law: MultiCropLaw, seed: int) -> DeviceMultiCrop:
    """The `DeviceMultiCrop` with the same law as `law` (e.g. the loop's per-image self-labeling crops)."""
    if isinstance(law, DeviceMultiCrop):
        return law
    crops = DeviceMultiCrop(seed=seed)
    crops.__dict__.update({key: getattr(law, key) for key in vars(MultiCropLaw())})
    return crops


def _column_slice(shard, column: str, first: int, end: int) -> list:
    return shard[first:end][column]


def training_device(use_gpu: bool) -> torch.device:
    """The device the views are made on: this process's current CUDA device with --use_gpu, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


class DeviceViews:
    """The `gpu` backend: decode and parameter draws in DataLoader workers, the views made on `device`."""

    def __init__(
        self,
        dataset,
        image_column: str | None,
        crops: DeviceMultiCrop,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
        device: torch.device,
    ):
        self.image_column = find_image_column(dataset.features, image_column)
        self.dataset = with_undecoded_images(dataset, self.image_column)
        self.crops, self.batch_size = crops, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.device = num_workers, device
        self.skipped = SkippedImageCounter()
        self.steps_per_epoch = (len(dataset) // world_size) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} training images make no full batch of {batch_size} per worker over {world_size} "
                "workers; lower per_device_train_batch_size or use more data."
            )

    def epoch(
        self,
        epoch: int,
        skip_steps: int = 0,
        transform: MultiCropLaw | None = None,
        stop_step: int | None = None,
    ) -> Iterator[list[torch.Tensor]]:
        """The views of steps [skip_steps, stop_step) of the epoch, made by `transform` (default: the views' own),
        each step's parameters seeded by (seed, rank, epoch, step) as in `BatchedViews`."""
        crops = self.crops if transform is None else device_crops(transform, self.seed)
        stop = self.steps_per_epoch if stop_step is None else min(stop_step, self.steps_per_epoch)
        shard = shuffled_shard_for_epoch(self.dataset, self.rank, self.world_size, self.seed, epoch)
        step_seed = epoch_seed(self.seed + 7919 * self.rank, epoch)
        on_gpu = self.device.type == "cuda"
        values = functools.partial(_column_slice, shard, self.image_column)
        batches = StepBatches(
            values, crops, self.batch_size, step_seed, skip_steps, stop, on_gpu, decode=decode_image_or_reason
        )
        loader = DataLoader(
            batches, batch_size=None, collate_fn=keep_batch, num_workers=self.num_workers, pin_memory=on_gpu
        )
        return views_on_device(loader, crops, self.device, self.skipped.merge)
