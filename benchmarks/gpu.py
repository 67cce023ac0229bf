"""Single-GPU benchmark, self-contained (torch and twist_hf only: no Ray, no network), about 8 minutes on an H100.

1. ResNet-50 TWIST training step at 2x224 + 6x96 multi-crop, bf16 autocast + channels_last + torch.compile +
   fused SGD-momentum: images/s and model FLOP utilisation (FLOPs of one step counted with FlopCounterMode,
   divided by step time and the GPU's dense bf16 peak).
2. A short real Fashion-MNIST pretraining run with a ResNet-18-sized backbone (batched GPU multi-crop), then
   weighted kNN top-1 on the test set against the same network at random init.

    python benchmarks/gpu.py                      # on a GPU machine, writes benchmarks/results/<gpu>-<date>.json
    python benchmarks/gpu.py --device cpu --tiny  # smoke test on the CPU
"""

from __future__ import annotations

import argparse
import math
import sys
import time
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

from twist_hf import TwistConfig, TwistForPreTraining
from twist_hf.data import fashion_mnist_arrays
from twist_hf.evaluation.knn import knn_evaluate
from twist_hf.transforms import BatchedMultiCrop, batched_eval_transform

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
    parser.add_argument("--fmnist-epochs", type=float, default=10.0)
    parser.add_argument("--fmnist-batch-size", type=int, default=512)
    parser.add_argument("--fmnist-max-seconds", type=float, default=210.0, help="stop training early after this")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    return parser.parse_args(argv)


def bf16_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAKS.items() if key in name), None)


def fused_sgd(model: torch.nn.Module, device: torch.device, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, fused=device.type == "cuda"
    )


def training_step(model, optimizer, device: torch.device):
    def step(views: list[torch.Tensor]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(views).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_step_flops(model, views: list[torch.Tensor], device: torch.device) -> int:
    """FLOPs of one forward + backward (matmuls and convolutions) as FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16):
        model(views).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def resnet50_throughput(args: argparse.Namespace, device: torch.device) -> dict:
    """ResNet-50 2x224 + 6x96 bf16 training step: img/s, step time, MFU, peak memory."""
    batch, global_size, local_size = (4, 64, 32) if args.tiny else (args.batch_size, 224, 96)
    torch.manual_seed(0)
    config = TwistConfig.from_preset("resnet50", bunch_size=batch)
    model = TwistForPreTraining(config).to(device, memory_format=torch.channels_last).train()
    views = [
        torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        for size in [global_size] * 2 + [local_size] * 6
    ]
    flops = count_step_flops(model, views, device)
    use_compile = device.type == "cuda" and not args.no_compile
    compiled = torch.compile(model) if use_compile else model
    step = training_step(compiled, fused_sgd(model, device, 0.1, 1e-6), device)
    steps_per_rep = 1 if args.tiny else args.steps_per_rep
    reps = 1 if args.tiny else args.reps
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        for _ in range(3):
            step(views)
        synchronize(device)
        warmup_s = time.perf_counter() - started
        seconds = []
        for _ in range(reps):
            started = time.perf_counter()
            for _ in range(steps_per_rep):
                step(views)
            synchronize(device)
            seconds.append((time.perf_counter() - started) / steps_per_rep)
    peak = bf16_peak_flops(device, args.peak_tflops)
    step_s = summarise(seconds)
    return {
        "workload": f"resnet50 2x{global_size} + 6x{local_size}, batch {batch}, bf16 autocast, channels_last, "
        f"{'torch.compile' if use_compile else 'eager'}, fused SGD-momentum",
        "img_per_s": summarise(rates(seconds, batch)),
        "step_s": step_s,
        "warmup_s": warmup_s,
        "flops_per_step": flops,
        "achieved_tflops": flops / step_s["median"] / 1e12,
        "bf16_peak_tflops": peak / 1e12 if peak else None,
        "mfu": flops / step_s["median"] / peak if peak else None,
        "peak_memory_mb": memory.peak_bytes / 2**20,
        "memory_measure": memory.kind,
    }


def fashion_mnist_dir(args: argparse.Namespace) -> Path:
    for candidate in [Path(args.data_dir)] if args.data_dir else [CARRIED_DATA, SYSTEM_DATA]:
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    raise FileNotFoundError(
        "No Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) in "
        f"{args.data_dir or [CARRIED_DATA, SYSTEM_DATA]}."
        f" Copy them with: mkdir -p {CARRIED_DATA} && cp {SYSTEM_DATA}/*.gz {CARRIED_DATA}/ , or pass --data-dir."
    )


@torch.no_grad()
def backbone_features(model, images: torch.Tensor, device: torch.device, batch_size: int = 2048) -> torch.Tensor:
    config = model.config
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = batched_eval_transform(
            images[start : start + batch_size].to(device), config.image_size, config.image_mean, config.image_std
        )
        with torch.autocast(device.type, dtype=torch.bfloat16):
            chunks.append(model.twist(pixel_values=pixels).pooler_output.float())
    model.train()
    return torch.cat(chunks)


def knn_top1(model, train: tuple, test: tuple, device: torch.device) -> float:
    bank, queries = backbone_features(model, train[0], device), backbone_features(model, test[0], device)
    return knn_evaluate(bank, train[1].to(device), queries, test[1].to(device), 10, ks=(20,))["knn_top1"]


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def fashion_mnist_run(args: argparse.Namespace, device: torch.device) -> dict:
    """Short TWIST pretraining of a ResNet-18-sized backbone on real Fashion-MNIST, then kNN top-1."""
    root = fashion_mnist_dir(args)
    limit = 512 if args.tiny else None
    train_images, train_labels = (torch.tensor(array[:limit]) for array in fashion_mnist_arrays("train", root))
    test_images, test_labels = (torch.tensor(array[:limit]) for array in fashion_mnist_arrays("test", root))
    batch = 64 if args.tiny else args.fmnist_batch_size
    backbone = {**RESNET18, "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]} if args.tiny else RESNET18
    torch.manual_seed(0)
    config = TwistConfig.from_preset("fmnist-resnet", backbone_config=backbone, bunch_size=batch)
    model = TwistForPreTraining(config).to(device, memory_format=torch.channels_last)
    random_init_top1 = knn_top1(model, (train_images, train_labels), (test_images, test_labels), device)
    crops = BatchedMultiCrop(
        mean=config.image_mean,
        std=config.image_std,
        global_size=28,
        local_size=14,
        num_local_crops=4,
        global_scale=(0.35, 1.0),
        local_scale=(0.1, 0.35),
        seed=0,
    )
    optimizer = fused_sgd(model, device, 0.0, 5e-4)
    step = training_step(model, optimizer, device)
    steps_per_epoch = len(train_images) // batch
    total = 4 if args.tiny else int(args.fmnist_epochs * steps_per_epoch)
    gpu_images = train_images.to(device)
    generator = torch.Generator().manual_seed(0)
    started, done, loss = time.perf_counter(), 0, torch.tensor(float("nan"))
    while done < total and time.perf_counter() - started < args.fmnist_max_seconds:
        order = torch.randperm(len(train_images), generator=generator)
        for index in order[: steps_per_epoch * batch].view(steps_per_epoch, batch):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(done, total, max(1, total // 20), 0.05 * batch / 256 * 10)
            views = [view.contiguous(memory_format=torch.channels_last) for view in crops(gpu_images[index.to(device)])]
            loss = step(views)
            done += 1
            if done >= total or time.perf_counter() - started > args.fmnist_max_seconds:
                break
    synchronize(device)
    train_s = time.perf_counter() - started
    return {
        "workload": f"ResNet-18-sized backbone (small stem), batch {batch}, 2x28 + 4x14 crops, bf16",
        "steps": done,
        "planned_steps": total,
        "epochs": done / steps_per_epoch,
        "train_s": train_s,
        "img_per_s": done * batch / train_s,
        "final_loss": float(loss),
        "knn_top1": knn_top1(model, (train_images, train_labels), (test_images, test_labels), device),
        "random_init_knn_top1": random_init_top1,
        "data_dir": str(root),
    }


def markdown(results: dict) -> str:
    r50, fmnist = results["resnet50_multicrop"], results["fashion_mnist"]
    mfu = f"{100 * r50['mfu']:.1f}%" if r50["mfu"] is not None else "n/a (unknown peak)"
    rows = [
        ["ResNet-50 2x224+6x96 bf16 step", fmt_range(r50["img_per_s"], 2), f"MFU {mfu} (target >= 35%)"],
        [
            "Fashion-MNIST ResNet-18-sized run",
            f"{fmnist['img_per_s']:.0f}",
            (
                f"kNN top-1 {fmnist['knn_top1']:.4f} vs random init {fmnist['random_init_knn_top1']:.4f}, "
                f"{fmnist['epochs']:.1f} epochs in {fmnist['train_s']:.0f} s"
            ),
        ],
    ]
    return (
        f"# GPU benchmark: {results['machine']['device']}, {results['machine']['date']}\n\n"
        + markdown_table(["benchmark", "img/s median (min-max)", "result"], rows)
        + "\n"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here; run with --device cpu --tiny for a smoke test.")
    torch.backends.cudnn.benchmark = True
    results = {
        "machine": machine_info(device),
        "tiny": args.tiny,
        "resnet50_multicrop": resnet50_throughput(args, device),
        "fashion_mnist": fashion_mnist_run(args, device),
    }
    stem = f"gpu-{device_slug(device)}{'-tiny' if args.tiny else ''}-{results['machine']['date']}"
    results_dir = Path(args.results_dir)
    write_json(results_dir / f"{stem}.json", results)
    (results_dir / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
