"""Pretraining engine: typed arguments, the per-worker Accelerate loop, and its launchers."""

from .arguments import (
    DataArguments,
    LaunchArguments,
    ModelArguments,
    PretrainArguments,
    TwistTrainingArguments,
    parse_pretrain_args,
)
from .launch import LaunchError, launch, validate_before_launch
from .loop import LocalReporter, Reporter, train_worker

__all__ = [
    "DataArguments",
    "LaunchArguments",
    "ModelArguments",
    "PretrainArguments",
    "TwistTrainingArguments",
    "parse_pretrain_args",
    "LaunchError",
    "launch",
    "validate_before_launch",
    "LocalReporter",
    "Reporter",
    "train_worker",
]
