"""The per-worker pretraining run: plain Accelerate code that runs under Ray Train, under `accelerate launch`,
or in one process. It knows nothing of Ray: a `Reporter` carries metrics and checkpoints to whatever launched
it. The steps are `TrainingStep`s, the views come from `training.data`, the scores from `training.monitors`."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from ..accelerator import fresh_accelerator
from ..hub import HubPusher, resolve_resume_checkpoint
from ..model_card import model_config_summary, write_model_card
from ..modeling_twist import TwistForPreTraining, TwistForPreTrainingOutput
from ..outputs import ARGS_FILE, MODEL_DIR, RESULTS_FILE
from .arguments import PretrainArguments
from .checkpoint import (
    LocalCheckpoints,
    find_latest_checkpoint,
    load_training_state,
    restore_training_state,
    save_checkpoint,
)
from .data import BatchedViews, PerImageViews, build_train_views, crop_transforms
from .monitors import build_monitors, monitor_metrics
from .optim import build_recipe_optimizer, build_schedule
from .preemption import TerminationNotice, TrainingPreempted
from .run_log import RunLog, step_statistics
from .step import (
    TrainingDivergedError,
    TrainingStep,
    build_teacher,
    mixed_precision,
    precision_name,
    prepare_for_training,
    rank_step_seed,
)

logger = logging.getLogger(__name__)

__all__ = ["LocalReporter", "PretrainingRun", "Reporter", "train_worker"]


class Reporter(Protocol):
    """How the loop talks to its launcher. Every rank calls `report`; only rank 0 passes a checkpoint."""

    def report(self, metrics: dict, checkpoint: Path | None) -> None: ...

    def restored_checkpoint(self) -> AbstractContextManager[Path | None]:
        """The checkpoint the launcher restored after a failure (or None), readable inside the `with` block."""


class LocalReporter:
    """For runs without Ray: checkpoints are kept under `<output_dir>/checkpoints/`."""

    def __init__(self, output_dir: str, save_total_limit: int):
        self.checkpoints = LocalCheckpoints(output_dir, save_total_limit)
        self.last_metrics: dict = {}

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        self.last_metrics = metrics
        if checkpoint is not None:
            self.checkpoints.keep(checkpoint, metrics["global_step"])

    def restored_checkpoint(self) -> AbstractContextManager[Path | None]:
        return nullcontext()


def build_accelerator(args: PretrainArguments) -> Accelerator:
    """A fresh Accelerator for this run: device, precision, trackers and their folder."""
    training = args.training
    return fresh_accelerator(
        cpu=not args.launch.use_gpu,
        mixed_precision=mixed_precision(training.bf16, training.fp16, on_gpu=args.launch.use_gpu),
        log_with=list(training.report_to) or None,
        project_config=ProjectConfiguration(
            project_dir=training.output_dir, logging_dir=str(Path(training.output_dir) / "runs")
        ),
    )


def build_model(args: PretrainArguments) -> TwistForPreTraining:
    """The same initial weights on every rank (seeded before building)."""
    torch.manual_seed(args.training.seed)
    config = args.model.build_config()
    if args.model.model_name_or_path is not None:
        return TwistForPreTraining.from_pretrained(args.model.model_name_or_path, config=config)
    return TwistForPreTraining(config)


def _requested_checkpoint(args: PretrainArguments) -> Path | None:
    """The checkpoint --resume_from_checkpoint names, if any (a Hub one is downloaded to the Hub cache)."""
    spec = args.training.resume_from_checkpoint
    if spec is None:
        return None
    if spec == "latest":
        latest = find_latest_checkpoint(args.training.output_dir)
        if latest is None:
            raise FileNotFoundError(f"No checkpoint under {args.training.output_dir} to resume from.")
        return latest
    return Path(resolve_resume_checkpoint(spec, token=args.training.hub_token))


class PretrainingRun:
    """One worker's share of a pretraining run: build, restore, train (checkpointing on the way), finish."""

    def __init__(self, args: PretrainArguments, reporter: Reporter):
        self.accelerator = build_accelerator(args)
        # An elastic run restarted on fewer workers keeps its global batch: each worker takes a larger share.
        args = args.for_world_size(self.accelerator.num_processes)
        self.args, self.reporter, self.training = args, reporter, args.training
        self.output_dir = Path(self.training.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        model = build_model(args)
        self.config = model.config
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.views = build_train_views(args, self.config, rank, world)
        self.global_batch = self.training.per_device_train_batch_size * world
        self.schedule = build_schedule(self.training, self.views.steps_per_epoch, self.global_batch)
        optimizer = build_recipe_optimizer(model, self.training, self.schedule.lr(0))
        self.teacher = build_teacher(model) if self.training.momentum_teacher else None
        # Where the data stands: the epoch and how many of its batches are used (trained on, or skipped on every
        # rank for lack of a decodable image). Epochs end when their data ends, so these are counted, not derived.
        self.epoch, self.batch_in_epoch = 0, 0
        self.start_step = self._restore(model, optimizer)
        self.model, self.optimizer = prepare_for_training(
            model, optimizer, self.accelerator, self.training.channels_last, self.training.torch_compile
        )
        if self.teacher is not None:
            self.teacher.to(self.accelerator.device)
        self.step = TrainingStep(
            self.model,
            self.optimizer,
            self.schedule,
            self.accelerator,
            self.teacher,
            self.training.max_grad_norm,
            self.training.channels_last,
        )
        self.monitors = build_monitors(args, self.config)
        self.pusher = self._build_pusher()
        # A resumed run starts from a good checkpoint: the one it resumed from, until it saves its own.
        self.last_checkpoint_step: int | None = self.start_step or None
        # The first log line of a (re)started run says on how many workers, and where a resumed one picked up.
        self.start_note = {"num_workers": world, "global_batch_size": self.global_batch}
        if self.start_step:
            self.start_note["resumed_from_step"] = self.start_step
        self.last_step = self.start_step
        self.log = RunLog(self.accelerator, self.output_dir, self.schedule.total_steps, self.start_step, args.to_dict())

    def _restore(self, model: TwistForPreTraining, optimizer: torch.optim.Optimizer) -> int:
        # A checkpoint the launcher restored after a failure wins over --resume_from_checkpoint.
        with self.reporter.restored_checkpoint() as restored:
            source = restored or _requested_checkpoint(self.args)
            if source is None:
                return 0
            state = load_training_state(source)
        restore_training_state(
            state, model=model, optimizer=optimizer, teacher=self.teacher, scaler=self.accelerator.scaler
        )
        step = int(state["global_step"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        if self.accelerator.is_main_process:
            logger.info(
                "Resumed from %s at step %d (epoch %d, batch %d).", source, step, self.epoch, self.batch_in_epoch
            )
        return step

    def _build_pusher(self) -> HubPusher | None:
        if not (self.training.push_to_hub and self.accelerator.is_main_process):
            return None
        return HubPusher(
            self.training.hub_model_id,
            hub_strategy=self.training.hub_strategy,
            hub_private_repo=self.training.hub_private_repo,
            hub_token=self.training.hub_token,
            hub_revision=self.training.hub_revision,
            push_timeout=self.training.hub_push_timeout,
        )

    @property
    def student(self) -> TwistForPreTraining:
        return self.accelerator.unwrap_model(self.model)

    def run(self) -> dict:
        """Train to the last step, save the model and its checkpoint, then evaluate and report; returns the final
        metrics (same on every rank). Whatever way it exits, the pending Hub pushes are finished first."""
        started = time.perf_counter()
        notice = TerminationNotice()
        try:
            try:
                self._train(notice)
            except TrainingDivergedError as error:
                return self._stopped({"status": "diverged", "error": self._divergence_message(error)})
            except TrainingPreempted as error:
                return self._stopped({"status": "preempted", "error": str(error)})
            finally:
                notice.close()
            train_seconds = time.perf_counter() - started
            self._save_final_model()
            results = self._results(train_seconds)
            self.log.log(self.schedule.total_steps, results)
            self._finish(results)
            return results
        finally:
            self.log.close()
            self._finish_pushes()

    def _stopped(self, metrics: dict) -> dict:
        """Report why the run stopped early (no new checkpoint: the last one stands)."""
        metrics["global_step"] = self.last_step
        self.reporter.report(metrics, None)
        return metrics

    def _results(self, train_seconds: float) -> dict:
        total = self.schedule.total_steps
        return {
            "status": "completed",
            "global_step": total,
            "train_runtime": train_seconds,
            "train_images_per_second": (total - self.start_step) * self.global_batch / max(train_seconds, 1e-9),
            "precision": self.precision,
            "skipped_images": self._skipped_images(),
            **monitor_metrics(self.monitors, self.student.twist, self.accelerator),
        }

    @property
    def precision(self) -> str:
        """The precision the run trained in, which may differ from the one asked for (bf16 on a CPU without bf16
        instructions trains in fp32)."""
        return precision_name(self.accelerator.mixed_precision)

    def _skipped_images(self) -> int:
        """Undecodable training images skipped (and logged): per read over all ranks on the per-image path,
        where each rank reads its own shard every epoch; once per image on the batched path."""
        skipped, per_rank = self.views.skipped, isinstance(self.views, PerImageViews)
        if skipped.count and (per_rank or self.accelerator.is_main_process):
            logger.warning("Rank %d %s.", self.accelerator.process_index, skipped.summary())
        if not per_rank:
            return skipped.count
        return int(self.accelerator.reduce(torch.tensor(skipped.count, device=self.accelerator.device), "sum"))

    def _train(self, notice: TerminationNotice) -> None:
        """Epoch by epoch to the schedule's last step. An epoch ends when its data ends (batches without a decodable
        image are skipped on every rank, so an epoch may train fewer than `steps_per_epoch` steps); an epoch that
        crosses into the self-labeling phase is read in two pieces, each with its phase's crops. After SIGTERM,
        the step that was running is checkpointed and the run stops."""
        while self.last_step < self.schedule.total_steps:
            piece_start = self.batch_in_epoch
            trained = self._train_piece(notice)
            if self.batch_in_epoch < self.views.steps_per_epoch:
                continue  # the phase changed mid-epoch, or the run reached its last step
            if trained == 0 and piece_start == 0:
                raise ValueError(self._no_decodable_batch_message())
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self.last_step < self.schedule.total_steps:
                self._end_of_epoch(self.last_step)

    def _train_piece(self, notice: TerminationNotice) -> int:
        """Train on the epoch's batches from where the data stands until the epoch, the phase or the run ends;
        returns the steps trained."""
        step = self.last_step
        phase_end = self._phase_end(step)
        trained = 0
        for views in self.views.epoch(self.epoch, self.batch_in_epoch, transform=self._crops(step)):
            self.batch_in_epoch += 1
            if not self._every_rank_has(views):
                continue
            self._train_step(step, views)
            step, trained = step + 1, trained + 1
            self.last_step = step
            self._after_step(step)
            if step < self.schedule.total_steps and notice.on_any_rank(self.accelerator):
                self._checkpoint_and_stop(step)
            if step >= phase_end:
                break
        return trained

    def _every_rank_has(self, views: list[torch.Tensor] | None) -> bool:
        """Whether every rank has a batch for this step (a rank whose batch had no decodable image has none): all
        ranks then take the same steps and no collective waits for a rank that skipped."""
        have = views is not None
        if self.accelerator.num_processes == 1:
            return have
        flag = torch.tensor(int(have), device=self.accelerator.device)
        return int(self.accelerator.reduce(flag, "sum").item()) == self.accelerator.num_processes

    def _no_decodable_batch_message(self) -> str:
        skipped = self.views.skipped
        found = skipped.summary() if skipped.count else "no image was read"
        return (
            f"Epoch {self.epoch} has no batch with a decodable training image on every worker ({found}); check the "
            "training data (--dataset_name, --data_dir, --image_column)."
        )

    def _phase_end(self, step: int) -> int:
        """The first step after the phase that `step` is in."""
        schedule = self.schedule
        return schedule.total_steps if schedule.in_self_label_phase(step) else schedule.phase1_steps

    def _crops(self, step: int):
        """The self-labeling phase's harder crops, or None for the views' own (phase 1)."""
        if not self.schedule.in_self_label_phase(step):
            return None
        return crop_transforms(self.args, self.config, self_labeling=True, batched=isinstance(self.views, BatchedViews))

    def _after_step(self, step: int) -> None:
        self.log.advance()
        if self.training.save_strategy == "steps" and step % self.training.save_steps == 0:
            if step < self.schedule.total_steps:
                self._checkpoint(step, {})

    def _checkpoint_and_stop(self, step: int) -> None:
        if self.last_checkpoint_step != step:
            self._checkpoint(step, {"preempted": True})
        raise TrainingPreempted(step)

    def _end_of_epoch(self, step: int) -> None:
        metrics = {"epoch": self.epoch}
        if self.training.eval_strategy == "epoch" and self.monitors:
            metrics.update(monitor_metrics(self.monitors, self.student.twist, self.accelerator))
            self.log.log(step, metrics)
        if self.training.save_strategy == "epoch":
            self._checkpoint(step, metrics)
        elif "knn_top1" in metrics:
            self.reporter.report({"global_step": step, **metrics}, None)

    def _train_step(self, step: int, views: list[torch.Tensor]) -> None:
        torch.manual_seed(rank_step_seed(self.training.seed, self.accelerator.process_index, step))
        output = self.step(step, views)
        if (step + 1) % self.training.logging_steps == 0:
            self._log_step(step + 1, output)

    def _log_step(self, step: int, output: TwistForPreTrainingOutput) -> None:
        metrics = {
            "loss": output.loss.item(),
            "lr": self.schedule.lr(step - 1),
            **step_statistics(output),
            "img_per_s": self.log.throughput(step, self.global_batch),
            "epoch": self.epoch + self.batch_in_epoch / self.views.steps_per_epoch,
        }
        metrics.update(self.start_note)
        self.start_note = {}
        self.log.log(step, metrics)
        if step > self.schedule.warmup_steps and not self.schedule.in_self_label_phase(step):
            self.log.warn_if_collapsing(step, metrics, self.config.num_classes, output.logits.shape[1])

    def _divergence_message(self, error: TrainingDivergedError) -> str:
        kept = (
            f"The last good checkpoint (step {self.last_checkpoint_step}) is kept."
            if self.last_checkpoint_step is not None
            else "No checkpoint had been saved yet."
        )
        return (
            f"{error}; training stopped. {kept} Lower learning_rate, set max_grad_norm, or use fp32 instead of "
            "fp16, then resume with --resume_from_checkpoint."
        )

    def _checkpoint(self, step: int, metrics: dict) -> None:
        """Every rank reports; rank 0 writes the state into a fresh folder that the reporter keeps."""
        folder = None
        if self.accelerator.is_main_process:
            folder = Path(tempfile.mkdtemp(prefix=f"twist-checkpoint-{step}-"))
            save_checkpoint(
                folder,
                model=self.student,
                optimizer=self.optimizer,
                teacher=self.teacher,
                scaler=self.accelerator.scaler,
                global_step=step,
                epoch=self.epoch,
                step_in_epoch=self.batch_in_epoch,
                metrics=metrics,
            )
            if self.pusher is not None:
                self.pusher.on_save(folder / MODEL_DIR, folder, step=step)
        self.reporter.report({"global_step": step, **metrics}, folder)
        self.last_checkpoint_step = step
        if folder is not None and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)

    def _save_final_model(self) -> None:
        """The last checkpoint and the trained model with its arguments, before anything that can still fail
        (final evaluation, model card, pushes)."""
        self._checkpoint(self.schedule.total_steps, {})
        if self.accelerator.is_main_process:
            self.student.save_pretrained(self.output_dir)
            (self.output_dir / ARGS_FILE).write_text(json.dumps(self.args.to_dict(), indent=2))

    def _finish(self, results: dict) -> None:
        """The final metrics to the launcher, then the results file, the model card and the final push."""
        self.reporter.report(results, None)
        if not self.accelerator.is_main_process:
            return
        (self.output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        write_model_card(
            self.output_dir,
            model_id=self.training.hub_model_id or self.output_dir.name,
            config_summary=model_config_summary(self.config),
            training_summary=self._training_summary(results),
            eval_results=_eval_rows(self.args, results),
        )
        if self.pusher is not None:
            summary, self.pusher = self.pusher.finish(self.output_dir, timeout=self.training.hub_push_timeout), None
            results["hub_push"] = str(summary)

    def _finish_pushes(self) -> None:
        """On an early exit (divergence, a failed evaluation), the pushes already queued still land (within the
        push deadline) and their staging copies are removed."""
        if self.pusher is not None:
            self.pusher, pusher = None, self.pusher
            pusher.finish(timeout=self.training.hub_push_timeout)

    def _training_summary(self, results: dict) -> dict:
        args = self.args
        return {
            "recipe": args.model.model_preset,
            "dataset": args.data.dataset_name,
            "epochs": self.schedule.total_steps / self.views.steps_per_epoch,
            "steps": self.schedule.total_steps,
            "global batch size": self.global_batch,
            "workers": self.accelerator.num_processes,
            "hardware": "GPU" if args.launch.use_gpu else "CPU",
            "precision": self.precision,
            "wall time (s)": round(results["train_runtime"], 1),
            "local crops": args.data.num_local_crops,
            "optimizer": self.training.optim,
        }


def _eval_rows(args: PretrainArguments, results: dict) -> list[tuple]:
    if "knn_top1" not in results:
        return []
    return [("image-classification", args.data.dataset_name, f"knn{args.training.knn_k}_top1", results["knn_top1"])]


def train_worker(args: PretrainArguments, reporter: Reporter) -> dict:
    """Entry point of one worker: build, (resume,) train, evaluate, save."""
    return PretrainingRun(args, reporter).run()
