"""The benchmark harness cannot rot: a smoke run writes its files with the expected keys; the timing and launcher
log math is checked by hand; no speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import run as benchmark_run
from gpu import markdown, run_section
from harness import device_slug, fmt_range, rates, ratio, summarise, time_repeated
from launchers import steady_step_seconds


def test_summarise_and_ratio_by_hand():
    stats = summarise([3.0, 1.0, 2.0, 10.0])
    assert stats == {"min": 1.0, "median": 2.5, "max": 10.0, "reps": 4}
    assert ratio({"median": 6.0}, {"median": 4.0}) == 1.5
    assert rates([0.5, 0.25], 8) == [16.0, 32.0]
    assert fmt_range(stats) == "2.5 (1.0-10.0)"
    with pytest.raises(ValueError, match="empty"):
        summarise([])


def test_time_repeated_runs_warmup_then_reps():
    calls = []
    seconds = time_repeated(lambda: calls.append(1), warmup=2, reps=3)
    assert len(calls) == 5 and len(seconds) == 3 and all(value >= 0 for value in seconds)
    with pytest.raises(ValueError, match="reps"):
        time_repeated(lambda: None, warmup=0, reps=0)


def test_steady_step_seconds_skips_start_up_lines():
    # 10 step lines at 64 img/s except the first two (start-up); a final results line without img_per_s.
    log = [{"step": 1, "img_per_s": 8.0}, {"step": 2, "img_per_s": 16.0}]
    log += [{"step": step, "img_per_s": 64.0 * (2 if step == 10 else 1)} for step in range(3, 11)]
    log.append({"step": 10, "knn_top1": 0.5})
    seconds = steady_step_seconds(log, global_batch=64, skip_fraction=0.2)
    assert seconds == [1.0] * 7 + [0.5]


def run_benchmark_script(name: str, *arguments: str, timeout: float) -> None:
    """Run benchmarks/<name> as a user would and fail with its stderr if it exits non-zero."""
    finished = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *arguments],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]


def test_a_run_of_some_sections_names_its_files_after_them_and_keeps_the_full_table():
    cpu, slug = torch.device("cpu"), device_slug(torch.device("cpu"))
    only_quality = benchmark_run.parse_args(["--only", "quality", "--quality"])
    assert benchmark_run.output_paths(only_quality, cpu, "2026-12-04") == (f"quality-{slug}-2026-12-04", None)
    named = benchmark_run.parse_args(["--only", "quality", "launchers", "--summary", "mine.md"])
    assert benchmark_run.output_paths(named, cpu, "2026-12-04") == (
        f"quality-launchers-{slug}-2026-12-04",
        Path("mine.md"),
    )
    smoke = benchmark_run.parse_args(["--smoke"])
    assert benchmark_run.output_paths(smoke, cpu, "2026-12-04") == (
        f"{slug}-2026-12-04-smoke",
        REPO / "benchmarks" / "RESULTS.md",
    )


def test_smoke_run_writes_results_and_table(tmp_path):
    results_dir, summary = tmp_path / "results", tmp_path / "RESULTS.md"
    run_benchmark_script("run.py", "--smoke", "--results-dir", str(results_dir), "--summary", str(summary), timeout=300)
    [json_path] = results_dir.glob("cpu-*-smoke.json")
    results = json.loads(json_path.read_text())
    assert set(results) >= {"machine", "mode", "train_step", "augmentation", "quality", "section_seconds"}
    assert results["machine"]["device"] and results["mode"] == "smoke" and results["errors"] == {}
    assert results["complete"] is True
    [workload] = results["train_step"].values()
    assert set(workload["variants"]) == {"eager-fp32", "channels_last", "bf16", "channels_last+bf16"}
    eager = workload["variants"]["eager-fp32"]
    assert eager["speedup_vs_eager"] == 1.0 and eager["peak_memory_mb"] > 0
    assert set(eager["img_per_s"]) == {"min", "median", "max", "reps"}
    pipelines = results["augmentation"]["pipelines"]
    assert "ours (MultiCropTransform)" in pipelines
    assert pipelines["authors (torchvision on PIL, PIL blur)"]["speedup_vs_authors"] == 1
    baselines = results["quality"]["baselines_knn_top1"]
    assert set(baselines) == {"raw_pixels", "mean_centred_pixels", "random_init_fmnist_resnet"}
    assert all(0.1 < value <= 1 for value in baselines.values())
    table = json_path.with_suffix(".md").read_text()
    assert table == summary.read_text()
    for heading in ("## Training step", "## Augmentation", "## Quality on Fashion-MNIST", "## Targets"):
        assert heading in table


def test_gpu_script_keeps_earlier_sections_when_one_fails(tmp_path):
    # A GPU lease is short: a section that raises is recorded and the file already holds what ran before it.
    results, json_path = {"machine": {"device": "test GPU", "date": "2026-12-04"}, "tiny": True}, tmp_path / "r.json"
    run_section(results, "resnet50_multicrop", lambda: {"img_per_s": summarise([2.0]), "mfu": 0.5}, json_path)
    run_section(results, "jpeg_backends", lambda: 1 / 0, json_path)
    assert json.loads(json_path.read_text())["jpeg_backends"]["error"] == "ZeroDivisionError: division by zero"
    table = markdown(results)
    assert "| 2.00 (2.00-2.00) | MFU 50.0% |" in table
    assert "| ResNet-50 step from JPEG files | not run | ZeroDivisionError: division by zero |" in table
    assert "| Fashion-MNIST recipe run, ResNet-18-sized | not run | the script stopped before this section |" in table


@pytest.mark.slow
def test_gpu_script_smoke_on_cpu(tmp_path):
    run_benchmark_script("gpu.py", "--device", "cpu", "--tiny", "--results-dir", str(tmp_path), timeout=600)
    [json_path] = tmp_path.glob("gpu-cpu-*-tiny-*.json")
    results = json.loads(json_path.read_text())
    r50 = results["resnet50_multicrop"]
    assert r50["flops_per_step"] > 0 and r50["mfu"] is None and r50["img_per_s"]["median"] > 0
    assert results["jpeg_backends"]["per_image"]["img_per_s"] > 0
    fmnist = results["fashion_mnist"]
    assert fmnist["steps"] == 4 and 0 <= fmnist["knn_top1"] <= 1
    assert "GPU benchmark" in json_path.with_suffix(".md").read_text()
