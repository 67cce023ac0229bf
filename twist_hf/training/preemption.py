"""SIGTERM, the notice a spot machine gets shortly before it is taken away, turned into a checkpoint: the handler
only sets a flag; at the end of the step every rank learns (one-number all-reduce) whether any rank got it, and
all of them save and stop together, so preemption loses at most the step that was running."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator

# Module state, because Python runs signal handlers in the main thread only and the loop may run in another one
# (Ray Train's training thread): the flag the handler sets, and the handlers it replaced (innermost last).
_received = threading.Event()
_replaced_handlers: list[Any] = []


class TrainingPreempted(RuntimeError):
    """The run stopped at `step` after SIGTERM, with a checkpoint of that step."""

    def __init__(self, step: int):
        super().__init__(
            f"Stopped by SIGTERM after step {step}, with a checkpoint of that step; resume with "
            "--resume_from_checkpoint latest (Ray Train resumes it by itself)."
        )
        self.step = step


class TerminationNotice:
    """Catches SIGTERM while it is open: from the main thread it installs the handler itself; in another thread it
    relies on its launcher to have routed SIGTERM to it (`sigterm_caught_through_ray_actor` for a Ray Train worker).
    Otherwise (e.g. a Ray Tune trial, whose actor's main thread is busy) it catches nothing and the process's own
    handling stays."""

    def __init__(self):
        self._took = threading.current_thread() is threading.main_thread() and _take_sigterm()
        self.installed = bool(_replaced_handlers)

    def on_any_rank(self, accelerator: Accelerator) -> bool:
        """Whether any rank got SIGTERM; the same answer on every rank (all of them must call it). Without a handler
        (every rank alike, as their launchers are alike) there is nothing to ask."""
        if not self.installed:
            return False
        if accelerator.num_processes == 1:
            return _received.is_set()
        flag = torch.tensor([float(_received.is_set())], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)

    def close(self) -> None:
        """Give SIGTERM back to the handler it had before (if this notice installed it)."""
        if self._took:
            _give_sigterm_back()
        self._took = self.installed = False


@contextlib.contextmanager
def sigterm_caught_through_ray_actor() -> Iterator[None]:
    """In a Ray Train worker (the loop in the actor's training thread, the actor's main thread free), install the
    handler in the main thread as an actor task (`__ray_call__`, Ray's way to run a function on an actor), so that
    the loop's `TerminationNotice` sees SIGTERM; give the old handler back afterwards."""
    import ray

    actor = ray.get_runtime_context().current_actor
    took = ray.get(actor.__ray_call__.remote(_take_sigterm))
    try:
        yield
    finally:
        if took:
            ray.get(actor.__ray_call__.remote(_give_sigterm_back))


def _on_sigterm(signum, frame) -> None:
    _received.set()


def _take_sigterm(_actor: Any = None) -> bool:
    """Install the flag-setting handler (only possible in the main thread), keeping the one it replaces."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _received.clear()
    _replaced_handlers.append(signal.signal(signal.SIGTERM, _on_sigterm))
    return True


def _give_sigterm_back(_actor: Any = None) -> None:
    previous = _replaced_handlers.pop()
    signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
