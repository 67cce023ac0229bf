"""The `gpu` augmentation backend: DataLoader workers read, decode (at a reduced size where exact) and draw every
random parameter of a step's batch on the CPU; `DeviceMultiCrop.apply` makes the views batched on the training
device, the next batch staged there on a side CUDA stream while the current step runs (sequential on a CPU)."""

from __future__ import annotations

import collections
import io
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage
from torch.utils.data import DataLoader

from ..data import (
    SkippedImageCounter,
    decode_image_or_reason,
    epoch_seed,
    find_image_column,
    shuffled_shard_for_epoch,
    with_undecoded_images,
)
from ..gpu_augment import DeviceMultiCrop, ViewParameters
from ..transforms import MultiCropLaw

# EXIF orientations that swap width and height (transpose, 90 and 270 degree rotations).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


@dataclass
class StepBatch:
    """One step's decoded images (uint8 (C, H, W) each; JPEG bytes when `encoded[i]`) and every view's parameters."""

    images: list[torch.Tensor]
    encoded: list[bool]
    parameters: list[ViewParameters]
    skipped: dict[str, int]


def device_crops(law: MultiCropLaw, seed: int) -> DeviceMultiCrop:
    """The `DeviceMultiCrop` with the same law as `law` (e.g. the loop's per-image self-labeling crops)."""
    if isinstance(law, DeviceMultiCrop):
        return law
    crops = DeviceMultiCrop(seed=seed)
    crops.__dict__.update({key: getattr(law, key) for key in vars(MultiCropLaw())})
    return crops


def _open_lazily(value) -> tuple[PILImage.Image | None, str | None]:
    """Open an image without decoding its pixels (so a JPEG can still be drafted), or say why it cannot be."""
    try:
        if isinstance(value, dict) and value.get("bytes") is not None:
            return PILImage.open(io.BytesIO(value["bytes"])), None
        if isinstance(value, dict) and value.get("path") is not None:
            with open(value["path"], "rb") as handle:
                return PILImage.open(io.BytesIO(handle.read())), None
        return None, "missing value"
    except FileNotFoundError:
        return None, "missing file"
    except Exception:  # noqa: BLE001 - any failure on untrusted bytes means "skip this image"
        return None, "unidentified format"


def oriented_size(image: PILImage.Image) -> tuple[int, int]:
    """(height, width) of the image as shown, its EXIF orientation applied."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (width, height) if orientation in _SWAPPING_ORIENTATIONS else (height, width)


def draft_factor(boxes: torch.Tensor, sizes: list[int]) -> int:
    """The JPEG draft reduction (1, 2, 4 or 8) that keeps every crop of one image at least its output size."""
    reduction = min(min(height, width) / size for (_, _, height, width), size in zip(boxes.tolist(), sizes))
    return 2 ** min(3, int(math.log2(reduction))) if reduction >= 2 else 1


def decode_for_boxes(image: PILImage.Image, boxes: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, float, float]:
    """Decode `image` to uint8 (3, H, W) at the largest exact JPEG reduction for its `boxes` (one per view);
    returns the pixels and the (y, x) scale of the decoded image relative to the oriented full size."""
    full_height, full_width = oriented_size(image)
    factor = draft_factor(boxes, sizes)
    if factor > 1 and image.format == "JPEG":
        image.draft("RGB", (math.ceil(image.size[0] / factor), math.ceil(image.size[1] / factor)))
    decoded, reason = decode_image_or_reason(image)
    if decoded is None:
        raise ValueError(reason)
    pixels = torch.from_numpy(np.asarray(decoded).copy()).permute(2, 0, 1)
    return pixels, pixels.shape[1] / full_height, pixels.shape[2] / full_width


class StepBatches(torch.utils.data.Dataset):
    """Item k is step `start + k` of one rank's epoch: its images decoded and its views' parameters drawn with a
    generator seeded by (seed, rank, epoch, step), so a resumed run draws exactly the same views."""

    def __init__(
        self,
        shard,
        image_column: str,
        crops: DeviceMultiCrop,
        batch_size: int,
        step_seed: int,
        start: int,
        stop: int,
        encoded_jpegs: bool,
    ):
        self.shard, self.image_column, self.crops = shard, image_column, crops
        self.batch_size, self.step_seed, self.start, self.stop = batch_size, step_seed, start, stop
        self.encoded_jpegs = encoded_jpegs

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> StepBatch:
        step = self.start + index
        rows = self.shard[step * self.batch_size : (step + 1) * self.batch_size][self.image_column]
        opened, skipped = [], Counter()
        for value in rows:
            image, reason = _open_lazily(value)
            if image is None:
                skipped[reason] += 1
            else:
                opened.append((image, value))
        if not opened:
            raise ValueError(f"No image of step {step}'s batch could be opened ({dict(skipped)}).")
        sizes = torch.tensor([oriented_size(image) for image, _ in opened], dtype=torch.float32)
        generator = torch.Generator().manual_seed(epoch_seed(self.step_seed, step))
        parameters = self.crops.sample(sizes, generator)
        return self._decode(opened, parameters, skipped)

    def _decode(self, opened: list, parameters: list[ViewParameters], skipped: Counter) -> StepBatch:
        images, encoded, good = [], [], []
        for index, (image, value) in enumerate(opened):
            boxes = torch.stack([view.boxes[index] for view in parameters])
            if self.encoded_jpegs and image.format == "JPEG":
                images.append(torch.frombuffer(bytearray(_raw_bytes(value)), dtype=torch.uint8))
                encoded.append(True)
                good.append(index)
                continue
            try:
                pixels, y_scale, x_scale = decode_for_boxes(image, boxes, self.crops.sizes)
            except Exception as error:  # noqa: BLE001 - a truncated or corrupt image is skipped and counted
                skipped[str(error) if isinstance(error, ValueError) else "corrupt"] += 1
                continue
            for view in parameters:
                view.boxes[index] = _scaled_box(view.boxes[index], y_scale, x_scale, pixels.shape[1:])
            images.append(pixels)
            encoded.append(False)
            good.append(index)
        if not good:
            raise ValueError(f"No image of a batch could be decoded ({dict(skipped)}).")
        fill = [good[position % len(good)] for position in range(self.batch_size)]
        images = [images[position % len(good)] for position in range(self.batch_size)]
        encoded = [encoded[position % len(good)] for position in range(self.batch_size)]
        chosen = torch.tensor(fill)
        return StepBatch(images, encoded, [view.select(chosen) for view in parameters], dict(skipped))


def _raw_bytes(value: dict) -> bytes:
    if value.get("bytes") is not None:
        return value["bytes"]
    with open(value["path"], "rb") as handle:
        return handle.read()


def _scaled_box(box: torch.Tensor, y_scale: float, x_scale: float, shape: torch.Size) -> torch.Tensor:
    """A (top, left, height, width) box of the full image in the pixels of a reduced decode, kept inside it."""
    top, left, height, width = box.tolist()
    height = max(1, min(shape[0], round(height * y_scale)))
    width = max(1, min(shape[1], round(width * x_scale)))
    top = min(shape[0] - height, round(top * y_scale))
    left = min(shape[1] - width, round(left * x_scale))
    return torch.tensor([top, left, height, width], dtype=box.dtype)


def _first(batch: StepBatch) -> StepBatch:
    return batch


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
        batches = StepBatches(shard, self.image_column, crops, self.batch_size, step_seed, skip_steps, stop, on_gpu)
        loader = DataLoader(
            batches, batch_size=None, collate_fn=_first, num_workers=self.num_workers, pin_memory=on_gpu
        )
        views = (self._views(batch, crops) for batch in loader)
        return _staged_on_side_stream(views) if on_gpu else views

    def _views(self, batch: StepBatch, crops: DeviceMultiCrop) -> list[torch.Tensor]:
        self.skipped.merge(batch.skipped)
        images = decode_jpegs_on_device(batch.images, batch.encoded, self.device) if any(batch.encoded) else batch.images
        images = [image.to(self.device, non_blocking=True) for image in images]
        return crops.apply(images, batch.parameters)


def decode_jpegs_on_device(images: list[torch.Tensor], encoded: list[bool], device: torch.device) -> list[torch.Tensor]:
    """Decode the JPEG byte tensors among `images` with `torchvision.io.decode_jpeg` on `device` (nvJPEG on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    positions = [index for index, flag in enumerate(encoded) if flag]
    data = [images[index] for index in positions]
    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    images = list(images)
    for index, pixels in zip(positions, decoded):
        images[index] = pixels
    return images


def _staged_on_side_stream(views: Iterator[list[torch.Tensor]]) -> Iterator[list[torch.Tensor]]:
    """Make batch k + 1's views on a side CUDA stream while the caller trains on batch k."""
    side, pending = torch.cuda.Stream(), collections.deque()
    iterator = iter(views)
    while True:
        with torch.cuda.stream(side):
            staged = next(iterator, None)
        if staged is not None:
            pending.append((staged, side.record_event()))
        if not pending:
            return
        if staged is not None and len(pending) < 2:
            continue
        ready, event = pending.popleft()
        torch.cuda.current_stream().wait_event(event)
        for view in ready:
            view.record_stream(torch.cuda.current_stream())
        yield ready
