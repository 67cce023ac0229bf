"""End-to-end training on JPEG files, data and step together: images/s and the fraction of the training loop spent
waiting for the next batch, per augmentation backend, in one run.

    python benchmarks/ingest.py                       # CPU: per_image (1 and 2 loader workers), gpu (on CPU), ray_data
    python benchmarks/ingest.py --tiny                # smoke test

The CPU section drives the library's own views (`build_train_views`; Ray Data's dataset iterated in this process
as a Train worker would) and `TrainingStep`. The helpers `jpeg_folder` and `timed_training` need neither `datasets`
nor Ray: benchmarks/gpu.py uses them on a GPU machine that has neither.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGENET_SIZE = (375, 500)  # ImageNet-1k's average photograph, height x width


def synthetic_photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth random colour field with a little noise: compresses and decodes like a photograph."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, field.shape, dtype=np.int16)
    return Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_folder(root: Path, count: int, size: tuple[int, int] = IMAGENET_SIZE, seed: int = 0) -> list[Path]:
    """`count` ImageNet-sized JPEGs (quality 90) as an imagefolder root/train/class{0,1}/, generated here (no
    downloads); returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        folder = root / "train" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:06d}.jpg"
        height, width = size if index % 4 else size[::-1]
        path.write_bytes(jpeg_bytes(synthetic_photo(rng, height, width)))
        paths.append(path)
    return paths


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_training(
    views: Iterable[list[torch.Tensor]],
    step: Callable[[int, list[torch.Tensor]], object],
    batch: int,
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict:
    """Train `warmup` then `steps` steps on `views`; img/s of the timed steps and the fraction of their wall time
    the loop spent blocked on the next batch (data wait)."""
    batches = iter(views)
    for index in range(warmup):
        step(index, next(batches))
    synchronize(device)
    waited, started = 0.0, time.perf_counter()
    for index in range(warmup, warmup + steps):
        asked = time.perf_counter()
        current = next(batches)
        waited += time.perf_counter() - asked
        step(index, current)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"img_per_s": steps * batch / seconds, "data_wait_fraction": waited / seconds, "steps": steps}


def cpu_arguments(data_dir: Path, backend: str, workers: int, batch: int, steps: int, tiny: bool):
    """The library's run arguments of the CPU workload: tiny-resnet, 2 x 64 + 4 x 32 crops (smaller when tiny)."""
    from twist_hf.training.arguments import PretrainArguments, make_parser

    options = {
        "model_preset": "tiny-resnet",
        "dataset_name": "imagefolder",
        "data_dir": str(data_dir),
        "augmentation_backend": backend,
        "dataloader_num_workers": workers,
        "per_device_train_batch_size": batch,
        "bunch_size": batch,
        "global_crop_size": 32 if tiny else 64,
        "local_crop_size": 16 if tiny else 32,
        "num_local_crops": 2 if tiny else 4,
        "launcher": "local",
        "num_workers": 1,
        "output_dir": tempfile.mkdtemp(prefix="ingest-bench-"),
        "report_to": ["none"],
        "max_steps": steps,
        "eval_split": None,
    }
    return PretrainArguments(*make_parser().parse_dict(options))


def ray_data_views(args) -> Iterable[list[torch.Tensor]]:
    """The ray_data backend's views as a Train worker gets them, iterated in this process (one worker)."""
    from twist_hf.training.ray_data import build_ray_train_dataset

    names = [f"view{index}" for index in range(2 + args.data.num_local_crops)]
    batches = build_ray_train_dataset(args).iter_torch_batches(batch_size=args.training.per_device_train_batch_size)
    return ([batch[name] for name in names] for batch in batches)


CPU_BACKENDS = {
    "per_image, 1 loader worker": ("per_image", 1),
    "per_image, 2 loader workers": ("per_image", 2),
    "gpu backend on CPU, 1 loader worker": ("gpu", 1),
    "ray_data (2 CPUs)": ("ray_data", 0),
}


def run_cpu(tiny: bool) -> dict:
    """Each backend on the same JPEG folder with the same model and step, one after another."""
    import ray
    from train_step import recipe_step

    from twist_hf.training.data import build_train_views

    batch, warmup, steps = (8, 1, 3) if tiny else (16, 4, 20)
    device = torch.device("cpu")
    results = {}
    with tempfile.TemporaryDirectory(prefix="ingest-bench-jpegs-") as folder:
        jpeg_folder(Path(folder), batch * (warmup + steps) + batch, size=(96, 128) if tiny else IMAGENET_SIZE)
        for label, (backend, workers) in CPU_BACKENDS.items():
            args = cpu_arguments(Path(folder), backend, workers, batch, warmup + steps, tiny)
            step, model = recipe_step(args, device)
            if backend == "ray_data":
                ray.init(address="local", num_cpus=2, include_dashboard=False)
                try:
                    results[label] = timed_training(ray_data_views(args), step, batch, warmup, steps, device)
                finally:
                    ray.shutdown()
                continue
            views = build_train_views(args, model.config, 0, 1).epoch(0)
            results[label] = timed_training(views, step, batch, warmup, steps, device)
    return {
        "workload": f"tiny-resnet, batch {batch}, 2x{64 if not tiny else 32} + {4 if not tiny else 2}x"
        f"{32 if not tiny else 16} crops, ImageNet-sized JPEGs, {torch.get_num_threads()} torch threads",
        "backends": results,
    }


def markdown(section: dict) -> str:
    rows = [
        f"| {label} | {row['img_per_s']:.1f} | {100 * row['data_wait_fraction']:.0f}% |"
        for label, row in section["backends"].items()
    ]
    return "\n".join(
        [f"End-to-end CPU training ({section['workload']})", "", "| backend | img/s | data wait |", "|---|---|---|"]
        + rows
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and steps (smoke test)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    section = run_cpu(args.tiny)
    print(markdown(section))
    if args.output:
        Path(args.output).write_text(json.dumps(section, indent=2))
    return section


if __name__ == "__main__":
    main()
