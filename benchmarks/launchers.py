"""Launcher overhead: the same per-worker loop (recipes/pretrain.py) under Ray Train with 2 CPU workers and under
`torchrun --nproc_per_node 2 ... --launcher local`. Time to the first step is when rank 0's log.jsonl gets its
first line (logging every step); the steady-state step time comes from the img_per_s of every later step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import ratio, summarise

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "recipes" / "pretrain.py"
GLOBAL_BATCH = 64


def common_arguments(steps: int, output_dir: Path) -> list[str]:
    """A tiny-resnet run on a Fashion-MNIST subset with no evaluation or checkpoints in the way."""
    return [
        "--model_preset",
        "tiny-resnet",
        "--max_train_samples",
        "4096",
        "--eval_split",
        "",
        "--per_device_train_batch_size",
        str(GLOBAL_BATCH // 2),
        "--bunch_size",
        str(GLOBAL_BATCH),
        "--local_crop_size",
        "8",
        "--num_local_crops",
        "2",
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


def run(work_dir: Path, steps: int, timeout_s: float = 600) -> dict:
    """Both launchers one after the other; the ratio Ray / torchrun of the median steady-state step time."""
    results = {}
    for name, (command, output_dir) in launcher_commands(steps, work_dir).items():
        measured = run_launcher(command, output_dir, timeout_s)
        seconds = steady_step_seconds(measured.pop("log"), GLOBAL_BATCH)
        results[name] = {**measured, "step_s": summarise(seconds), "steps": steps}
    return {
        "workload": f"tiny-resnet, global batch {GLOBAL_BATCH}, 2 workers x 1 thread, 2x16 + 2x8 crops",
        "launchers": results,
        "step_time_ratio_ray_over_torchrun": ratio(results["ray-train"]["step_s"], results["torchrun"]["step_s"]),
        "first_step_ratio_ray_over_torchrun": results["ray-train"]["time_to_first_step_s"]
        / results["torchrun"]["time_to_first_step_s"],
    }
