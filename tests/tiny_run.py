"""The tiny pretraining run the integration tests share: tiny-resnet on 512 Fashion-MNIST images."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_SCRIPT = ROOT / "recipes" / "pretrain.py"

TINY_OPTIONS = {
    "model_preset": "tiny-resnet",
    "max_train_samples": 512,
    "max_eval_samples": 200,
    "per_device_train_batch_size": 32,
    "bunch_size": 32,
    "local_crop_size": 8,
    "num_local_crops": 2,
    "logging_steps": 4,
    "report_to": "none",
}


def tiny_run_args(**overrides) -> list[str]:
    """Command-line flags of the tiny run, with `overrides` replacing or adding options."""
    options = {**TINY_OPTIONS, **overrides}
    return [item for name, value in options.items() for item in (f"--{name}", str(value))]


def torchrun_command(script: Path, *args: str, processes: int = 2) -> list[str]:
    """`script` with `args` in `processes` local torchrun processes (`--standalone`: on a free port, so that tests
    running at the same time do not meet on torchrun's default one)."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--standalone", "--nproc_per_node", str(processes), str(script), *args]
