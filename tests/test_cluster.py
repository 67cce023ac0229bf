"""`recipes/pretrain.py --ray_address` against a real multi-node Ray cluster on this machine (a CPU-less head and
two 2-CPU nodes) with checkpoints in a real S3 API server (moto, over HTTP): placement over nodes, the bucket
as the only storage, a resume from the bucket by a new driver, sweeps over the nodes, and an elastic run that
loses a whole node and then gets a spot machine's SIGTERM."""

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from local_cluster import BUCKET, Driver, LocalCluster, S3Server
from tiny_run import ROOT, tiny_run_args
from transformers import AutoModel

from twist_hf.training.launch import _ensure_output_folder

sys.path.insert(0, str(ROOT / "recipes"))
from pretrain import main

pytestmark = pytest.mark.slow

CPUS_PER_NODE = 2
SWEEP_SCRIPT = ROOT / "tune" / "sweep.py"
TINY = tiny_run_args(num_workers=2, bunch_size=64, save_strategy="steps", save_steps=4, eval_split="")


@pytest.fixture(scope="module")
def cluster(s3):
    """Started after the S3 server so that every raylet (and so every worker) has its endpoint and keys."""
    cluster = LocalCluster(worker_nodes=2, cpus_per_node=CPUS_PER_NODE)
    yield cluster
    cluster.shutdown()


def run_pretrain(cluster, *args: str, timeout: float = 300) -> Driver:
    driver = Driver([*TINY, "--ray_address", cluster.address, "--ray_dashboard", "false", *args])
    assert driver.wait(timeout) == 0, driver.output[-4000:]
    return driver


def log_entries(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def stored_checkpoints(s3: S3Server, prefix: str) -> list[str]:
    """Names of the checkpoint folders among the objects <prefix><run>/checkpoint-<step>/..."""
    folders = [key[len(prefix) :].split("/") for key in s3.keys(prefix)]
    return sorted({parts[1] for parts in folders if len(parts) > 2 and parts[1].startswith("checkpoint-")})


def checkpoint_downloads() -> set[Path]:
    """Folders where Ray downloads a checkpoint from storage (the workers run on this machine)."""
    return set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*"))


def test_spread_run_keeps_checkpoints_in_s3_and_a_new_driver_resumes_from_the_bucket(cluster, s3, tmp_path):
    output = tmp_path / "run"
    storage = f"s3://{BUCKET}/runs"
    first = run_pretrain(
        cluster,
        *("--output_dir", str(output), "--storage_path", storage, "--max_steps", "12", "--save_total_limit", "1"),
        "--placement_strategy",
        "SPREAD",
    )
    (_, ranks), *_ = first.placements()
    assert len(set(ranks.values())) == 2  # one worker on each 2-CPU node
    assert json.loads((output / "all_results.json").read_text())["num_nodes"] == 2
    # Checkpoints are objects in the bucket (runs/<run>/checkpoint-<step>/...); keep-last-1 deleted 4 and 8.
    assert stored_checkpoints(s3, "runs/") == ["checkpoint-000000012"]
    assert any(key.endswith("checkpoint-000000012/model/model.safetensors") for key in s3.keys("runs/"))

    # A new driver (as after a head restart) finds the newest checkpoint in the bucket; PACK fits both on one node.
    downloads_before = checkpoint_downloads()
    second = run_pretrain(
        cluster,
        *("--output_dir", str(output), "--storage_path", storage, "--max_steps", "16", "--save_total_limit", "1"),
        *("--resume_from_checkpoint", "latest"),
    )
    (_, ranks), *_ = second.placements()
    assert len(set(ranks.values())) == 1
    results = json.loads((output / "all_results.json").read_text())
    assert results["global_step"] == 16 and results["num_nodes"] == 1
    log = log_entries(output)
    resumed = [entry for entry in log if "resumed_from_step" in entry]
    assert [entry["resumed_from_step"] for entry in resumed] == [12]
    assert [entry["step"] for entry in log[log.index(resumed[0]) :]] == [16, 16]
    assert stored_checkpoints(s3, "runs/") == ["checkpoint-000000012", "checkpoint-000000016"]  # one per run
    assert checkpoint_downloads() <= downloads_before  # the workers deleted their download of checkpoint 12
    assert f"Reading checkpoint s3://{BUCKET}/runs/" in second.output  # the object, not only the download's folder

    # With rank 0 on another machine the driver's folder is empty: the final model comes from the bucket.
    from ray.train import Checkpoint

    elsewhere = tmp_path / "driver-machine"
    final = next(key for key in s3.keys("runs/") if key.endswith("checkpoint-000000016/trainer_state.json"))
    _ensure_output_folder(SimpleNamespace(checkpoint=Checkpoint(f"s3://{BUCKET}/{Path(final).parent}")), elsewhere)
    assert AutoModel.from_pretrained(elsewhere).config.num_classes == 16


def test_sweep_spreads_each_trials_workers_over_nodes_and_resumes_from_the_bucket(cluster, s3, tmp_path):
    """Each trial runs Ray Train inside it, its 2 workers on both nodes; the trial's score is the head's cluster ACC
    that the run's cluster monitor gathered over both workers."""
    sweep = [
        *tiny_run_args(num_workers=2, bunch_size=64, max_train_samples=256, num_train_epochs=1),
        *("--search_space", '{"tau": {"grid": [0.3]}}', "--scheduler", "fifo", "--num_samples", "1"),
        *("--max_concurrent_trials", "1", "--metric", "cluster_acc"),
        *("--placement_strategy", "SPREAD", "--storage_path", f"s3://{BUCKET}/sweeps", "--sweep_name", "tiny"),
        *("--output_dir", str(tmp_path / "sweep"), "--ray_address", cluster.address, "--ray_dashboard", "false"),
    ]
    first = Driver(sweep, script=SWEEP_SCRIPT)
    assert first.wait(300) == 0, first.output[-4000:]
    (_, ranks), *_ = first.placements()
    assert len(set(ranks.values())) == 2
    assert "sweeps/tiny/tuner.pkl" in s3.keys("sweeps/tiny/")
    trials = pd.read_csv(tmp_path / "sweep" / "trials.csv")
    # Each trial's Ray Train run (named after the trial) checkpoints in the bucket.
    train_runs = {key.split("/")[2] for key in s3.keys("sweeps/tiny-train-runs/") if "/checkpoint-" in key}
    assert train_runs == set(trials["trial_id"])
    assert trials["cluster_acc"].between(0, 1).all() and (trials["cluster_acc"] > 0).all()
    (trial_dir,) = map(Path, trials["output_dir"])
    results = json.loads((trial_dir / "all_results.json").read_text())
    assert {"cluster_nmi", "cluster_ami", "cluster_ari"} <= set(results)
    assert json.loads((trial_dir / "training_args.json").read_text())["launch"]["num_workers"] == 2
    assert "workers" in (trial_dir / "README.md").read_text()

    resumed = Driver([*sweep, "--resume"], script=SWEEP_SCRIPT)
    assert resumed.wait(300) == 0, resumed.output[-4000:]
    assert "Restoring the sweep at s3://" in resumed.output
    assert list(pd.read_csv(tmp_path / "sweep" / "trials.csv")["outcome"]) == ["completed"]


def registered_checkpoint_step(output_dir: Path) -> int | None:
    """The step of the newest checkpoint Ray Train's controller has registered (its snapshot in the storage).

    A checkpoint folder can be persisted before the controller's next poll registers the report; a node
    killed in between is restored from the previously registered checkpoint, so the test waits for this."""
    for snapshot in output_dir.glob("ray/*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, json.JSONDecodeError):
            return None
        return latest["metrics"]["global_step"] if latest else None
    return None


def kill_a_workers_node(cluster, driver: Driver, output: Path) -> tuple[float, int, int]:
    """Once Ray has registered a checkpoint, SIGKILL a node that hosts workers (raylet and workers); returns when,
    the newest registered checkpoint's step and the newest logged step at that moment. The workers of a killed
    raylet notice its death only after a moment and may train (and log) a few more steps that no one registers."""
    wait_until(lambda: registered_checkpoint_step(output) is not None and driver.placements(), driver, "a checkpoint")
    step, logged = registered_checkpoint_step(output), log_entries(output)[-1]["step"]
    cluster.kill_node(next(iter(driver.placements()[0][1].values())))
    return time.monotonic(), step, logged


# Elastic: 4 workers (2 per node) at first; 12, 8 or 6 images per worker and bunches of 24 over 2, 3 or 4 ranks.
ELASTIC = tiny_run_args(
    num_workers="2-4",
    global_train_batch_size=24,
    bunch_size=24,
    max_steps=60,
    save_strategy="steps",
    save_steps=4,
    logging_steps=2,
    eval_split="",
)


def test_a_lost_node_costs_one_checkpoint_interval_and_a_sigterm_not_a_step_in_an_elastic_run(cluster, tmp_path):
    """An elastic run starts on 4 workers over both nodes. A node is SIGKILLed (raylet and workers) once Ray has
    registered a checkpoint: the run continues on the 2 workers of the other node, with the same global batch, from
    that checkpoint or a later one. Then rank 1 gets SIGTERM (a spot machine's notice): every rank stops after
    the same step, checkpoints it, and Ray Train restarts from exactly that step."""
    output = tmp_path / "run"
    driver = Driver(
        [*ELASTIC, "--ray_address", cluster.address, "--ray_dashboard", "false", "--output_dir", str(output)]
    )
    try:
        killed_at, checkpoint_step, logged_at_kill = kill_a_workers_node(cluster, driver, output)
        wait_until(lambda: len(driver.placements()) == 2 and trained_after(output, 2), driver, "the restart")
        print(f"node killed -> workers running again: {driver.placements()[1][0] - killed_at:.1f} s")
        os.kill(driver.worker_pids()[1], signal.SIGTERM)
        assert driver.wait(300) == 0, driver.output[-4000:]
    finally:
        cluster.add_node()  # the other tests of the module get their two nodes back

    placements = driver.placements()
    assert len(placements) == 3, f"{len(placements)} starts, not 3:\n{controller_events(driver)}"
    (_, first), (_, second), (_, third) = placements
    assert len(set(first.values())) == 2 and len(set(second.values())) == 1 and second == third
    log = log_entries(output)
    starts = [entry for entry in log if "num_workers" in entry]
    assert [entry["num_workers"] for entry in starts] == [4, 2, 2]
    assert [entry["global_batch_size"] for entry in starts] == [24, 24, 24]
    after_kill, after_sigterm = starts[1]["resumed_from_step"], starts[2]["resumed_from_step"]
    # Nothing Ray had registered is lost, and the restart costs at most one checkpoint interval (save_steps 4).
    lost = logged_at_kill - after_kill
    assert after_kill >= checkpoint_step and lost <= 4, (after_kill, checkpoint_step, logged_at_kill)
    assert f"Stopped by SIGTERM after step {after_sigterm}" in driver.output
    between = log[log.index(starts[1]) : log.index(starts[2])]
    assert max(entry["step"] for entry in between) <= after_sigterm  # the restart loses no step it trained
    steps = [entry["step"] for entry in log[log.index(starts[1]) :] if "loss" in entry]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # the step counter continues
    results = json.loads((output / "all_results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 60 and results["num_nodes"] == 1


def controller_events(driver: Driver) -> str:
    """The driver's lines that say why Ray Train (re)started the worker group: its sizes, failures and retries."""
    markers = ("Detected ready resources", "FailurePolicy", "Error:", "timed out", "runs on node", "SIGTERM")
    return "\n".join(line[:300] for _, line in driver.lines_with(*markers))


def trained_after(output: Path, starts: int) -> bool:
    """Whether the run has logged a training step since its `starts`-th start."""
    log = log_entries(output) if (output / "log.jsonl").is_file() else []
    begun = [index for index, entry in enumerate(log) if "num_workers" in entry]
    return len(begun) >= starts and any("loss" in entry for entry in log[begun[starts - 1] :])


def wait_until(condition, driver: Driver, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert driver.process.poll() is None, f"the run ended before {what}:\n{driver.output[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{driver.output[-3000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--storage_path", "s3://no-such-bucket/runs"], "the bucket 'no-such-bucket' does not exist; create it"),
        (["--placement_strategy", "DIAGONAL"], "placement_strategy must be one of 'PACK', 'SPREAD'"),
        (["--storage_path", f"s3://{BUCKET}/empty", "--resume_from_checkpoint", "latest"], "no checkpoint of a run"),
    ],
)
def test_bad_cluster_options_fail_before_any_worker_starts(s3, tmp_path, capsys, options, message):
    assert main([*TINY, "--output_dir", str(tmp_path / "run"), "--ray_dashboard", "false", *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "log.jsonl").exists()
