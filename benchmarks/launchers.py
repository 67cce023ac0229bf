"""Launcher overhead: the same per-worker loop (recipes/pretrain.py, the default Fashion-MNIST recipe) under Ray
Train with 2 CPU workers and under `torchrun --nproc_per_node 2 ... --launcher local`, in alternating rounds so
that load drifting on a shared machine hits both alike. Time to the first step is when rank 0's log.jsonl gets
its first line (logging every step); the steady-state step time comes from the img_per_s of every later step."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import ratio, summarise

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "recipes" / "pretrain.py"
PER_WORKER_BATCH = 128
GLOBAL_BATCH = 2 * PER_WORKER_BATCH


def common_arguments(steps: int, output_dir: Path) -> list[str]:
    """The default recipe's training steps, with no evaluation or checkpoints in the way."""
    return [
        "--eval_split",
        "",
        "--per_device_train_batch_size",
        str(PER_WORKER_BATCH),
        "--max_steps",
        str(steps),
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--output_dir",
        str(output_dir),
        "--overwrite_output_dir",
    ]


def launcher_commands(steps: int, work_dir: Path) -> dict[str, tuple[list[str], Path]]:
    """name -> (command, output folder)."""
    python = sys.executable
    torchrun = str(Path(python).with_name("torchrun"))
    ray_dir, torchrun_dir = work_dir / "ray", work_dir / "torchrun"
    return {
        "ray-train": (
            [python, str(PRETRAIN), *common_arguments(steps, ray_dir), "--launcher", "ray", "--num_workers", "2"],
            ray_dir,
        ),
        "torchrun": (
            [
                torchrun,
                "--nproc_per_node",
                "2",
                "--standalone",
                str(PRETRAIN),
                *common_arguments(steps, torchrun_dir),
                "--launcher",
                "local",
            ],
            torchrun_dir,
        ),
    }


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_step_seconds(log: list[dict], global_batch: int, skip_fraction: float = 0.2) -> list[float]:
    """Per-step seconds (global_batch / img_per_s) of training-step log lines, leaving out the first
    `skip_fraction` of them (start-up, allocator and thread-pool warm-up)."""
    steps = [line for line in log if "img_per_s" in line]
    kept = steps[int(len(steps) * skip_fraction) :]
    return [global_batch / line["img_per_s"] for line in kept if line["img_per_s"] > 0]


def run_launcher(command: list[str], output_dir: Path, timeout_s: float) -> dict:
    """Run one launcher, watching rank 0's log for the first step; returns timings and the log."""
    log_path = output_dir / "log.jsonl"
    shutil.rmtree(output_dir, ignore_errors=True)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first_step_s = None
    output = ""
    try:
        while process.poll() is None:
            if first_step_s is None and log_path.is_file() and log_path.stat().st_size > 0:
                first_step_s = time.perf_counter() - started
            if time.perf_counter() - started > timeout_s:
                process.kill()
                raise TimeoutError(f"{command[:3]} took over {timeout_s:.0f} s")
            time.sleep(0.05)
        output = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    wall_s = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed (exit {process.returncode}):\n{output[-3000:]}")
    return {"wall_s": wall_s, "time_to_first_step_s": first_step_s, "log": read_log(log_path)}


def run(work_dir: Path, steps: int, rounds: int = 2, timeout_s: float = 600) -> dict:
    """`rounds` alternating runs of each launcher; the ratio Ray / torchrun of the median steady-state step time
    over all rounds."""
    if rounds < 1:
        raise ValueError(f"Need at least one round, got rounds={rounds}.")
    seconds: dict[str, list[float]] = {}
    measured: dict[str, list[dict]] = {}
    commands = launcher_commands(steps, work_dir)
    for _ in range(rounds):
        for name, (command, output_dir) in commands.items():
            result = run_launcher(command, output_dir, timeout_s)
            seconds.setdefault(name, []).extend(steady_step_seconds(result.pop("log"), GLOBAL_BATCH))
            measured.setdefault(name, []).append(result)
    results = {
        name: {
            "step_s": summarise(seconds[name]),
            "time_to_first_step_s": statistics.median(run["time_to_first_step_s"] for run in runs),
            "wall_s": statistics.median(run["wall_s"] for run in runs),
            "steps": steps,
            "rounds": rounds,
        }
        for name, runs in measured.items()
    }
    return {
        "workload": (
            f"default recipe (fmnist-resnet, bf16, channels_last), global batch {GLOBAL_BATCH}, 2 workers x 1 "
            f"thread, {steps} steps x {rounds} alternating rounds"
        ),
        "launchers": results,
        "step_time_ratio_ray_over_torchrun": ratio(results["ray-train"]["step_s"], results["torchrun"]["step_s"]),
        "first_step_ratio_ray_over_torchrun": results["ray-train"]["time_to_first_step_s"]
        / results["torchrun"]["time_to_first_step_s"],
    }
