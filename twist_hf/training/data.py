"""Training and monitoring data for the per-worker loop: the augmented views of each step (and how the run's
arguments build them), and the labelled in-memory splits of the monitors. Built on `twist_hf.data` and
`twist_hf.transforms`."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..configuration_twist import TwistConfig
from ..data import (
    FASHION_MNIST_ROOT,
    DecodedImageDataset,
    DecodedIterableImageDataset,
    SkippedImageCounter,
    collate_skipping_bad_images,
    decode_to_uint8_array,
    epoch_seed,
    fashion_mnist_arrays,
    find_image_column,
    find_label_column,
    in_memory_batches,
    is_fashion_mnist,
    load_image_dataset,
    shuffled_shard_for_epoch,
)
from ..transforms import BatchedMultiCrop, MultiCropTransform
from .arguments import DataArguments, PretrainArguments


@dataclass
class LabelledImages:
    """A split decoded into memory: uint8 images (N, H, W) or (N, 3, H, W) and int64 labels (-1: none)."""

    images: np.ndarray
    labels: np.ndarray

    def head(self, count: int | None) -> LabelledImages:
        return self if count is None else LabelledImages(self.images[:count], self.labels[:count])


def load_split(
    data_args: DataArguments,
    split: str,
    size: int,
    counter: SkippedImageCounter | None = None,
    max_samples: int | None = None,
) -> LabelledImages:
    """Decode one split into memory at `size` x `size` (Fashion-MNIST straight from the IDX files in data_dir)."""
    if is_fashion_mnist(data_args.dataset_name):
        images, labels = fashion_mnist_arrays(split, root=data_args.data_dir or FASHION_MNIST_ROOT)
        return LabelledImages(images, labels).head(max_samples)
    dataset = open_dataset(data_args, split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    images, labels = decode_to_uint8_array(dataset, size, data_args.image_column, data_args.label_column, counter)
    return LabelledImages(images, labels)


def open_dataset(data_args: DataArguments, split: str, streaming: bool = False):
    """The HF dataset of one split, as the data arguments name it."""
    return load_image_dataset(
        data_args.dataset_name,
        config_name=data_args.dataset_config_name,
        split=split,
        data_dir=data_args.data_dir,
        data_files=data_args.data_files,
        streaming=streaming,
    )


def check_dataset(data_args: DataArguments, need_labels: bool) -> None:
    """Fail early, in the driver, on an unknown dataset, split or column."""
    if is_fashion_mnist(data_args.dataset_name):
        for split in filter(None, (data_args.train_split, data_args.eval_split)):
            fashion_mnist_arrays(split, root=data_args.data_dir or FASHION_MNIST_ROOT)
        return
    train = open_dataset(data_args, data_args.train_split, streaming=data_args.streaming)
    try:
        find_image_column(train.features, data_args.image_column)
        if need_labels and data_args.eval_split:
            evaluation = open_dataset(data_args, data_args.eval_split, streaming=data_args.streaming)
            if find_label_column(evaluation.features, data_args.label_column) is None:
                raise ValueError(
                    f"The eval split {data_args.eval_split!r} has no label column for the kNN monitor; name it "
                    "with --label_column, or pass --eval_split '' to train without kNN evaluation."
                )
    except KeyError as error:  # a column named on the command line is missing: a config error, not a crash
        raise ValueError(error.args[0]) from error


def rank_epoch_stream(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's augmentation in one epoch, from which each step (batched) or sample (per image) seeds
    its draws: different on every rank, the same again in a resumed run."""
    return epoch_seed(seed + 7919 * rank, epoch)


class BatchedViews:
    """The in-memory fast path: each step's views made for the whole batch at once (one grid_sample each)."""

    def __init__(
        self,
        split: LabelledImages,
        transform: BatchedMultiCrop,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        skipped: SkippedImageCounter,
    ):
        self.split = split
        self.skipped = skipped
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.steps_per_epoch = (len(split.images) // world_size) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(split.images)} training images make no full batch of {batch_size} per worker over "
                f"{world_size} workers; lower per_device_train_batch_size or use more data."
            )

    def epoch(
        self,
        epoch: int,
        skip_steps: int = 0,
        transform: BatchedMultiCrop | None = None,
        stop_step: int | None = None,
    ) -> Iterator[list[torch.Tensor]]:
        """The views of steps [skip_steps, stop_step) of the epoch, made by `transform` (default: the views' own);
        each step's augmentation is seeded by (seed, rank, epoch, step), so a run resumed mid-epoch draws the same
        crops as an uninterrupted one."""
        transform = transform or self.transform
        epoch_stream = rank_epoch_stream(self.seed, self.rank, epoch)
        batches = in_memory_batches(
            self.split.images,
            self.split.labels,
            self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
        )
        stop = self.steps_per_epoch if stop_step is None else min(stop_step, self.steps_per_epoch)
        for step, (images, _) in enumerate(itertools.islice(batches, skip_steps, stop), start=skip_steps):
            yield transform(images, generator=torch.Generator().manual_seed(epoch_seed(epoch_stream, step)))


class PerImageViews:
    """Any HF dataset: torchvision v2 multi-crop per image in DataLoader workers, bad images skipped."""

    def __init__(
        self,
        data_args: DataArguments,
        transform: MultiCropTransform,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        max_steps_per_epoch: int | None,
        pin_memory: bool,
    ):
        self.dataset = open_dataset(data_args, data_args.train_split, streaming=data_args.streaming)
        if data_args.max_train_samples is not None and not data_args.streaming:
            self.dataset = self.dataset.select(range(min(data_args.max_train_samples, len(self.dataset))))
        self.data_args = data_args
        self.transform = transform
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.pin_memory = pin_memory
        self.skipped = SkippedImageCounter()
        if data_args.streaming:
            if max_steps_per_epoch is None:
                raise ValueError("A streaming dataset has no length: set --max_steps.")
            self.steps_per_epoch = max_steps_per_epoch
        else:
            self.steps_per_epoch = (len(self.dataset) // world_size) // batch_size
            if self.steps_per_epoch == 0:
                raise ValueError(f"The training split has too few images for one batch of {batch_size} per worker.")

    def _loader(self, epoch: int, transform: MultiCropTransform, skip_steps: int = 0) -> DataLoader:
        """The epoch's batches from batch `skip_steps` on. A map-style shard starts there by index (nothing before
        it is decoded) and seeds each sample's augmentation by its position; a stream is read from its start."""
        shard = shuffled_shard_for_epoch(self.dataset, self.rank, self.world_size, self.seed, epoch)
        columns = (self.data_args.image_column, self.data_args.label_column)
        if self.data_args.streaming:
            torch_dataset = DecodedIterableImageDataset(shard, transform, *columns)
        else:
            samples = DecodedImageDataset(shard, transform, *columns)
            stream = rank_epoch_stream(self.seed, self.rank, epoch)
            end = self.steps_per_epoch * self.batch_size  # the same number of batches on every rank
            torch_dataset = SeededSamples(samples, skip_steps * self.batch_size, end, stream)
        return DataLoader(
            torch_dataset,
            batch_size=self.batch_size,
            collate_fn=collate_skipping_bad_images,
            num_workers=self.data_args.dataloader_num_workers,
            pin_memory=self.pin_memory,
            drop_last=True,
        )

    def _batches(self, epoch: int, transform: MultiCropTransform, skip_steps: int) -> Iterator[dict]:
        """The epoch's batches from `skip_steps` on; a stream restarts (re-shuffled) when it runs out before the
        epoch's steps, and is skipped by reading it."""
        if not self.data_args.streaming:
            yield from self._loader(epoch, transform, skip_steps)
            return
        restarts = (self._loader(restart, transform) for restart in itertools.count(epoch, 10_000))
        yield from itertools.islice(itertools.chain.from_iterable(restarts), skip_steps, None)

    def epoch(
        self,
        epoch: int,
        skip_steps: int = 0,
        transform: MultiCropTransform | None = None,
        stop_step: int | None = None,
    ) -> Iterator[list[torch.Tensor] | None]:
        """The views of batches [skip_steps, stop_step) of the epoch, made by `transform` (default: the views' own);
        None for a batch whose images were all undecodable (the loop skips it on every rank)."""
        stop = self.steps_per_epoch if stop_step is None else min(stop_step, self.steps_per_epoch)
        batches = self._batches(epoch, transform or self.transform, skip_steps)
        yield from (self._count_skipped_and_fill(batch) for batch in itertools.islice(batches, stop - skip_steps))

    def _count_skipped_and_fill(self, batch: dict) -> list[torch.Tensor] | None:
        self.skipped.merge(batch["skipped"])
        return fill_batch(batch["pixel_values"], self.batch_size) if "pixel_values" in batch else None


class SeededSamples(torch.utils.data.Dataset):
    """Positions [start, end) of an epoch's shard. Each sample's augmentation (Python's `random`, which
    `MultiCropTransform` draws from) is seeded by its position in a (seed, rank, epoch) stream, so that any
    DataLoader worker, and a run resumed mid-epoch, draws the same views for it."""

    def __init__(self, samples: DecodedImageDataset, start: int, end: int, stream: int):
        self.samples, self.start, self.stream = samples, start, stream
        self.end = min(end, len(samples))

    def __len__(self) -> int:
        return max(self.end - self.start, 0)

    def __getitem__(self, index: int) -> dict:
        position = self.start + index
        outer = random.getstate()  # the caller's stream is left as it was (num_workers=0 runs here)
        random.seed(epoch_seed(self.stream, position))
        try:
            return self.samples[position]
        finally:
            random.setstate(outer)


def fill_batch(views: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Top a batch that lost skipped images back up to `batch_size` by repeating its first samples, so every
    rank keeps the same batch size (bunch norm groups and DDP need it)."""
    missing = batch_size - views[0].shape[0]
    if missing <= 0:
        return views
    repeat = torch.arange(missing) % views[0].shape[0]
    return [torch.cat([view, view[repeat]]) for view in views]


def crop_transforms(
    args: PretrainArguments, config: TwistConfig, self_labeling: bool, batched: bool
) -> BatchedMultiCrop | MultiCropTransform:
    """The multi-crop transform of the phase: the recipe's crops, or its (harder) self-labeling crops."""
    data = args.data
    if self_labeling:
        scales = {"global_scale": data.self_label_global_crop_scale, "local_scale": data.self_label_local_crop_scale}
    else:
        scales = {"global_scale": data.global_crop_scale, "local_scale": data.local_crop_scale}
    common = {
        "global_size": data.global_crop_size or config.image_size,
        "local_size": data.local_crop_size,
        "num_local_crops": data.num_local_crops,
        "mean": config.image_mean,
        "std": config.image_std,
        "solarize_probabilities": data.solarize_probabilities,
        "equalize_probabilities": data.equalize_probabilities,
        **scales,
    }
    if batched:  # no hue jitter on whole batches
        return BatchedMultiCrop(**common, jitter_strength=data.colour_jitter[:3], seed=args.training.seed)
    return MultiCropTransform(**common, jitter=data.colour_jitter)


def build_train_views(
    args: PretrainArguments, config: TwistConfig, rank: int, world_size: int
) -> BatchedViews | PerImageViews:
    """This rank's training views with the phase-1 crops: in memory (batched backend), per image, made on the
    training device (gpu) or streamed from Ray Data tasks (ray_data)."""
    training, data = args.training, args.data
    if data.augmentation_backend in ("gpu", "ray_data"):
        return build_ingest_views(args, config, rank, world_size)
    batched = data.augmentation_backend == "batched"
    transform = crop_transforms(args, config, self_labeling=False, batched=batched)
    if batched:
        skipped = SkippedImageCounter()
        split = load_split(
            data, data.train_split, config.image_size, counter=skipped, max_samples=data.max_train_samples
        )
        return BatchedViews(
            split, transform, training.per_device_train_batch_size, rank, world_size, training.seed, skipped
        )
    return PerImageViews(
        data,
        transform,
        training.per_device_train_batch_size,
        rank,
        world_size,
        training.seed,
        training.max_steps if training.max_steps > 0 else None,
        pin_memory=args.launch.use_gpu,
    )


def build_ingest_views(args: PretrainArguments, config: TwistConfig, rank: int, world_size: int):
    """The views of the `gpu` backend (`DeviceViews`) or of the `ray_data` backend (`RayDataViews`)."""
    training, data = args.training, args.data
    if data.augmentation_backend == "ray_data":
        from .ray_data import RayDataViews

        return RayDataViews(args, config, rank, world_size)
    from .device_views import DeviceViews, device_crops, training_device

    dataset = open_dataset(data, data.train_split)
    if data.max_train_samples is not None:
        dataset = dataset.select(range(min(data.max_train_samples, len(dataset))))
    law = crop_transforms(args, config, self_labeling=False, batched=False)
    return DeviceViews(
        dataset,
        data.image_column,
        device_crops(law, training.seed),
        training.per_device_train_batch_size,
        rank,
        world_size,
        training.seed,
        data.dataloader_num_workers,
        training_device(args.launch.use_gpu),
    )
