"""Launchers of the per-worker loop: Ray Train (laptop to multi-node cluster, resuming after failures) or
this process (single process, or each process of `accelerate launch`). Bad input fails here, in the
driver, before any worker starts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..distributed import bunch_layout
from ..hub import require_hub_token
from ..outputs import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, LOG_FILE, MODEL_DIR, RAY_STORAGE_DIR, RESULTS_FILE
from .arguments import PretrainArguments, arguments_from_dict

# The run (`.loop`) and the data checks (`.data`) are imported where they are used: they load `datasets`, which
# `import twist_hf.training` must not need (the GPU benchmark imports `twist_hf.training.step` without it).

logger = logging.getLogger(__name__)

# Measured with Ray 2.60: a 0.5 s controller poll resumes from the newest checkpoint after a worker dies and
# cuts the cost of a report from ~1.3 s to ~30 ms; a collective timeout turns a mistaken barrier into an error.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_COLLECTIVE_TIMEOUT_S": "900"}


class LaunchError(ValueError):
    """A problem with the run's configuration or environment, found before training starts."""


def world_size_for(args: PretrainArguments) -> int:
    if args.launch.launcher == "ray":
        return args.launch.num_workers
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_before_launch(args: PretrainArguments) -> None:
    """Everything that can be checked without training: config, batch/bunch layout, data, output, Hub."""
    from .data import check_dataset

    config = args.model.build_config()
    _check_bunch(config, args.training.per_device_train_batch_size, world_size_for(args))
    check_dataset(args.data, need_labels=bool(args.data.eval_split))
    _check_output_dir(args)
    if args.training.push_to_hub:
        _check_hub_token(args)
    if args.data.augmentation_backend == "ray_data" and args.launch.launcher != "ray":
        raise LaunchError("--augmentation_backend ray_data streams from Ray Data tasks: it needs --launcher ray.")
    if args.launch.use_gpu and args.launch.launcher == "local" and not torch.cuda.is_available():
        raise LaunchError("--use_gpu was given but this machine has no CUDA device.")


def _check_bunch(config, batch: int, world: int) -> None:
    if config.last_norm != "bunch":
        return
    try:
        bunch_layout(batch, config.bunch_size, world)
    except ValueError as error:
        raise LaunchError(f"{error} (options: --bunch_size, --per_device_train_batch_size, --num_workers)") from error


def _check_output_dir(args: PretrainArguments) -> None:
    output = Path(args.training.output_dir)
    used = output.is_dir() and any(output.iterdir())
    if used and not args.training.overwrite_output_dir and args.training.resume_from_checkpoint is None:
        raise LaunchError(
            f"The output folder {output} already holds a run. Pass --resume_from_checkpoint latest to continue "
            "it, --overwrite_output_dir to train anew into it, or another --output_dir."
        )


def _check_hub_token(args: PretrainArguments) -> None:
    try:
        require_hub_token(args.training.hub_token, "--push_to_hub")
    except ValueError as error:
        raise LaunchError(str(error)) from error


def run_local(args: PretrainArguments) -> dict:
    """The loop in this process (one process, or each process of `accelerate launch`)."""
    from .loop import LocalReporter, train_worker

    return train_worker(args, LocalReporter(args.training.output_dir, args.training.save_total_limit))


class RayReporter:
    """Metrics and checkpoints through `ray.train.report` (a barrier: every rank calls it)."""

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        import ray.train

        ray_checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
        name = f"{CHECKPOINT_PREFIX}{metrics['global_step']:09d}" if checkpoint is not None else None
        ray.train.report(metrics, checkpoint=ray_checkpoint, checkpoint_dir_name=name)

    def restored_checkpoint(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint is not None else None


def ray_train_loop(loop_config: dict) -> None:
    """What each Ray Train worker runs."""
    from .loop import train_worker

    args = arguments_from_dict(loop_config["args"])
    set_worker_threads(args)
    train_worker(args, RayReporter())


def set_worker_threads(args: PretrainArguments) -> None:
    """One torch thread per CPU the worker holds in Ray."""
    torch.set_num_threads(max(1, int(worker_resources(args).get("CPU", 1))))


def worker_resources(args: PretrainArguments) -> dict:
    """Ray resources of one worker: as given, else 1 CPU (and 1 GPU with --use_gpu)."""
    if args.launch.resources_per_worker:
        return dict(args.launch.resources_per_worker)
    return {"CPU": 1, "GPU": 1} if args.launch.use_gpu else {"CPU": 1}


def _check_cluster(args: PretrainArguments) -> None:
    import ray

    available = ray.cluster_resources()
    for resource, amount in worker_resources(args).items():
        needed = amount * args.launch.num_workers
        if available.get(resource, 0) < needed:
            raise LaunchError(
                f"{args.launch.num_workers} workers need {needed:g} {resource} but the Ray cluster has "
                f"{available.get(resource, 0):g}. Lower --num_workers or --resources_per_worker, or add nodes."
            )


def start_ray(args: PretrainArguments) -> bool:
    """Start or join a Ray cluster; False when this process already runs Ray (its owner shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    address = args.launch.ray_address or os.environ.get("RAY_ADDRESS")
    env_vars = {key: os.environ[key] for key in RAY_TRAIN_ENV}
    if args.training.hub_token:
        env_vars["HF_TOKEN"] = args.training.hub_token
    ray.init(
        address=address,
        include_dashboard=args.launch.ray_dashboard if address is None else None,
        runtime_env={"env_vars": env_vars},
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    return True


def build_torch_trainer(args: PretrainArguments, name: str, storage_path: str, callbacks: list | None = None):
    """The Ray Train trainer of one pretraining run: `num_workers` workers of `ray_train_loop`, failures
    resumed from the last checkpoint, the last `save_total_limit` checkpoints kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .ray_data import train_datasets

    resources = worker_resources(args)
    return TorchTrainer(
        train_loop_per_worker=ray_train_loop,
        train_loop_config={"args": args.to_dict()},
        datasets=train_datasets(args),
        scaling_config=ScalingConfig(
            num_workers=args.launch.num_workers, use_gpu=args.launch.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=args.launch.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=args.training.save_total_limit),
        ),
    )


def run_ray(args: PretrainArguments) -> dict:
    """The loop on `num_workers` Ray Train workers; a worker failure resumes from the last checkpoint."""
    import ray

    started = start_ray(args)
    try:
        _check_cluster(args)
        output_dir = Path(args.training.output_dir).resolve()
        storage = args.launch.storage_path or str(output_dir / RAY_STORAGE_DIR)
        trainer = build_torch_trainer(
            args,
            name=f"{output_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage if "://" in storage else str(Path(storage).resolve()),
        )
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        _ensure_output_folder(result, output_dir)
        metrics["checkpoints"] = result.path
        return metrics
    finally:
        if started:
            ray.shutdown()


def _ensure_output_folder(result, output_dir: Path) -> None:
    """On a multi-node cluster rank 0 wrote the outputs on its own node: fetch the model from storage."""
    if (output_dir / "config.json").is_file() or result.checkpoint is None:
        return
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / MODEL_DIR, output_dir, dirs_exist_ok=True)


def launch(args: PretrainArguments) -> dict:
    """Validate, run with the chosen launcher, and say where everything is."""
    validate_before_launch(args)
    if args.training.overwrite_output_dir and args.training.resume_from_checkpoint is None:
        shutil.rmtree(args.training.output_dir, ignore_errors=True)
    metrics = run_ray(args) if args.launch.launcher == "ray" else run_local(args)
    if metrics.get("status") == "diverged":
        raise RuntimeError(metrics.get("error", "Training diverged."))
    return metrics


def summary_lines(args: PretrainArguments, metrics: dict) -> list[str]:
    """What a user needs after a run: the numbers and where each output is."""

    output = Path(args.training.output_dir).resolve()
    lines = [
        f"Model (AutoModel.from_pretrained): {output}",
        f"Results: {output / RESULTS_FILE}",
        f"Training log: {output / LOG_FILE}",
    ]
    if "checkpoints" in metrics:
        lines.append(f"Checkpoints (Ray storage): {metrics['checkpoints']}")
    else:
        lines.append(f"Checkpoints: {output / CHECKPOINTS_DIR}")
    shown = {
        key: metrics[key]
        for key in ("knn_top1", "knn_top5", "train_runtime", "train_images_per_second", "skipped_images")
        if key in metrics
    }
    lines.append("Metrics: " + json.dumps(shown))
    return lines
