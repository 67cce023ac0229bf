"""Training-step throughput of TwistForPreTraining: forward + backward + optimiser step, eager fp32 against the
optimised variants (channels_last, bf16 autocast, torch.compile, fused optimiser), each on a fresh model built
from the same seed and fed the same synthetic views (the step cost does not depend on pixel values)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from harness import PeakMemory, interleaved_seconds, rates, ratio, summarise, time_repeated

from twist_hf import TwistConfig, TwistForPreTraining


@dataclass(frozen=True)
class Workload:
    """One model at one crop layout: `batch` images, each giving 2 global views and `num_local` local views."""

    name: str
    preset: str
    batch: int
    global_size: int
    local_size: int = 0
    num_local: int = 0
    optim: str = "lars"
    overrides: tuple = ()

    @property
    def is_cnn(self) -> bool:
        return not self.preset.startswith("vit")


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False
    fused_optim: bool = False


EAGER = Variant("eager-fp32")


def workloads(size: str) -> list[Workload]:
    """The models of issue 7; `size` 'full' (CPU defaults), 'quick' (smaller batches) or 'smoke' (tiny)."""
    if size == "smoke":
        return [Workload("tiny-resnet-2x16+2x8", "tiny-resnet", 8, 16, 8, 2)]
    big = 4 if size == "quick" else 8
    return [
        Workload("fmnist-resnet-2x28+4x14", "fmnist-resnet", 64 if size == "quick" else 128, 28, 14, 4),
        Workload("resnet50-2x224", "resnet50", big, 224),
        Workload("vit-s16-2x224", "vit-s16", big, 224, optim="adamw"),
        Workload("resnet50-2x224+6x96", "resnet50", big, 224, 96, 6),
    ]


def candidate_variants(workload: Workload) -> list[Variant]:
    """Cheap variants tried on every model (compile is added on top of the fastest of these)."""
    if workload.is_cnn:
        # LARS (the ResNet recipes' optimiser) has no fused or foreach implementation.
        return [
            EAGER,
            Variant("channels_last", channels_last=True),
            Variant("bf16", bf16=True),
            Variant("channels_last+bf16", channels_last=True, bf16=True),
        ]
    return [
        EAGER,
        Variant("fused-adamw", fused_optim=True),
        Variant("bf16", bf16=True),
        Variant("bf16+fused-adamw", bf16=True, fused_optim=True),
    ]


def with_compile(variant: Variant) -> Variant:
    name = "compile" if variant == EAGER else f"{variant.name}+compile"
    return Variant(name, variant.channels_last, variant.bf16, True, variant.fused_optim)


def build_model(workload: Workload) -> TwistForPreTraining:
    torch.manual_seed(0)
    config = TwistConfig.from_preset(workload.preset, bunch_size=workload.batch, **dict(workload.overrides))
    return TwistForPreTraining(config).train()


def build_optimizer(model: torch.nn.Module, workload: Workload, variant: Variant) -> torch.optim.Optimizer:
    """The recipe's optimiser: LARS for ResNets, AdamW for ViTs (fused kernel or plain for-loop)."""
    if workload.optim == "lars":
        from twist_hf.training.optim import LARS, parameter_groups

        return LARS(parameter_groups(model, 1e-6), lr=0.1, weight_decay=1e-6)
    if variant.fused_optim:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, foreach=False)


def synthetic_views(workload: Workload, device: torch.device, channels_last: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sizes = [workload.global_size] * 2 + [workload.local_size] * workload.num_local
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return [
        torch.randn(workload.batch, 3, size, size, generator=generator).to(device, memory_format=memory_format)
        for size in sizes
    ]


def make_step(workload: Workload, variant: Variant, device: torch.device):
    """A closure running one full training step of a fresh model under `variant`."""
    model = build_model(workload).to(device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, workload, variant)
    forward = torch.compile(model) if variant.compile else model
    views = synthetic_views(workload, device, variant.channels_last)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            loss = forward(views).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


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
