"""Single-GPU benchmark (torch and twist_hf: no Ray, no `datasets`, no network), 287 s on an H200.

1. The library's `TrainingStep` of the ResNet-50 multi-crop recipe (recipes/configs/imagenet-resnet50-multicrop.yaml:
   2x224 + 6x96 crops, LARS, bf16 autocast, channels_last) with torch.compile: images/s and model FLOP
   utilisation (FLOPs of one step counted with FlopCounterMode, divided by step time and the GPU's dense bf16
   peak). Needs neither Ray nor `datasets`.
2. End-to-end training of that step on JPEG files generated here (no downloads), data and step together, per
   augmentation backend that runs without Ray and `datasets`: per_image (`MultiCropTransform` in DataLoader
   workers over a plain torch Dataset of files) and gpu (workers decode and draw the parameters, the views made
   batched on the GPU; JPEGs decoded by nvJPEG, or drafted on the CPU): img/s, data-wait fraction, MFU.
3. The library's pretraining run of the Fashion-MNIST recipe (recipes/configs/fmnist.yaml) with a
   ResNet-18-sized backbone on one GPU, and its weighted kNN top-1 on the test set against the same network at
   random init (Fashion-MNIST is read from its files: no `datasets` either).

    python benchmarks/gpu.py                      # on a GPU machine, writes benchmarks/results/<gpu>-<date>.json
    python benchmarks/gpu.py --device cpu --tiny  # smoke test on the CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    PeakMemory,
    device_slug,
    fmt_range,
    machine_info,
    markdown_table,
    rates,
    summarise,
    write_json,
)
from ingest import IMAGENET_SIZE, jpeg_folder, synchronize, timed_training
from train_step import RECIPES, Variant, Workload, recipe_arguments, recipe_step, synthetic_views

from twist_hf.training.arguments import PretrainArguments, make_parser, read_recipe

HERE = Path(__file__).resolve().parent
CARRIED_DATA = HERE / "data" / "fashion-mnist"
SYSTEM_DATA = Path("/usr/share/datasets/fashion-mnist")
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
BF16_PEAKS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}
MULTICROP_RECIPE = "imagenet-resnet50-multicrop.yaml"
SECTIONS = ("resnet50_multicrop", "jpeg_backends", "fashion_mnist")
RESNET18 = {
    "model_type": "resnet",
    "embedding_size": 64,
    "hidden_sizes": [64, 128, 256, 512],
    "depths": [2, 2, 2, 2],
    "layer_type": "basic",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="'cuda' (default) or 'cpu' for a smoke test")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and steps (smoke test, any device)")
    parser.add_argument("--batch-size", type=int, default=128, help="ResNet-50 images per step")
    parser.add_argument("--steps-per-rep", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="eager (the default on CPU: compiling is slow)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak, if the GPU is not known")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Fashion-MNIST IDX .gz folder (default: benchmarks/data/"
        "fashion-mnist, else /usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument("--jpeg-steps", type=int, default=30, help="timed steps per backend on JPEG files")
    parser.add_argument("--loader-workers", type=int, default=None, help="default: all cores but one")
    parser.add_argument("--fmnist-epochs", type=float, default=None, help="default: the recipe's (fmnist.yaml)")
    parser.add_argument("--fmnist-batch-size", type=int, default=512)
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="which parts to run (default: all); the JPEG part takes its MFU from the ResNet-50 part's FLOP count",
    )
    return parser.parse_args(argv)


def bf16_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAKS.items() if key in name), None)


def count_step_flops(model, views: list[torch.Tensor], device: torch.device) -> int:
    """FLOPs of one forward + backward (matmuls and convolutions) as FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16):
        model(views).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def resnet50_throughput(args: argparse.Namespace, device: torch.device) -> dict:
    """The ResNet-50 multi-crop recipe's library training step: img/s, step time, MFU, peak memory."""
    step, model, batch, global_size, local_size = resnet50_step(args, device)
    use_compile = device.type == "cuda" and not args.no_compile
    views = synthetic_views(batch, [global_size] * 2 + [local_size] * 6, device, channels_last=True)
    flops = count_step_flops(model, views, device)
    steps_per_rep = 1 if args.tiny else args.steps_per_rep
    reps = 1 if args.tiny else args.reps
    with PeakMemory(device) as memory:
        warmup_s = timed_steps(step, views, device, 0, 3)
        seconds = [timed_steps(step, views, device, 3 + rep * steps_per_rep, steps_per_rep) for rep in range(reps)]
    peak = bf16_peak_flops(device, args.peak_tflops)
    step_s = summarise([total / steps_per_rep for total in seconds])
    return {
        "workload": f"library TrainingStep of {MULTICROP_RECIPE}: resnet50 2x{global_size} + 6x{local_size}, batch "
        f"{batch}, LARS, bf16 autocast, channels_last, {'torch.compile' if use_compile else 'eager'}",
        "img_per_s": summarise(rates([total / steps_per_rep for total in seconds], batch)),
        "step_s": step_s,
        "warmup_s": warmup_s,
        "flops_per_step": flops,
        "achieved_tflops": flops / step_s["median"] / 1e12,
        "bf16_peak_tflops": peak / 1e12 if peak else None,
        "mfu": flops / step_s["median"] / peak if peak else None,
        "peak_memory_mb": memory.peak_bytes / 2**20,
        "memory_measure": memory.kind,
    }


def resnet50_step(args: argparse.Namespace, device: torch.device):
    """The ResNet-50 multi-crop recipe's library step on a fresh model (a tiny ResNet at tiny sizes for smoke
    tests): (step, model, batch, global size, local size)."""
    batch, global_size, local_size = (4, 64, 32) if args.tiny else (args.batch_size, 224, 96)
    preset = "tiny-resnet" if args.tiny else "resnet50"
    use_compile = device.type == "cuda" and not args.no_compile
    workload = Workload("resnet50-multicrop", preset, batch, global_size, MULTICROP_RECIPE, local_size, 6)
    variant = Variant("recipe", channels_last=True, bf16=True, compile=use_compile)
    step, model = recipe_step(recipe_arguments(workload, variant), device)
    return step, model, batch, global_size, local_size


def jpeg_backends(args: argparse.Namespace, device: torch.device, flops_per_step: int | None) -> dict:
    """End-to-end img/s, data-wait fraction and MFU of the ResNet-50 step fed from JPEG files, per backend."""
    from torch.utils.data import DataLoader

    from twist_hf.device_ingest import MultiCropFiles, StepBatches, file_values, keep_batch, views_on_device
    from twist_hf.gpu_augment import DeviceMultiCrop
    from twist_hf.transforms import MultiCropTransform

    step, model, batch, global_size, local_size = resnet50_step(args, device)
    warmup, steps = (1, 2) if args.tiny else (5, args.jpeg_steps)
    workers = args.loader_workers if args.loader_workers is not None else max(1, (os.cpu_count() or 2) - 1)
    law = {
        "global_size": global_size,
        "local_size": local_size,
        "num_local_crops": 6,
        "mean": model.config.image_mean,
        "std": model.config.image_std,
    }
    on_gpu, peak = device.type == "cuda", bf16_peak_flops(device, args.peak_tflops)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-jpegs-") as folder:
        files = jpeg_folder(
            Path(folder), min(512, batch * (warmup + steps)), size=(96, 128) if args.tiny else IMAGENET_SIZE
        )
        paths = [files[index % len(files)] for index in range(batch * (warmup + steps))]
        per_image = DataLoader(
            MultiCropFiles(paths, MultiCropTransform(**law)),
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            pin_memory=on_gpu,
            drop_last=True,
        )
        crops = DeviceMultiCrop(**law, seed=0)
        feeds = {"per_image": lambda: per_image}
        for label, encoded in (("gpu, nvJPEG decode", True), ("gpu, CPU draft decode", False)):
            if encoded and not on_gpu:
                continue
            batches = StepBatches(file_values(paths), crops, batch, 0, 0, warmup + steps, encoded_jpegs=encoded)
            loader = DataLoader(batches, batch_size=None, collate_fn=keep_batch, num_workers=workers, pin_memory=on_gpu)
            feeds[label] = lambda loader=loader: views_on_device(loader, crops, device, lambda skipped: None)
        for label, feed in feeds.items():
            row = timed_training(feed(), step, batch, warmup, steps, device)
            alone = timed_training(feed(), lambda index, views: None, batch, warmup, steps, device)  # no step
            row["feed_img_per_s"] = alone["img_per_s"]
            row["mfu"] = flops_per_step * row["img_per_s"] / batch / peak if peak and flops_per_step else None
            results[label] = row
    return {
        "workload": f"resnet50 2x{global_size} + 6x{local_size}, batch {batch}, {workers} loader workers",
        **results,
    }


def timed_steps(step, views: list[torch.Tensor], device: torch.device, first: int, count: int) -> float:
    """Seconds for `count` library steps from global step `first`, synchronised."""
    started = time.perf_counter()
    for index in range(first, first + count):
        step(index, views)
    synchronize(device)
    return time.perf_counter() - started


def fashion_mnist_dir(args: argparse.Namespace) -> Path:
    for candidate in [Path(args.data_dir)] if args.data_dir else [CARRIED_DATA, SYSTEM_DATA]:
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    raise FileNotFoundError(
        "No Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) in "
        f"{args.data_dir or [CARRIED_DATA, SYSTEM_DATA]}."
        f" Copy them with: mkdir -p {CARRIED_DATA} && cp {SYSTEM_DATA}/*.gz {CARRIED_DATA}/ , or pass --data-dir."
    )


def knn_top1_at_random_init(args: PretrainArguments, root: Path, device: torch.device) -> float:
    """kNN top-1 (the recipe's k and temperature) of the run's network at its seeded initialisation."""
    from twist_hf.data import fashion_mnist_arrays
    from twist_hf.evaluation import image_features, knn_evaluate
    from twist_hf.training.loop import build_model

    limit = args.data.max_train_samples
    model = build_model(args).twist.to(device)
    bank, queries = (
        image_features(model, *(array[:limit] for array in fashion_mnist_arrays(split, root)), batch_size=2048)
        for split in ("train", "test")
    )
    metrics = knn_evaluate(
        bank.features,
        bank.labels,
        queries.features,
        queries.labels,
        10,
        ks=(args.training.knn_k,),
        temperature=args.training.knn_temperature,
    )
    return metrics["knn_top1"]


def fashion_mnist_arguments(args: argparse.Namespace, root: Path, output_dir: Path, device: torch.device):
    """The Fashion-MNIST recipe on this device, one worker, with a ResNet-18-sized backbone."""
    backbone = {**RESNET18, "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]} if args.tiny else RESNET18
    batch = 64 if args.tiny else args.fmnist_batch_size
    options = {
        **read_recipe(RECIPES / "fmnist.yaml"),
        "backbone_overrides": backbone,
        "bunch_size": batch,
        "per_device_train_batch_size": batch,
        "data_dir": str(root),
        "launcher": "local",
        "num_workers": 1,
        "use_gpu": device.type == "cuda",
        "output_dir": str(output_dir),
        "report_to": ["none"],
        "save_strategy": "no",
    }
    if args.fmnist_epochs is not None:
        options["num_train_epochs"] = args.fmnist_epochs
    if args.tiny:
        options.update(max_train_samples=512, max_eval_samples=512, max_steps=4)
    return PretrainArguments(*make_parser().parse_dict(options))


def fashion_mnist_run(args: argparse.Namespace, device: torch.device) -> dict:
    """The library's Fashion-MNIST pretraining run on this device, then kNN top-1 against random init."""
    from twist_hf.training.loop import LocalReporter, train_worker

    root = fashion_mnist_dir(args)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-fmnist-") as folder:
        run_args = fashion_mnist_arguments(args, root, Path(folder), device)
        random_init_top1 = knn_top1_at_random_init(run_args, root, device)
        started = time.perf_counter()
        results = train_worker(run_args, LocalReporter(folder, 1))
        wall_s = time.perf_counter() - started
    return {
        "workload": f"recipes/configs/fmnist.yaml, ResNet-18-sized backbone, batch "
        f"{run_args.training.per_device_train_batch_size}, one GPU",
        "steps": results["global_step"],
        "epochs": run_args.training.num_train_epochs,
        "train_s": results["train_runtime"],
        "wall_s": wall_s,
        "img_per_s": results["train_images_per_second"],
        "knn_top1": results["knn_top1"],
        "random_init_knn_top1": random_init_top1,
        "data_dir": str(root),
    }


def markdown(results: dict) -> str:
    """The results table of the sections chosen; one that failed or did not run says so in its row."""
    chosen = results.get("sections", SECTIONS)
    rows = []
    if "resnet50_multicrop" in chosen:
        rows.append(
            ["ResNet-50 2x224+6x96 recipe step (LARS, bf16)", *resnet50_cells(results.get("resnet50_multicrop"))]
        )
    if "fashion_mnist" in chosen:
        rows.append(["Fashion-MNIST recipe run, ResNet-18-sized", *fashion_mnist_cells(results.get("fashion_mnist"))])
    if "jpeg_backends" in chosen:
        rows.extend(jpeg_rows(results.get("jpeg_backends")))
    return (
        f"# GPU benchmark: {results['machine']['device']}, {results['machine']['date']}\n\n"
        + markdown_table(["benchmark", "img/s median (min-max)", "result"], rows)
        + "\n"
    )


def jpeg_rows(jpegs: dict | None) -> list[list[str]]:
    if not jpegs or "error" in jpegs:
        return [["ResNet-50 step from JPEG files", *not_run_cells(jpegs)]]
    rows = []
    for label, row in jpegs.items():
        if isinstance(row, dict):
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
            rows.append(
                [
                    f"{jpegs['workload']} from JPEGs: {label}",
                    f"{row['img_per_s']:.0f}",
                    f"data wait {100 * row['data_wait_fraction']:.0f}%{mfu}; the data path alone "
                    f"{row['feed_img_per_s']:.0f} img/s",
                ]
            )
    return rows


def not_run_cells(section: dict | None) -> list[str]:
    return ["not run", section["error"] if section else "the script stopped before this section"]


def resnet50_cells(r50: dict | None) -> list[str]:
    if not r50 or "error" in r50:
        return not_run_cells(r50)
    mfu = f"{100 * r50['mfu']:.1f}%" if r50["mfu"] is not None else "n/a (unknown peak)"
    return [fmt_range(r50["img_per_s"], 2), f"MFU {mfu}"]


def fashion_mnist_cells(fmnist: dict | None) -> list[str]:
    if not fmnist or "error" in fmnist:
        return not_run_cells(fmnist)
    return [
        f"{fmnist['img_per_s']:.0f}",
        f"kNN top-1 {fmnist['knn_top1']:.4f} vs random init {fmnist['random_init_knn_top1']:.4f}, "
        f"{fmnist['steps']} steps in {fmnist['train_s']:.0f} s",
    ]


def run_section(results: dict, name: str, section: Callable[[], dict], json_path: Path) -> dict:
    """Run one section into `results[name]` and rewrite the results file, so that a section that fails (its
    error is recorded) or a run cut short by a time limit keeps what the sections before it measured."""
    started = time.perf_counter()
    try:
        results[name] = section()
    except Exception as error:
        traceback.print_exc()
        results[name] = {"error": f"{type(error).__name__}: {error}"}
    results[name]["section_s"] = time.perf_counter() - started
    write_json(json_path, results)
    return results[name]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here; run with --device cpu --tiny for a smoke test.")
    torch.backends.cudnn.benchmark = True
    results = {"machine": machine_info(device), "tiny": args.tiny, "sections": args.sections}
    stem = f"gpu-{device_slug(device)}{'-tiny' if args.tiny else ''}-{results['machine']['date']}"
    json_path = Path(args.results_dir) / f"{stem}.json"
    sections = {
        "resnet50_multicrop": lambda: resnet50_throughput(args, device),
        "jpeg_backends": lambda: jpeg_backends(
            args, device, results.get("resnet50_multicrop", {}).get("flops_per_step")
        ),
        "fashion_mnist": lambda: fashion_mnist_run(args, device),
    }
    for name in args.sections:
        run_section(results, name, sections[name], json_path)
    json_path.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
