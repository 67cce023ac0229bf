"""The pretraining engine on a real local Ray cluster of 2 CPUs (one instance for the module): a 2-worker run
and its outputs, `latest` in Ray's storage, and a run that asks for more workers than the cluster has. (Lost
workers and nodes: tests/test_cluster.py.)"""

import contextlib
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from transformers import AutoModel

from twist_hf.training.checkpoint import read_trainer_state
from twist_hf.training.launch import RAY_TRAIN_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
from pretrain import main
from tiny_run import tiny_run_args

TINY = tiny_run_args(launcher="ray", num_workers=2, bunch_size=64, save_strategy="steps", save_steps=4)


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU Ray instance shared by the module's runs (run_ray joins it and leaves it running)."""
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        address="local",
        num_cpus=2,
        runtime_env={"env_vars": {key: os.environ[key] for key in RAY_TRAIN_ENV}},
        configure_logging=True,
        logging_level=logging.WARNING,
        include_dashboard=False,  # nothing here reads it; it costs seconds per start and per run
    )
    yield
    ray.shutdown()


def logged_steps(output_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output_dir / "log.jsonl").read_text().splitlines()]


def ray_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints Ray has persisted in its storage (<output_dir>/ray/<run>/checkpoint-<step>)."""
    return sorted(path for path in output_dir.glob("ray/*/checkpoint-*") if (path / "trainer_state.json").is_file())


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, tmp_path_factory) -> tuple[Path, str]:
    """The run's output folder and what the driver printed."""
    output = tmp_path_factory.mktemp("ray") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main([*TINY, "--output_dir", str(output), "--num_train_epochs", "2", "--save_total_limit", "2"]) == 0
    return output, printed.getvalue()


def test_two_worker_ray_run_leaves_model_results_log_card_and_checkpoints(two_worker_run, capsys):
    output, printed = two_worker_run
    results = json.loads((output / "all_results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 16  # 512 / (2 x 32) = 8 steps x 2 epochs
    assert 0.1 < results["knn_top1"] <= 1
    # The driver's summary has the final report, which comes after the last checkpoint.
    summary = json.loads(printed.split("Metrics: ", 1)[1].splitlines()[0])
    assert summary["knn_top1"] == results["knn_top1"] and summary["train_runtime"] == results["train_runtime"]
    model = AutoModel.from_pretrained(output)
    assert all(torch.isfinite(value).all() for value in model.state_dict().values())
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "training_args.json"} <= {
        path.name for path in output.iterdir()
    }
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    # The recipe's kNN monitor runs after each epoch (step 8) and at the end: the curve has two points.
    assert [entry["step"] for entry in log] == [4, 8, 8, 12, 16, 16]
    assert [entry["step"] for entry in log if "knn_top1" in entry] == [8, 16]
    assert log[0]["epoch"] == 0.5  # two workers share each epoch
    assert [path.name for path in ray_checkpoints(output)] == ["checkpoint-000000012", "checkpoint-000000016"]
    # The last checkpoint is written before the final evaluation (a failing evaluation cannot lose it).
    assert read_trainer_state(ray_checkpoints(output)[-1])["global_step"] == 16
    assert AutoModel.from_pretrained(ray_checkpoints(output)[0] / "model").config.num_classes == 16
    assert ray.is_initialized()  # run_ray left the module's instance running


def test_latest_finds_the_newest_checkpoint_in_ray_storage(two_worker_run, capsys):
    """`--resume_from_checkpoint latest` looks in the Ray storage too; here it continues the Ray run locally."""
    output, _ = two_worker_run
    assert (
        main(
            [
                *TINY,
                "--launcher",
                "local",
                "--output_dir",
                str(output),
                "--max_steps",
                "20",
                "--resume_from_checkpoint",
                "latest",
            ]
        )
        == 0
    )
    assert logged_steps(output)[-3:] == [16, 20, 20]  # the Ray run's final line, then steps 17-20 here
    assert json.loads((output / "all_results.json").read_text())["global_step"] == 20


def test_a_diverged_ray_run_exits_with_the_error_and_keeps_its_last_good_checkpoint(ray_cluster, tmp_path, capsys):
    """Steps 1-12 train normally; the self-labeling phase (steps 13-16) has an absurd lr. Rank 0's final report
    (status diverged) reaches the driver although no checkpoint comes with it."""
    output = tmp_path / "run"
    absurd_self_labeling = ["--self_label_learning_rate", "1e30", "--self_label_warmup_epochs", "0"]
    options = ["--max_steps", "16", "--self_label_epochs", "0.5", *absurd_self_labeling]
    assert main([*TINY, "--output_dir", str(output), *options]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "The loss became" in errors[0], errors
    assert "The last good checkpoint (step 12) is kept." in errors[0]
    assert not (output / "all_results.json").exists() and not (output / "model.safetensors").exists()
    assert ray_checkpoints(output)[-1].name == "checkpoint-000000012"


def test_more_workers_than_the_cluster_has_fails_before_any_worker_starts(ray_cluster, tmp_path, capsys):
    started = time.perf_counter()
    assert main([*TINY, "--output_dir", str(tmp_path / "run"), "--num_workers", "8", "--max_steps", "4"]) == 2
    assert time.perf_counter() - started < 10
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [
        (
            "error: 8 workers need 8 CPU but the Ray cluster has 2. Lower --num_workers or "
            "--resources_per_worker, or add nodes."
        )
    ]
    assert not (tmp_path / "run" / "ray").exists() and not (tmp_path / "run" / "log.jsonl").exists()
    assert not train_workers()


def train_workers() -> list[psutil.Process]:
    """This test process's own Ray Train worker processes (other Ray instances on the machine are not ours)."""
    return [
        child for child in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(_cmdline(child))
    ]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []
