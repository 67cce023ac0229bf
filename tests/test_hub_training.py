"""Pushing from real (tiny) training runs to the local Hub test server, including its failure modes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hub_server import PUSHED_MODEL_FILES, TEST_TOKEN, TEST_USER, client_env
from huggingface_hub import HfApi
from tiny_run import PRETRAIN_SCRIPT, tiny_run_args

pytestmark = pytest.mark.slow

REPO = f"{TEST_USER}/twist-tiny"


def pretrain_command(output_dir: Path, *extra: str, steps: int = 16, save_steps: int = 8) -> list[str]:
    flags = tiny_run_args(launcher="local", max_steps=steps, save_strategy="steps", save_steps=save_steps)
    hub = ["--push_to_hub", "--hub_model_id", REPO, "--hub_token", TEST_TOKEN]
    return [sys.executable, str(PRETRAIN_SCRIPT), *flags, "--output_dir", str(output_dir), *hub, *extra]


def pretrain(output_dir: Path, env: dict, *extra: str, steps: int = 16) -> subprocess.CompletedProcess:
    command = pretrain_command(output_dir, *extra, steps=steps)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


def repo_files(hub) -> set[str]:
    return set(HfApi(endpoint=hub.endpoint, token=TEST_TOKEN).list_repo_files(REPO))


def logged_steps(output_dir: Path) -> list[int]:
    lines = (output_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_checkpoint_strategy_pushes_training_state_and_resumes_from_the_hub(hub, tmp_path):
    env = client_env(hub, tmp_path / "hf-home")
    first = pretrain(tmp_path / "first", env, "--hub_strategy", "checkpoint")
    assert first.returncode == 0, first.stderr[-3000:]
    files = repo_files(hub)
    assert PUSHED_MODEL_FILES | {"last-checkpoint/training_state.pt", "last-checkpoint/trainer_state.json"} <= files
    assert not any(name.startswith(("checkpoints/", "ray/")) for name in files)

    second = pretrain(tmp_path / "second", env, "--resume_from_checkpoint", REPO, "--hub_strategy", "end", steps=24)
    assert second.returncode == 0, second.stderr[-3000:]
    steps = logged_steps(tmp_path / "second")
    assert min(steps) > 16 and max(steps) == 24
    results = json.loads((tmp_path / "second" / "all_results.json").read_text())
    assert results["global_step"] == 24


def saved_steps(output: Path) -> list[int]:
    return [int(folder.name.split("-")[-1]) for folder in (output / "checkpoints").glob("checkpoint-*")]


def wait_for_checkpoint(output: Path, step: int, run: subprocess.Popen, timeout: float = 300) -> bool:
    """Until a checkpoint at or after `step` exists (older ones are pruned by save_total_limit); False if the run
    ended or `timeout` passed first (the test then fails on what the Hub holds)."""
    deadline = time.monotonic() + timeout
    while max(saved_steps(output), default=0) < step:
        if run.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_while_paused(run: subprocess.Popen, stage) -> None:
    """`stage` with the run's processes stopped (SIGSTOP), so that the run cannot outrun what `stage` does to the
    Hub: a tiny run saves and fails a push every few milliseconds, faster than the server restarts."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGSTOP)
    try:
        stage()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGCONT)


def run_with_faults(hub, tmp_path, stages: list) -> tuple[subprocess.CompletedProcess, Path]:
    """Train 300 steps (a save every 20); `stages[0]` breaks the Hub at the start, `stages[i]` runs, with the run
    paused, once step 60 * i is saved. The last stage mends it, so only a later push (the saves after it, or the
    final one) can land; at least 8 saves follow the mend however fast the run trains."""
    output = tmp_path / "run"
    stages[0]()
    command = pretrain_command(
        output, "--hub_strategy", "every_save", "--hub_push_timeout", "20", steps=300, save_steps=20
    )
    env = client_env(hub, tmp_path / "hf-home")
    run = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )

    def follow_stages():
        for index, stage in enumerate(stages[1:], start=1):
            if not wait_for_checkpoint(output, 60 * index, run):
                return
            run_while_paused(run, stage)

    follower = threading.Thread(target=follow_stages, daemon=True)
    follower.start()
    try:
        stdout, stderr = run.communicate(timeout=400)
    finally:
        run.kill()
    follower.join(timeout=30)
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr), output


def assert_survived_and_pushed_later(hub, result, output: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    log = result.stderr.lower()
    assert "push" in log and ("fail" in log or "deadline" in log)
    assert TEST_TOKEN not in result.stderr + result.stdout
    assert {"config.json", "model.safetensors", "README.md"} <= repo_files(hub)


def test_training_survives_a_hub_that_is_down_then_failing(hub, tmp_path):
    def back_up_but_failing():
        hub.restart()
        hub.fail_with(500)

    result, output = run_with_faults(hub, tmp_path, [hub.stop, back_up_but_failing, hub.heal])
    assert_survived_and_pushed_later(hub, result, output)


def test_training_survives_a_hanging_hub(hub, tmp_path):
    result, output = run_with_faults(hub, tmp_path, [lambda: hub.hang(30), hub.heal])
    assert_survived_and_pushed_later(hub, result, output)
