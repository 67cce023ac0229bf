"""Names of the files and folders a run writes, in one place: the loop, the launcher, the checkpoint store, the
Hub pusher, the sweep and the evaluation runner all read them from here; and the removal of exactly those
outputs, so that `--overwrite_output_dir` never deletes a file the project did not write."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

# In a pretraining run's output folder.
RESULTS_FILE = "all_results.json"
LOG_FILE = "log.jsonl"
ARGS_FILE = "training_args.json"
CHECKPOINTS_DIR = "checkpoints"
RAY_STORAGE_DIR = "ray"

# Inside one checkpoint folder (`checkpoint-<step>`): the model as `save_pretrained` writes it.
CHECKPOINT_PREFIX = "checkpoint-"
MODEL_DIR = "model"

# In a Hub repo: the resumable state pushed with hub_strategy=checkpoint.
HUB_CHECKPOINT_DIR = "last-checkpoint"

# Written by the evaluation runner next to the model.
EVAL_RESULTS_FILE = "eval_results.json"

# Folders: checkpoints, the default Ray storage, the trackers' logs. Files: results, log, arguments, and the
# `save_pretrained` model (the model card README.md and code files are replaced when the run ends).
RUN_FOLDERS = (CHECKPOINTS_DIR, RAY_STORAGE_DIR, "runs")
RUN_FILES = (
    RESULTS_FILE,
    LOG_FILE,
    ARGS_FILE,
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
)
RUN_FILE_PATTERNS = ("model-*-of-*.safetensors",)


def remove_run_outputs(output_dir: str | Path) -> list[Path]:
    """Delete a previous run's outputs in `output_dir` (nothing else); returns what was removed."""
    output = Path(output_dir)
    patterns_matches = [path for pattern in RUN_FILE_PATTERNS for path in output.glob(pattern)]
    return remove_paths([*(output / name for name in (*RUN_FOLDERS, *RUN_FILES)), *patterns_matches])


def remove_paths(paths: Iterable[Path]) -> list[Path]:
    """Delete these files and folders where they exist (folders whole: they are the project's own)."""
    removed = []
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed
