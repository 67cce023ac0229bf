"""Fast linear probe on cached frozen features: many learning rates trained together in one pass."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from .metrics import topk_accuracy

DEFAULT_PROBE_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class StackedLinearProbes:
    """One linear classifier per learning rate, stacked: weight (L, F, C), bias (L, C), standardised input."""

    learning_rates: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores (L, N, C) of every probe."""
        standardised = (features.to(self.weight.device).float() - self.feature_mean) / self.feature_std
        return torch.einsum("nf,lfc->lnc", standardised, self.weight) + self.bias.unsqueeze(1)


def train_linear_probes(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    learning_rates: Sequence[float] = DEFAULT_PROBE_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> StackedLinearProbes:
    """SGD (momentum, cosine schedule) of len(learning_rates) probes at once on standardised features.

    The loss is the sum of each probe's mean cross-entropy, so each probe's gradient is its own.
    """
    _check_probe_inputs(features, labels, learning_rates, epochs, batch_size)
    device = features.device
    features = features.float()
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    standardised = (features - mean) / std
    lrs = torch.tensor(learning_rates, dtype=torch.float32, device=device)
    num_probes, num_samples = len(learning_rates), features.shape[0]
    weight = torch.zeros(num_probes, features.shape[1], num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_probes, num_classes, device=device, requires_grad=True)
    velocity = [torch.zeros_like(weight), torch.zeros_like(bias)]
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(num_samples / batch_size)
    total_steps = epochs * steps_per_epoch
    for step in range(total_steps):
        if step % steps_per_epoch == 0:
            order = torch.randperm(num_samples, generator=generator).to(device)
        batch = order[(step % steps_per_epoch) * batch_size :][:batch_size]
        logits = torch.einsum("nf,lfc->lnc", standardised[batch], weight) + bias.unsqueeze(1)
        loss = F.cross_entropy(logits.reshape(-1, num_classes), labels[batch].repeat(num_probes)) * num_probes
        weight.grad, bias.grad = None, None
        loss.backward()
        cosine = 0.5 * (1 + math.cos(math.pi * step / total_steps))
        _sgd_momentum_step([weight, bias], velocity, lrs * cosine, momentum, weight_decay)
    return StackedLinearProbes(lrs, weight.detach(), bias.detach(), mean, std)


def _sgd_momentum_step(
    params: list[torch.Tensor],
    velocity: list[torch.Tensor],
    lrs: torch.Tensor,
    momentum: float,
    weight_decay: float,
) -> None:
    """In-place SGD with momentum where slice l of every parameter uses learning rate lrs[l]."""
    with torch.no_grad():
        for param, buffer in zip(params, velocity, strict=True):
            gradient = param.grad + weight_decay * param
            buffer.mul_(momentum).add_(gradient)
            param.sub_(lrs.view(-1, *([1] * (param.ndim - 1))) * buffer)


def linear_probe_on_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    learning_rates: Sequence[float] = DEFAULT_PROBE_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """Train probes on train minus a held-out split, pick the lr best on it, report that probe on test."""
    fit_index, val_index = _holdout_split(train_labels, val_fraction, seed)
    probes = train_linear_probes(
        train_features[fit_index],
        train_labels[fit_index],
        num_classes,
        learning_rates,
        epochs,
        batch_size,
        seed=seed,
    )
    val_scores = probes.scores(train_features[val_index])
    val_top1 = [topk_accuracy(scores, train_labels[val_index], (1,))[1] for scores in val_scores]
    best = int(np.argmax(val_top1))
    test_accuracy = topk_accuracy(probes.scores(test_features)[best], test_labels, (1, 5))
    return {
        "linear_top1": test_accuracy[1],
        "linear_top5": test_accuracy[5],
        "linear_val_top1": val_top1[best],
        "linear_best_lr": float(learning_rates[best]),
    }


def _holdout_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/validation index split, stratified by label when every class has two samples."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    label_array = labels.cpu().numpy()
    class_counts = np.bincount(label_array)
    num_val = math.ceil(val_fraction * len(label_array))
    stratify = label_array if _can_stratify(class_counts[class_counts > 0], num_val) else None
    fit, val = train_test_split(
        np.arange(len(label_array)), test_size=val_fraction, random_state=seed, stratify=stratify
    )
    return torch.as_tensor(np.sort(fit), device=labels.device), torch.as_tensor(np.sort(val), device=labels.device)


def _can_stratify(class_counts: np.ndarray, num_val: int) -> bool:
    """Stratifying needs two samples of every class and room for every class on both sides of the split."""
    return class_counts.min() >= 2 and min(num_val, class_counts.sum() - num_val) >= len(class_counts)


def _check_probe_inputs(
    features: torch.Tensor,
    labels: torch.Tensor,
    learning_rates: Sequence[float],
    epochs: int,
    batch_size: int,
) -> None:
    """Raise a ValueError naming the first malformed linear-probe input."""
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"features must be (N, F) and labels (N,); got {tuple(features.shape)} and {tuple(labels.shape)}."
        )
    if not learning_rates or min(learning_rates) <= 0:
        raise ValueError(f"learning_rates must be a non-empty list of positive numbers, got {list(learning_rates)}.")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
