"""TWIST loss terms as pure functions of the logits (docs/method.md §3 and §4).

Every mean is over the GLOBAL batch: per-rank sums are packed into one differentiable all-reduce, so
the batch-mean distribution's gradient reaches every rank's samples. Without a process group the same
code is the single-process loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distributed import all_gather_no_grad, all_reduce_sum, global_batch_size


@dataclass
class TwistLossTerms:
    """The total loss and its consistency (kl), sharpness (eh) and diversity (he) terms."""

    loss: torch.Tensor
    kl: torch.Tensor
    eh: torch.Tensor
    he: torch.Tensor


def check_view_logits(logits: torch.Tensor, min_views: int = 2) -> None:
    """Validate a (num_views, batch, num_classes) logits tensor."""
    if logits.dim() != 3:
        raise ValueError(f"Expected logits of shape (num_views, batch, num_classes), got {tuple(logits.shape)}.")
    if logits.shape[0] < min_views:
        raise ValueError(f"TWIST needs at least {min_views} views of each image, got {logits.shape[0]}.")


def sparse_view_pairs(num_views: int) -> list[tuple[int, int]]:
    """Multi-crop "sparse" pairing: each global view (0, 1) with every later view."""
    return [(a, b) for a in (0, 1) for b in range(a + 1, num_views)]


def _entropy_rows(q: torch.Tensor, eps: float) -> torch.Tensor:
    """-sum_k q log(q + eps) for each row."""
    return -(q * torch.log(q + eps)).sum(-1)


def _kl_sum(p_a: torch.Tensor, p_b: torch.Tensor, eps: float) -> torch.Tensor:
    """Sum over samples of KL(p_a || p_b) with eps inside the logs (docs/method.md §3.1)."""
    return (p_a * (torch.log(p_a + eps) - torch.log(p_b + eps))).sum()


def _global_reduce(parts: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """All-reduce several per-rank sums in one collective and divide by the global batch size."""
    flat = torch.cat([part.reshape(-1) for part in parts])
    reduced = all_reduce_sum(flat) / global_batch_size(batch_size, flat.device)
    return list(torch.split(reduced, [part.numel() for part in parts]))


def twist_loss(
    logits: torch.Tensor, tau: float = 1.0, lam1: float = 0.0, lam2: float = 1.0, eps: float = 1e-5
) -> TwistLossTerms:
    """TWIST loss over views (V, B, K): two views, or multi-crop with the sparse pairing."""
    check_view_logits(logits)
    num_views, batch, num_classes = logits.shape
    logits = logits.float()
    p = logits.softmax(-1)
    q = p if tau == 1.0 else (logits / tau).softmax(-1)
    pairs = sparse_view_pairs(num_views)
    kl_sums = torch.stack([(_kl_sum(p[a], p[b], eps) + _kl_sum(p[b], p[a], eps)) / 2 for a, b in pairs])
    eh_sums = _entropy_rows(q, eps).sum(-1)
    kl_pairs, eh_views, q_mean = _global_reduce([kl_sums, eh_sums, q.sum(1)], batch)
    he_views = _entropy_rows(q_mean.view(num_views, num_classes), eps)
    first, second = (torch.tensor(index, device=logits.device) for index in zip(*pairs))
    kl = kl_pairs.mean()
    eh = ((eh_views[first] + eh_views[second]) / 2).mean()
    he = ((he_views[first] + he_views[second]) / 2).mean()
    return TwistLossTerms(loss=kl + (1 + lam1) * eh - lam2 * he, kl=kl, eh=eh, he=he)


def momentum_twist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 1.0,
    lam1: float = -0.6,
    lam2: float = 1.0,
    eps: float = 1e-5,
) -> TwistLossTerms:
    """Momentum-encoder TWIST: KL(q_teacher_i || q_student_j) over i != j; eh, he over student views."""
    check_view_logits(student_logits)
    check_view_logits(teacher_logits)
    if teacher_logits.shape[1:] != student_logits.shape[1:]:
        raise ValueError(
            f"Teacher logits {tuple(teacher_logits.shape)} do not match student logits "
            f"{tuple(student_logits.shape)} in batch size and number of classes."
        )
    num_views, batch, num_classes = student_logits.shape
    q_student = (student_logits.float() / tau).softmax(-1)
    q_teacher = (teacher_logits.detach().float() / tau).softmax(-1)
    pairs = [(i, j) for i in range(teacher_logits.shape[0]) for j in range(num_views) if i != j]
    kl_sums = torch.stack([_kl_sum(q_teacher[i], q_student[j], eps) for i, j in pairs])
    eh_sums = _entropy_rows(q_student, eps).sum(-1)
    kl_pairs, eh_views, q_mean = _global_reduce([kl_sums, eh_sums, q_student.sum(1)], batch)
    he_views = _entropy_rows(q_mean.view(num_views, num_classes), eps)
    kl, eh, he = kl_pairs.mean(), eh_views.mean(), he_views.mean()
    return TwistLossTerms(loss=kl + (1 + lam1) * eh - lam2 * he, kl=kl, eh=eh, he=he)


def confidence_threshold(confidence: torch.Tensor, quantile: float) -> torch.Tensor:
    """The value at position ``quantile`` of the global batch's confidences sorted descending; samples at or
    above it are used (docs/method.md §4.2; the authors' per-rank, strictly-above rule is discussed in §9)."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"The self-labeling quantile must lie in [0, 1], got {quantile}.")
    everyone = all_gather_no_grad(confidence.detach()).sort(descending=True).values
    position = min(int(math.floor(quantile * everyone.numel())), everyone.numel() - 1)
    return everyone[position]


def self_label_loss(logits: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-labeling phase: cross-entropy against the confident global view's argmax.

    Returns the loss (mean over confident samples of the global batch, averaged over the V-1 other views)
    and the fraction of the global batch that was confident enough to be used.
    """
    check_view_logits(logits)
    num_views, batch, _ = logits.shape
    logits = logits.float()
    with torch.no_grad():
        max_prob, argmax = logits[:2].softmax(-1).max(-1)
        anchor = max_prob.argmax(0)
        confidence = max_prob.gather(0, anchor[None])[0]
        pseudo_label = argmax.gather(0, anchor[None])[0]
        mask = (confidence >= confidence_threshold(confidence, quantile)).float()
    samples = torch.arange(batch, device=logits.device)
    other_global = logits[1 - anchor, samples]
    cross_entropy = F.cross_entropy(other_global, pseudo_label, reduction="none")
    for view in range(2, num_views):
        cross_entropy = cross_entropy + F.cross_entropy(logits[view], pseudo_label, reduction="none")
    per_sample = cross_entropy / (num_views - 1)
    loss_sum, used = _global_reduce([(per_sample * mask).sum(), mask.sum()], batch)
    return loss_sum[0] / used[0].clamp(min=1e-12), used[0]
