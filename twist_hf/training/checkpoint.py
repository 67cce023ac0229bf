"""Resumable training state: one folder per checkpoint with the full state and a `save_pretrained` model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..outputs import CHECKPOINTS_DIR as CHECKPOINTS_DIR
from ..outputs import MODEL_DIR as MODEL_DIR

TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"


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
    """Write model, optimiser, teacher, scaler and RNG state, the step counters and a loadable model folder."""
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
    counters = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch, "metrics": metrics}
    (folder / TRAINER_STATE).write_text(json.dumps(counters, indent=2))
    model.save_pretrained(folder / MODEL_DIR)
    return folder


def read_trainer_state(folder: Path) -> dict:
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a twist-hf checkpoint (no {TRAINER_STATE}); pass a folder written by "
            "recipes/pretrain.py, a Hub repo pushed with --hub_strategy checkpoint, or 'latest'."
        )
    return json.loads(path.read_text())


def load_training_state(folder: Path) -> dict:
    """The tensors and counters of a checkpoint folder (safe loading: tensors and plain containers only)."""
    counters = read_trainer_state(folder)
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
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint folder with the highest global step anywhere under `root` (local or Ray storage)."""
    candidates = [path.parent for path in Path(root).rglob(TRAINER_STATE)]
    if not candidates:
        return None
    return max(candidates, key=lambda folder: read_trainer_state(folder)["global_step"])


class LocalCheckpoints:
    """Checkpoints kept under `<output_dir>/checkpoints/checkpoint-<step>`, the last `limit` of them."""

    def __init__(self, output_dir: str | Path, limit: int):
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.limit = limit

    def keep(self, folder: Path, global_step: int) -> Path:
        target = self.root / f"checkpoint-{global_step}"
        self.root.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(folder), target)
        self._prune()
        return target

    def _prune(self) -> None:
        folders = sorted(self.root.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
        for old in folders[: max(len(folders) - self.limit, 0)]:
            shutil.rmtree(old, ignore_errors=True)
