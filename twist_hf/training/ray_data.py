"""The `ray_data` augmentation backend: decoding and multi-crop augmentation run as Ray Data tasks on any CPU of
the cluster (nodes without GPUs included) and stream to the Train workers (`ray.train.get_dataset_shard`).

Same as the other backends: the image at (rank, epoch, step, position) is the one `shuffled_shard_for_epoch` gives
the per-image and gpu backends (a permutation shared by all ranks, new each epoch, disjoint interleaved shards);
`steps_per_epoch`, the schedule and the self-labeling phase's harder crops (chosen by the row's step); each
sample's views are seeded by (seed, step, slot), so a resumed run draws the same views.
What differs: Ray Data's streaming split hands each worker `steps x batch` rows in the order its tasks finish,
so which Train worker trains on a given step's samples, and the batch a sample lands in near step boundaries,
may change from run to run (each worker still gets the same number of full batches). The driver starts the
dataset at the step of --resume_from_checkpoint; after a worker failure Ray restarts it from that step and the
workers drop the batches before their checkpoint (recomputed, not trained on).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..configuration_twist import TwistConfig
from ..data import (
    SkippedImageCounter,
    decode_image_or_reason,
    epoch_seed,
    find_image_column,
    shuffled_shard_for_epoch,
    with_undecoded_images,
)
from .arguments import PretrainArguments
from .optim import build_schedule

TRAIN_DATASET = "train"


def ingest_layout(args: PretrainArguments, world_size: int) -> tuple[int, int, int]:
    """(number of training images, steps per epoch, total steps) of a run over `world_size` workers."""
    batch = args.training.per_device_train_batch_size
    num_images = len(_training_images(args))
    steps_per_epoch = (num_images // world_size) // batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"{num_images} training images make no full batch of {batch} per worker over {world_size} workers; "
            "lower per_device_train_batch_size or use more data."
        )
    schedule = build_schedule(args.training, steps_per_epoch, batch * world_size)
    return num_images, steps_per_epoch, schedule.total_steps


def _training_images(args: PretrainArguments):
    from .data import open_dataset

    dataset = open_dataset(args.data, args.data.train_split)
    if args.data.max_train_samples is not None:
        dataset = dataset.select(range(min(args.data.max_train_samples, len(dataset))))
    return dataset


def train_datasets(args: PretrainArguments) -> dict | None:
    """The TorchTrainer's `datasets=`: {"train": the views' Ray Dataset} with the ray_data backend, else None."""
    if args.data.augmentation_backend != "ray_data":
        return None
    return {TRAIN_DATASET: build_ray_train_dataset(args, resume_step(args))}


def build_ray_train_dataset(args: PretrainArguments, start_step: int = 0):
    """The Ray Dataset of a run's views from `start_step` on: one row per (step, slot) of the global batch, mapped
    by `MultiCropViews` tasks (1 CPU each) wherever the cluster has CPUs."""
    import ray.data

    world, batch = args.launch.num_workers, args.training.per_device_train_batch_size
    _, _, total = ingest_layout(args, world)
    rows = (total - start_step) * world * batch
    return ray.data.range(rows, override_num_blocks=max(1, min(rows // batch, 1000))).map_batches(
        MultiCropViews,
        fn_constructor_kwargs={"args_dict": args.to_dict(), "start_step": start_step},
        batch_size=batch,
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)))),
    )


class MultiCropViews:
    """A Ray Data map over rows {"id"}: row i is slot i % (world x batch) of step start + i // (world x batch);
    it decodes that slot's image and makes its views with the phase's per-image `MultiCropTransform`."""

    def __init__(self, args_dict: dict, start_step: int):
        from .arguments import arguments_from_dict
        from .data import crop_transforms

        self.args = arguments_from_dict(args_dict)
        self.world, self.batch = self.args.launch.num_workers, self.args.training.per_device_train_batch_size
        self.start_step, self.seed = start_step, self.args.training.seed
        dataset = _training_images(self.args)
        self.image_column = find_image_column(dataset.features, self.args.data.image_column)
        self.dataset = with_undecoded_images(dataset, self.image_column)
        _, self.steps_per_epoch, _ = ingest_layout(self.args, self.world)
        config = self.args.model.build_config()
        self.schedule = build_schedule(self.args.training, self.steps_per_epoch, self.batch * self.world)
        self.crops = [crop_transforms(self.args, config, self_labeling=phase, batched=False) for phase in (0, 1)]
        import ray

        self.node = node_number(ray.get_runtime_context().get_node_id())

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one actor per task pool, a handful of (rank, epoch) shards
    def _shard(self, rank: int, epoch: int):
        return shuffled_shard_for_epoch(self.dataset, rank, self.world, self.seed, epoch)

    def __call__(self, rows: dict) -> dict:
        samples = [self._sample(int(row)) for row in rows["id"]]
        good = [sample for sample in samples if sample[1] is not None]
        if not good:
            raise ValueError(f"No image of the rows {rows['id'][:4]}... could be decoded.")
        views = [sample[1] if sample[1] is not None else good[i % len(good)][1] for i, sample in enumerate(samples)]
        columns = {f"view{index}": np.stack([view[index].numpy() for view in views]) for index in range(len(views[0]))}
        columns["step"] = np.array([sample[0] for sample in samples], dtype=np.int64)
        columns["skipped"] = np.array([sample[1] is None for sample in samples], dtype=np.int64)
        columns["node"] = np.full(len(samples), self.node, dtype=np.int64)
        return columns

    def _sample(self, row: int) -> tuple[int, list[torch.Tensor] | None]:
        step, slot = divmod(row, self.world * self.batch)
        step += self.start_step
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        rank, position = divmod(slot, self.batch)
        value = self._shard(rank, epoch)[in_epoch * self.batch + position][self.image_column]
        image, _ = decode_image_or_reason(value)
        if image is None:
            return step, None
        sample_seed = epoch_seed(epoch_seed(self.seed, step), slot)
        random.seed(sample_seed)
        torch.manual_seed(sample_seed)
        np.random.seed(sample_seed)
        return step, self.crops[int(self.schedule.in_self_label_phase(step))](image)


class RayDataViews:
    """A Train worker's views streamed from its `get_dataset_shard("train")`; one stream for the whole run."""

    def __init__(self, args: PretrainArguments, config: TwistConfig, rank: int, world_size: int):
        import ray.train

        self.batch_size = args.training.per_device_train_batch_size
        _, self.steps_per_epoch, _ = ingest_layout(args, world_size)
        self.shard = ray.train.get_dataset_shard(TRAIN_DATASET)
        self.skipped = SkippedImageCounter()
        self.nodes: set[int] = set()
        self._stream: Iterator[dict] | None = None

    def epoch(
        self, epoch: int, skip_steps: int = 0, transform=None, stop_step: int | None = None
    ) -> Iterator[list[torch.Tensor]]:
        """The views of steps [skip_steps, stop_step) of the epoch. The crops were chosen by the Ray Data tasks
        from each row's step (`transform`, the loop's phase crops, is what they used)."""
        stop = self.steps_per_epoch if stop_step is None else min(stop_step, self.steps_per_epoch)
        first = epoch * self.steps_per_epoch + skip_steps
        for _ in range(stop - skip_steps):
            yield self._views(self._next_batch_from(first))

    def _next_batch_from(self, first_step: int) -> dict:
        """The next batch of the stream, past the batches of steps before `first_step` (after a restart)."""
        if self._stream is None:
            self._stream = iter(self.shard.iter_torch_batches(batch_size=self.batch_size, device="cpu"))
        batch = next(self._stream)
        while int(batch["step"].max()) < first_step:
            batch = next(self._stream)
        return batch

    def _views(self, batch: dict) -> list[torch.Tensor]:
        skipped = int(batch["skipped"].sum())
        if skipped:
            self.skipped.merge({"undecodable (replaced in the Ray Data task)": skipped})
        self.nodes.update(batch["node"].tolist())
        names = sorted((key for key in batch if key.startswith("view")), key=lambda name: int(name[4:]))
        return [batch[name] for name in names]


def node_number(node_id: str) -> int:
    """A Ray node id (hex) as an int64 that a tensor column can carry (its first 60 bits)."""
    return int(node_id[:15], 16)


def resume_step(args: PretrainArguments) -> int:
    """The global step the run resumes from (0 for a fresh run), read in the driver from the checkpoint."""
    from ..hub import resolve_resume_checkpoint
    from .checkpoint import find_latest_checkpoint, read_trainer_state

    spec = args.training.resume_from_checkpoint
    if spec is None:
        return 0
    folder = find_latest_checkpoint(args.training.output_dir) if spec == "latest" else None
    if spec == "latest" and folder is None:
        return 0
    folder = folder or Path(resolve_resume_checkpoint(spec, token=args.training.hub_token))
    return int(read_trainer_state(folder)["global_step"])
