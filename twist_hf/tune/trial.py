"""One sweep trial = one pretraining run through the same per-worker loop as `recipes/pretrain.py`:
`train_worker` in the trial's own process for one worker, a Ray Train run (`ray_train_loop` on
`num_workers` workers) inside the trial otherwise."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..training.arguments import PretrainArguments, arguments_from_dict
from ..training.checkpoint import MODEL_DIR
from ..training.loop import train_worker
from .space import option_section

KNN_METRICS = ("knn_top1", "knn_top5")
CLUSTER_METRICS = ("cluster_nmi", "cluster_acc", "cluster_ami", "cluster_ari")
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


def trial_arguments(base: dict, params: dict, output_dir: str | Path) -> PretrainArguments:
    """The base recipe (`PretrainArguments.to_dict()`) with the trial's values and the sweep's fixed settings."""
    values = copy.deepcopy(base)
    for name, value in params.items():
        values[option_section(name)][name] = value
    for (section, name), value in TRIAL_SETTINGS.items():
        values[section][name] = value
    values["training"]["output_dir"] = str(output_dir)
    return arguments_from_dict(values)


class Objective:
    """Makes sure a report carries the sweep metric: the head's cluster scores are computed from the reported
    checkpoint when asked for (kNN scores come from the loop itself)."""

    def __init__(self, metric: str, data_args: dict):
        self.metric = metric
        self.data_args = data_args

    def complete(self, metrics: dict, checkpoint_dir: Path | None) -> dict | None:
        """The metrics to forward to Tune, or None for a report without a score (a diverged run)."""
        if self.metric in CLUSTER_METRICS and checkpoint_dir is not None:
            metrics = {**metrics, **head_cluster_metrics(Path(checkpoint_dir) / MODEL_DIR, self.data_args)}
        return metrics if self.metric in metrics else None


@torch.no_grad()
def head_cluster_metrics(model_dir: Path, data_args: dict, batch_size: int = 512) -> dict[str, float]:
    """NMI/ACC/AMI/ARI of the TWIST head's argmax on the held-out split (the split the kNN monitor uses)."""
    from ..evaluation.clustering import cluster_metrics
    from ..modeling_twist import TwistForPreTraining
    from ..training.arguments import DataArguments
    from ..training.data import load_split
    from ..transforms import batched_eval_transform

    model = TwistForPreTraining.from_pretrained(model_dir).twist.eval()
    config = model.config
    data = DataArguments(**data_args)
    split = load_split(data, data.eval_split, config.image_size, max_samples=data.max_eval_samples)
    logits = torch.cat(
        [
            model(
                pixel_values=batched_eval_transform(
                    torch.from_numpy(split.images[start : start + batch_size]),
                    config.image_size,
                    config.image_mean,
                    config.image_std,
                )
            ).logits
            for start in range(0, len(split.images), batch_size)
        ]
    )
    labels = torch.as_tensor(split.labels)
    scores = cluster_metrics(logits, labels, num_labels=int(labels.max()) + 1)
    return {name: scores[name] for name in CLUSTER_METRICS}


class TuneReporter:
    """The loop's `Reporter` in a one-worker trial: metrics and checkpoints go straight to Ray Tune."""

    def __init__(self, objective: Objective):
        self.objective = objective

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        from ray import tune

        complete = self.objective.complete(metrics, checkpoint)
        if complete is None:
            return
        tune_checkpoint = tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
        tune.report(complete, checkpoint=tune_checkpoint)

    def restored_checkpoint(self) -> Path | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint is not None else None


def _report_callback(objective: Objective):
    """`TuneReportCallback` that forwards only scored reports, with the cluster scores added when asked."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None and objective.metric in CLUSTER_METRICS:
                with checkpoint.as_directory() as folder:
                    complete = objective.complete(metrics[0], Path(folder))
            else:
                complete = objective.complete(metrics[0], None)
            if complete is not None:
                super().after_report(run_context, [complete, *metrics[1:]], checkpoint)

    return ObjectiveReportCallback()


def run_trial(config: dict, setup: dict) -> None:
    """The Tune trainable. `setup`: base (arguments dict), metric, trials_dir, train_storage."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    args = trial_arguments(setup["base"], config, Path(setup["trials_dir"]) / trial_id)
    marker = Path(args.training.output_dir) / DIVERGED_FILE
    if marker.is_file():
        # A restored sweep (--resume) would train it again with the same seed and diverge again.
        raise TrialDivergedError(f"{json.loads(marker.read_text())['error']} (diverged before --resume; not re-run)")
    objective = Objective(setup["metric"], setup["base"]["data"])
    if args.launch.num_workers == 1:
        final = _train_in_this_process(args, objective)
    else:
        final = _train_on_ray_train(args, objective, name=trial_id, storage=setup["train_storage"])
    if final.get("status") == "diverged":
        error = final.get("error", "The loss stopped being finite.")
        marker.write_text(json.dumps({"error": error}))
        raise TrialDivergedError(error)


def _train_in_this_process(args: PretrainArguments, objective: Objective) -> dict:
    from ..data import using_image_limits
    from ..training.launch import set_worker_threads

    set_worker_threads(args)
    with using_image_limits(args.data.image_limits()):
        return train_worker(args, TuneReporter(objective))


def _train_on_ray_train(args: PretrainArguments, objective: Objective, name: str, storage: str) -> dict:
    """A Ray Train run named after the trial: a restored trial re-creates it and Ray Train resumes it."""
    from ..training.launch import build_torch_trainer

    trainer = build_torch_trainer(args, name=name, storage_path=storage, callbacks=[_report_callback(objective)])
    return dict(trainer.fit().metrics or {})
