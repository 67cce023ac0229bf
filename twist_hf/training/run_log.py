"""Rank 0's record of a run: the progress bar, `log.jsonl`, Accelerate trackers, the per-step statistics
that are logged and the collapse warnings they trigger."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..modeling_twist import TwistForPreTrainingOutput
from ..outputs import LOG_FILE

logger = logging.getLogger(__name__)


class RunLog:
    """Rank 0's view of the run: progress bar, `log.jsonl`, Accelerate trackers and collapse warnings."""

    def __init__(
        self, accelerator: Accelerator, output_dir: Path, total_steps: int, start_step: int, tracker_config: dict
    ):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = output_dir / LOG_FILE
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="pretraining", disable=not self.main, dynamic_ncols=True
        )
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.collapse_warnings = 0
        if accelerator.trackers is not None and accelerator.log_with:
            accelerator.init_trackers("twist", config=_flat_scalars(tracker_config))

    def advance(self) -> None:
        self.bar.update(1)

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.accelerator.log(metrics, step=step)
        shown = {
            key: metrics[key]
            for key in ("loss", "kl_loss", "eh_loss", "he_loss", "img_per_s", "knn_top1")
            if key in metrics
        }
        self.bar.set_postfix({key: f"{value:.3g}" for key, value in shown.items()}, refresh=False)

    def throughput(self, step: int, images_per_step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.last_step) * images_per_step / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        return rate

    def warn_if_collapsing(self, step: int, metrics: dict, num_classes: int, batch: int) -> None:
        used, he = metrics.get("classes_used"), metrics.get("he_loss")
        if not self.main or used is None or he is None:
            return
        ceiling = math.log(min(num_classes, batch))
        if he < 0.5 * ceiling or used < max(2, 0.05 * min(num_classes, batch)):
            self.collapse_warnings += 1
            logger.warning(
                "Collapse warning at step %d: the batch uses %d of %d classes and the entropy of the batch-mean "
                "distribution is %.2f of a possible %.2f. The representation may be collapsing: lower "
                "learning_rate, raise lam2, or check that the last norm is on.",
                step,
                used,
                num_classes,
                he,
                ceiling,
            )

    def close(self) -> None:
        self.bar.close()
        if self.main and self.accelerator.log_with:
            self.accelerator.end_training()


def _flat_scalars(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
    return flat


@torch.no_grad()
def step_statistics(output: TwistForPreTrainingOutput) -> dict:
    """Collapse and agreement monitors of one step (docs/method.md §3.4)."""
    argmax = output.logits.argmax(-1)
    raw = output.unnormalized_logits[0].float()
    stats = {
        "agreement": (argmax[0] == argmax[1]).float().mean().item(),
        "classes_used": int(argmax[0].unique().numel()),
        "logit_column_std": raw.std(0).mean().item(),
        "logit_row_std": raw.std(1).mean().item(),
    }
    for name in ("kl_loss", "eh_loss", "he_loss", "self_label_fraction"):
        value = getattr(output, name)
        if value is not None:
            stats[name] = value.item()
    return stats
