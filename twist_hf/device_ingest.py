"""Multi-crop ingest for the `gpu` backend without `datasets` (the GPU benchmark imports it on a machine without it):
DataLoader workers read a step's images, draw every random parameter (`DeviceMultiCrop.sample`, seeded per step)
and decode JPEGs at the largest exact draft reduction; `views_on_device` makes the views batched on the device,
the next batch staged on a side CUDA stream while the caller trains (sequential on a CPU). Also a plain torch
Dataset of JPEG files for the per-image path (`MultiCropFiles`)."""

from __future__ import annotations

import collections
import io
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps

from .gpu_augment import DeviceMultiCrop, ViewParameters

# EXIF orientations that swap width and height (transpose, 90 and 270 degree rotations).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


@dataclass
class StepBatch:
    """One step's decoded images (uint8 (C, H, W) each; JPEG bytes when `encoded[i]`) and every view's parameters."""

    images: list[torch.Tensor]
    encoded: list[bool]
    parameters: list[ViewParameters]
    skipped: dict[str, int]


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


def step_generator(step_seed: int, step: int) -> torch.Generator:
    """The generator of one step's draws: seeded by (step_seed, step) as `twist_hf.data.epoch_seed` derives seeds."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([step_seed, step]).generate_state(1)[0]))


def decode_rgb(image: PILImage.Image) -> tuple[PILImage.Image | None, str | None]:
    """A plain decode to RGB (EXIF orientation applied), or None and why (training passes the library's robust
    `twist_hf.data.decode_image_or_reason` instead)."""
    try:
        return ImageOps.exif_transpose(image).convert("RGB"), None
    except Exception as error:  # noqa: BLE001 - any failure on untrusted bytes means "skip this image"
        return None, f"corrupt ({type(error).__name__})"


def draft_factor(boxes: torch.Tensor, sizes: list[int]) -> int:
    """The JPEG draft reduction (1, 2, 4 or 8) that keeps every crop of one image at least its output size."""
    reduction = min(min(height, width) / size for (_, _, height, width), size in zip(boxes.tolist(), sizes))
    return 2 ** min(3, int(math.log2(reduction))) if reduction >= 2 else 1


def decode_for_boxes(
    image: PILImage.Image, boxes: torch.Tensor, sizes: list[int], decode: Callable = decode_rgb
) -> tuple[torch.Tensor, float, float]:
    """Decode `image` to uint8 (3, H, W) at the largest exact JPEG reduction for its `boxes` (one per view);
    returns the pixels and the (y, x) scale of the decoded image relative to the oriented full size."""
    full_height, full_width = oriented_size(image)
    factor = draft_factor(boxes, sizes)
    if factor > 1 and image.format == "JPEG":
        image.draft("RGB", (math.ceil(image.size[0] / factor), math.ceil(image.size[1] / factor)))
    decoded, reason = decode(image)
    if decoded is None:
        raise ValueError(reason)
    pixels = torch.from_numpy(np.asarray(decoded).copy()).permute(2, 0, 1)
    return pixels, pixels.shape[1] / full_height, pixels.shape[2] / full_width


class StepBatches(torch.utils.data.Dataset):
    """Item k is step `start + k` of one rank's epoch: its images decoded and its views' parameters drawn with a
    generator seeded by (seed, rank, epoch, step), so a resumed run draws exactly the same views."""

    def __init__(
        self,
        values: Callable[[int, int], list],
        crops: DeviceMultiCrop,
        batch_size: int,
        step_seed: int,
        start: int,
        stop: int,
        encoded_jpegs: bool,
        decode: Callable = decode_rgb,
    ):
        """`values(first, end)`: the {bytes, path} image values of a rank's epoch positions [first, end)."""
        self.values, self.crops, self.decode = values, crops, decode
        self.batch_size, self.step_seed, self.start, self.stop = batch_size, step_seed, start, stop
        self.encoded_jpegs = encoded_jpegs

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> StepBatch:
        step = self.start + index
        rows = self.values(step * self.batch_size, (step + 1) * self.batch_size)
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
        parameters = self.crops.sample(sizes, step_generator(self.step_seed, step))
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
                pixels, y_scale, x_scale = decode_for_boxes(image, boxes, self.crops.sizes, self.decode)
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


def keep_batch(batch: StepBatch) -> StepBatch:
    """The DataLoader's collate_fn for `StepBatches` (each item is already a whole batch)."""
    return batch


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


def views_on_device(
    batches: Iterable[StepBatch], crops: DeviceMultiCrop, device: torch.device, skipped: Callable[[dict], None]
) -> Iterator[list[torch.Tensor]]:
    """The views of each `StepBatch` made on `device` (its skip counts passed to `skipped`); on CUDA the next
    batch is copied, decoded and augmented on a side stream while the caller trains on the current one."""
    views = (_views(batch, crops, device, skipped) for batch in batches)
    return _staged_on_side_stream(views) if device.type == "cuda" else views


def _views(batch: StepBatch, crops: DeviceMultiCrop, device: torch.device, skipped: Callable) -> list[torch.Tensor]:
    skipped(batch.skipped)
    images = decode_jpegs_on_device(batch.images, batch.encoded, device) if any(batch.encoded) else batch.images
    return crops.apply([image.to(device, non_blocking=True) for image in images], batch.parameters)


def file_values(paths: Sequence[str | Path]) -> Callable[[int, int], list[dict]]:
    """`StepBatches` values of plain image files, in order (a rank's shard of an epoch is the caller's business)."""
    values = [{"bytes": None, "path": str(path)} for path in paths]
    return lambda first, end: values[first:end]


class MultiCropFiles(torch.utils.data.Dataset):
    """Plain torch Dataset of image files for the per-image path without `datasets`: item i is `transform`
    applied to file i opened lazily (a JPEG can still decode at a reduced size)."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable[[PILImage.Image], list[torch.Tensor]]):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        with open(self.paths[index], "rb") as handle:
            return self.transform(PILImage.open(io.BytesIO(handle.read())))
