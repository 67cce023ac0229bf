"""Search spaces over pretraining options: parsed from YAML, checked before any trial starts, turned into
Ray Tune domains."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, fields
from typing import Any

from ..training.arguments import ARGUMENT_CLASSES

SECTIONS = ("model", "data", "training", "launch")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
RANGE_DISTRIBUTIONS = ("uniform", "loguniform")

# Options that place, launch or publish a trial rather than change what it learns.
NOT_SWEEPABLE = {
    "output_dir": "each trial writes into <output_dir>/trials/<trial id>",
    "overwrite_output_dir": "trial folders are managed by the sweep",
    "resume_from_checkpoint": "use --resume to continue a sweep",
    "launcher": "trials always run on Ray",
    "num_workers": "set the workers per trial once, for every trial",
    "resources_per_worker": "set the resources per trial once, for every trial",
    "use_gpu": "set it once, for every trial",
    "storage_path": "the sweep's storage is set once",
    "ray_address": "the sweep runs on one cluster",
    "max_failures": "set it once, for every trial",
    "eval_split": "every trial must be scored on the same held-out split",
    "eval_strategy": "trials always evaluate every epoch",
    "save_strategy": "trials always checkpoint every epoch",
    "push_to_hub": "use --push_best_to_hub to push the best trial's model",
    "hub_model_id": "use --push_best_to_hub",
    "hub_strategy": "use --push_best_to_hub",
    "hub_token": "set it once",
    "hub_private_repo": "set it once",
    "hub_revision": "set it once",
}


def _field_types() -> dict[str, tuple[str, Any]]:
    """Option name -> (section of PretrainArguments.to_dict(), resolved type hint)."""
    table = {}
    for section, cls in zip(SECTIONS, ARGUMENT_CLASSES):
        hints = typing.get_type_hints(cls)
        for item in fields(cls):
            table[item.name] = (section, hints[item.name])
    return table


OPTION_TYPES = _field_types()


def option_section(name: str) -> str:
    """Which part of `PretrainArguments.to_dict()` holds the option `name`."""
    return OPTION_TYPES[name][0]


def _numeric_kind(name: str) -> type | None:
    """int or float for a numeric option (None allowed), else None."""
    members = set(typing.get_args(OPTION_TYPES[name][1])) or {OPTION_TYPES[name][1]}
    members.discard(type(None))
    if members == {int}:
        return int
    if members == {float} or members == {int, float}:
        return float
    return None


@dataclass(frozen=True)
class Dimension:
    """One swept option: `grid`/`choice` over values, or a `uniform`/`loguniform` range [low, high]."""

    name: str
    distribution: str
    values: tuple

    @property
    def is_range(self) -> bool:
        return self.distribution in RANGE_DISTRIBUTIONS

    def probe_values(self) -> list:
        """The values a trial may get that are worth checking up front: all listed values, or both bounds."""
        return list(self.values)

    def tune_domain(self, grid_choices: bool = False):
        """The Ray Tune domain; integer options sample integers from ranges (bounds included)."""
        from ray import tune

        if self.distribution == "grid" or (grid_choices and self.distribution == "choice"):
            return tune.grid_search(list(self.values))
        if self.distribution == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if _numeric_kind(self.name) is int:
            sampler = tune.randint if self.distribution == "uniform" else tune.lograndint
            return sampler(int(low), int(high) + 1)
        sampler = tune.uniform if self.distribution == "uniform" else tune.loguniform
        return sampler(float(low), float(high))


class SearchSpaceError(ValueError):
    """A search space that no trial could run; raised before any trial starts."""


def parse_search_space(spec: dict) -> list[Dimension]:
    """`{option: {grid|choice: [values]} | {uniform|loguniform: [low, high]}}` -> checked dimensions."""
    if not isinstance(spec, dict) or not spec:
        raise SearchSpaceError(
            "The search space is empty: give `search_space:` in the sweep YAML (or --search_space as JSON), e.g. "
            '{"tau": {"uniform": [0.1, 0.6]}, "lam2": {"grid": [1.0, 2.0]}}.'
        )
    return [_parse_dimension(name, entry) for name, entry in spec.items()]


def _parse_dimension(name: str, entry: Any) -> Dimension:
    _check_name(name)
    if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in DISTRIBUTIONS:
        raise SearchSpaceError(
            f"search_space.{name} must be one mapping {{distribution: values}} with distribution one of "
            f"{', '.join(DISTRIBUTIONS)}; got {entry!r}. Example: {name}: {{grid: [0.2, 0.4]}}."
        )
    distribution, values = next(iter(entry.items()))
    if not isinstance(values, list) or not values:
        raise SearchSpaceError(f"search_space.{name}.{distribution} needs a non-empty list, got {values!r}.")
    if distribution in RANGE_DISTRIBUTIONS:
        _check_range(name, distribution, values)
    return Dimension(name, distribution, tuple(values))


def _check_name(name: str) -> None:
    if name not in OPTION_TYPES:
        close = difflib.get_close_matches(name, OPTION_TYPES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SearchSpaceError(
            f"Unknown parameter {name!r} in the search space.{hint} Any option of "
            "`python recipes/pretrain.py --help` can be swept."
        )
    if name in NOT_SWEEPABLE:
        raise SearchSpaceError(f"{name} cannot be swept: {NOT_SWEEPABLE[name]}.")


def _check_range(name: str, distribution: str, values: list) -> None:
    if _numeric_kind(name) is None:
        raise SearchSpaceError(
            f"search_space.{name}: {distribution} needs a numeric option; use grid or choice for {name}."
        )
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise SearchSpaceError(f"search_space.{name}.{distribution} must be [low, high], got {values!r}.")
    low, high = values
    if low > high:
        raise SearchSpaceError(f"search_space.{name}.{distribution} range [{low}, {high}] is inverted: low > high.")
    if low == high:
        raise SearchSpaceError(
            f"search_space.{name}.{distribution} range [{low}, {high}] is empty; widen it or "
            f"fix {name} in the recipe instead."
        )
    if distribution == "loguniform" and low <= 0:
        raise SearchSpaceError(f"search_space.{name}.loguniform needs 0 < low, got [{low}, {high}].")


def check_search_algorithm(dimensions: list[Dimension], search_alg: str) -> None:
    """grid search needs listed values only; a model-based searcher cannot take grid dimensions."""
    if search_alg == "grid":
        ranges = [d.name for d in dimensions if d.is_range]
        if ranges:
            raise SearchSpaceError(
                f"--search_alg grid needs grid or choice values, but {', '.join(ranges)} "
                "are ranges; use --search_alg random (or optuna), or list values."
            )
    if search_alg == "optuna":
        grids = [d.name for d in dimensions if d.distribution == "grid"]
        if grids:
            raise SearchSpaceError(
                f"--search_alg optuna cannot take grid dimensions ({', '.join(grids)}); write them as choice."
            )


def param_space(dimensions: list[Dimension], search_alg: str) -> dict:
    """The Tuner's param_space: option name -> Ray Tune domain."""
    return {d.name: d.tune_domain(grid_choices=search_alg == "grid") for d in dimensions}
