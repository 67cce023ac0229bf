"""`recipes/pretrain.py --ray_address` against a real multi-node Ray cluster on this machine (a CPU-less head and
two 2-CPU nodes) with checkpoints in a real S3 API server (moto, over HTTP): placement over nodes, the bucket
as the only storage, a resume from the bucket by a new driver, and a whole node killed mid-run."""

import json
import sys
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
def s3():
    server = S3Server().start()
    yield server
    server.stop()


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

    # With rank 0 on another machine the driver's folder is empty: the final model comes from the bucket.
    from ray.train import Checkpoint

    elsewhere = tmp_path / "driver-machine"
    final = next(key for key in s3.keys("runs/") if key.endswith("checkpoint-000000016/trainer_state.json"))
    _ensure_output_folder(SimpleNamespace(checkpoint=Checkpoint(f"s3://{BUCKET}/{Path(final).parent}")), elsewhere)
    assert AutoModel.from_pretrained(elsewhere).config.num_classes == 16


def test_sweep_spreads_each_trials_workers_over_nodes_and_resumes_from_the_bucket(cluster, s3, tmp_path):
    sweep = [
        *tiny_run_args(num_workers=2, bunch_size=64, max_train_samples=256, num_train_epochs=1),
        *("--search_space", '{"tau": {"grid": [0.3]}}', "--scheduler", "fifo", "--num_samples", "1"),
        *("--max_concurrent_trials", "1"),
        *("--placement_strategy", "SPREAD", "--storage_path", f"s3://{BUCKET}/sweeps", "--sweep_name", "tiny"),
        *("--output_dir", str(tmp_path / "sweep"), "--ray_address", cluster.address, "--ray_dashboard", "false"),
    ]
    first = Driver(sweep, script=SWEEP_SCRIPT)
    assert first.wait(300) == 0, first.output[-4000:]
    (_, ranks), *_ = first.placements()
    assert len(set(ranks.values())) == 2
    assert "sweeps/tiny/tuner.pkl" in s3.keys("sweeps/tiny/")
    assert stored_checkpoints(s3, "sweeps/tiny-train-runs/")  # the trial's Ray Train run checkpoints in the bucket

    resumed = Driver([*sweep, "--resume"], script=SWEEP_SCRIPT)
    assert resumed.wait(300) == 0, resumed.output[-4000:]
    assert "Restoring the sweep at s3://" in resumed.output
    assert list(pd.read_csv(tmp_path / "sweep" / "trials.csv")["outcome"]) == ["completed"]


def test_a_killed_node_costs_at_most_one_checkpoint_interval(cluster, s3, tmp_path):
    """PACK puts both workers on one node; SIGKILLing that node's raylet and workers moves the run to the other."""
    output = tmp_path / "run"
    driver = Driver(
        [*TINY, "--ray_address", cluster.address, "--ray_dashboard", "false", "--output_dir", str(output)]
        + ["--max_steps", "40", "--max_failures", "1", "--save_total_limit", "3"]
    )
    killed_at, checkpoint_step = kill_the_workers_node(cluster, driver, output)
    assert driver.wait(300) == 0, driver.output[-4000:]
    placements = driver.placements()
    (_, before), (restarted_at, after) = placements[0], next(found for found in placements if found[0] > killed_at)
    assert set(before.values()).isdisjoint(after.values()), placements
    print(f"node killed -> workers running again: {restarted_at - killed_at:.1f} s; placements: {placements}")

    log = log_entries(output)
    restarts = [index for index, entry in enumerate(log) if "resumed_from_step" in entry]
    assert len(restarts) == 1, log
    resumed_from = log[restarts[0]]["resumed_from_step"]
    lost = [entry["step"] for entry in log[: restarts[0]]][-1] - resumed_from
    assert resumed_from >= checkpoint_step and lost <= 4, (resumed_from, checkpoint_step, lost)
    assert [entry["step"] for entry in log[restarts[0] :]] == [*range(resumed_from + 4, 41, 4), 40]
    results = json.loads((output / "all_results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 40 and results["num_nodes"] == 1


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


def kill_the_workers_node(cluster, driver: Driver, output: Path, timeout: float = 240) -> tuple[float, int]:
    """Once Ray has registered a checkpoint, SIGKILL the node the workers run on (raylet and workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = registered_checkpoint_step(output)
        placements = driver.placements()
        if step is not None and placements:
            (node_id,) = set(placements[0][1].values())
            cluster.kill_node(node_id)
            return time.monotonic(), step
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint was registered in {timeout} s:\n{driver.output[-3000:]}")


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
