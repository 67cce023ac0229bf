"""Launchers of the per-worker loop: Ray Train (laptop to multi-node cluster, resuming after failures) or
this process (single process, or each process of `accelerate launch`). Bad input fails here, in the
driver, before any worker starts."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data import using_image_limits
from ..distributed import bunch_layout
from ..hub import require_hub_token
from ..outputs import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    LOG_FILE,
    MODEL_DIR,
    RAY_STORAGE_DIR,
    RESULTS_FILE,
    remove_run_outputs,
)
from .arguments import PretrainArguments, arguments_from_dict
from .checkpoint import TRAINER_STATE, CheckpointError, checkpoint_problem, find_latest_checkpoint
from .storage import (
    StorageError,
    check_storage_reachable,
    checkpoint_folder,
    find_latest_stored_checkpoint,
    is_remote,
)

# The run (`.loop`) and the data checks (`.data`) are imported where they are used: they load `datasets`, which
# `import twist_hf.training` must not need (the GPU benchmark imports `twist_hf.training.step` without it).

logger = logging.getLogger(__name__)

# Measured with Ray 2.60: a 0.5 s controller poll resumes from the newest checkpoint after a worker dies and
# cuts the cost of a report from ~1.3 s to ~30 ms; a collective timeout turns a mistaken barrier into an error.
# A worker group that cannot start within 30 s (e.g. its node just died and Ray still counts it alive) is torn
# down and started again at once, instead of after Ray's default 60 s.
RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_COLLECTIVE_TIMEOUT_S": "900",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
}
# Final statuses of a run that stopped before its last step (the loop's final report says which and why).
STOPPED_EARLY = ("diverged", "preempted")
# How long the per-node checks may take before the cluster is called unusable.
NODE_CHECK_TIMEOUT_S = 120
# An elastic run that lost a node asks for its old size once more before it shrinks: a shorter worker-group start
# timeout bounds that retry. It waits only for resources, not for workers to start (README, "Elastic runs").
ELASTIC_RAY_TRAIN_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}


class LaunchError(ValueError):
    """A problem with the run's configuration or environment, found before training starts."""


def world_sizes_for(args: PretrainArguments) -> range:
    """Every number of workers the run may have: the Ray range, or this `accelerate launch` world."""
    if args.launch.launcher == "ray":
        return args.launch.worker_counts
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return range(world, world + 1)


def validate_before_launch(args: PretrainArguments) -> None:
    """Everything that can be checked without training: config, batch/bunch layout, data, output, Hub."""
    from .data import check_dataset

    config = args.model.build_config()
    _check_batch_layout(args, config)
    check_dataset(args.data, need_labels=bool(args.data.eval_split))
    _check_output_dir(args)
    _check_resume(args)
    if args.training.push_to_hub:
        _check_hub_token(args)
    if args.data.augmentation_backend == "ray_data" and args.launch.launcher != "ray":
        raise LaunchError("--augmentation_backend ray_data streams from Ray Data tasks: it needs --launcher ray.")
    if args.launch.use_gpu and args.launch.launcher == "local" and not torch.cuda.is_available():
        raise LaunchError("--use_gpu was given but this machine has no CUDA device.")
    if args.launch.launcher == "ray" and is_remote(args.launch.storage_path):
        try:
            check_storage_reachable(args.launch.storage_path)
        except StorageError as error:
            raise LaunchError(str(error)) from error
        stored_resume_checkpoint(args)  # `latest` with nothing in the bucket fails here


def _check_batch_layout(args: PretrainArguments, config) -> None:
    """Every worker count the run may have must split the global batch into equal per-worker batches that
    fit the last norm's bunches; otherwise say which counts and global batch sizes would."""
    training, counts = args.training, world_sizes_for(args)
    if args.launch.is_elastic and args.launch.launcher == "ray" and training.global_train_batch_size is None:
        raise LaunchError(
            f"--num_workers {args.launch.num_workers} resizes the run, and TWIST's batch statistics need the same "
            f"global batch at every size: set --global_train_batch_size (e.g. "
            f"{_fitting_global_batches(config, training.per_device_train_batch_size * counts.stop, counts)[0]})."
        )
    for world in counts:
        problem = _layout_problem(config, training, world)
        if problem is None:
            continue
        if training.global_train_batch_size is None:
            raise LaunchError(f"{problem} (options: --bunch_size, --per_device_train_batch_size, --num_workers)")
        size = training.global_train_batch_size
        fitting_counts = [
            count for count in range(1, 2 * counts.stop + 8) if not _layout_problem(config, training, count)
        ]
        fitting_sizes = _fitting_global_batches(config, size, counts)
        raise LaunchError(
            f"{problem} Worker counts that fit --global_train_batch_size {size}: "
            f"{', '.join(map(str, fitting_counts)) or 'none'}; global batch sizes that fit every count in "
            f"--num_workers {args.launch.num_workers}: {', '.join(map(str, fitting_sizes))}."
        )


def _layout_problem(config, training, world: int) -> str | None:
    """Why `world` workers cannot share this batch (None if they can)."""
    try:
        batch = training.per_device_batch(world)
        if config.last_norm == "bunch":
            bunch_layout(batch, config.bunch_size, world)
    except ValueError as error:
        return f"With {world} workers: {error}"
    return None


def _fitting_global_batches(config, near: int, counts: range, how_many: int = 4) -> list[int]:
    """The `how_many` global batch sizes closest to `near` that every worker count in `counts` can share."""
    step = math.lcm(*counts)
    candidates = range(step, max(4 * near, 64 * step) + 1, step)
    fitting = [size for size in candidates if all(_fits(config, size, world) for world in counts)]
    return sorted(sorted(fitting, key=lambda size: abs(size - near))[:how_many])


def _fits(config, global_batch: int, world: int) -> bool:
    if config.last_norm != "bunch":
        return True
    try:
        bunch_layout(global_batch // world, config.bunch_size, world)
    except ValueError:
        return False
    return True


def _check_output_dir(args: PretrainArguments) -> None:
    output = Path(args.training.output_dir)
    used = output.is_dir() and any(output.iterdir())
    if used and not args.training.overwrite_output_dir and args.training.resume_from_checkpoint is None:
        raise LaunchError(
            f"The output folder {output} already holds a run. Pass --resume_from_checkpoint latest to continue "
            "it, --overwrite_output_dir to train anew into it, or another --output_dir."
        )


def _check_resume(args: PretrainArguments) -> None:
    """`latest` needs a readable checkpoint in output_dir (in the bucket for remote Ray storage, which
    `stored_resume_checkpoint` searches); a local checkpoint folder must read back whole."""
    spec = args.training.resume_from_checkpoint
    if spec == "latest" and args.launch.launcher == "ray" and is_remote(args.launch.storage_path):
        return
    if spec == "latest":
        if find_latest_checkpoint(args.training.output_dir) is None:
            raise LaunchError(
                f"--resume_from_checkpoint latest: no readable checkpoint under {args.training.output_dir}. "
                "Check --output_dir, or start anew without --resume_from_checkpoint."
            )
    elif spec is not None and (Path(spec) / TRAINER_STATE).is_file():
        problem = checkpoint_problem(spec)
        if problem is not None:
            raise CheckpointError(
                f"Cannot resume from {spec}: {problem}. It was probably cut short by a crash or a full disk; "
                "pass an older checkpoint, or --resume_from_checkpoint latest, which skips unreadable ones."
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
    """Metrics and checkpoints through `ray.train.report` (a barrier: every rank calls it). Every report says on
    how many nodes the workers run; `initial_checkpoint` (a storage URI) is where a fresh run resumes from."""

    def __init__(self, num_nodes: int = 1, initial_checkpoint: str | None = None):
        self.num_nodes = num_nodes
        self.initial_checkpoint = initial_checkpoint

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        import ray.train

        metrics = {**metrics, "num_nodes": self.num_nodes}
        ray_checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
        name = f"{CHECKPOINT_PREFIX}{metrics['global_step']:09d}" if checkpoint is not None else None
        ray.train.report(metrics, checkpoint=ray_checkpoint, checkpoint_dir_name=name)

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.initial_checkpoint is not None:
            checkpoint = ray.train.Checkpoint(self.initial_checkpoint)
        return checkpoint_folder(checkpoint)


def ray_train_loop(loop_config: dict) -> dict:
    """What each Ray Train worker runs; rank 0's return value reaches the driver as `Result.return_value`."""
    from .loop import train_worker
    from .preemption import TrainingPreempted, sigterm_caught_through_ray_actor

    args = arguments_from_dict(loop_config["args"])
    if loop_config.get("hub_token") is not None:
        import ray

        args.training.hub_token = ray.get(loop_config["hub_token"])
    set_worker_threads(args)
    placement = worker_placement()
    with using_image_limits(args.data.image_limits()), sigterm_caught_through_ray_actor():
        results = train_worker(args, RayReporter(len(set(placement)), loop_config.get("initial_checkpoint")))
    if results.get("status") == "preempted":
        # A worker failure to Ray Train: it restarts the workers from the checkpoint of the step just reported.
        raise TrainingPreempted(results["global_step"])
    return results


def worker_placement() -> list[str]:
    """Every rank's Ray node ("<ip> <node id>"), in rank order; rank 0 logs them with each rank's process id (Ray
    Train forwards worker logs to the driver's output)."""
    import ray
    import ray.train
    import torch.distributed as dist

    context = ray.get_runtime_context()
    here = (f"{ray.util.get_node_ip_address()} {context.get_node_id()[:12]}", os.getpid())
    if not (dist.is_available() and dist.is_initialized()):
        placement = [here]
    else:
        placement = [None] * dist.get_world_size()
        dist.all_gather_object(placement, here)
    if ray.train.get_context().get_world_rank() == 0:
        logger.info(
            "; ".join(f"rank {rank} runs on node {node} (pid {pid})" for rank, (node, pid) in enumerate(placement))
        )
    return [node for node, _ in placement]


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
    workers = args.launch.min_workers
    for resource, amount in worker_resources(args).items():
        needed = amount * workers
        if available.get(resource, 0) < needed:
            raise LaunchError(
                f"{workers} workers need {needed:g} {resource} but the Ray cluster has "
                f"{available.get(resource, 0):g}. Lower --num_workers or --resources_per_worker, or add nodes."
            )
    check_nodes_import_package(args)


# What a worker imports first: a node where one of these cannot be found cannot host a worker.
WORKER_MODULES = ("twist_hf", "torch", "transformers", "accelerate", "datasets")


def missing_modules_probe() -> Callable[[tuple[str, ...]], list[str]]:
    """The function run on each node: the modules among its argument that the node's Python cannot find. A lambda,
    so that Ray ships it by value: running it imports nothing (a module-level function would make the node import
    twist_hf, torch and transformers first, seconds per node)."""
    return lambda names: [name for name in names if importlib.util.find_spec(name) is None]


def check_nodes_import_package(args: PretrainArguments) -> None:
    """A tiny task on every other alive node that could host a worker looks up twist_hf and what its workers import:
    a node without the package (or with another Python) fails here, before the run, instead of as a worker crash
    loop. The driver's own node has just imported it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    needed, driver_node = worker_resources(args), ray.get_runtime_context().get_node_id()
    nodes = [
        node
        for node in ray.nodes()
        if node["Alive"]
        and node["NodeID"] != driver_node
        and all(node["Resources"].get(name, 0) >= amount for name, amount in needed.items())
    ]
    probe = ray.remote(num_cpus=0, max_retries=0)(missing_modules_probe())
    pending = {
        node["NodeManagerAddress"] + " " + node["NodeID"][:12]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(WORKER_MODULES)
        for node in nodes
    }
    for node, ref in pending.items():
        try:
            missing = ray.get(ref, timeout=NODE_CHECK_TIMEOUT_S)
        except Exception as error:  # any failure means the workers could not run there either
            missing = [f"twist_hf ({type(error).__name__}: {str(error)[:300]})"]
        if missing:
            raise LaunchError(
                f"Node {node} cannot import {', '.join(missing)}. Install the package on every node (same Python "
                'version), e.g. in the cluster\'s setup_commands; see README.md, "Run on a cluster".'
            )


def start_ray(args: PretrainArguments) -> bool:
    """Start or join a Ray cluster; False when this process already runs Ray (its owner shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    defaults = {**RAY_TRAIN_ENV, **(ELASTIC_RAY_TRAIN_ENV if args.launch.is_elastic else {})}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    address = args.launch.ray_address or os.environ.get("RAY_ADDRESS")
    # No secret here: Ray's dashboard and job records show the runtime_env (see `train_loop_config`).
    env_vars = {key: os.environ[key] for key in defaults}
    ray.init(
        address=address,
        include_dashboard=args.launch.ray_dashboard if address is None else None,
        runtime_env={"env_vars": env_vars},
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    return True


def build_torch_trainer(
    args: PretrainArguments,
    name: str,
    storage_path: str,
    callbacks: list | None = None,
    initial_checkpoint: str | None = None,
):
    """The Ray Train trainer of one pretraining run: `num_workers` workers (or a range) of `ray_train_loop` placed by
    `placement_strategy`, failures resumed from the last checkpoint, the last `save_total_limit` checkpoints
    kept; a fresh run starts from `initial_checkpoint` (a storage URI) when given."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .ray_data import train_datasets

    resources = worker_resources(args)
    return TorchTrainer(
        train_loop_per_worker=ray_train_loop,
        train_loop_config=train_loop_config(args, initial_checkpoint),
        datasets=train_datasets(args),
        scaling_config=ScalingConfig(
            num_workers=_ray_num_workers(args),
            use_gpu=args.launch.use_gpu,
            resources_per_worker=resources,
            placement_strategy=args.launch.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=args.launch.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=args.training.save_total_limit),
        ),
    )


def train_loop_config(args: PretrainArguments, initial_checkpoint: str | None = None) -> dict:
    """What every worker receives: the arguments without the Hub token, the checkpoint a fresh run starts from,
    and the token (if any) as an object in Ray's object store, whose contents Ray's dashboard and job records
    never show."""
    import ray

    token = args.training.hub_token
    return {
        "args": args.to_dict(),
        "initial_checkpoint": initial_checkpoint,
        "hub_token": ray.put(token) if token else None,
    }


def _ray_num_workers(args: PretrainArguments) -> int | tuple[int, int]:
    """Ray Train's form: a count, or (min, max) for an elastic run."""
    launch = args.launch
    return (launch.min_workers, launch.max_workers) if launch.is_elastic else launch.num_workers


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
            storage_path=storage if is_remote(storage) else str(Path(storage).resolve()),
            initial_checkpoint=stored_resume_checkpoint(args),
        )
        result = trainer.fit()
        metrics = ray_run_metrics(result)
        if metrics.get("status") not in STOPPED_EARLY:
            _ensure_output_folder(result, output_dir)
            _record_run_results(metrics, output_dir)
        metrics["checkpoints"] = result.path
        return metrics
    finally:
        if started:
            ray.shutdown()


def ray_run_metrics(result) -> dict:
    """A finished Ray Train run's metrics: its newest checkpoint's (all that `Result.metrics` holds), updated with
    rank 0's final results, which come after that checkpoint (the final kNN, or why the run stopped)."""
    return {**(result.metrics or {}), **(result.return_value or {})}


def stored_resume_checkpoint(args: PretrainArguments) -> str | None:
    """The storage URI a Ray run resumes from when the checkpoints live in object storage: the newest
    checkpoint of this output folder's runs for `latest`, or a checkpoint URI given as such. None otherwise
    (local checkpoints are found by the workers)."""
    spec, storage = args.training.resume_from_checkpoint, args.launch.storage_path
    if spec is not None and is_remote(spec):
        return spec
    if spec != "latest" or not is_remote(storage):
        return None
    run_prefix = f"{Path(args.training.output_dir).name}-"
    latest = find_latest_stored_checkpoint(storage, run_prefix)
    if latest is None:
        raise LaunchError(
            f"--resume_from_checkpoint latest: no checkpoint of a run named {run_prefix}* under {storage}. Check "
            "--storage_path and --output_dir (runs are named after the output folder)."
        )
    logger.info("Resuming from %s.", latest)
    return latest


def _ensure_output_folder(result, output_dir: Path) -> None:
    """On a multi-node cluster rank 0 wrote the outputs on its own node: fetch the model from storage
    (a local folder or object storage; Ray downloads it to this machine)."""
    if (output_dir / "config.json").is_file() or result.checkpoint is None:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / MODEL_DIR, output_dir, dirs_exist_ok=True)


def _record_run_results(metrics: dict, output_dir: Path) -> None:
    """`all_results.json` in the driver's output folder, with `num_nodes` (Ray nodes that hosted workers): rank
    0's file when it ran on this machine, otherwise its final report."""
    path = output_dir / RESULTS_FILE
    results = json.loads(path.read_text()) if path.is_file() else dict(metrics)
    results["num_nodes"] = metrics.get("num_nodes", 1)
    path.write_text(json.dumps(results, indent=2))


def launch(args: PretrainArguments) -> dict:
    """Validate, run with the chosen launcher, and say where everything is."""
    with using_image_limits(args.data.image_limits()):
        validate_before_launch(args)
        if args.training.overwrite_output_dir and args.training.resume_from_checkpoint is None:
            for path in remove_run_outputs(args.training.output_dir):
                logger.info("--overwrite_output_dir: removed %s of the previous run.", path)
        metrics = run_ray(args) if args.launch.launcher == "ray" else run_local(args)
    if metrics.get("status") in STOPPED_EARLY:
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
