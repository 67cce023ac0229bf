"""Run the twist-hf benchmarks on this machine and write benchmarks/results/<device>-<date>.{json,md} and
benchmarks/RESULTS.md (the latest table); a run of some sections (--only) writes <sections>-<device>-<date> files
and leaves RESULTS.md alone unless --summary names it.

    python benchmarks/run.py            # training step, augmentation, launchers (~7 min on 2 idle CPU cores)
    python benchmarks/run.py --quick    # smaller batches, fewer steps
    python benchmarks/run.py --quality  # also the default Fashion-MNIST run and its baselines (~15 min in all)
    python benchmarks/run.py --smoke    # tiny sizes, one repetition (the test suite's smoke test)
    python benchmarks/run.py --only quality --quality   # one section: results/quality-<device>-<date>.{json,md}
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import augmentation
import launchers
import quality
import train_step
from harness import device_slug, fmt_range, machine_info, markdown_table, write_json

HERE = Path(__file__).resolve().parent
SECTIONS = ("train_step", "augmentation", "launchers", "quality")
TARGETS = {"train_step": 1.3, "augmentation": 2.0, "launchers": 1.05}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller batches and fewer steps")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition, no launchers")
    parser.add_argument(
        "--quality", action="store_true", help="also run the default Fashion-MNIST recipe and its baselines (~7.5 min)"
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument(
        "--compile",
        choices=("none", "small", "all"),
        default=None,
        help="torch.compile variants: none, fmnist-resnet only ('small', the CPU default: compiling "
        "ResNet-50 takes minutes on 2 cores) or every model (default on GPU)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3, smoke 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument(
        "--summary",
        default=None,
        help="where the report is copied (default: RESULTS.md for a run of every section; none with --only, so "
        "a partial run never replaces the full table)",
    )
    return parser.parse_args(argv)


def output_paths(args: argparse.Namespace, device: torch.device, date: str) -> tuple[str, Path | None]:
    """The results file stem (`<device>-<date>`, prefixed by the sections of an --only run) and the summary to write."""
    prefix = "-".join(args.only) + "-" if args.only else ""
    stem = f"{prefix}{device_slug(device)}-{date}{'-smoke' if args.smoke else ''}"
    if args.summary is not None:
        return stem, Path(args.summary)
    return stem, None if args.only else HERE / "RESULTS.md"


def chosen_sections(args: argparse.Namespace) -> list[str]:
    if args.only:
        return list(args.only)
    sections = ["augmentation", "train_step", "quality"] if args.smoke else ["augmentation", "launchers", "train_step"]
    if args.quality and "quality" not in sections:
        sections.append("quality")
    return sections


def run_section(
    section: str, args: argparse.Namespace, device: torch.device, save_train_step: Callable[[dict], None]
) -> dict:
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    reps = args.reps or (1 if args.smoke else 3)
    if section == "train_step":
        compile_mode = args.compile or (
            "none" if args.smoke or args.quick else "all" if device.type == "cuda" else "small"
        )
        return train_step.run(device, size, 1, reps, compile_mode, on_workload=save_train_step)
    if section == "augmentation":
        return augmentation.run(
            warmup=1, reps=reps, max_images=2 if args.smoke else None, num_local=2 if args.smoke else 6
        )
    if section == "launchers":
        with tempfile.TemporaryDirectory(prefix="twist-bench-launch-") as work_dir:
            return launchers.run(Path(work_dir), steps=60 if args.quick else 150, rounds=1 if args.quick else 2)
    with tempfile.TemporaryDirectory(prefix="twist-bench-quality-") as work_dir:
        subset = (2000, 500) if args.smoke else (None, None)
        return quality.run(
            Path(work_dir), with_training=args.quality and not args.smoke, max_train=subset[0], max_test=subset[1]
        )


def run_sections(args: argparse.Namespace, device: torch.device, save: Callable[[dict], None]) -> dict:
    """Each chosen section in turn; `save` writes the results so far after every section and training workload.
    A section that fails (a launcher timing out on a loaded machine) is recorded and the others still run."""
    results: dict = {"section_seconds": {}, "errors": {}}
    for section in chosen_sections(args):
        started = time.perf_counter()
        print(f"[benchmarks] {section} ...", flush=True)
        try:
            results[section] = run_section(section, args, device, lambda done: save({**results, "train_step": done}))
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as error:
            results["errors"][section] = f"{type(error).__name__}: {error}"[-2000:]
        results["section_seconds"][section] = time.perf_counter() - started
        save(results)
    return results


def train_step_rows(section: dict) -> list[list[str]]:
    rows = []
    for name, workload in section.items():
        for variant_name, variant in workload["variants"].items():
            best = " **best**" if variant_name == workload["best_variant"] else ""
            rows.append(
                [
                    f"{name} (batch {workload['workload']['batch']})",
                    variant_name + best,
                    fmt_range(variant["img_per_s"], 2),
                    f"{variant['speedup_vs_eager']:.2f}x",
                    f"{variant['peak_memory_mb']:.0f}",
                    f"{variant['first_step_s']:.1f}",
                ]
            )
    return rows


def markdown_report(results: dict) -> str:
    machine = results["machine"]
    parts = [
        f"# twist-hf benchmarks: {machine['device']} ({machine['cpu_count']} cores), {machine['date']}",
        "",
        (
            f"Load average at start (1/5/15 min): {machine['load_average_1_5_15']}; torch {machine['torch']}. "
            "Medians of repeated runs after a warm-up, (min-max) in brackets; every ratio compares two "
            "measurements of this same run. Produced by `python benchmarks/run.py`; see benchmarks/README.md."
        ),
    ]
    sections = {
        "train_step": train_step_section,
        "augmentation": augmentation_section,
        "launchers": launchers_section,
        "quality": lambda section: ["## Quality on Fashion-MNIST (kNN top-1)", "", quality_table(section)],
    }
    for name, render in sections.items():
        if name in results:
            parts += ["", *render(results[name])]
    parts += ["", "## Targets", ""] + [f"- {line}" for line in target_lines(results)]
    parts += [f"- section {name} failed: {message.splitlines()[0]}" for name, message in results["errors"].items()]
    parts += [
        "",
        f"Section wall times (s): { {k: round(v) for k, v in results['section_seconds'].items()} }"
        + ("" if results.get("complete") else " (partial: the run is still going or was stopped)"),
        "",
    ]
    return "\n".join(parts)


def train_step_section(section: dict) -> list[str]:
    return [
        "## Training step (the library's TrainingStep with each recipe's optimiser)",
        "",
        (
            "Peak memory: process RSS high-water mark on CPU (includes the Python process), "
            "torch.cuda.max_memory_allocated on GPU. First step includes compilation."
        ),
        "",
        markdown_table(
            ["model (views)", "variant", "img/s", "vs eager fp32", "peak MB", "first step s"],
            train_step_rows(section),
        ),
    ]


def augmentation_section(section: dict) -> list[str]:
    rows = [
        [name, fmt_range(value["img_per_s"]), f"{value['speedup_vs_authors']:.2f}x"]
        for name, value in section["pipelines"].items()
    ]
    return [
        (
            f"## Augmentation ({section['views']}, 1 thread, {len(section['images'])} photographs "
            "as ImageNet-size JPEGs, from encoded bytes)"
        ),
        "",
        markdown_table(["pipeline", "img/s", "vs the authors' pipeline"], rows),
    ]


def launchers_section(section: dict) -> list[str]:
    rows = [
        [name, fmt_range(value["step_s"], 3), f"{value['time_to_first_step_s']:.1f}", f"{value['wall_s']:.1f}"]
        for name, value in section["launchers"].items()
    ]
    return [
        f"## Launchers ({section['workload']})",
        "",
        markdown_table(["launcher", "steady step s", "time to first step s", "wall s"], rows),
        "",
        (
            f"Step time ratio Ray / torchrun: {section['step_time_ratio_ray_over_torchrun']:.3f} "
            f"(target <= 1.05); time to first step ratio: {section['first_step_ratio_ray_over_torchrun']:.2f}."
        ),
    ]


def quality_table(section: dict) -> str:
    rows = [[name.replace("_", " "), f"{value:.4f}", "", ""] for name, value in section["baselines_knn_top1"].items()]
    if "default_run" in section:
        run = section["default_run"]
        rows.append(
            [
                "default TWIST run (recipes/pretrain.py)",
                f"{run['knn_top1']:.4f}",
                f"{run['train_images_per_second']:.0f}",
                f"{run['wall_s']:.0f}",
            ]
        )
    return (
        f"{section['knn']}, {section['train_samples']} train / {section['test_samples']} test images.\n\n"
        + markdown_table(["features", "kNN top-1", "train img/s", "wall s"], rows)
    )


def target_lines(results: dict) -> list[str]:
    """Each benchmark target, met or missed and by how much."""
    lines = []
    for name, workload in results.get("train_step", {}).items():
        speedup = workload["best_speedup_vs_eager"]
        verdict = "met" if speedup >= TARGETS["train_step"] else f"missed by {TARGETS['train_step'] - speedup:.2f}x"
        lines.append(
            f"train step {name}: best {workload['best_variant']} = {speedup:.2f}x eager fp32 "
            f"(target >= 1.3x): {verdict}"
        )
    if "augmentation" in results:
        speedup = results["augmentation"]["pipelines"][augmentation.OURS]["speedup_vs_authors"]
        verdict = "met" if speedup >= TARGETS["augmentation"] else f"missed by {TARGETS['augmentation'] - speedup:.2f}x"
        lines.append(f"augmentation: ours = {speedup:.2f}x the authors' pipeline (target >= 2x): {verdict}")
    if "launchers" in results:
        value = results["launchers"]["step_time_ratio_ray_over_torchrun"]
        verdict = "met" if value <= TARGETS["launchers"] else f"missed by {value - TARGETS['launchers']:.3f}"
        lines.append(f"launchers: Ray / torchrun steady step time = {value:.3f} (target <= 1.05): {verdict}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    header = {"machine": machine_info(device), "mode": "smoke" if args.smoke else "quick" if args.quick else "full"}
    stem, summary = output_paths(args, device, header["machine"]["date"])
    results_dir = Path(args.results_dir)

    def save(sections: dict) -> None:
        write_json(results_dir / f"{stem}.json", {**header, **sections})
        report = markdown_report({**header, **sections})
        (results_dir / f"{stem}.md").write_text(report)
        if summary is not None:
            summary.write_text(report)

    results = {**header, **run_sections(args, device, save)}
    results["complete"] = True
    save({key: value for key, value in results.items() if key not in header})
    print(markdown_report(results))
    return results


if __name__ == "__main__":
    main()
