"""Sweep options + the pretraining options of the base recipe, parsed by one `HfArgumentParser`.

A sweep YAML names a base recipe (`base_recipe:`), a `search_space:`, and any sweep or pretraining option;
pretraining options there override the base recipe, command-line flags override both.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..cli import check_known_options, read_yaml_options, split_config_flag
from ..configuration_twist import check_choice
from ..training.arguments import ARGUMENT_CLASSES, PretrainArguments, read_recipe
from .trial import SWEEP_METRICS

SEARCH_ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")


@dataclass
class SweepArguments:
    """What to search, how, and where the results go (the sweep's folder is --output_dir)."""

    base_recipe: str | None = field(
        default=None,
        metadata={
            "help": "Pretraining recipe every trial starts from: a path relative to the sweep YAML (in the YAML), "
            "to the current folder, or absolute."
        },
    )
    search_space: dict | str | None = field(
        default=None,
        metadata={
            "help": 'JSON replacing the YAML search_space, e.g. {"tau": {"uniform": [0.1, 0.6]}}; '
            "distributions: grid, choice, uniform, loguniform."
        },
    )
    metric: str = field(default="knn_top1", metadata={"help": f"Objective (maximised): {', '.join(SWEEP_METRICS)}."})
    search_alg: str = field(default="random", metadata={"help": "'random', 'grid' or 'optuna' (TPE; needs optuna)."})
    scheduler: str = field(default="asha", metadata={"help": "'asha' (stop bad trials early) or 'fifo' (none)."})
    num_samples: int = field(default=4, metadata={"help": "Trials to sample (grid: repeats of the whole grid)."})
    max_concurrent_trials: int = field(
        default=0, metadata={"help": "Trials running at once; 0: as many as the cluster's resources hold."}
    )
    grace_period: int = field(default=1, metadata={"help": "ASHA: epochs every trial runs before it may be stopped."})
    reduction_factor: float = field(default=2.0, metadata={"help": "ASHA: keep 1/reduction_factor at each rung."})
    sweep_seed: int | None = field(default=0, metadata={"help": "Seed of the search algorithm's sampling."})
    sweep_name: str | None = field(default=None, metadata={"help": "Tune experiment name; default output_dir's."})
    resume: bool = field(default=False, metadata={"help": "Restore the interrupted sweep in --output_dir / storage."})
    push_best_to_hub: str | None = field(
        default=None, metadata={"help": "Hub repo id to push the best trial's model to (uses --hub_token)."}
    )

    def __post_init__(self):
        if isinstance(self.search_space, str):
            try:
                self.search_space = json.loads(self.search_space)
            except json.JSONDecodeError as error:
                raise ValueError(f"--search_space must be a JSON object: {error}") from error
        for name, value, choices in (
            ("metric", self.metric, SWEEP_METRICS),
            ("search_alg", self.search_alg, SEARCH_ALGORITHMS),
            ("scheduler", self.scheduler, SCHEDULERS),
        ):
            check_choice(f"--{name}", value, choices)
        if self.num_samples < 1:
            raise ValueError("--num_samples must be at least 1.")
        if self.max_concurrent_trials < 0:
            raise ValueError("--max_concurrent_trials must be >= 0 (0: fill the cluster).")
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ValueError("ASHA needs --grace_period >= 1 and --reduction_factor > 1.")


@dataclass
class SweepSetup:
    sweep: SweepArguments
    base: PretrainArguments


def make_sweep_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (*ARGUMENT_CLASSES, SweepArguments),
        description="TWIST hyperparameter sweep (Ray Tune over the pretraining loop).",
    )


def read_sweep_config(path: str | os.PathLike) -> dict:
    """The sweep YAML as a flat dict; `base_recipe` is made absolute (relative to the YAML's folder first)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Sweep config {path} does not exist; sweep configs live in tune/configs/.")
    content = read_yaml_options(path)
    if content.get("base_recipe"):
        content["base_recipe"] = str(_resolve_recipe(content["base_recipe"], path.parent))
    return content


def _resolve_recipe(name: str, folder: Path) -> Path:
    """The recipe file by an explicit path (relative to `folder` first), so a sweep runs the same from an
    installed package as from a checkout."""
    candidates = (folder / name, Path(name))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(str(candidate.resolve()) for candidate in candidates)
    raise FileNotFoundError(
        f"Base recipe {name} not found (tried {tried}). Give base_recipe as an absolute path, or relative to the "
        "sweep config (in its YAML) or to the current folder (on the command line)."
    )


def parse_sweep_args(argv: list[str]) -> SweepSetup:
    """`--config sweep.yaml` + flags -> sweep options and the base pretraining arguments."""
    config_path, rest = split_config_flag(argv)
    sweep_defaults = read_sweep_config(config_path) if config_path else {}
    _check_known(sweep_defaults, config_path)
    parser = make_sweep_parser()
    parser.set_defaults(**sweep_defaults)
    base_recipe = parser.parse_args_into_dataclasses(args=rest)[-1].base_recipe
    recipe = read_recipe(_resolve_recipe(base_recipe, Path.cwd())) if base_recipe else {}
    _check_known(recipe, base_recipe)
    defaults = {
        "output_dir": os.path.join("outputs", f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"),
        **recipe,
        **sweep_defaults,
    }
    parser.set_defaults(**defaults)
    *pretrain, sweep = parser.parse_args_into_dataclasses(args=rest)
    return SweepSetup(sweep=sweep, base=PretrainArguments(*pretrain))


def _check_known(options: dict, source: str | None) -> None:
    check_known_options(
        options,
        make_sweep_parser(),
        source,
        "python tune/sweep.py",
        hint=" (search_space entries go under `search_space:`)",
    )
