"""Resumable training state: one folder per checkpoint with the full state and a `save_pretrained` model.

Checkpoints appear under their final name only when complete (written in a temporary folder next to them,
flushed to disk, then renamed), and resuming picks the newest checkpoint whose files all read back."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import torch

from ..outputs import CHECKPOINT_PREFIX
from ..outputs import CHECKPOINTS_DIR as CHECKPOINTS_DIR
from ..outputs import MODEL_DIR as MODEL_DIR

logger = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"
MODEL_WEIGHTS = "model.safetensors"
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
# Folders being written (or left behind by a kill mid-save) start with this prefix and are never resumed from.
PARTIAL_PREFIX = ".partial-"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from (missing or truncated files)."""


def save_checkpoint(
    folder: Path,
    *,
    model,
    optimizer: torch.optim.Optimizer,
    teacher,
    scaler,
    global_step: int,
    epoch: int,
    step_in_epoch: int,
    metrics: dict,
) -> Path:
    """Write model, optimiser, teacher, scaler and RNG state, a loadable model folder, and last the step
    counters (`trainer_state.json` marks a checkpoint whose other files are written)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "teacher": teacher.state_dict() if teacher is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(state, folder / TRAINING_STATE)
    model.save_pretrained(folder / MODEL_DIR)
    counters = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch, "metrics": metrics}
    (folder / TRAINER_STATE).write_text(json.dumps(counters, indent=2))
    return folder


def read_trainer_state(folder: Path) -> dict:
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a twist-hf checkpoint (no {TRAINER_STATE}); pass a folder written by "
            "recipes/pretrain.py, a Hub repo pushed with --hub_strategy checkpoint, or 'latest'."
        )
    return json.loads(path.read_text())


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be resumed from (a missing, truncated or corrupt file), or None if every file reads."""
    folder = Path(folder)
    try:
        int(json.loads((folder / TRAINER_STATE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{TRAINER_STATE} unreadable ({type(error).__name__})"
    state = folder / TRAINING_STATE
    try:
        with zipfile.ZipFile(state) as archive:
            broken = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        return f"{TRAINING_STATE} truncated or corrupt ({type(error).__name__})"
    if broken is not None:
        return f"{TRAINING_STATE} corrupt (entry {broken})"
    weights = folder / MODEL_DIR / MODEL_WEIGHTS
    if weights.exists() and not _safetensors_complete(weights):
        return f"{MODEL_DIR}/{MODEL_WEIGHTS} truncated"
    return None


def _safetensors_complete(path: Path) -> bool:
    """The file holds its whole header and every tensor the header lists (no byte missing at the end)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return False
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > size:
            return False
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            return False
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + header_size + max(ends, default=0) == size


def load_training_state(folder: Path) -> dict:
    """The tensors and counters of a checkpoint folder (safe loading: tensors and plain containers only)."""
    counters = read_trainer_state(folder)
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(
            f"Cannot resume from {folder}: {problem}. It was probably cut short by a crash or a full disk; "
            "pass an older checkpoint, or --resume_from_checkpoint latest, which skips unreadable ones."
        )
    state = torch.load(Path(folder) / TRAINING_STATE, map_location="cpu", weights_only=True)
    return {**state, **counters}


def restore_training_state(state: dict, *, model, optimizer, teacher, scaler) -> None:
    """Load a checkpoint's state into freshly built objects (nothing is re-initialised afterwards)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if teacher is not None and state.get("teacher") is not None:
        teacher.load_state_dict(state["teacher"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    cuda_states = restorable_cuda_rng_states(state.get("cuda_rng"), torch.cuda.device_count())
    for device, cuda_state in enumerate(cuda_states):
        torch.cuda.set_rng_state(cuda_state, device)


def restorable_cuda_rng_states(saved: list | None, device_count: int) -> list:
    """The saved CUDA RNG states of the devices this machine has: a checkpoint from a machine with more GPUs
    restores the first `device_count` (the others are dropped), one with fewer restores those it lists."""
    return list(saved or [])[:device_count]


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` (local or Ray storage) whose files all read back; newer unreadable
    ones (cut short by a crash) are skipped, each named in a warning."""
    candidates = []
    for path in Path(root).rglob(TRAINER_STATE):
        folder = path.parent
        if any(part.startswith(PARTIAL_PREFIX) for part in folder.relative_to(root).parts):
            continue
        try:
            candidates.append((int(json.loads(path.read_text())["global_step"]), str(folder)))
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("Skipping checkpoint %s: %s unreadable.", folder, TRAINER_STATE)
    for _, folder in sorted(candidates, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return Path(folder)
        logger.warning("Skipping checkpoint %s: %s; trying an older one.", folder, problem)
    return None


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so that a rename afterwards publishes whole files."""
    for path in sorted(folder.rglob("*"), key=lambda item: len(item.parts), reverse=True):
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LocalCheckpoints:
    """Checkpoints kept under `<output_dir>/checkpoints/checkpoint-<step>`, the last `limit` of them."""

    def __init__(self, output_dir: str | Path, limit: int):
        if limit < 1:
            raise ValueError(f"save_total_limit must be at least 1, got {limit}.")
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.limit = limit

    def keep(self, folder: Path, global_step: int) -> Path:
        """Move `folder` to checkpoint-<step> atomically, then drop the checkpoints beyond the limit."""
        target = self.root / f"checkpoint-{global_step}"
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_partial_folders()
        staging = self.root / f"{PARTIAL_PREFIX}{target.name}"
        shutil.move(str(folder), staging)  # a rename on the same filesystem, else a copy into the hidden folder
        os.chmod(staging, self.root.stat().st_mode & 0o777)  # as readable as checkpoints/ (the umask's mode)
        fsync_tree(staging)
        if target.exists():  # the same step saved again (a resumed run): the old copy goes once the new is whole
            replaced = self.root / f"{PARTIAL_PREFIX}old-{target.name}"
            target.rename(replaced)
            staging.rename(target)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            staging.rename(target)
        _fsync(self.root)
        self._prune()
        return target

    def _remove_partial_folders(self) -> None:
        """Leftovers of a save that was killed half-way (only this process writes here)."""
        for partial in self.root.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(partial, ignore_errors=True)

    def _prune(self) -> None:
        """Delete the oldest checkpoint-<step> folders beyond the limit; other names are left alone."""
        steps = {
            int(match.group(1)): path
            for path in self.root.iterdir()
            if path.is_dir() and (match := CHECKPOINT_NAME.fullmatch(path.name))
        }
        for step in sorted(steps)[: max(len(steps) - self.limit, 0)]:
            shutil.rmtree(steps[step], ignore_errors=True)
