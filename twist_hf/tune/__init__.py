"""Hyperparameter sweeps of TWIST pretraining with Ray Tune: every trial runs the pretraining loop."""

from .arguments import SweepArguments, SweepSetup, parse_sweep_args
from .runner import SweepError, SweepOutcome, plan_sweep, run_sweep
from .space import Dimension, SearchSpaceError, parse_search_space

__all__ = [
    "Dimension",
    "SearchSpaceError",
    "SweepArguments",
    "SweepError",
    "SweepOutcome",
    "SweepSetup",
    "parse_search_space",
    "parse_sweep_args",
    "plan_sweep",
    "run_sweep",
]
