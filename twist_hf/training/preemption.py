"""SIGTERM, the notice a spot machine gets shortly before it is taken away, turned into a checkpoint: the handler
only sets a flag; at the end of the step every rank learns (one-number all-reduce) whether any rank got it, and
all of them save and stop together, so preemption loses at most the step that was running."""

from __future__ import annotations

import signal
import threading

import torch
from accelerate import Accelerator


class TrainingPreempted(RuntimeError):
    """The run stopped at `step` after SIGTERM, with a checkpoint of that step."""

    def __init__(self, step: int):
        super().__init__(
            f"Stopped by SIGTERM after step {step}, with a checkpoint of that step; resume with "
            "--resume_from_checkpoint latest (Ray Train resumes it by itself)."
        )
        self.step = step


class TerminationNotice:
    """Catches SIGTERM while it is open (a handler can only be installed from the main thread: elsewhere, e.g. in
    Ray Train's training thread, it catches nothing and the process's own handling stays)."""

    def __init__(self):
        self.received = False
        self.installed = threading.current_thread() is threading.main_thread()
        self._previous = signal.signal(signal.SIGTERM, self._on_signal) if self.installed else None

    def _on_signal(self, signum, frame) -> None:
        self.received = True

    def on_any_rank(self, accelerator: Accelerator) -> bool:
        """Whether any rank got SIGTERM; the same answer on every rank (all of them must call it). Without a handler
        (every rank runs in a worker thread alike, as under Ray Train) there is nothing to ask."""
        if not self.installed:
            return False
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([float(self.received)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)

    def close(self) -> None:
        """Give SIGTERM back to the handler it had before."""
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self.installed = False
