"""Sweeps with Ray Tune: bad input fails before any trial; real tiny sweeps on a local Ray instance (ASHA stopping
a trial, an interrupted sweep resumed, a diverged trial), and the best config run by recipes/pretrain.py. (Trials
of two workers spread over the nodes of a cluster: tests/test_cluster.py.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from twist_hf.training.arguments import parse_pretrain_args
from twist_hf.training.launch import RAY_TRAIN_ENV
from twist_hf.tune import SweepError, parse_sweep_args, plan_sweep, run_sweep
from twist_hf.tune.runner import concurrent_trials, trial_resources

REPO = Path(__file__).resolve().parents[1]

# A few steps per epoch of the tiny model on a Fashion-MNIST subset.
TINY = {
    "base_recipe": str(REPO / "recipes/configs/fmnist.yaml"),
    "model_preset": "tiny-resnet",
    "max_train_samples": 256,
    "max_eval_samples": 200,
    "per_device_train_batch_size": 32,
    "bunch_size": 64,
    "local_crop_size": 8,
    "num_local_crops": 0,
    "num_train_epochs": 2,
    "logging_steps": 4,
    "report_to": ["none"],
    "num_workers": 1,
    "search_space": {"tau": {"grid": [0.2, 0.4]}},
    "scheduler": "fifo",
    "max_concurrent_trials": 1,
    "num_samples": 1,
}


FIND_RECIPE = """
import sys
from twist_hf.tune import parse_sweep_args
assert not sys.modules["twist_hf"].__file__.startswith(sys.argv[2]), "imported from the checkout"
print(parse_sweep_args(["--config", sys.argv[1]]).sweep.base_recipe)
"""


def test_the_sweep_finds_its_recipe_with_the_package_outside_the_checkout(tmp_path):
    """No lookup through the source checkout: a copy of the package elsewhere resolves the YAML's own path."""
    shutil.copytree(REPO / "twist_hf", tmp_path / "site" / "twist_hf", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "sweeps").mkdir()
    shutil.copy(REPO / "recipes/configs/fmnist.yaml", tmp_path / "sweeps" / "base.yaml")
    (tmp_path / "sweeps" / "sweep.yaml").write_text("base_recipe: base.yaml\nsearch_space: {tau: {grid: [0.2]}}\n")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run(
        [sys.executable, "-c", FIND_RECIPE, str(tmp_path / "sweeps" / "sweep.yaml"), str(REPO)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str((tmp_path / "sweeps" / "base.yaml").resolve())


def test_a_base_recipe_named_relative_to_the_checkout_elsewhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="Base recipe recipes/configs/fmnist.yaml not found.*absolute path"):
        parse_sweep_args(["--base_recipe", "recipes/configs/fmnist.yaml", "--search_space", '{"tau": {"grid": [0.2]}}'])


def sweep_setup(tmp_path: Path, name: str = "sweep", **options):
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**TINY, **options}))
    return parse_sweep_args(["--config", str(config), "--output_dir", str(tmp_path / name)])


def read_trials(output_dir: Path) -> pd.DataFrame:
    return pd.read_csv(output_dir / "trials.csv")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"search_space": {"taus": {"grid": [0.2]}}}, "Unknown parameter 'taus'.*Did you mean tau"),
        ({"search_space": {"lam2": {"uniform": [2.0, 1.0]}}}, "inverted"),
        ({"search_space": {"lam2": {"uniform": [1.0, 1.0]}}}, "empty"),
        ({"search_space": {"lam1": {"choice": []}}}, "non-empty list"),
        ({"search_space": {"tau": {"loguniform": [0.0, 1.0]}}}, "0 < low"),
        ({"search_space": {"tau": {"normal": [0.0, 1.0]}}}, "grid, choice, uniform, loguniform"),
        ({"search_space": {"optim": {"uniform": [0.0, 1.0]}}}, "needs a numeric option"),
        ({"search_space": {"output_dir": {"grid": ["a"]}}}, "cannot be swept"),
        ({"search_space": {}}, "search space is empty"),
        ({"search_space": {"tau": {"grid": [0.2, -1.0]}}}, "value -1.0 cannot be trained.*tau must be > 0"),
        ({"search_space": {"lam1": {"uniform": [0.0, 1.0]}}, "search_alg": "grid"}, "needs grid or choice"),
        ({"metric": "loss"}, "--metric must be one of 'knn_top1'"),
        ({"eval_split": ""}, "held-out labelled split"),
        ({"learning_rat": 0.1}, "Unknown option.*learning_rat"),
    ],
)
def test_bad_input_fails_before_any_trial(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        plan_sweep(sweep_setup(tmp_path, **options))
    assert not (tmp_path / "sweep").exists()


def test_optuna_requested_without_optuna_is_a_clear_error(tmp_path):
    pytest.importorskip("ray")
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(SweepError, match="pip install optuna"):
            plan_sweep(sweep_setup(tmp_path, search_alg="optuna", search_space={"tau": {"choice": [0.2, 0.4]}}))
    else:
        plan = plan_sweep(sweep_setup(tmp_path, search_alg="optuna", search_space={"tau": {"choice": [0.2]}}))
        assert plan.dimensions[0].name == "tau"


def test_trial_resources_and_concurrency_limits(tmp_path):
    one = sweep_setup(tmp_path).base
    two = sweep_setup(tmp_path, num_workers=2, resources_per_worker='{"CPU": 0.5}').base
    assert trial_resources(one) == {"CPU": 1}
    assert trial_resources(two) == {"CPU": pytest.approx(1.01)}
    assert concurrent_trials(0, {"CPU": 1}, {"CPU": 2.0}) == 2
    assert concurrent_trials(1, {"CPU": 1.01}, {"CPU": 2.0}) == 1
    with pytest.raises(SweepError, match="holds only 1 such trial"):
        concurrent_trials(2, {"CPU": 1.01}, {"CPU": 2.0})
    with pytest.raises(SweepError, match="One trial needs 2.01 CPU"):
        concurrent_trials(1, {"CPU": 2.01}, {"CPU": 2.0})


@pytest.fixture(scope="module")
def local_ray():
    """One local 2-CPU Ray instance for all sweeps of this file (each sweep joins it)."""
    import ray

    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": dict(RAY_TRAIN_ENV)}, include_dashboard=False)
    yield ray
    ray.shutdown()


def _asha_must_stop(first_epoch_scores: list[float]) -> list[bool]:
    """ASHA (reduction factor 2, one rung at epoch 1) on trials run one after another: a trial stops when
    its score is below the median of the scores recorded at the rung so far (its own included)."""
    import numpy as np

    return [
        score < np.percentile(first_epoch_scores[: index + 1], 50) for index, score in enumerate(first_epoch_scores)
    ]


@pytest.mark.slow
def test_one_worker_sweep_asha_outputs_and_best_config_round_trip(tmp_path, local_ray):
    # The second trial's kNN memory bank is 4x smaller, so its epoch-1 score is far below the first's.
    setup = sweep_setup(
        tmp_path,
        scheduler="asha",
        grace_period=1,
        reduction_factor=2,
        search_space={"max_train_samples": {"grid": [256, 64, 128]}, "tau": {"uniform": [0.3, 0.5]}},
    )
    outcome = run_sweep(setup)
    output = tmp_path / "sweep"
    trials = read_trials(output)
    assert len(trials) == 3 and outcome.unfinished == 0
    assert list(trials["rank"]) == [1, 2, 3]
    assert trials["knn_top1"].is_monotonic_decreasing
    assert trials["tau"].between(0.3, 0.5).all()

    by_samples = trials.set_index("max_train_samples")
    assert by_samples.loc[256, "outcome"] == "completed" and by_samples.loc[256, "epochs"] == 2
    assert by_samples.loc[64, "outcome"] == "stopped early" and by_samples.loc[64, "epochs"] == 1
    first_epoch = [_first_epoch_knn(Path(by_samples.loc[n, "output_dir"])) for n in (256, 64, 128)]
    expected_stops = _asha_must_stop(first_epoch)
    assert [by_samples.loc[n, "outcome"] == "stopped early" for n in (256, 64, 128)] == expected_stops

    markdown = (output / "trials.md").read_text()
    assert markdown.index(str(trials.loc[0, "trial_id"])) < markdown.index(str(trials.loc[2, "trial_id"]))
    assert (output / "metric_vs_parameters.png").stat().st_size > 10_000

    best = yaml.safe_load((output / "best_config.yaml").read_text())
    winner = trials[trials["outcome"] == "completed"].iloc[0]
    assert best["tau"] == pytest.approx(winner["tau"])
    assert best["max_train_samples"] == winner["max_train_samples"]
    assert "output_dir" not in best and best["model_preset"] == "tiny-resnet"
    _pretrain_runs_best_config(output / "best_config.yaml", tmp_path / "retrain", best["tau"])


def _first_epoch_knn(trial_dir: Path) -> float:
    """The kNN top-1 the trial logged at the end of its first epoch (log.jsonl, written by the loop)."""
    records = [json.loads(line) for line in (trial_dir / "log.jsonl").read_text().splitlines()]
    return next(record["knn_top1"] for record in records if "knn_top1" in record)


def _pretrain_runs_best_config(config: Path, output_dir: Path, tau: float) -> None:
    args = parse_pretrain_args(["--config", str(config)])
    assert args.model.tau == pytest.approx(tau) and args.training.eval_strategy == "epoch"
    run = subprocess.run(
        [
            sys.executable,
            "recipes/pretrain.py",
            "--config",
            str(config),
            "--launcher",
            "local",
            "--output_dir",
            str(output_dir),
            "--num_train_epochs",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((output_dir / "config.json").read_text())["tau"] == pytest.approx(tau)
    assert 0 < json.loads((output_dir / "all_results.json").read_text())["knn_top1"] <= 1


# Trials long enough that Tune's stop signal, sent once both have a checkpoint, lands before they finish (at 3
# epochs of 8 tiny steps they sometimes completed first).
EPOCHS_TO_INTERRUPT = 8


@pytest.mark.slow
def test_interrupted_sweep_resumes_from_trial_checkpoints(tmp_path, local_ray):
    setup = sweep_setup(tmp_path, num_train_epochs=EPOCHS_TO_INTERRUPT)
    plan = plan_sweep(setup)
    interrupt_after_first_checkpoint(Path(plan.experiment_path), trials=2)
    first = run_sweep(sweep_setup(tmp_path, num_train_epochs=EPOCHS_TO_INTERRUPT))
    assert first.unfinished >= 1

    resumed = parse_sweep_args(
        ["--config", str(tmp_path / "sweep.yaml"), "--output_dir", str(tmp_path / "sweep"), "--resume"]
    )
    outcome = run_sweep(resumed)
    trials = read_trials(tmp_path / "sweep")
    assert outcome.unfinished == 0 and list(trials["outcome"]) == ["completed", "completed"]
    assert sorted(trials["tau"]) == [0.2, 0.4]
    steps_per_epoch = 256 // 32
    for trial_dir in map(Path, trials["output_dir"]):
        logged = [
            json.loads(line)["step"] for line in (trial_dir / "log.jsonl").read_text().splitlines() if "loss" in line
        ]
        first_epoch_steps = [step for step in logged if step <= steps_per_epoch]
        # A restart from scratch would log the first epoch twice; a resume continues after its checkpoint.
        assert sorted(first_epoch_steps) == sorted(set(first_epoch_steps)) == [4, 8]
        assert max(logged) == EPOCHS_TO_INTERRUPT * steps_per_epoch


def interrupt_after_first_checkpoint(experiment_path: Path, trials: int, timeout: float = 240) -> None:
    """Send this process SIGUSR1 (Tune's 'stop and save the sweep' signal) once every trial has a checkpoint that
    Tune has registered: a checkpoint folder exists a moment before its result is processed (a stop in between
    restarts that trial from scratch), so each trial's result.json must name it."""

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(map(has_a_registered_checkpoint, experiment_path.glob("*/result.json"))) >= trials:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def has_a_registered_checkpoint(result_file: Path) -> bool:
    """Whether a result Tune has processed for this trial came with a checkpoint."""
    try:
        results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return False  # read while being written
    return any(result.get("checkpoint_dir_name") for result in results)


def test_overwrite_output_dir_replaces_the_sweeps_own_outputs_only(tmp_path):
    output = tmp_path / "sweep"
    (output / "ray" / "sweep").mkdir(parents=True)
    (output / "ray" / "sweep" / "tuner.pkl").write_bytes(b"old sweep")
    (output / "trials" / "old-trial").mkdir(parents=True)
    (output / "trials.csv").write_text("old")
    (output / "thesis.tex").write_text("\\chapter{Mine}")
    (output / "data").mkdir()
    (output / "data" / "labels.csv").write_text("mine too")
    plan_sweep(sweep_setup(tmp_path, overwrite_output_dir=True))
    assert sorted(path.relative_to(output).as_posix() for path in output.rglob("*")) == [
        "data",
        "data/labels.csv",
        "ray",
        "thesis.tex",
    ]


@pytest.mark.slow
def test_resume_reports_a_diverged_trial_instead_of_rerunning_it_with_the_same_seed(tmp_path, local_ray):
    """The trial's self-labeling epoch (the second) has an absurd lr: it diverges, and --resume must not train
    it again (same seed, same divergence) but report it as diverged."""
    diverging = {
        "self_label_epochs": 1,
        "self_label_warmup_epochs": 0,
        "max_train_samples": 64,
        "max_eval_samples": 64,
        "search_space": {"self_label_learning_rate": {"grid": [1e30]}},
    }
    run_sweep(sweep_setup(tmp_path, **diverging))
    trial_dir = Path(read_trials(tmp_path / "sweep")["output_dir"][0])
    log = (trial_dir / "log.jsonl").read_text()
    assert "The loss became" in (trial_dir / "diverged.json").read_text()

    resumed = parse_sweep_args(
        ["--config", str(tmp_path / "sweep.yaml"), "--output_dir", str(tmp_path / "sweep"), "--resume"]
    )
    run_sweep(resumed)
    assert (trial_dir / "log.jsonl").read_text() == log
    (outcome,) = read_trials(tmp_path / "sweep")["outcome"]
    assert outcome.startswith("error") and "TrialDivergedError" in outcome
