"""The one way this package makes an Accelerator for a whole run (pretraining, or an evaluation), so that several
runs can follow each other in one process."""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.state import AcceleratorState


def fresh_accelerator(**options) -> Accelerator:
    """A new Accelerator. Accelerate keeps one process-wide state and refuses a second run with another precision
    in the same process (notebooks, sweeps, tests, benchmarks); the run-level part of that state is reset here,
    the process group part is kept."""
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**options)
