"""What a finished sweep leaves in its output folder: trials.csv, trials.md (ranked), a plot of the metric
against each swept parameter, and best_config.yaml (a recipe `recipes/pretrain.py --config` runs as is)."""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..training.arguments import ARGUMENT_CLASSES, PretrainArguments
from .space import Dimension

TRIALS_CSV = "trials.csv"
TRIALS_MD = "trials.md"
PLOT_FILE = "metric_vs_parameters.png"
BEST_CONFIG = "best_config.yaml"
# Never written into a recipe: where the run goes is the user's choice, tokens are secrets.
RECIPE_EXCLUDED = ("output_dir", "hub_token")


def plain(value):
    """numpy scalars (Tune's samplers return them) as Python values, so YAML and JSON can hold them."""
    return value.item() if isinstance(value, np.generic) else value


def trials_table(
    result_grid, dimensions: list[Dimension], metric: str, saved_status: dict[str, str], trials_dir: Path
) -> pd.DataFrame:
    """One row per trial, best first: parameters, the metric (last and best report), epochs, outcome.

    `saved_status`: trial id -> status in the saved sweep state (an interrupted trial is still RUNNING there)."""
    rows = []
    for result in result_grid:
        history = result.metrics_dataframe
        scores = history[metric].dropna() if history is not None and metric in history else pd.Series(dtype=float)
        last = result.metrics or {}
        trial_id = last.get("trial_id") or Path(result.path).name
        rows.append(
            {
                "trial_id": trial_id,
                **{d.name: plain(result.config.get(d.name)) for d in dimensions},
                metric: float(scores.iloc[-1]) if len(scores) else math.nan,
                f"best_{metric}": float(scores.max()) if len(scores) else math.nan,
                "epochs": int(last.get("training_iteration", 0)),
                "outcome": _outcome(result, last, saved_status.get(trial_id, "TERMINATED")),
                "output_dir": str(trials_dir / trial_id),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def _outcome(result, last: dict, status: str) -> str:
    if result.error is not None:
        return f"error: {type(result.error).__name__}"
    if last.get("status") == "completed":
        return "completed"
    return "stopped early" if status == "TERMINATED" else "unfinished"


def write_tables(table: pd.DataFrame, output_dir: Path, metric: str) -> tuple[Path, Path]:
    csv_path, md_path = output_dir / TRIALS_CSV, output_dir / TRIALS_MD
    table.to_csv(csv_path, index=False)
    shown = markdown_table(table.drop(columns=["output_dir"]))
    md_path.write_text(f"# Sweep trials, ranked by {metric} (higher is better)\n\n{shown}\n")
    return csv_path, md_path


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; floats with 4 significant digits."""

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def plot_metric(table: pd.DataFrame, dimensions: list[Dimension], metric: str, path: Path) -> Path:
    """One panel per swept parameter: each trial's metric at its value (trials that did not complete hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(dimensions), figsize=(4 * len(dimensions), 3.4), squeeze=False)
    completed = table["outcome"] == "completed"
    for axis, dimension in zip(axes[0], dimensions):
        x = _plot_positions(table[dimension.name], axis)
        axis.scatter(x[completed], table[metric][completed], color="tab:blue", label="completed")
        axis.scatter(
            x[~completed],
            table[metric][~completed],
            facecolors="none",
            edgecolors="tab:red",
            label="not completed (stopped early, unfinished, failed)",
        )
        if dimension.distribution == "loguniform":
            axis.set_xscale("log")
        axis.set_xlabel(dimension.name)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.suptitle(f"{metric} of each trial against the swept parameters")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_positions(values: pd.Series, axis) -> np.ndarray:
    """Numbers as they are; other values (lists, strings) at evenly spaced positions with their labels."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values.to_numpy(dtype=float)
    labels = sorted({str(v) for v in values})
    axis.set_xticks(range(len(labels)), labels, rotation=30, fontsize="small")
    return np.array([labels.index(str(v)) for v in values], dtype=float)


def recipe_of(args: PretrainArguments) -> dict:
    """The options that differ from their defaults, flat, as a pretraining recipe YAML holds them."""
    recipe = {}
    parts = (args.model, args.data, args.training, args.launch)
    for part, cls in zip(parts, ARGUMENT_CLASSES):
        values = asdict(part)
        defaults = asdict(cls(**({"output_dir": "unused"} if "output_dir" in values else {})))
        for item in fields(cls):
            name = item.name
            if name not in RECIPE_EXCLUDED and values[name] != defaults[name]:
                recipe[name] = plain(values[name])
    return recipe


def write_best_config(args: PretrainArguments, path: Path, header: str) -> Path:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(recipe_of(args), sort_keys=False))
    return path
