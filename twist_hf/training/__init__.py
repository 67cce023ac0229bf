"""Pretraining engine: typed arguments, the per-worker Accelerate run, its training step, and its launchers.

The run's names are imported on first use, so that `twist_hf.training.step` (what the GPU benchmark times)
loads without `datasets` or Ray installed."""

from importlib import import_module

from .arguments import (
    DataArguments,
    LaunchArguments,
    ModelArguments,
    PretrainArguments,
    TwistTrainingArguments,
    parse_pretrain_args,
)
from .launch import LaunchError, launch, validate_before_launch
from .step import TrainingDivergedError, TrainingStep

_RUN_NAMES = {
    "LocalReporter": "loop",
    "PretrainingRun": "loop",
    "Reporter": "loop",
    "train_worker": "loop",
    "Monitor": "monitors",
}

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
    "TrainingDivergedError",
    "TrainingStep",
    *_RUN_NAMES,
]


def __getattr__(name: str):
    if name not in _RUN_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_RUN_NAMES[name]}", __name__), name)
