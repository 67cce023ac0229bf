"""Optimisers and schedules of the TWIST recipes (docs/method.md §6): LARS with exclusions, AdamW, SGD,
linear warm-up + cosine learning rate, cosine weight decay, teacher momentum and self-label quantile."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .arguments import TwistTrainingArguments

# Parameters never decayed nor LARS-adapted besides biases and 1-D tensors (ViT position embedding, CLS token).
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "position_embeddings")


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling as the TWIST authors run it (docs/method.md §6.2).

    Per tensor: ``update = lr * trust * (g + wd * w)``, ``buffer = momentum * buffer + update``,
    ``w -= buffer``. The learning rate sits inside the momentum buffer, so a change of lr (warm-up, the
    self-labeling restart) only affects new gradients. ``trust = eta * ||w|| / (||g|| + wd * ||w||)``;
    groups with ``lars_adaptation=False`` (biases, norms) use ``trust = 1``.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 1e-3):
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta, "lars_adaptation": True}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                decay = group["weight_decay"]
                trust = lars_trust_ratio(param, param.grad, decay, group["eta"]) if group["lars_adaptation"] else 1.0
                update = param.grad.add(param, alpha=decay).mul_(trust * group["lr"])
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.sub_(buffer)
        return loss


def lars_trust_ratio(param: torch.Tensor, grad: torch.Tensor, weight_decay: float, eta: float) -> torch.Tensor | float:
    """``eta * ||w|| / (||g|| + wd * ||w||)``, the authors' ratio (norms taken separately, not of g + wd*w).

    A zero weight gives 0 (the tensor stays where it is, as in the authors' code); a zero denominator
    (zero gradient and no decay, where their code divides by zero) gives 1, the update being zero anyway.
    """
    param_norm, grad_norm = param.norm(), grad.norm()
    denominator = grad_norm + weight_decay * param_norm
    ratio = eta * param_norm / denominator
    return torch.where(denominator > 0, ratio, torch.ones_like(ratio))


def is_excluded_from_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, all 1-D parameters, and ViT position embedding / CLS token (docs/method.md §6.1)."""
    return param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in _NO_DECAY_NAMES)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed + LARS-adapted weights, and the excluded parameters."""
    decay, excluded = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (excluded if is_excluded_from_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_adaptation": True, "decay": True},
        {"params": excluded, "weight_decay": 0.0, "lars_adaptation": False, "decay": False},
    ]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    lars_eta: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The recipe's optimiser over `parameter_groups(model)`."""
    groups = parameter_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, eta=lars_eta)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}; choose 'lars', 'adamw' or 'sgd'.")


def build_recipe_optimizer(model: nn.Module, training: TwistTrainingArguments, lr: float) -> torch.optim.Optimizer:
    """`build_optimizer` with the optimiser settings of the training arguments (the run's and benchmarks' one)."""
    return build_optimizer(
        model,
        training.optim,
        lr,
        training.weight_decay,
        training.momentum,
        training.lars_eta,
        (training.adam_beta1, training.adam_beta2),
    )


def cosine(start: float, end: float, progress: float) -> float:
    """Cosine interpolation from `start` (progress 0) to `end` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def default_warmup_epochs(epochs: float) -> float:
    """10 warm-up epochs; 3 when training <= 20 epochs, 5 when <= 50 (docs/method.md §6.1)."""
    if epochs <= 20:
        return 3.0
    if epochs <= 50:
        return 5.0
    return 10.0


@dataclass
class TrainingSchedule:
    """Per-step values of every schedule; phase 2 (self-labeling) restarts the lr with its own warm-up."""

    total_steps: int
    self_label_steps: int
    warmup_steps: int
    self_label_warmup_steps: int
    learning_rate: float
    self_label_learning_rate: float
    min_lr_ratio: float
    weight_decay: float
    weight_decay_end: float
    teacher_momentum: float
    self_label_quantile: tuple[float, float]

    @property
    def phase1_steps(self) -> int:
        return self.total_steps - self.self_label_steps

    def in_self_label_phase(self, step: int) -> bool:
        return step >= self.phase1_steps

    def lr(self, step: int) -> float:
        if self.in_self_label_phase(step):
            return _warmup_cosine(
                step - self.phase1_steps,
                self.self_label_steps,
                self.self_label_warmup_steps,
                self.self_label_learning_rate,
                self.min_lr_ratio,
            )
        return _warmup_cosine(step, self.phase1_steps, self.warmup_steps, self.learning_rate, self.min_lr_ratio)

    def weight_decay_at(self, step: int) -> float:
        """Cosine over the whole run, self-labeling phase included, as the authors' schedule."""
        return cosine(self.weight_decay, self.weight_decay_end, step / max(self.total_steps, 1))

    def teacher_momentum_at(self, step: int) -> float:
        return cosine(self.teacher_momentum, 1.0, step / max(self.phase1_steps, 1))

    def self_label_quantile_at(self, step: int) -> float | None:
        if not self.in_self_label_phase(step):
            return None
        start, end = self.self_label_quantile
        return cosine(start, end, (step - self.phase1_steps) / max(self.self_label_steps, 1))


def _warmup_cosine(step: int, steps: int, warmup: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine to `min_ratio * peak` at `steps`."""
    if step < warmup:
        return peak * step / warmup
    return cosine(peak, peak * min_ratio, (step - warmup) / max(steps - warmup, 1))


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this step's lr on every group and weight decay on the decayed group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("decay", True):
            group["weight_decay"] = weight_decay


def build_schedule(training: TwistTrainingArguments, steps_per_epoch: int, global_batch: int) -> TrainingSchedule:
    """The run's schedule in steps: epochs converted, the learning rates scaled by global batch / 256 if asked."""
    scale = global_batch / 256 if training.scale_lr_by_batch else 1.0
    total = (
        training.max_steps
        if training.max_steps > 0
        else max(1, int(round(training.num_train_epochs * steps_per_epoch)))
    )
    self_label_steps = int(round(training.self_label_epochs * steps_per_epoch))
    phase1 = total - self_label_steps
    return TrainingSchedule(
        total_steps=total,
        self_label_steps=self_label_steps,
        warmup_steps=min(_warmup_steps(training, total, phase1, steps_per_epoch), max(phase1 - 1, 0)),
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


def _warmup_steps(training: TwistTrainingArguments, total: int, phase1: int, steps_per_epoch: int) -> int:
    """warmup_steps, else warmup_ratio of all steps, else warmup_epochs (default: by phase-1 length)."""
    if training.warmup_steps > 0:
        return training.warmup_steps
    if training.warmup_ratio > 0:
        return int(training.warmup_ratio * total)
    epochs = training.warmup_epochs
    if epochs is None:
        epochs = default_warmup_epochs(phase1 / steps_per_epoch)
    return int(round(epochs * steps_per_epoch))
