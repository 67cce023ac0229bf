"""The peers benchmark (TWIST vs lightly's SwAV, Barlow Twins, DINO at one budget) runs end to end on a tiny budget
and reports every method with finite scores; its RESULTS.md section is replaced in place, never duplicated."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightly", reason="benchmarks/peers.py needs lightly: pip install -e '.[bench]' (or '.[dev]')")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from peers import DEFAULT_LEARNING_RATES, METHODS, SECTION_END, SECTION_START, learning_rates_to_run, replace_section


def test_replace_section_appends_then_replaces():
    once = replace_section("# Results\n", "table 1")
    assert once == f"# Results\n\n{SECTION_START}\ntable 1\n{SECTION_END}\n"
    twice = replace_section(once + "after\n", "table 2")
    assert twice == f"# Results\n\n{SECTION_START}\ntable 2\n{SECTION_END}\nafter\n"
    with pytest.raises(ValueError, match="without"):
        replace_section(f"{SECTION_START}\nhalf", "table")


def test_learning_rates_name_known_methods():
    runs = learning_rates_to_run(["swav", "dino"], {"dino": [0.1, 0.2]})
    assert runs == [("swav", DEFAULT_LEARNING_RATES["swav"]), ("dino", 0.1), ("dino", 0.2)]
    with pytest.raises(ValueError, match="barlow_twins"):
        learning_rates_to_run(["swav"], {"barlow_twins": [0.1]})


@pytest.mark.slow
def test_peers_smoke_run_reports_every_method(tmp_path):
    summary = tmp_path / "RESULTS.md"
    summary.write_text("# Results\n")
    arguments = ["--budget_s", "60", "--max_steps", "2", "--max_train_samples", "512", "--max_test_samples", "128"]
    # One thread: on a loaded 2-core machine two OpenMP threads stall each other for seconds per step.
    arguments += ["--threads", "1", "--probe_epochs", "1", "--label", "smoke"]
    arguments += ["--output_dir", str(tmp_path), "--summary", str(summary)]
    finished = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "peers.py"), *arguments],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads(next(tmp_path.glob("peers-*.json")).read_text())
    assert [run["method"] for run in results["runs"]] == list(METHODS)
    for run in results["runs"]:
        assert run["steps"] == 2
        for key in ("knn_top1", "linear_top1", "first_loss", "last_loss", "images_per_s"):
            assert math.isfinite(run[key]), (run["method"], key, run[key])
        assert 0 <= run["knn_top1"] <= 1 and 0 <= run["linear_top1"] <= 1
    table = next(tmp_path.glob("peers-*.md")).read_text()
    assert all(f"| {method} |" in table for method in METHODS)
    assert summary.read_text().count(SECTION_START) == 1 and "| twist |" in summary.read_text()
