"""The per-worker pretraining loop: plain Accelerate code that runs under Ray Train, under
`accelerate launch`, or in one process. It knows nothing of Ray: a `Reporter` carries metrics and
checkpoints to whatever launched it."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from ..data import SkippedImageCounter
from ..evaluation.knn import knn_evaluate
from ..hub import HubPusher, resolve_resume_checkpoint
from ..model_card import write_model_card
from ..modeling_twist import TwistForPreTraining
from ..transforms import (
    BatchedMultiCrop,
    MultiCropTransform,
    batched_eval_transform,
    self_labeling_crop_scales,
)
from .arguments import PretrainArguments
from .checkpoint import (
    LocalCheckpoints,
    find_latest_checkpoint,
    load_training_state,
    restore_training_state,
    save_checkpoint,
)
from .data import BatchedViews, LabelledImages, PerImageViews, load_split
from .optim import TrainingSchedule, apply_schedule, build_optimizer, default_warmup_epochs

logger = logging.getLogger(__name__)

RESULTS_FILE = "all_results.json"
LOG_FILE = "log.jsonl"
ARGS_FILE = "training_args.json"


class Reporter(Protocol):
    """How the loop talks to its launcher. Every rank calls `report`; only rank 0 passes a checkpoint."""

    def report(self, metrics: dict, checkpoint: Path | None) -> None: ...

    def restored_checkpoint(self) -> Path | None: ...


class LocalReporter:
    """For runs without Ray: checkpoints are kept under `<output_dir>/checkpoints/`."""

    def __init__(self, output_dir: str, save_total_limit: int):
        self.checkpoints = LocalCheckpoints(output_dir, save_total_limit)
        self.last_metrics: dict = {}

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        self.last_metrics = metrics
        if checkpoint is not None:
            self.checkpoints.keep(checkpoint, metrics["global_step"])

    def restored_checkpoint(self) -> Path | None:
        return None


class TrainingDivergedError(RuntimeError):
    """The loss stopped being finite; the last good checkpoint is kept."""


def build_accelerator(args: PretrainArguments) -> Accelerator:
    """A fresh Accelerator for this run. Accelerate keeps one process-wide state and refuses a second run with
    another precision in the same process (notebooks, sweeps, tests); the run-level part of that state is reset
    here, the process group part is kept."""
    training = args.training
    precision = "bf16" if training.bf16 else "fp16" if training.fp16 else "no"
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=not args.launch.use_gpu,
        mixed_precision=precision,
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


def crop_transforms(args: PretrainArguments, config, self_labeling: bool, batched: bool):
    """The multi-crop transform of the phase: the spec's crops, harder in the self-labeling phase."""
    data = args.data
    scales = (
        self_labeling_crop_scales()
        if self_labeling
        else {"global_scale": tuple(data.global_crop_scale), "local_scale": tuple(data.local_crop_scale)}
    )
    common = {
        "global_size": data.global_crop_size or config.image_size,
        "local_size": data.local_crop_size,
        "num_local_crops": data.num_local_crops,
        "mean": config.image_mean,
        "std": config.image_std,
        **scales,
    }
    if batched:
        return BatchedMultiCrop(**common, seed=args.training.seed)
    return MultiCropTransform(**common)


def build_train_views(args: PretrainArguments, config, rank: int, world_size: int, total_steps_hint: int | None):
    training, data = args.training, args.data
    transform = crop_transforms(args, config, self_labeling=False, batched=data.augmentation_backend == "batched")
    if data.augmentation_backend == "batched":
        skipped = SkippedImageCounter()
        split = load_split(
            data, data.train_split, config.image_size, counter=skipped, max_samples=data.max_train_samples
        )
        return BatchedViews(
            split, transform, training.per_device_train_batch_size, rank, world_size, training.seed, skipped
        )
    return PerImageViews(
        data,
        transform,
        training.per_device_train_batch_size,
        rank,
        world_size,
        training.seed,
        total_steps_hint,
        pin_memory=args.launch.use_gpu,
    )


def build_schedule(args: PretrainArguments, steps_per_epoch: int, global_batch: int) -> TrainingSchedule:
    training = args.training
    scale = global_batch / 256 if training.scale_lr_by_batch else 1.0
    epochs = training.num_train_epochs
    total = training.max_steps if training.max_steps > 0 else max(1, int(round(epochs * steps_per_epoch)))
    self_label_steps = int(round(training.self_label_epochs * steps_per_epoch))
    if training.warmup_steps > 0:
        warmup = training.warmup_steps
    elif training.warmup_ratio > 0:
        warmup = int(training.warmup_ratio * total)
    else:
        phase1_epochs = (total - self_label_steps) / steps_per_epoch
        warmup_epochs = (
            training.warmup_epochs if training.warmup_epochs is not None else default_warmup_epochs(phase1_epochs)
        )
        warmup = int(round(warmup_epochs * steps_per_epoch))
    phase1 = total - self_label_steps
    return TrainingSchedule(
        total_steps=total,
        self_label_steps=self_label_steps,
        warmup_steps=min(warmup, max(phase1 - 1, 0)),
        self_label_warmup_steps=min(
            int(round(training.self_label_warmup_epochs * steps_per_epoch)), max(self_label_steps - 1, 0)
        ),
        learning_rate=training.learning_rate * scale,
        self_label_learning_rate=training.self_label_learning_rate * scale,
        min_lr_ratio=training.min_lr_ratio,
        weight_decay=training.weight_decay,
        weight_decay_end=training.weight_decay_end if training.weight_decay_end is not None else training.weight_decay,
        teacher_momentum=training.teacher_momentum,
        self_label_quantile=tuple(training.self_label_quantile),
    )


class KnnMonitor:
    """Weighted kNN top-1 of the backbone features: memory bank = train split, queries = eval split.

    Feature extraction is split over the ranks and gathered back in dataset order.
    """

    def __init__(self, args: PretrainArguments, config):
        data = args.data
        self.size, self.mean, self.std = config.image_size, config.image_mean, config.image_std
        self.k, self.temperature = args.training.knn_k, args.training.knn_temperature
        self.bank = load_split(data, data.train_split, self.size, max_samples=data.max_train_samples)
        self.queries = load_split(data, data.eval_split, self.size, max_samples=data.max_eval_samples)
        if (self.bank.labels < 0).any() or (self.queries.labels < 0).any():
            raise ValueError(
                "The kNN monitor needs labels in the train and eval splits; pass --label_column, or "
                "--eval_split '' to train without it."
            )

    @torch.no_grad()
    def evaluate(self, twist_model, accelerator: Accelerator, batch_size: int = 512) -> dict[str, float]:
        was_training = twist_model.training
        twist_model.eval()
        bank = self._features(twist_model, self.bank, accelerator, batch_size)
        queries = self._features(twist_model, self.queries, accelerator, batch_size)
        twist_model.train(was_training)
        num_classes = int(max(self.bank.labels.max(), self.queries.labels.max())) + 1
        metrics = knn_evaluate(
            bank,
            torch.tensor(self.bank.labels),
            queries,
            torch.tensor(self.queries.labels),
            num_classes,
            ks=(self.k,),
            temperature=self.temperature,
        )
        return {"knn_top1": metrics["knn_top1"], "knn_top5": metrics["knn_top5"]}

    def _features(self, model, split: LabelledImages, accelerator: Accelerator, batch_size: int) -> torch.Tensor:
        parts = np.array_split(np.arange(len(split.images)), accelerator.num_processes)
        mine = parts[accelerator.process_index]
        chunks = []
        with accelerator.autocast():
            for start in range(0, len(mine), batch_size):
                index = mine[start : start + batch_size]
                pixels = batched_eval_transform(torch.from_numpy(split.images[index]), self.size, self.mean, self.std)
                chunks.append(model(pixel_values=pixels.to(accelerator.device)).pooler_output.float())
        local = torch.cat(chunks) if chunks else torch.zeros(0, model.feature_size, device=accelerator.device)
        return gather_in_order(local, [len(part) for part in parts], accelerator).cpu()


def gather_in_order(local: torch.Tensor, sizes: list[int], accelerator: Accelerator) -> torch.Tensor:
    """Concatenate each rank's rows in rank order (ranks may hold one row more than others)."""
    if accelerator.num_processes == 1:
        return local
    padded = torch.zeros(max(sizes), *local.shape[1:], device=local.device, dtype=local.dtype)
    padded[: local.shape[0]] = local
    gathered = accelerator.gather(padded).view(len(sizes), max(sizes), *local.shape[1:])
    return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])


class RunLog:
    """Rank 0's view of the run: progress bar, `log.jsonl`, Accelerate trackers and collapse warnings."""

    def __init__(
        self, accelerator: Accelerator, output_dir: Path, total_steps: int, start_step: int, tracker_config: dict
    ):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = output_dir / LOG_FILE
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="pretraining", disable=not self.main, dynamic_ncols=True
        )
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.collapse_warnings = 0
        if accelerator.trackers is not None and accelerator.log_with:
            accelerator.init_trackers("twist", config=_flat_scalars(tracker_config))

    def advance(self) -> None:
        self.bar.update(1)

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.accelerator.log(metrics, step=step)
        shown = {
            key: metrics[key]
            for key in ("loss", "kl_loss", "eh_loss", "he_loss", "img_per_s", "knn_top1")
            if key in metrics
        }
        self.bar.set_postfix({key: f"{value:.3g}" for key, value in shown.items()}, refresh=False)

    def throughput(self, step: int, images_per_step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.last_step) * images_per_step / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        return rate

    def warn_if_collapsing(self, step: int, metrics: dict, num_classes: int, batch: int) -> None:
        used, he = metrics.get("classes_used"), metrics.get("he_loss")
        if not self.main or used is None or he is None:
            return
        ceiling = math.log(min(num_classes, batch))
        if he < 0.5 * ceiling or used < max(2, 0.05 * min(num_classes, batch)):
            self.collapse_warnings += 1
            logger.warning(
                "Collapse warning at step %d: the batch uses %d of %d classes and the entropy of the batch-mean "
                "distribution is %.2f of a possible %.2f. The representation may be collapsing: lower "
                "learning_rate, raise lam2, or check that the last norm is on.",
                step,
                used,
                num_classes,
                he,
                ceiling,
            )

    def close(self) -> None:
        self.bar.close()
        if self.main and self.accelerator.log_with:
            self.accelerator.end_training()


def _flat_scalars(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
    return flat


@torch.no_grad()
def step_statistics(output, num_views: int) -> dict:
    """Collapse and agreement monitors of one step (spec section 3, 'useful to log')."""
    argmax = output.logits.argmax(-1)
    raw = output.unnormalized_logits[0].float()
    stats = {
        "agreement": (argmax[0] == argmax[1]).float().mean().item(),
        "classes_used": int(argmax[0].unique().numel()),
        "logit_column_std": raw.std(0).mean().item(),
        "logit_row_std": raw.std(1).mean().item(),
    }
    for name in ("kl_loss", "eh_loss", "he_loss", "self_label_fraction"):
        value = getattr(output, name)
        if value is not None:
            stats[name] = value.item()
    return stats


@torch.no_grad()
def update_teacher(teacher, student, momentum: float) -> None:
    """EMA of the student's parameters; buffers (batch-norm statistics) are copied."""
    for t_param, s_param in zip(teacher.parameters(), student.parameters()):
        t_param.mul_(momentum).add_(s_param.detach(), alpha=1 - momentum)
    for t_buffer, s_buffer in zip(teacher.buffers(), student.buffers()):
        t_buffer.copy_(s_buffer)


def _resume_source(args: PretrainArguments, reporter: Reporter) -> Path | None:
    """A checkpoint Ray restored after a failure wins; otherwise --resume_from_checkpoint."""
    restored = reporter.restored_checkpoint()
    if restored is not None:
        return restored
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
    """One worker's share of a pretraining run."""

    def __init__(self, args: PretrainArguments, reporter: Reporter):
        self.args, self.reporter = args, reporter
        self.training = args.training
        self.accelerator = build_accelerator(args)
        self.output_dir = Path(self.training.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        model = build_model(args)
        self.config = model.config
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.views = build_train_views(
            args, self.config, rank, world, self.training.max_steps if self.training.max_steps > 0 else None
        )
        self.global_batch = self.training.per_device_train_batch_size * world
        self.schedule = build_schedule(args, self.views.steps_per_epoch, self.global_batch)
        optimizer = build_optimizer(
            model,
            self.training.optim,
            self.schedule.lr(0),
            self.training.weight_decay,
            self.training.momentum,
            self.training.lars_eta,
            (self.training.adam_beta1, self.training.adam_beta2),
        )
        self.teacher = self._build_teacher(model)
        self.start_step = self._restore(model, optimizer)
        if self.training.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.training.torch_compile:
            self.model = torch.compile(self.model)
        if self.teacher is not None:
            self.teacher.to(self.accelerator.device)
        self.monitor = KnnMonitor(args, self.config) if args.data.eval_split else None
        self.pusher = self._build_pusher()
        # A resumed run starts from a good checkpoint: the one it resumed from, until it saves its own.
        self.last_checkpoint_step: int | None = self.start_step or None
        # The first log line of a resumed (or Ray-restarted) run says where it picked up.
        self.resumed_from_step: int | None = self.start_step or None

    def _build_teacher(self, model):
        if not self.training.momentum_teacher:
            return None
        teacher = copy.deepcopy(model)
        teacher.requires_grad_(False)
        return teacher

    def _restore(self, model, optimizer) -> int:
        source = _resume_source(self.args, self.reporter)
        if source is None:
            return 0
        state = load_training_state(source)
        restore_training_state(
            state, model=model, optimizer=optimizer, teacher=self.teacher, scaler=self.accelerator.scaler
        )
        if self.accelerator.is_main_process:
            logger.info("Resumed from %s at step %d.", source, state["global_step"])
        return int(state["global_step"])

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
        """Train to the last step, then evaluate and save; returns the final metrics (same on every rank)."""
        total = self.schedule.total_steps
        self.log = RunLog(self.accelerator, self.output_dir, total, self.start_step, self.args.to_dict())
        started = time.perf_counter()
        try:
            self._train(total)
        except TrainingDivergedError as error:
            self.log.close()
            metrics = {"status": "diverged", "error": str(error), "global_step": self.last_step}
            self.reporter.report(metrics, None)
            return metrics
        train_seconds = time.perf_counter() - started
        results = {
            "status": "completed",
            "global_step": total,
            "train_runtime": train_seconds,
            "train_images_per_second": (total - self.start_step) * self.global_batch / max(train_seconds, 1e-9),
            "skipped_images": self._skipped_images(),
        }
        if self.monitor is not None:
            results.update(self.monitor.evaluate(self.student.twist, self.accelerator))
        self.log.log(total, results)
        self.log.close()
        self._finish(results)
        return results

    def _skipped_images(self) -> int:
        """Undecodable training images skipped (and logged): per read over all ranks on the per-image path,
        where each rank reads its own shard every epoch; once per image on the batched path."""
        skipped, per_rank = self.views.skipped, isinstance(self.views, PerImageViews)
        if skipped.count and (per_rank or self.accelerator.is_main_process):
            logger.warning("Rank %d %s.", self.accelerator.process_index, skipped.summary())
        if not per_rank:
            return skipped.count
        return int(self.accelerator.reduce(torch.tensor(skipped.count, device=self.accelerator.device), "sum"))

    def _train(self, total: int) -> None:
        per_epoch = self.views.steps_per_epoch
        step = self.start_step
        self.last_step = step
        while step < total:
            epoch, in_epoch = divmod(step, per_epoch)
            self._set_phase(step)
            for views in self.views.epoch(epoch, skip_steps=in_epoch):
                self._train_step(step, views)
                step += 1
                self.last_step = step
                self.log.advance()
                if self.training.save_strategy == "steps" and step % self.training.save_steps == 0 and step < total:
                    self._checkpoint(step, {})
                if step >= total or self.schedule.in_self_label_phase(step) != self.schedule.in_self_label_phase(
                    step - 1
                ):
                    break
            if step % per_epoch == 0 and step < total:
                self._end_of_epoch(step)

    def _set_phase(self, step: int) -> None:
        if self.schedule.in_self_label_phase(step):
            self.views.transform = crop_transforms(
                self.args, self.config, self_labeling=True, batched=isinstance(self.views, BatchedViews)
            )

    def _end_of_epoch(self, step: int) -> None:
        metrics = {"epoch": step // self.views.steps_per_epoch}
        if self.training.eval_strategy == "epoch" and self.monitor is not None:
            metrics.update(self.monitor.evaluate(self.student.twist, self.accelerator))
            self.log.log(step, metrics)
        if self.training.save_strategy == "epoch":
            self._checkpoint(step, metrics)
        elif "knn_top1" in metrics:
            self.reporter.report({"global_step": step, **metrics}, None)

    def _train_step(self, step: int, views: list[torch.Tensor]) -> None:
        apply_schedule(self.optimizer, self.schedule.lr(step), self.schedule.weight_decay_at(step))
        memory_format = torch.channels_last if self.training.channels_last else torch.contiguous_format
        views = [view.to(self.accelerator.device, non_blocking=True, memory_format=memory_format) for view in views]
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad(), self.accelerator.autocast():
                teacher_logits = self.teacher(views[:2], return_loss=False).logits
        with self.accelerator.autocast():
            output = self.model(
                views, teacher_logits=teacher_logits, self_label_quantile=self.schedule.self_label_quantile_at(step)
            )
        loss = output.loss
        if not torch.isfinite(loss):
            raise TrainingDivergedError(self._divergence_message(step, loss.item()))
        self.accelerator.backward(loss)
        if self.training.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.training.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.teacher is not None:
            update_teacher(self.teacher, self.student, self.schedule.teacher_momentum_at(step))
        if (step + 1) % self.training.logging_steps == 0:
            self._log_step(step + 1, loss, output, len(views))

    def _log_step(self, step: int, loss: torch.Tensor, output, num_views: int) -> None:
        metrics = {
            "loss": loss.item(),
            "lr": self.schedule.lr(step - 1),
            **step_statistics(output, num_views),
            "img_per_s": self.log.throughput(step, self.global_batch),
            "epoch": step / self.views.steps_per_epoch,
        }
        if self.resumed_from_step is not None:
            metrics["resumed_from_step"], self.resumed_from_step = self.resumed_from_step, None
        self.log.log(step, metrics)
        if step > self.schedule.warmup_steps and not self.schedule.in_self_label_phase(step):
            self.log.warn_if_collapsing(step, metrics, self.config.num_classes, output.logits.shape[1])

    def _divergence_message(self, step: int, value: float) -> str:
        kept = (
            f"The last good checkpoint (step {self.last_checkpoint_step}) is kept."
            if self.last_checkpoint_step is not None
            else "No checkpoint had been saved yet."
        )
        return (
            f"The loss became {value} at step {step}; training stopped. {kept} Lower learning_rate, set "
            "max_grad_norm, or use fp32 instead of fp16, then resume with --resume_from_checkpoint."
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
                epoch=step // self.views.steps_per_epoch,
                step_in_epoch=step % self.views.steps_per_epoch,
                metrics=metrics,
            )
            if self.pusher is not None:
                self.pusher.on_save(folder / "model", folder, step=step)
        self.reporter.report({"global_step": step, **metrics}, folder)
        self.last_checkpoint_step = step
        if folder is not None and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)

    def _finish(self, results: dict) -> None:
        """Final checkpoint and the user-facing output folder: model, card, results, arguments."""
        self._checkpoint(self.schedule.total_steps, results)
        if not self.accelerator.is_main_process:
            return
        self.student.save_pretrained(self.output_dir)
        (self.output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        (self.output_dir / ARGS_FILE).write_text(json.dumps(self.args.to_dict(), indent=2))
        write_model_card(
            self.output_dir,
            model_id=self.training.hub_model_id or self.output_dir.name,
            config_summary=_config_summary(self.config),
            training_summary=self._training_summary(results),
            eval_results=_eval_rows(self.args, results),
        )
        if self.pusher is not None:
            summary = self.pusher.finish(self.output_dir, timeout=self.training.hub_push_timeout)
            results["hub_push"] = str(summary)

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
            "wall time (s)": round(results["train_runtime"], 1),
            "local crops": args.data.num_local_crops,
            "optimizer": self.training.optim,
        }


def _config_summary(config) -> dict:
    return {
        "backbone": config.backbone_config.model_type,
        "num_classes (K)": config.num_classes,
        "head_hidden_size": config.head_hidden_size,
        "tau": config.tau,
        "lam1": config.lam1,
        "lam2": config.lam2,
        "image_size": config.image_size,
    }


def _eval_rows(args: PretrainArguments, results: dict) -> list[tuple]:
    if "knn_top1" not in results:
        return []
    return [("image-classification", args.data.dataset_name, f"knn{args.training.knn_k}_top1", results["knn_top1"])]


def train_worker(args: PretrainArguments, reporter: Reporter) -> dict:
    """Entry point of one worker: build, (resume,) train, evaluate, save."""
    return PretrainingRun(args, reporter).run()
