"""One optimisation step of TWIST pretraining, the unit that `PretrainingRun` repeats and that the benchmarks
time: this step's schedule values, autocast forward (with the momentum teacher's targets), a finite-loss check,
backward, gradient clipping, the optimiser step and the teacher update. Needs neither Ray nor `datasets`."""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ..modeling_twist import TwistForPreTraining, TwistForPreTrainingOutput
from .optim import TrainingSchedule, apply_schedule

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss stopped being finite; the last good checkpoint is kept."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"The loss became {loss} at step {step}")
        self.step, self.loss = step, loss


def rank_step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's random draws (drop path) at one step: different on every rank, and the same again
    when a resumed run reaches that step."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def cpu_runs_bf16_natively() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512-BF16). Without them PyTorch emulates bf16
    matmuls and convolutions: the default recipe's step then runs 9x slower than in fp32 (AMD EPYC Zen 3, AVX2)."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def mixed_precision(bf16: bool, fp16: bool, on_gpu: bool) -> str:
    """Accelerate's `mixed_precision` for the run. bf16 on a CPU that only emulates it falls back to fp32 with a
    warning: recipes ask for bf16 for its speed, and there it has none."""
    if bf16 and not on_gpu and not cpu_runs_bf16_natively():
        logger.warning(
            "bf16 asked for, but this CPU has neither AMX nor AVX512-BF16, so bf16 would be emulated (about 9x "
            "slower than fp32): training in fp32. Pass --bf16 false to silence this."
        )
        return "no"
    return "bf16" if bf16 else "fp16" if fp16 else "no"


def precision_name(accelerate_precision: str) -> str:
    """The name results and cards give Accelerate's `mixed_precision` ("no" is fp32)."""
    return "fp32" if accelerate_precision == "no" else accelerate_precision


def prepare_for_training(
    model: TwistForPreTraining,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    channels_last: bool,
    compile_model: bool,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The student in its memory format, wrapped by Accelerate (DDP over several processes), compiled if asked."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    return (torch.compile(prepared) if compile_model else prepared), optimizer


def build_teacher(model: TwistForPreTraining) -> TwistForPreTraining:
    """A frozen copy of the student, moved by `update_teacher` after each step."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMA of the student's parameters only: the teacher keeps its own batch-norm statistics, updated by its own
    forward passes in training mode, as the authors' code does."""
    for t_param, s_param in zip(teacher.parameters(), student.parameters()):
        t_param.mul_(momentum).add_(s_param.detach(), alpha=1 - momentum)


class TrainingStep:
    """One step of the recipe on an Accelerate-prepared (possibly compiled) model and optimiser.

    `accelerator` sets the precision (its autocast) and the device; `channels_last` the views' memory format.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: TrainingSchedule,
        accelerator: Accelerator,
        teacher: TwistForPreTraining | None = None,
        max_grad_norm: float = 0.0,
        channels_last: bool = False,
    ):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.accelerator, self.teacher, self.max_grad_norm = accelerator, teacher, max_grad_norm
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, step: int, views: list[torch.Tensor]) -> TwistForPreTrainingOutput:
        """Train on one batch of views at global step `step`; raises `TrainingDivergedError` on a non-finite loss
        before it touches the weights."""
        apply_schedule(self.optimizer, self.schedule.lr(step), self.schedule.weight_decay_at(step))
        self._training_mode()
        device = self.accelerator.device
        views = [view.to(device, non_blocking=True, memory_format=self.memory_format) for view in views]
        output = self._forward(step, views)
        if not torch.isfinite(output.loss):
            raise TrainingDivergedError(step, output.loss.item())
        self.accelerator.backward(output.loss)
        if self.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.teacher is not None:
            student = self.accelerator.unwrap_model(self.model)
            update_teacher(self.teacher, student, self.schedule.teacher_momentum_at(step))
        return output

    def _training_mode(self) -> None:
        """Student and teacher train (batch statistics, drop path) whatever mode `from_pretrained` or an
        evaluation left them in."""
        self.model.train()
        if self.teacher is not None:
            self.teacher.train()

    def _forward(self, step: int, views: list[torch.Tensor]) -> TwistForPreTrainingOutput:
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad(), self.accelerator.autocast():
                teacher_logits = self.teacher(views[:2], return_loss=False).logits
        with self.accelerator.autocast():
            return self.model(
                views, teacher_logits=teacher_logits, self_label_quantile=self.schedule.self_label_quantile_at(step)
            )
