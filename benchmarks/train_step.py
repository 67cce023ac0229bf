"""Training-step throughput of the library's `TrainingStep` (schedule, autocast forward, backward, clipping,
optimiser step, teacher update) with each model's recipe optimiser: eager fp32 against the optimised variants
(channels_last, bf16 autocast, torch.compile), each on a fresh model built from the same seed and fed the same
synthetic views (the step cost does not depend on pixel values)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from harness import PeakMemory, interleaved_seconds, rates, ratio, summarise, time_repeated

from twist_hf import TwistForPreTraining
from twist_hf.accelerator import fresh_accelerator
from twist_hf.training.arguments import PretrainArguments, make_parser, read_recipe
from twist_hf.training.optim import build_recipe_optimizer, build_schedule
from twist_hf.training.step import TrainingStep, build_teacher, prepare_for_training

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "configs"
# Steps per epoch of the synthetic schedule: long enough that every timed step is a phase-1 step.
SYNTHETIC_STEPS_PER_EPOCH = 10_000


@dataclass(frozen=True)
class Workload:
    """One model at one crop layout: `batch` images, each giving 2 global views and `num_local` local views,
    trained with the optimiser, schedule and teacher of `recipe` (a file in recipes/configs/)."""

    name: str
    preset: str
    batch: int
    global_size: int
    recipe: str
    local_size: int = 0
    num_local: int = 0

    @property
    def is_cnn(self) -> bool:
        return not self.preset.startswith("vit")


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False


EAGER = Variant("eager-fp32")


def workloads(size: str) -> list[Workload]:
    """The benchmarked models; `size` 'full' (CPU defaults), 'quick' (smaller batches) or 'smoke' (tiny)."""
    if size == "smoke":
        return [Workload("tiny-resnet-2x16+2x8", "tiny-resnet", 8, 16, "fmnist.yaml", 8, 2)]
    big = 4 if size == "quick" else 8
    return [
        Workload("fmnist-resnet-2x28+4x14", "fmnist-resnet", 64 if size == "quick" else 128, 28, "fmnist.yaml", 14, 4),
        Workload("resnet50-2x224", "resnet50", big, 224, "imagenet-resnet50-twoview.yaml"),
        Workload("vit-s16-2x224", "vit-s16", big, 224, "imagenet-vit-s16.yaml"),
        Workload("resnet50-2x224+6x96", "resnet50", big, 224, "imagenet-resnet50-multicrop.yaml", 96, 6),
    ]


def candidate_variants(workload: Workload) -> list[Variant]:
    """Cheap variants tried on every model (compile is added on top of the fastest of these)."""
    if workload.is_cnn:
        return [
            EAGER,
            Variant("channels_last", channels_last=True),
            Variant("bf16", bf16=True),
            Variant("channels_last+bf16", channels_last=True, bf16=True),
        ]
    return [EAGER, Variant("bf16", bf16=True)]


def with_compile(variant: Variant) -> Variant:
    name = "compile" if variant == EAGER else f"{variant.name}+compile"
    return Variant(name, variant.channels_last, variant.bf16, True)


def recipe_arguments(workload: Workload, variant: Variant) -> PretrainArguments:
    """The workload's recipe with its model, batch and the variant's precision, memory format and compilation."""
    options = {
        **read_recipe(RECIPES / workload.recipe),
        "model_preset": workload.preset,
        "bunch_size": workload.batch,
        "per_device_train_batch_size": workload.batch,
        "bf16": variant.bf16,
        "fp16": False,
        "channels_last": variant.channels_last,
        "torch_compile": variant.compile,
    }
    return PretrainArguments(*make_parser().parse_dict(options))


def recipe_step(args: PretrainArguments, device: torch.device) -> tuple[TrainingStep, TwistForPreTraining]:
    """The library's training step of the recipe on a fresh seeded model, and that model (unwrapped)."""
    training = args.training
    accelerator = fresh_accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if training.bf16 else "no")
    torch.manual_seed(0)
    model = TwistForPreTraining(args.model.build_config()).to(accelerator.device).train()
    schedule = build_schedule(training, SYNTHETIC_STEPS_PER_EPOCH, training.per_device_train_batch_size)
    optimizer = build_recipe_optimizer(model, training, schedule.lr(0))
    teacher = build_teacher(model) if training.momentum_teacher else None
    prepared, optimizer = prepare_for_training(
        model, optimizer, accelerator, training.channels_last, training.torch_compile
    )
    step = TrainingStep(
        prepared, optimizer, schedule, accelerator, teacher, training.max_grad_norm, training.channels_last
    )
    return step, model


def synthetic_views(batch: int, sizes: list[int], device: torch.device, channels_last: bool) -> list[torch.Tensor]:
    """Seeded random views (batch, 3, size, size) on `device`, one per size."""
    generator = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return [
        torch.randn(batch, 3, size, size, generator=generator).to(device, memory_format=memory_format) for size in sizes
    ]


def make_step(workload: Workload, variant: Variant, device: torch.device) -> Callable[[], None]:
    """A closure running one library training step of a fresh model under `variant`, synchronised."""
    step, _ = recipe_step(recipe_arguments(workload, variant), device)
    sizes = [workload.global_size] * 2 + [workload.local_size] * workload.num_local
    views = synthetic_views(workload.batch, sizes, device, variant.channels_last)
    counter = itertools.count()

    def run_one() -> None:
        step(next(counter), views)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run_one


def warm_up(workload: Workload, variant: Variant, device: torch.device, warmup: int):
    """Build the variant and run its warm-up steps (compilation included) under a peak-memory probe."""
    with PeakMemory(device) as memory:
        step = make_step(workload, variant, device)
        started = time.perf_counter()
        step()
        first_step_s = time.perf_counter() - started
        time_repeated(step, warmup=0, reps=max(warmup - 1, 1))
    return step, {
        "variant": asdict(variant),
        "first_step_s": first_step_s,
        "peak_memory_mb": memory.peak_bytes / 2**20,
        "memory_measure": memory.kind,
    }


def measure_round(workload: Workload, variants: list[Variant], device: torch.device, warmup: int, reps: int) -> dict:
    """Warm every variant up, then time them in turns; speedups are against this round's eager fp32."""
    steps, results = {}, {}
    for variant in variants:
        steps[variant.name], results[variant.name] = warm_up(workload, variant, device, warmup)
    for name, seconds in interleaved_seconds(steps, reps).items():
        results[name].update({"img_per_s": summarise(rates(seconds, workload.batch)), "step_s": summarise(seconds)})
    eager = results[EAGER.name]["img_per_s"]
    for result in results.values():
        result["speedup_vs_eager"] = ratio(result["img_per_s"], eager)
    return results


def benchmark_workload(workload: Workload, device: torch.device, warmup: int, reps: int, use_compile: bool) -> dict:
    """All cheap variants in turns; then torch.compile on top of the fastest, timed in turns with eager fp32
    again. The fastest of all is the 'optimised' path."""
    candidates = candidate_variants(workload)
    results = measure_round(workload, candidates, device, warmup, reps)
    if use_compile:
        best_cheap = max(candidates, key=lambda v: results[v.name]["img_per_s"]["median"])
        compiled = with_compile(best_cheap)
        second = measure_round(workload, [EAGER, compiled], device, warmup + 1, reps)
        results[compiled.name] = {
            **second[compiled.name],
            "eager_img_per_s_same_round": second[EAGER.name]["img_per_s"],
        }
    best = max(results, key=lambda name: results[name]["speedup_vs_eager"])
    return {
        "workload": asdict(workload),
        "variants": results,
        "best_variant": best,
        "best_speedup_vs_eager": results[best]["speedup_vs_eager"],
    }


SMALL_PRESETS = ("fmnist-resnet", "tiny-resnet")


def run(
    device: torch.device,
    size: str,
    warmup: int,
    reps: int,
    compile_mode: str,
    on_workload: Callable[[dict], None] | None = None,
) -> dict:
    """Every workload; compile_mode 'none', 'small' (the small presets only) or 'all'. `on_workload` sees the
    results so far after each workload (to save partial results on a slow machine)."""
    if compile_mode not in ("none", "small", "all"):
        raise ValueError(f"compile_mode must be 'none', 'small' or 'all', got {compile_mode!r}.")
    results = {}
    for workload in workloads(size):
        use_compile = compile_mode == "all" or (compile_mode == "small" and workload.preset in SMALL_PRESETS)
        results[workload.name] = benchmark_workload(workload, device, warmup, reps, use_compile)
        if on_workload is not None:
            on_workload(results)
    return results
