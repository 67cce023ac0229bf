"""Figures (PNG, Agg canvas): top-3 matched predictions, matched confusion matrix, training curves."""

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

DPI = 100
UNMATCHED_NAME = "(unmatched)"
LOSS_KEYS = (("loss", "loss"), ("kl_loss", "kl"), ("eh_loss", "eh"), ("he_loss", "he"))
CORRECT_COLOR, WRONG_COLOR, OTHER_COLOR = "tab:green", "tab:red", "tab:gray"


def _save(figure: Figure, path: str | Path) -> Path:
    """Render with the Agg canvas at DPI (no tight bbox, so the pixel size is figsize x DPI) and save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def plot_top3_predictions(
    images: Sequence[PIL.Image.Image],
    class_probabilities: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    path: str | Path,
    columns: int = 4,
) -> Path:
    """Grid of images, each beside bars of its 3 most probable matched classes; title = ground truth.

    Pixel size: (columns x 500) x (rows x 200); a green bar marks the true class, the title is green
    when the top prediction is right and red otherwise.
    """
    if len(images) == 0 or len(images) != len(class_probabilities) or len(images) != len(labels):
        raise ValueError(
            f"Need as many images ({len(images)}) as probability rows ({len(class_probabilities)}) and "
            f"labels ({len(labels)}), and at least one."
        )
    rows = math.ceil(len(images) / columns)
    figure = Figure(figsize=(columns * 5.0, rows * 2.0), layout="constrained")
    grid = figure.add_gridspec(rows, 2 * columns, width_ratios=[1.0, 1.5] * columns)
    top = class_probabilities.float().topk(min(3, class_probabilities.shape[1]), dim=1)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        row, column = divmod(i, columns)
        _draw_image(figure.add_subplot(grid[row, 2 * column]), image, class_names[label], top.indices[i, 0] == label)
        _draw_top3_bars(
            figure.add_subplot(grid[row, 2 * column + 1]), top.values[i], top.indices[i], label, class_names
        )
    return _save(figure, path)


def _draw_image(axes, image: PIL.Image.Image, true_name: str, correct: bool) -> None:
    """One image, titled with its ground-truth class."""
    axes.imshow(image.convert("RGB"))
    axes.set_title(f"true: {true_name}", fontsize=9, color=CORRECT_COLOR if correct else WRONG_COLOR)
    axes.axis("off")


def _draw_top3_bars(axes, probabilities: torch.Tensor, classes: torch.Tensor, label: int, class_names) -> None:
    """Horizontal bars of the top predicted classes, most probable on top, true class in green."""
    positions = np.arange(len(classes))
    colors = [CORRECT_COLOR if int(c) == label else OTHER_COLOR for c in classes]
    bars = axes.barh(positions, probabilities.numpy(), color=colors)
    axes.bar_label(bars, labels=[f"{p:.0%}" for p in probabilities.tolist()], padding=2, fontsize=7)
    axes.set_yticks(positions, [class_names[int(c)] for c in classes], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.tick_params(axis="x", labelsize=7)


def plot_confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str], path: str | Path
) -> Path:
    """Confusion matrix (rows true, columns matched prediction); unmatched predictions (-1) get a column.

    Square figure of max(6, 0.5 x classes + 3) inches at 100 dpi.
    """
    names = list(class_names)
    predictions = np.asarray(predictions)
    if (predictions < 0).any():
        names.append(UNMATCHED_NAME)
        predictions = np.where(predictions < 0, len(class_names), predictions)
    counts = confusion_matrix(labels, predictions, labels=np.arange(len(names)))
    size = max(6.0, 0.5 * len(names) + 3)
    figure = Figure(figsize=(size, size), layout="constrained")
    axes = figure.add_subplot()
    display = ConfusionMatrixDisplay(counts, display_labels=names)
    display.plot(ax=axes, include_values=len(names) <= 30, xticks_rotation="vertical", colorbar=False, cmap="Blues")
    axes.set_xlabel("predicted (Hungarian-matched)")
    axes.set_ylabel("true")
    return _save(figure, path)


def read_training_log(log_path: str | Path) -> list[dict]:
    """One dict per non-empty line of a JSON-lines log."""
    records = []
    for number, line in enumerate(Path(log_path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{log_path} line {number} is not JSON ({error.msg}); expected one dict per line."
                ) from error
    return records


def plot_training_curves(log_path: str | Path, path: str | Path) -> Path:
    """Loss terms (loss, kl, eh, he), kNN top-1 and learning rate over steps, one panel each that has data.

    Pixel size: (panels x 500) x 400.
    """
    records = read_training_log(log_path)
    panels = [
        ("loss terms", [(name, _series(records, key)) for key, name in LOSS_KEYS]),
        ("kNN top-1", [("knn_top1", _series(records, "knn_top1"))]),
        ("learning rate", [("lr", _series(records, "lr"))]),
    ]
    panels = [(title, [(n, s) for n, s in curves if s[0]]) for title, curves in panels]
    panels = [(title, curves) for title, curves in panels if curves]
    if not panels:
        raise ValueError(
            f"{log_path} has no plottable keys; expected some of loss, kl_loss, eh_loss, he_loss, knn_top1, lr."
        )
    figure = Figure(figsize=(5.0 * len(panels), 4.0), layout="constrained")
    for axes, (title, curves) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for name, (steps, values) in curves:
            axes.plot(steps, values, label=name, marker="o" if len(steps) < 30 else None)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return _save(figure, path)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry `key`; the step is the record's `step` or its line index."""
    points = [(record.get("step", i), record[key]) for i, record in enumerate(records) if record.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]
