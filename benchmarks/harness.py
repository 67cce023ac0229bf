"""Shared benchmark plumbing: repeated timing with a warm-up, peak-memory probes, device naming, results files.

Every number is a median over repetitions after warm-up, reported with its min and max; every comparison is a
ratio of two such medians measured in the same process on the same machine.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import torch


def summarise(values: list[float]) -> dict[str, float]:
    """min / median / max of repeated measurements (and how many there were)."""
    if not values:
        raise ValueError("Cannot summarise an empty list of measurements.")
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "reps": len(values)}


def time_repeated(run_once: Callable[[], object], warmup: int, reps: int) -> list[float]:
    """Seconds per call of `run_once` for `reps` calls after `warmup` untimed calls."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"Need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}.")
    for _ in range(warmup):
        run_once()
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        run_once()
        seconds.append(time.perf_counter() - started)
    return seconds


def interleaved_seconds(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each named callable, taking turns (one call of each per round) so that load drifting
    on a shared machine hits them all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            seconds[name].extend(time_repeated(call, warmup=0, reps=1))
    return seconds


def rates(seconds: list[float], items_per_call: int) -> list[float]:
    """Items per second of each timed call."""
    return [items_per_call / max(value, 1e-12) for value in seconds]


def ratio(numerator: dict, denominator: dict) -> float:
    """Ratio of two medians (e.g. optimised img/s over eager img/s)."""
    return numerator["median"] / denominator["median"]


class PeakMemory:
    """Peak memory of a code region: torch.cuda.max_memory_allocated on GPU; on CPU the process RSS high-water
    mark, sampled by a background thread (getrusage's maximum cannot be reset between variants)."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval_s = device, interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        process = psutil.Process()
        self.peak_bytes = process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
        self._thread.start()
        return self

    def _sample(self, process) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()

    @property
    def kind(self) -> str:
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "process_rss_peak"


def device_name(device: torch.device) -> str:
    """Human-readable name of the CPU model or GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: torch.device) -> str:
    """File-name part for the device: 'cpu-<cores>c' or the GPU's name, lower-case with dashes."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{os.cpu_count()}c"


def machine_info(device: torch.device) -> dict:
    """What a reader needs to judge the numbers: device, cores, threads, load, versions."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": load,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
        "time": dt.datetime.now().isoformat(timespec="seconds"),
    }


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def fmt_range(stats: dict, digits: int = 1) -> str:
    """'median (min-max)' of a summary."""
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
