"""Run a sweep: check everything, start (or restore) the Ray Tune experiment, write the outputs."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..hub import require_hub_token
from ..outputs import RAY_STORAGE_DIR, remove_paths
from ..training.arguments import PretrainArguments
from ..training.launch import check_nodes_import_package, start_ray, validate_before_launch, worker_resources
from ..training.storage import is_remote, open_storage
from .arguments import SweepSetup
from .results import (
    BEST_CONFIG,
    PLOT_FILE,
    TRIALS_CSV,
    TRIALS_MD,
    plain,
    plot_metric,
    trials_table,
    write_best_config,
    write_tables,
)
from .space import Dimension, SearchSpaceError, check_search_algorithm, param_space, parse_search_space
from .trial import run_trial, trial_arguments

logger = logging.getLogger(__name__)

DRIVER_CPU = 0.01  # the trial function that drives a Ray Train run only waits; 0 is refused by Ray
# Trials checkpoint every epoch and Tune keeps one checkpoint each, so Tune snapshots its state at every
# epoch end; with short trials that is expected, not a bottleneck worth a warning.
QUIET_TUNE_ENV = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


class SweepError(ValueError):
    """A sweep that cannot start: bad options, search space or resources. Raised before any trial runs."""


@dataclass
class SweepPlan:
    """A checked sweep: where it lives and what every trial gets."""

    setup: SweepSetup
    dimensions: list[Dimension]
    output_dir: Path
    storage: str  # a local folder or an object-storage URI (s3://bucket/prefix)
    name: str

    @property
    def experiment_path(self) -> str:
        return f"{self.storage}/{self.name}"

    @property
    def train_storage(self) -> str:
        """Ray Train runs of multi-worker trials (a folder or an object-storage URI)."""
        return f"{self.storage}/{self.name}-train-runs"

    @property
    def trials_dir(self) -> Path:
        return self.output_dir / "trials"

    @property
    def max_epochs(self) -> int:
        return max(1, math.ceil(self.setup.base.training.num_train_epochs))


@dataclass
class SweepOutcome:
    table_path: Path
    best_config: Path | None
    best: dict
    unfinished: int


def plan_sweep(setup: SweepSetup) -> SweepPlan:
    """Every check that needs no Ray: search space, values, metric, algorithm, output folder."""
    sweep, base = setup.sweep, setup.base
    dimensions = parse_search_space(sweep.search_space)
    check_search_algorithm(dimensions, sweep.search_alg)
    if sweep.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise SweepError("--search_alg optuna needs Optuna: `pip install optuna`, or use --search_alg random.")
    _check_metric(sweep.metric, base)
    _check_hub(sweep, base)
    output_dir = Path(base.training.output_dir).resolve()
    storage = base.launch.storage_path or str(output_dir / RAY_STORAGE_DIR)
    storage = storage.rstrip("/") if is_remote(storage) else str(Path(storage).resolve())
    plan = SweepPlan(setup, dimensions, output_dir, storage, sweep.sweep_name or output_dir.name)
    _check_values(plan)
    _check_output(plan)
    return plan


def _check_metric(metric: str, base: PretrainArguments) -> None:
    if not base.data.eval_split:
        raise SweepError(f"Trials report {metric} only with a held-out labelled split: set --eval_split (e.g. test).")


def _check_hub(sweep, base: PretrainArguments) -> None:
    if not sweep.push_best_to_hub:
        return
    try:
        require_hub_token(base.training.hub_token, "--push_best_to_hub")
    except ValueError as error:
        raise SweepError(str(error)) from error


def _check_values(plan: SweepPlan) -> None:
    """Build (and validate like a launch) the arguments of every listed value and both ends of every range."""
    base = plan.setup.base.to_dict()
    probe_dir = plan.trials_dir / "probe-not-created"
    validate_before_launch(trial_arguments(base, {}, probe_dir))
    for dimension in plan.dimensions:
        for value in dimension.probe_values():
            try:
                validate_before_launch(trial_arguments(base, {dimension.name: value}, probe_dir))
            except (ValueError, TypeError) as error:
                raise SearchSpaceError(
                    f"search_space.{dimension.name}: the value {value!r} cannot be trained: {error}"
                ) from error


def _experiment_saved(plan: SweepPlan) -> bool:
    """Whether Tune has saved a sweep at the experiment path (a folder, or objects in a bucket)."""
    import pyarrow.fs

    if not is_remote(plan.storage):
        return (Path(plan.experiment_path) / "tuner.pkl").exists()
    filesystem, path = open_storage(plan.experiment_path)
    return filesystem.get_file_info(f"{path}/tuner.pkl").type == pyarrow.fs.FileType.File


def _delete_stored(location: str) -> None:
    """Delete a folder of the sweep's storage, local or in a bucket, if it exists."""
    import pyarrow.fs

    if not is_remote(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    filesystem, path = open_storage(location)
    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        filesystem.delete_dir(path)


def _check_output(plan: SweepPlan) -> None:
    exists = _experiment_saved(plan)
    if plan.setup.sweep.resume and not exists:
        raise SweepError(
            f"--resume: no sweep to restore at {plan.experiment_path}; check --output_dir, "
            "--storage_path and --sweep_name."
        )
    if not plan.setup.sweep.resume and exists:
        if not plan.setup.base.training.overwrite_output_dir:
            raise SweepError(
                f"{plan.experiment_path} already holds a sweep: pass --resume to continue it, "
                "--overwrite_output_dir to start anew, or another --output_dir."
            )
        remove_sweep_outputs(plan)


def remove_sweep_outputs(plan: SweepPlan) -> list[Path]:
    """--overwrite_output_dir: delete the previous sweep's own outputs (its trials, tables, plot, best config
    and Ray Tune state), never other files in the output folder."""
    results = [plan.output_dir / name for name in (TRIALS_CSV, TRIALS_MD, PLOT_FILE, BEST_CONFIG)]
    removed = remove_paths([plan.trials_dir, *results])
    for location in (plan.experiment_path, plan.train_storage):
        _delete_stored(location)
    for path in removed:
        logger.info("--overwrite_output_dir: removed %s of the previous sweep.", path)
    return removed


def trial_resources(base: PretrainArguments) -> dict:
    """What one trial holds: its worker's resources, or a tiny driver share plus num_workers workers (the most
    an elastic range may use)."""
    per_worker = worker_resources(base)
    workers = base.launch.max_workers
    if workers == 1:
        return dict(per_worker)
    total = {name: amount * workers for name, amount in per_worker.items()}
    total["CPU"] = total.get("CPU", 0) + DRIVER_CPU
    return total


def trial_function_resources(base: PretrainArguments) -> dict:
    """What Tune reserves for the trial function: its worker, or only the driver share (Ray Train's workers
    reserve their own)."""
    return dict(worker_resources(base)) if base.launch.max_workers == 1 else {"CPU": DRIVER_CPU}


def concurrent_trials(requested: int, per_trial: dict, available: dict) -> int:
    """How many trials may run at once; an error if the cluster cannot hold the requested number."""
    fits = min(math.floor(available.get(name, 0) / amount + 1e-9) for name, amount in per_trial.items() if amount)
    if fits < 1:
        raise SweepError(
            f"One trial needs {_describe(per_trial)} but the Ray cluster has {_describe(available)}. "
            "Lower --num_workers or --resources_per_worker."
        )
    if requested > fits:
        raise SweepError(
            f"--max_concurrent_trials {requested} needs {_describe(per_trial)} each, but the Ray "
            f"cluster holds only {fits} such trial(s) ({_describe(available)}). Lower "
            "--max_concurrent_trials, --num_workers or --resources_per_worker."
        )
    return requested or fits


def _describe(resources: dict) -> str:
    return ", ".join(
        f"{amount:g} {name}"
        for name, amount in sorted(resources.items())
        if name in ("CPU", "GPU") or not name.startswith(("node:", "memory", "object_store"))
    )


def _search_algorithm(plan: SweepPlan, concurrency: int):
    """Random/grid variants (Tune's generator, seeded) or Optuna's TPE, each running `concurrency` at most."""
    sweep = plan.setup.sweep
    if sweep.search_alg == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=sweep.sweep_seed), max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrency, random_state=sweep.sweep_seed)


def _scheduler(plan: SweepPlan):
    sweep = plan.setup.sweep
    if sweep.scheduler == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=plan.max_epochs,
        grace_period=min(sweep.grace_period, plan.max_epochs),
        reduction_factor=sweep.reduction_factor,
    )


def _trainable(plan: SweepPlan):
    from ray import tune

    setup = {
        "base": plan.setup.base.to_dict(),
        "metric": plan.setup.sweep.metric,
        "trials_dir": str(plan.trials_dir),
        "train_storage": plan.train_storage,
    }
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_function_resources(plan.setup.base))


def _tuner(plan: SweepPlan, concurrency: int):
    from ray import tune

    trainable = _trainable(plan)
    if plan.setup.sweep.resume:
        logger.info("Restoring the sweep at %s.", plan.experiment_path)
        return tune.Tuner.restore(
            plan.experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    sweep = plan.setup.sweep
    return tune.Tuner(
        trainable,
        param_space=param_space(plan.dimensions, sweep.search_alg),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode="max",
            search_alg=_search_algorithm(plan, concurrency),
            scheduler=_scheduler(plan),
            num_samples=sweep.num_samples,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.storage,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )


def run_sweep(setup: SweepSetup) -> SweepOutcome:
    """Check, run (or resume) the sweep, and write trials.csv/.md, the plot and best_config.yaml.

    Uses the Ray instance this process is already connected to, if any; otherwise starts or joins one
    (--ray_address, $RAY_ADDRESS) like `recipes/pretrain.py`."""
    import ray

    plan = plan_sweep(setup)
    for key, value in QUIET_TUNE_ENV.items():
        os.environ.setdefault(key, value)
    started_here = not ray.is_initialized()
    if started_here:
        start_ray(setup.base)
    try:
        concurrency = concurrent_trials(
            setup.sweep.max_concurrent_trials, trial_resources(setup.base), ray.cluster_resources()
        )
        check_nodes_import_package(setup.base)
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        result_grid = _tuner(plan, concurrency).fit()
    finally:
        if started_here:
            ray.shutdown()
    return write_outputs(plan, result_grid)


def write_outputs(plan: SweepPlan, result_grid) -> SweepOutcome:
    from ray.tune import ExperimentAnalysis

    metric = plan.setup.sweep.metric
    saved = {trial.trial_id: trial.status for trial in ExperimentAnalysis(plan.experiment_path).trials}
    table = trials_table(result_grid, plan.dimensions, metric, saved, plan.trials_dir)
    table_path, _ = write_tables(table, plan.output_dir, metric)
    unfinished = int((table["outcome"] == "unfinished").sum()) if not table.empty else 0
    scored = table.dropna(subset=[metric]) if not table.empty else table
    if scored.empty:
        return SweepOutcome(table_path, None, {}, unfinished)
    plot_metric(scored, plan.dimensions, metric, plan.output_dir / PLOT_FILE)
    completed = scored[scored["outcome"] == "completed"]
    best = (completed if not completed.empty else scored).iloc[0].to_dict()
    params = {d.name: plain(best[d.name]) for d in plan.dimensions}
    best_args = trial_arguments(plan.setup.base.to_dict(), params, best["output_dir"])
    _restore_recipe_settings(best_args, plan.setup.base)
    header = (
        f"Best trial {best['trial_id']} of sweep {plan.name}: {metric} = {best[metric]:.4f} "
        f"({best['outcome']}).\nRun it: python recipes/pretrain.py --config {plan.output_dir / BEST_CONFIG}"
    )
    best_config = write_best_config(best_args, plan.output_dir / BEST_CONFIG, header)
    if plan.setup.sweep.push_best_to_hub and best["outcome"] == "completed":
        push_best_model(plan, Path(best["output_dir"]))
    return SweepOutcome(table_path, best_config, best, unfinished)


def _restore_recipe_settings(best: PretrainArguments, base: PretrainArguments) -> None:
    """The recipe keeps the user's own launch and Hub settings; only the trial's values and the per-epoch
    evaluation that scored it are taken from the sweep."""
    best.training.overwrite_output_dir = base.training.overwrite_output_dir
    best.training.push_to_hub = base.training.push_to_hub
    best.launch.launcher = base.launch.launcher


def push_best_model(plan: SweepPlan, model_dir: Path) -> None:
    from ..hub import HubPusher

    training = plan.setup.base.training
    pusher = HubPusher(
        plan.setup.sweep.push_best_to_hub,
        hub_strategy="end",
        hub_token=training.hub_token,
        hub_private_repo=training.hub_private_repo,
        hub_revision=training.hub_revision,
    )
    summary = pusher.finish(model_dir, timeout=600)
    logger.info("Best model pushed: %s", summary)
