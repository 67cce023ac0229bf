"""Fashion-MNIST TWIST recipe search: one-process stand-in for the 2-worker default run.

One process with `--threads 2` and the full global batch does the same math as 2 DDP workers with half
the batch each (the TWIST loss and batch norms are global). Trains for `--epochs` with linear warm-up and
cosine decay, then reports weighted kNN top-1 (k=20, T=0.07) of the backbone features on the test set.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from twist_hf import TwistConfig, TwistForPreTraining
from twist_hf.data import fashion_mnist_arrays
from twist_hf.evaluation.knn import knn_evaluate
from twist_hf.transforms import BatchedMultiCrop, batched_eval_transform


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="DDP workers the run stands in for (clock divisor)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="train for this many seconds, lr schedule on elapsed time (ranking runs)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size")
    parser.add_argument("--embedding-size", type=int, default=32)
    parser.add_argument("--hidden-sizes", default="32,64,128")
    parser.add_argument("--depths", default="1,1,1")
    parser.add_argument("--downsample-first", action="store_true")
    parser.add_argument("--head-hidden", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=256)
    parser.add_argument("--bunch-size", type=int, default=None, help="default: global batch / 2 (per device)")
    parser.add_argument("--last-norm", default="bunch")
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--lam1", type=float, default=0.0)
    parser.add_argument("--lam2", type=float, default=1.0)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--final-lr-fraction", type=float, default=0.001)
    parser.add_argument("--num-local", type=int, default=6)
    parser.add_argument("--local-size", type=int, default=14)
    parser.add_argument("--global-scale", default="0.4,1.0")
    parser.add_argument("--local-scale", default="0.1,0.4")
    parser.add_argument("--jitter", default="0.4,0.4,0.0")
    parser.add_argument("--jitter-p", type=float, default=0.8)
    parser.add_argument("--solarize", default="0,0.2,0")
    parser.add_argument("--blur", default="0,0,0")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="benchmarks/fmnist_recipe/results.jsonl")
    return parser.parse_args()


def floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


def build_config(args: argparse.Namespace) -> TwistConfig:
    backbone = {
        "model_type": "resnet",
        "embedding_size": args.embedding_size,
        "hidden_sizes": ints(args.hidden_sizes),
        "depths": ints(args.depths),
        "layer_type": "basic",
        "downsample_in_first_stage": args.downsample_first,
    }
    return TwistConfig.from_preset(
        "fmnist-resnet",
        backbone_config=backbone,
        head_hidden_size=args.head_hidden,
        num_classes=args.num_classes,
        bunch_size=args.bunch_size or args.batch_size // 2,
        last_norm=args.last_norm,
        tau=args.tau,
        lam1=args.lam1,
        lam2=args.lam2,
    )


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv / linear weights only; biases and norm parameters are left alone."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, args.weight_decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=args.lr)


def lr_at(step: float, total: float, warmup: float, base: float, final_fraction: float) -> float:
    """Linear warm-up over `warmup`, then cosine decay to `final_fraction * base` at `total` (steps or seconds)."""
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1e-9, total - warmup))
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, mean, std, channels_last: bool) -> torch.Tensor:
    outputs = []
    for chunk in images.split(1000):
        pixels = batched_eval_transform(chunk, 28, mean, std)
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        outputs.append(model(pixel_values=pixels).pooler_output)
    return torch.cat(outputs)


def effective_seconds(workers: int) -> float:
    """Process CPU time / workers: the wall time of `workers` one-thread DDP workers sharing this batch
    (before communication), robust to other jobs on the shared machine. Run with --threads 1."""
    return time.process_time() / workers


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_images, train_labels = fashion_mnist_arrays("train")
    test_images, test_labels = fashion_mnist_arrays("test")
    train_images, test_images = torch.tensor(train_images), torch.tensor(test_images)
    config = build_config(args)
    model = TwistForPreTraining(config)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    crops = BatchedMultiCrop(
        mean=config.image_mean[:1],
        std=config.image_std[:1],
        global_size=28,
        local_size=args.local_size,
        num_local_crops=args.num_local,
        global_scale=floats(args.global_scale),
        local_scale=floats(args.local_scale),
        jitter_strength=floats(args.jitter),
        jitter_probability=args.jitter_p,
        grayscale_probability=0.0,
        blur_probabilities=floats(args.blur),
        solarize_probabilities=floats(args.solarize),
        seed=args.seed,
    )
    optimizer = build_optimizer(args, model)
    steps_per_epoch = len(train_images) // args.batch_size
    total_steps = int(args.epochs * steps_per_epoch) if args.time_budget is None else 10**9
    warmup_steps = max(1, int(args.warmup_epochs * steps_per_epoch))
    if args.time_budget is not None:
        warmup_seconds = args.time_budget * args.warmup_epochs / args.epochs
    model.train()
    start = time.perf_counter()
    cpu_start = effective_seconds(args.workers)
    step, seen, log = 0, 0, []
    generator = torch.Generator().manual_seed(args.seed)
    while step < total_steps:
        order = torch.randperm(len(train_images), generator=generator)
        for begin in range(0, len(order) - args.batch_size + 1, args.batch_size):
            if step >= total_steps:
                break
            views = crops(train_images[order[begin : begin + args.batch_size]])
            if args.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            if args.time_budget is None:
                lr = lr_at(step, total_steps, warmup_steps, args.lr, args.final_lr_fraction)
            else:
                elapsed = effective_seconds(args.workers) - cpu_start
                lr = lr_at(elapsed, args.time_budget, warmup_seconds, args.lr, args.final_lr_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            output = model(pixel_values=views)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            step += 1
            seen += args.batch_size
            if step % 50 == 0:
                elapsed = effective_seconds(args.workers) - cpu_start
                entry = (
                    step,
                    round(elapsed, 1),
                    round(output.loss.item(), 3),
                    round(output.kl_loss.item(), 3),
                    round(output.eh_loss.item(), 3),
                    round(output.he_loss.item(), 3),
                )
                log.append(entry)
                print(
                    f"step {entry[0]}/{total_steps} t={entry[1]}s loss={entry[2]} kl={entry[3]} "
                    f"eh={entry[4]} he={entry[5]} img/s={seen / elapsed:.0f}",
                    flush=True,
                )
            if args.time_budget is not None and effective_seconds(args.workers) - cpu_start >= args.time_budget:
                total_steps = step
        if not math.isfinite(output.loss.item()):
            break
    wall_seconds = time.perf_counter() - start
    train_seconds = effective_seconds(args.workers) - cpu_start
    model.eval()
    backbone = model.twist
    mean, std = config.image_mean, config.image_std
    eval_start = time.perf_counter()
    train_features = features(backbone, train_images, mean, std, args.channels_last)
    test_features = features(backbone, test_images, mean, std, args.channels_last)
    metrics = knn_evaluate(
        train_features,
        torch.from_numpy(train_labels).long(),
        test_features,
        torch.from_numpy(test_labels).long(),
        num_classes=10,
        ks=(20,),
    )
    result = {
        "name": args.name,
        "knn_top1": round(metrics["knn_top1"], 4),
        "train_s": round(train_seconds, 1),
        "wall_s": round(wall_seconds, 1),
        "img_per_s": round(seen / train_seconds),
        "steps": step,
        "epochs_done": round(seen / len(train_images), 2),
        "eval_s": round(time.perf_counter() - eval_start, 1),
        "params_m": round(sum(p.numel() for p in backbone.backbone.parameters()) / 1e6, 3),
        "final_loss": log[-1][2:] if log else None,
        "args": vars(args),
    }
    print(json.dumps(result), flush=True)
    with open(args.results, "a") as handle:
        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
