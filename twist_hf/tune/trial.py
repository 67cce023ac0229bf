"""One sweep trial = one pretraining run through the same per-worker loop as `recipes/pretrain.py`:
`train_worker` in the trial's own process for one worker, a Ray Train run (`ray_train_loop` on
`num_workers` workers) inside the trial otherwise."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

from ..training.arguments import PretrainArguments, arguments_from_dict
from ..training.monitors import CLUSTER_METRICS
from ..training.storage import checkpoint_folder
from .space import option_section

KNN_METRICS = ("knn_top1", "knn_top5")
SWEEP_METRICS = KNN_METRICS + CLUSTER_METRICS

# Every trial evaluates and checkpoints each epoch (the scheduler needs a score per epoch), trains into its
# own folder, and publishes nothing (the sweep pushes the best model at the end).
TRIAL_SETTINGS = {
    ("training", "eval_strategy"): "epoch",
    ("training", "save_strategy"): "epoch",
    ("training", "overwrite_output_dir"): True,
    ("training", "resume_from_checkpoint"): None,
    ("training", "push_to_hub"): False,
    ("launch", "launcher"): "ray",
}


DIVERGED_FILE = "diverged.json"


class TrialDivergedError(RuntimeError):
    """The trial's loss stopped being finite: Tune marks the trial as errored."""


def trial_arguments(base: dict, params: dict, output_dir: str | Path, metric: str | None = None) -> PretrainArguments:
    """The base recipe (`PretrainArguments.to_dict()`) with the trial's values and the sweep's fixed settings;
    the run's cluster monitor is on when the sweep `metric` is one of its scores."""
    values = copy.deepcopy(base)
    for name, value in params.items():
        values[option_section(name)][name] = value
    for (section, name), value in TRIAL_SETTINGS.items():
        values[section][name] = value
    values["training"]["output_dir"] = str(output_dir)
    if metric in CLUSTER_METRICS:
        values["training"]["cluster_monitor"] = True
    return arguments_from_dict(values)


def scored(metrics: dict, metric: str) -> dict | None:
    """The report to forward to Tune, or None for a report without the sweep metric (a diverged run)."""
    return metrics if metric in metrics else None


class TuneReporter:
    """The loop's `Reporter` in a one-worker trial: scored metrics and checkpoints go straight to Ray Tune."""

    def __init__(self, metric: str):
        self.metric = metric

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        from ray import tune

        if scored(metrics, self.metric) is None:
            return
        tune_checkpoint = tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
        tune.report(metrics, checkpoint=tune_checkpoint)

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        from ray import tune

        return checkpoint_folder(tune.get_checkpoint())


def _report_callback(metric: str):
    """`TuneReportCallback` that forwards only the Ray Train reports that carry the sweep metric."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoredReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if scored(metrics[0], metric) is not None:
                super().after_report(run_context, metrics, checkpoint)

    return ScoredReportCallback()


def run_trial(config: dict, setup: dict) -> None:
    """The Tune trainable. `setup`: base (arguments dict), metric, trials_dir, train_storage."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    metric = setup["metric"]
    args = trial_arguments(setup["base"], config, Path(setup["trials_dir"]) / trial_id, metric)
    marker = Path(args.training.output_dir) / DIVERGED_FILE
    if marker.is_file():
        # A restored sweep (--resume) would train it again with the same seed and diverge again.
        raise TrialDivergedError(f"{json.loads(marker.read_text())['error']} (diverged before --resume; not re-run)")
    if args.launch.num_workers == 1:
        final = _train_in_this_process(args, metric)
    else:
        final = _train_on_ray_train(args, metric, name=trial_id, storage=setup["train_storage"])
    if final.get("status") == "diverged":
        error = final.get("error", "The loss stopped being finite.")
        marker.write_text(json.dumps({"error": error}))
        raise TrialDivergedError(error)


def _train_in_this_process(args: PretrainArguments, metric: str) -> dict:
    from ..data import using_image_limits
    from ..training.launch import set_worker_threads
    from ..training.loop import train_worker

    set_worker_threads(args)
    with using_image_limits(args.data.image_limits()):
        return train_worker(args, TuneReporter(metric))


def _train_on_ray_train(args: PretrainArguments, metric: str, name: str, storage: str) -> dict:
    """A Ray Train run named after the trial: a restored trial re-creates it and Ray Train resumes it."""
    from ..training.launch import build_torch_trainer, ray_run_metrics

    trainer = build_torch_trainer(args, name=name, storage_path=storage, callbacks=[_report_callback(metric)])
    return ray_run_metrics(trainer.fit())
