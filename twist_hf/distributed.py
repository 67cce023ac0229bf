"""Differentiable collectives and synchronised batch norms for TWIST's global-batch statistics.

Everything here works on gloo (CPU) and nccl (GPU) and degrades to plain single-process code when no
process group exists. Gradient convention: every collective is an all-reduce SUM whose backward is an
all-reduce SUM, so a loss that is identical on all ranks yields, on each rank, ``world_size`` times that
rank's share of the true gradient; DDP's gradient averaging then gives the exact full-batch gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_BUNCH_GROUPS: dict[tuple[int, int], object] = {}


def world_size() -> int:
    """Number of processes in the default group, 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group, 0 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class _AllReduceSum(torch.autograd.Function):
    """All-reduce SUM whose backward all-reduces the incoming gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        reduced = tensor.clone().contiguous()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        return reduced

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.clone().contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def end_process_group() -> None:
    """Destroy this process's torch.distributed groups (torchrun, accelerate launch) once it is done with them.
    Left to interpreter shutdown, Gloo's worker threads can abort a process whose run has finished ("terminate
    called without an active exception", pytorch/pytorch#190489). No-op without a group."""
    if dist.is_available() and dist.is_initialized():
        _BUNCH_GROUPS.clear()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, group=None, group_size: int | None = None) -> torch.Tensor:
    """Differentiable sum over the ``group_size`` ranks of ``group`` (default: all); identity over one rank."""
    if group_size is None:
        group_size = world_size() if group is None else dist.get_world_size(group)
    if group_size == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group)


def global_batch_size(local_batch_size: int, device: torch.device) -> int:
    """Sum of the per-rank batch sizes (no gradient)."""
    if world_size() == 1:
        return local_batch_size
    count = torch.tensor([local_batch_size], device=device, dtype=torch.long)
    dist.all_reduce(count)
    return int(count.item())


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of equally shaped tensors, without gradient."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def bunch_group(ranks_per_group: int):
    """The process group of consecutive ranks that contains this rank (created once, on every rank)."""
    size = world_size()
    key = (size, ranks_per_group)
    if key not in _BUNCH_GROUPS:
        groups = [
            dist.new_group(list(range(start, start + ranks_per_group))) for start in range(0, size, ranks_per_group)
        ]
        _BUNCH_GROUPS[key] = groups
    return _BUNCH_GROUPS[key][rank() // ranks_per_group]


class BunchLayout(NamedTuple):
    """Which samples form a bunch: ``chunk`` consecutive local samples on each of ``ranks`` consecutive ranks."""

    chunk: int
    ranks: int


def bunch_layout(local_batch_size: int, bunch_size: int, world_size: int) -> BunchLayout:
    """The bunch layout for a per-device batch, a bunch size and a world size; a clear error if they don't fit.

    The one rule used by the launcher's pre-flight check, the model's check and ``BunchBatchNorm``. A bunch
    larger than the local batch spans consecutive ranks; in a single process it shrinks to the local batch.
    """
    if local_batch_size >= bunch_size:
        if local_batch_size % bunch_size != 0:
            raise ValueError(
                f"The per-device batch size {local_batch_size} is not a multiple of bunch_size {bunch_size}. "
                "Pick a per-device batch size that divides into bunches, or change bunch_size."
            )
        return BunchLayout(bunch_size, 1)
    if bunch_size % local_batch_size != 0:
        raise ValueError(
            f"bunch_size {bunch_size} is not a multiple of the per-device batch size {local_batch_size}. "
            "Pick a per-device batch size that divides bunch_size (e.g. a power of two)."
        )
    ranks = bunch_size // local_batch_size
    if world_size == 1:
        return BunchLayout(local_batch_size, 1)
    if world_size % ranks != 0:
        raise ValueError(
            f"bunch_size {bunch_size} with a per-device batch size of {local_batch_size} spans {ranks} ranks, "
            f"which does not divide the {world_size} ranks. Change bunch_size, the per-device batch size or the "
            "number of workers so that bunch_size / per-device batch size divides the number of workers."
        )
    return BunchLayout(local_batch_size, ranks)


def _normalise(centred: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    return centred * torch.rsqrt(var + eps)


class BunchBatchNorm(nn.Module):
    """Non-affine batch norm of TWIST's logits with statistics over "bunches" of samples.

    ``mode="bunch"``: statistics over ``bunch_size`` consecutive samples (all views of them), i.e. over
    groups of ``bunch_size / per_device_batch`` consecutive ranks, or over chunks of the local batch when
    it holds several bunches. ``mode="global"``: over every rank's samples. Eval mode uses running stats.
    """

    def __init__(
        self, num_features: int, mode: str = "bunch", bunch_size: int = 256, eps: float = 1e-5, momentum: float = 0.1
    ):
        super().__init__()
        if mode not in ("bunch", "global"):
            raise ValueError(f"BunchBatchNorm mode must be 'bunch' or 'global', got {mode!r}.")
        self.num_features = num_features
        self.mode = mode
        self.bunch_size = bunch_size
        self.eps = eps
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _layout(self, local_batch_size: int) -> tuple[int, object, int]:
        """(chunk size, process group, ranks in it) for this batch."""
        if self.mode == "global":
            return local_batch_size, None, world_size()
        chunk, ranks = bunch_layout(local_batch_size, self.bunch_size, world_size())
        return chunk, bunch_group(ranks) if ranks > 1 else None, ranks

    def forward(self, x: torch.Tensor, num_views: int = 1) -> torch.Tensor:
        """Normalise ``x`` of shape (num_views * B, K), laid out view-major."""
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        total, features = x.shape
        batch = total // num_views
        chunk, group, ranks = self._layout(batch)
        grouped = x.float().reshape(num_views, batch // chunk, chunk, features)
        count = num_views * chunk * ranks
        mean = all_reduce_sum(grouped.sum(dim=(0, 2)), group, ranks) / count
        centred = grouped - mean[None, :, None, :]
        var = all_reduce_sum(centred.pow(2).sum(dim=(0, 2)), group, ranks) / count
        self._update_running_stats(mean, var, count)
        out = _normalise(centred, var[None, :, None, :], self.eps)
        return out.reshape(total, features).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        unbiased = var * count / max(count - 1, 1)
        self.running_mean.lerp_(mean.mean(0), self.momentum)
        self.running_var.lerp_(unbiased.mean(0), self.momentum)
        self.num_batches_tracked.add_(1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, mode={self.mode}, bunch_size={self.bunch_size}, eps={self.eps}"


class _DistributedBatchNormMixin:
    """Batch norm whose training statistics are synchronised over all ranks when a process group exists.

    Unlike ``torch.nn.SyncBatchNorm`` it runs on CPU tensors (gloo) as well as on GPU (nccl), and in a
    single process it is exactly ``torch.nn.BatchNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local_count = x.numel() // x.size(1)
        sums = torch.cat([xf.sum(dims), xf.new_full((1,), float(local_count))])
        sums = all_reduce_sum(sums)
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = xf - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        out = _normalise(centred, var.view(shape), self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        momentum = 0.1 if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        self.num_batches_tracked.add_(1)


class DistributedBatchNorm1d(_DistributedBatchNormMixin, nn.BatchNorm1d):
    """``BatchNorm1d`` synchronised over all ranks in training (gloo and nccl)."""


class DistributedBatchNorm2d(_DistributedBatchNormMixin, nn.BatchNorm2d):
    """``BatchNorm2d`` synchronised over all ranks in training (gloo and nccl)."""


_DISTRIBUTED_VERSIONS = {nn.BatchNorm1d: DistributedBatchNorm1d, nn.BatchNorm2d: DistributedBatchNorm2d}


def convert_to_distributed_batch_norm(module: nn.Module) -> nn.Module:
    """Turn every plain BatchNorm1d/2d inside ``module`` into its synchronised version, in place.

    The class is swapped on the existing object, so parameters, buffers and state-dict keys are unchanged.
    """
    for child in module.modules():
        replacement = _DISTRIBUTED_VERSIONS.get(type(child))
        if replacement is not None:
            child.__class__ = replacement
    return module
