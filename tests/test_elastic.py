"""Elastic runs keep TWIST's method when the number of workers changes (same global batch, same bunches, same
samples per step), and a SIGTERM'd run saves the step it was on. The slow tests are real: gloo process groups of
2 and 4, and a pretraining process that gets SIGTERM. (An elastic Ray run that loses a node, then gets SIGTERM in
a worker: tests/test_cluster.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from multiproc import run_in_processes
from tiny_run import PRETRAIN_SCRIPT, ROOT, tiny_run_args

from twist_hf.data import in_memory_batches
from twist_hf.training import parse_pretrain_args
from twist_hf.training.launch import LaunchError, validate_before_launch

BASE = ["--model_preset", "tiny-resnet", "--max_train_samples", "64", "--report_to", "none"]


def parsed(*argv: str, output_dir: Path):
    return parse_pretrain_args([*BASE, "--output_dir", str(output_dir), *argv])


@pytest.mark.parametrize(
    "yaml_value, expected", [('"2-4"', "2-4"), ("[2, 4]", "2-4"), ("2", 2), ("[3, 3]", 3), ('"3"', 3)]
)
def test_num_workers_is_a_count_or_a_range_in_yaml(tmp_path, yaml_value, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_preset: tiny-resnet\nnum_workers: {yaml_value}\n")
    launch = parse_pretrain_args(["--config", str(recipe), "--output_dir", str(tmp_path / "out")]).launch
    assert launch.num_workers == expected
    assert launch.is_elastic == isinstance(expected, str)


def test_num_workers_range_on_the_command_line(tmp_path):
    launch = parsed("--num_workers", "2-4", output_dir=tmp_path).launch
    assert (launch.min_workers, launch.max_workers, list(launch.worker_counts)) == (2, 4, [2, 3, 4])


@pytest.mark.parametrize("value", ["4-2", "0", "two", "1-2-3", "-2"])
def test_bad_num_workers_is_a_clear_error(tmp_path, value):
    with pytest.raises(ValueError, match="num_workers must be"):
        parsed("--num_workers", value, output_dir=tmp_path)


def test_each_worker_takes_its_share_of_the_global_batch(tmp_path):
    args = parsed("--global_train_batch_size", "48", output_dir=tmp_path)
    assert [args.for_world_size(world).training.per_device_train_batch_size for world in (2, 3, 4)] == [24, 16, 12]
    fixed = parsed("--per_device_train_batch_size", "8", output_dir=tmp_path)
    assert fixed.for_world_size(4).training.per_device_train_batch_size == 8


def test_an_elastic_run_needs_a_global_batch(tmp_path):
    with pytest.raises(LaunchError, match="--num_workers 2-4 resizes the run.*set --global_train_batch_size"):
        validate_before_launch(parsed("--num_workers", "2-4", output_dir=tmp_path))


def test_a_global_batch_that_some_worker_count_cannot_share_is_refused_with_what_would_fit(tmp_path):
    args = parsed("--num_workers", "2-4", "--global_train_batch_size", "16", "--bunch_size", "4", output_dir=tmp_path)
    with pytest.raises(LaunchError) as error:
        validate_before_launch(args)
    message = str(error.value)  # per-worker shares must be multiples of 4 at 2, 3 and 4 workers: multiples of 48
    assert "With 3 workers: global_train_batch_size 16 does not split into 3 equal per-worker batches" in message
    assert "Worker counts that fit --global_train_batch_size 16: 1, 2, 4, 8, 16;" in message
    assert "global batch sizes that fit every count in --num_workers 2-4: 48, 96, 144, 192." in message


def test_the_bunch_layout_is_checked_at_every_worker_count(tmp_path):
    # 24 images split evenly over 2, 3 and 4 workers, but 12 per worker on 2 do not make bunches of 8.
    args = parsed("--num_workers", "2-4", "--global_train_batch_size", "24", "--bunch_size", "8", output_dir=tmp_path)
    with pytest.raises(LaunchError, match="With 2 workers: The per-device batch size 12 is not a multiple of bunch"):
        validate_before_launch(args)


def step_samples(world: int, global_batch: int, steps: int) -> list[set[int]]:
    """The sample ids of each step's global batch over `world` ranks of the in-memory path."""
    ids = np.arange(100)
    per_rank = [
        [
            set(labels.tolist())
            for _, labels in in_memory_batches(ids, ids, global_batch // world, rank=r, world_size=world)
        ]
        for r in range(world)
    ]
    assert all(len(batches) == steps for batches in per_rank), "steps per epoch must not depend on the world size"
    return [set().union(*(batches[step] for batches in per_rank)) for step in range(steps)]


def test_each_step_draws_the_same_samples_at_any_world_size():
    """So a run resumed at step k on another number of workers continues the same epoch, sample for sample."""
    reference = step_samples(1, 12, 8)
    assert step_samples(2, 12, 8) == reference and step_samples(3, 12, 8) == reference
    assert step_samples(4, 12, 8) == reference and step_samples(6, 12, 8) == reference
    assert len(set().union(*reference)) == 96


# --- one step on 2 workers == the same step on 4 (real gloo process groups) ---------------------------------------

ELASTIC_CASES = [
    {"bunch_size": 8},  # a bunch spans 2 ranks of 4 samples, or 4 ranks of 2
    {"bunch_size": 4},  # one bunch per rank of 4, or one over 2 ranks of 2
    {"last_norm": "global"},
]


def ddp_steps(rank: int, world_size: int) -> list:
    from test_distributed import ddp_step

    return [ddp_step(rank, world_size, overrides) for overrides in ELASTIC_CASES]


@pytest.mark.slow
def test_one_step_on_two_workers_equals_the_step_on_four_with_the_same_global_batch():
    two, four = run_in_processes(ddp_steps, 2), run_in_processes(ddp_steps, 4)
    for case in range(len(ELASTIC_CASES)):
        reference = two[0][case]
        for result in [*two[1:], *four]:
            for value, expected in zip(result[case][:3], reference[:3]):
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
            assert result[case][3].keys() == reference[3].keys()
            for name, grad in result[case][3].items():
                torch.testing.assert_close(grad, reference[3][name], rtol=1e-4, atol=1e-6, msg=name)


# --- real runs --------------------------------------------------------------------------------------------------


def read_log(output: Path) -> list[dict]:
    path = output / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(condition, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


def start_pretraining(argv: list[str], output: Path) -> subprocess.Popen:
    command = [sys.executable, str(PRETRAIN_SCRIPT), *argv, "--output_dir", str(output)]
    console = (output.parent / f"{output.name}.console").open("w")
    return subprocess.Popen(command, cwd=ROOT, stdout=console, stderr=subprocess.STDOUT)


def console(output: Path) -> str:
    return (output.parent / f"{output.name}.console").read_text()[-3000:]


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_the_run_resumes_from_it(tmp_path):
    # A tiny step takes ~10 ms: 60 steps leave the signal half a second to land mid-run.
    options = tiny_run_args(launcher="local", per_device_train_batch_size=16, bunch_size=16, max_steps=60)
    options += ["--save_strategy", "steps", "--save_steps", "1000", "--logging_steps", "1", "--eval_split", "test"]
    output = tmp_path / "run"
    run = start_pretraining(options, output)
    wait_for(lambda: len(read_log(output)) >= 3, run, 120, "step 3")
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 2, console(output)
    stopped_at = read_log(output)[-1]["step"]
    assert "Stopped by SIGTERM after step" in console(output)
    assert [path.name for path in (output / "checkpoints").iterdir()] == [f"checkpoint-{stopped_at}"]
    assert 3 <= stopped_at < 60

    resumed = start_pretraining([*options, "--resume_from_checkpoint", "latest"], output)
    assert resumed.wait(timeout=120) == 0, console(output)
    log = read_log(output)
    restart = next(entry for entry in log if entry.get("resumed_from_step") is not None)
    assert restart["resumed_from_step"] == stopped_at and restart["step"] == stopped_at + 1
    assert json.loads((output / "all_results.json").read_text())["global_step"] == 60


def test_a_sweep_trial_reserves_the_most_workers_an_elastic_range_may_use(tmp_path):
    from twist_hf.tune.runner import DRIVER_CPU, trial_resources

    assert trial_resources(parsed("--num_workers", "2-4", output_dir=tmp_path)) == {"CPU": 4 + DRIVER_CPU}


def test_sigterm_sets_the_notice_in_the_main_thread_only_and_close_gives_the_signal_back():
    import threading

    from accelerate import Accelerator

    from twist_hf.training.preemption import TerminationNotice

    accelerator, before = Accelerator(cpu=True), signal.getsignal(signal.SIGTERM)
    notice = TerminationNotice()
    assert not notice.on_any_rank(accelerator)
    os.kill(os.getpid(), signal.SIGTERM)
    assert notice.on_any_rank(accelerator)
    notice.close()
    assert signal.getsignal(signal.SIGTERM) == before
    in_thread = []
    worker = threading.Thread(target=lambda: in_thread.append(TerminationNotice()))
    worker.start()
    worker.join()
    assert not in_thread[0].installed and signal.getsignal(signal.SIGTERM) == before
