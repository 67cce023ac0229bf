"""Peers at the same budget: TWIST against lightly's SwAV, Barlow Twins and DINO on Fashion-MNIST.

Every method trains the default recipe's fmnist-resnet backbone (built through twist_hf's config), on the default
recipe's batched two-view augmentation, global batch, optimiser, precision and memory format, for the same
wall-clock budget, one after the other in this one process on `--threads` CPU threads; the learning rate follows
the recipe's warm-up + cosine over the budget's elapsed time. Then weighted kNN top-1 (k=20, T=0.07) and the cached
feature linear probe score each backbone on the test set. Needs the `bench` extra (lightly).

    python benchmarks/peers.py                          # the full budget (the default run's train time)
    python benchmarks/peers.py --budget_s 90            # a quick look
    python benchmarks/peers.py --learning_rates '{"swav": [0.1, 0.3]}'   # an lr sweep
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import itertools
import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from harness import device_slug, machine_info, markdown_table, write_json
from lightly.loss import BarlowTwinsLoss, DINOLoss, SwaVLoss
from lightly.models.modules import BarlowTwinsProjectionHead, DINOProjectionHead, SwaVProjectionHead, SwaVPrototypes
from lightly.models.utils import deactivate_requires_grad, update_momentum
from quality import knn_top1
from torch import nn

from twist_hf import TwistForPreTraining, TwistModel
from twist_hf.data import fashion_mnist_arrays
from twist_hf.evaluation import image_features
from twist_hf.evaluation.linear import linear_probe_on_features
from twist_hf.training.arguments import PretrainArguments, parse_pretrain_args
from twist_hf.training.data import build_train_views
from twist_hf.training.optim import TrainingSchedule, apply_schedule, build_optimizer, cosine
from twist_hf.training.step import mixed_precision, precision_name

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "configs" / "fmnist.yaml"
# Train time of the default run (`python recipes/pretrain.py`, 8 epochs: `train_runtime` 465 s on 2 AMD EPYC Zen 4
# cores in bf16, 2026-12-04; 247 s on Zen 5): the budget of the peers table in RESULTS.md. On another machine pass
# that machine's own `train_runtime` (the run's all_results.json) as --budget_s.
DEFAULT_RUN_TRAIN_S = 465.0
GLOBAL_BATCH = 256  # the default recipe's 2 workers x 128
NUM_LABELS = 10
# Base learning rates (SGD, global batch 256): TWIST's is the recipe's; each peer's is the best kNN top-1 of a sweep
# at 120 s of training with the default recipe's augmentation (2026-12-04, idle 2-core AMD EPYC Zen 4, bf16;
# results/peers-cpu-2c-2026-12-04-lr-sweep-120s.md): SwAV 0.12 / 0.3 / 0.6 -> 0.850 / 0.861 / 0.866, Barlow Twins
# 0.3 / 0.6 / 1.2 -> 0.723 / 0.740 / 0.746, DINO 0.3 / 0.6 / 1.2 -> 0.816 / 0.806 / 0.805 (TWIST 0.863). The sweep
# before it (90 s, Zen 3, fp32, the paper's augmentation) had chosen 0.3, 0.3 and 0.6. Sweep again with
# --learning_rates.
DEFAULT_LEARNING_RATES = {"twist": 0.3, "swav": 0.6, "barlow_twins": 1.2, "dino": 0.3}
METHODS = tuple(DEFAULT_LEARNING_RATES)
SCHEDULE_RESOLUTION = 100_000  # the recipe's step schedule, indexed by elapsed fraction of the budget
SECTION_START, SECTION_END = "<!-- peers:start -->", "<!-- peers:end -->"  # the peers section of RESULTS.md


class Twist(nn.Module):
    """TWIST through the library's model and loss."""

    def __init__(self, args: PretrainArguments, steps_per_epoch: int):
        super().__init__()
        self.model = TwistForPreTraining(args.model.build_config())

    @property
    def encoder(self) -> TwistModel:
        return self.model.twist

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        return self.model(views).loss

    def after_step(self, progress: float) -> None:
        pass


class Peer(nn.Module):
    """A lightly method on the same backbone as TWIST (a TwistModel without its head)."""

    def __init__(self, args: PretrainArguments):
        super().__init__()
        self.encoder = TwistModel(args.model.build_config(), add_head=False)

    def after_step(self, progress: float) -> None:
        pass


class SwAV(Peer):
    """lightly's SwAV head, prototypes (frozen for the first epoch, renormalised every step) and Sinkhorn loss."""

    def __init__(self, args: PretrainArguments, steps_per_epoch: int, prototypes: int = 256):
        super().__init__(args)
        self.projection = SwaVProjectionHead(self.encoder.feature_size, 512, 128)
        self.prototypes = SwaVPrototypes(128, prototypes, n_steps_frozen_prototypes=steps_per_epoch)
        self.criterion = SwaVLoss()

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        self.prototypes.normalize()
        projected = F.normalize(self.projection(self.encoder.encode_views(views)), dim=1)
        scores = self.prototypes(projected, step).float().chunk(len(views))
        with torch.autocast("cpu", enabled=False):
            return self.criterion(list(scores[:2]), list(scores[2:]))


class BarlowTwins(Peer):
    """lightly's Barlow Twins projector and cross-correlation loss (in fp32)."""

    def __init__(self, args: PretrainArguments, steps_per_epoch: int, width: int = 2048):
        super().__init__(args)
        self.projection = BarlowTwinsProjectionHead(self.encoder.feature_size, width, width)
        self.criterion = BarlowTwinsLoss()

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        first, second = self.projection(self.encoder.encode_views(views)).float().chunk(len(views))[:2]
        with torch.autocast("cpu", enabled=False):
            return self.criterion(first, second)


class Dino(Peer):
    """lightly's DINO head and loss (centring, sharpened teacher), the last layer frozen for the first epoch, and an
    EMA teacher whose momentum follows a cosine from 0.996 to 1 over the budget."""

    def __init__(self, args: PretrainArguments, steps_per_epoch: int, output_dim: int = 2048):
        super().__init__(args)
        self.steps_per_epoch = steps_per_epoch
        self.head = DINOProjectionHead(self.encoder.feature_size, 512, 64, output_dim, freeze_last_layer=1)
        self.teacher_encoder = copy.deepcopy(self.encoder)
        self.teacher_head = DINOProjectionHead(self.encoder.feature_size, 512, 64, output_dim)
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_encoder)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=output_dim, warmup_teacher_temp=0.04, teacher_temp=0.04)
        self.epoch = 0

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        self.epoch = step // self.steps_per_epoch
        student = self.head(self.encoder.encode_views(views)).float().chunk(len(views))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder.encode_views(views[:2])).float().chunk(2)
        with torch.autocast("cpu", enabled=False):
            return self.criterion(list(teacher), list(student))

    def cancel_gradients(self) -> None:
        self.head.cancel_last_layer_gradients(self.epoch)

    def after_step(self, progress: float) -> None:
        momentum = cosine(0.996, 1.0, progress)
        update_momentum(self.encoder, self.teacher_encoder, momentum)
        update_momentum(self.head, self.teacher_head, momentum)


METHOD_CLASSES: dict[str, Callable[..., nn.Module]] = {
    "twist": Twist,
    "swav": SwAV,
    "barlow_twins": BarlowTwins,
    "dino": Dino,
}


def recipe_arguments(max_train_samples: int | None, seed: int) -> PretrainArguments:
    """The default recipe, as one process holding the whole global batch."""
    argv = ["--config", str(RECIPE), "--per_device_train_batch_size", str(GLOBAL_BATCH), "--seed", str(seed)]
    argv += ["--output_dir", tempfile.gettempdir()]
    if max_train_samples is not None:
        argv += ["--max_train_samples", str(max_train_samples)]
    return parse_pretrain_args(argv)


def budget_schedule(args: PretrainArguments, learning_rate: float) -> TrainingSchedule:
    """The recipe's warm-up + cosine, spread over the budget: warm-up is the recipe's share of its epochs."""
    training = args.training
    warmup_fraction = (training.warmup_epochs or 0.0) / training.num_train_epochs
    return TrainingSchedule(
        total_steps=SCHEDULE_RESOLUTION,
        self_label_steps=0,
        warmup_steps=int(warmup_fraction * SCHEDULE_RESOLUTION),
        self_label_warmup_steps=0,
        learning_rate=learning_rate * GLOBAL_BATCH / 256,
        self_label_learning_rate=0.0,
        min_lr_ratio=training.min_lr_ratio,
        weight_decay=training.weight_decay,
        weight_decay_end=training.weight_decay,
        teacher_momentum=training.teacher_momentum,
        self_label_quantile=(0.0, 0.0),
    )


def endless_views(views) -> Iterator[list[torch.Tensor]]:
    """Each step's augmented views, epoch after epoch."""
    return itertools.chain.from_iterable(views.epoch(epoch) for epoch in itertools.count())


def train_for_budget(
    method: str, args: PretrainArguments, learning_rate: float, budget_s: float, max_steps: int | None, bf16: bool
) -> tuple[TwistModel, dict]:
    """Train one method until the wall-clock budget (or max_steps) is spent; returns its backbone and the stats."""
    training = args.training
    config = args.model.build_config()
    views = build_train_views(args, config, rank=0, world_size=1)
    torch.manual_seed(training.seed)
    model = METHOD_CLASSES[method](args, views.steps_per_epoch)
    model.train()
    optimizer = build_optimizer(model, training.optim, learning_rate, training.weight_decay, training.momentum)
    if training.channels_last:
        model = model.to(memory_format=torch.channels_last)
    schedule = budget_schedule(args, learning_rate)
    memory_format = torch.channels_last if training.channels_last else torch.contiguous_format
    losses, step, started = [], 0, time.perf_counter()
    for batch in endless_views(views):
        progress = max((time.perf_counter() - started) / budget_s, step / max_steps if max_steps else 0.0)
        if progress >= 1.0:
            break
        apply_schedule(optimizer, schedule.lr(int(progress * SCHEDULE_RESOLUTION)), training.weight_decay)
        batch = [view.to(memory_format=memory_format) for view in batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(batch, step)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{method} diverged at step {step} (loss {loss.item()}) with lr {learning_rate}.")
        loss.backward()
        if isinstance(model, Dino):
            model.cancel_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_step(progress)
        losses.append(loss.item())
        step += 1
    seconds = time.perf_counter() - started
    stats = {
        "steps": step,
        "epochs": step / views.steps_per_epoch,
        "train_s": seconds,
        "images_per_s": step * GLOBAL_BATCH / max(seconds, 1e-9),
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": float(np.mean(losses[-10:])) if losses else math.nan,
    }
    return model.encoder.to(memory_format=torch.contiguous_format).eval(), stats


def score_backbone(encoder: TwistModel, splits: dict, probe_epochs: int) -> dict:
    """kNN top-1 (k=20, T=0.07) and the cached-feature linear probe's test top-1 of the backbone features."""
    train_images, train_labels, test_images, test_labels = splits["train"] + splits["test"]
    train_features = image_features(encoder, train_images, train_labels).features
    test_features = image_features(encoder, test_images, test_labels).features
    probe = linear_probe_on_features(
        train_features,
        torch.tensor(train_labels),
        test_features,
        torch.tensor(test_labels),
        NUM_LABELS,
        epochs=probe_epochs,
    )
    return {
        "knn_top1": knn_top1(train_features, train_labels, test_features, test_labels),
        "linear_top1": probe["linear_top1"],
        "linear_best_lr": probe["linear_best_lr"],
    }


def evaluation_splits(max_train: int | None, max_test: int | None) -> dict:
    """The labelled train (kNN bank, probe training) and test images that score every backbone."""
    train_images, train_labels = fashion_mnist_arrays("train")
    test_images, test_labels = fashion_mnist_arrays("test")
    return {
        "train": (train_images[:max_train], train_labels[:max_train]),
        "test": (test_images[:max_test], test_labels[:max_test]),
    }


def learning_rates_to_run(methods: list[str], overrides: dict[str, list[float]]) -> list[tuple[str, float]]:
    unknown = sorted(set(overrides) - set(methods))
    if unknown:
        raise ValueError(f"--learning_rates names {unknown}, which are not in --methods {methods}.")
    return [(method, lr) for method in methods for lr in overrides.get(method, [DEFAULT_LEARNING_RATES[method]])]


def run(options: argparse.Namespace) -> dict:
    torch.set_num_threads(options.threads)
    args = recipe_arguments(options.max_train_samples, options.seed)
    precision = mixed_precision(args.training.bf16, args.training.fp16, on_gpu=False)
    bf16 = precision == "bf16"
    splits = evaluation_splits(options.eval_train_samples or options.max_train_samples, options.max_test_samples)
    results = {
        "machine": machine_info(torch.device("cpu")),
        "budget_s": options.budget_s,
        "label": options.label,
        "threads": options.threads,
        "global_batch": GLOBAL_BATCH,
        "recipe": str(RECIPE.relative_to(HERE.parent)),
        "train_samples": options.max_train_samples or len(fashion_mnist_arrays("train")[1]),
        "eval_train_samples": len(splits["train"][0]),
        "test_samples": len(splits["test"][0]),
        "probe_epochs": options.probe_epochs,
        "precision": precision_name(precision),
        "runs": [],
    }
    for method, learning_rate in learning_rates_to_run(options.methods, options.learning_rates):
        encoder, stats = train_for_budget(method, args, learning_rate, options.budget_s, options.max_steps, bf16)
        scores = score_backbone(encoder, splits, options.probe_epochs)
        results["runs"].append({"method": method, "learning_rate": learning_rate, **stats, **scores})
        print(json.dumps(results["runs"][-1]), flush=True)
    return results


def results_table(results: dict) -> str:
    rows = [
        [
            run["method"],
            f"{run['learning_rate']:g}",
            f"{run['knn_top1']:.3f}",
            f"{run['linear_top1']:.3f}",
            str(run["steps"]),
            f"{run['epochs']:.2f}",
            f"{run['images_per_s']:.0f}",
        ]
        for run in results["runs"]
    ]
    header = ["method", "lr", "kNN top-1", "linear top-1", "steps", "epochs", "img/s"]
    return markdown_table(header, rows)


def results_markdown(results: dict) -> str:
    load = ", ".join(f"{value:.1f}" for value in results["machine"]["load_average_1_5_15"] or ())
    return "\n".join(
        [
            f"## Peers at the same budget ({results['label']})",
            "",
            f"{results['budget_s']:.0f} s of training per method, one process, CPU threads: {results['threads']}, "
            f"global batch {results['global_batch']}, the recipe {results['recipe']} (backbone, two-view batched "
            f"augmentation, SGD, {results['precision']} + channels_last) on {results['train_samples']} training "
            f"images; scored on {results['eval_train_samples']} train / {results['test_samples']} test images: kNN "
            f"k=20, T=0.07, linear probe {results['probe_epochs']} epochs on cached features. Load average at start "
            f"(1/5/15 min): {load}. `{results['command']}`",
            "",
            results_table(results),
        ]
    )


def replace_section(document: str, section: str) -> str:
    """`document` with its peers section (between the markers) replaced by `section`, or with it appended."""
    block = f"{SECTION_START}\n{section}\n{SECTION_END}"
    before, found, rest = document.partition(SECTION_START)
    if not found:
        return document.rstrip("\n") + "\n\n" + block + "\n"
    _, ended, after = rest.partition(SECTION_END)
    if not ended:
        raise ValueError(f"The summary has {SECTION_START} without {SECTION_END}; fix it by hand.")
    return before + block + after


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget_s", type=float, default=DEFAULT_RUN_TRAIN_S, help="training seconds per run")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--learning_rates",
        type=json.loads,
        default={},
        help="JSON {method: [lr, ...]}: one run per lr (base lr for batch 256); default %s" % DEFAULT_LEARNING_RATES,
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max_steps", type=int, default=None, help="also stop each run after this many steps")
    parser.add_argument("--max_train_samples", type=int, default=None, help="first N training images (all: None)")
    parser.add_argument("--max_test_samples", type=int, default=None, help="first N test images (all: None)")
    parser.add_argument(
        "--eval_train_samples", type=int, default=None, help="first N train images that score (default: all trained on)"
    )
    parser.add_argument("--probe_epochs", type=int, default=100, help="linear-probe epochs on cached features")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--label", default="full budget", help="what kind of run this is, for the table title")
    parser.add_argument("--output_dir", type=Path, default=HERE / "results", help="where the JSON and table go")
    parser.add_argument(
        "--summary", type=Path, default=HERE / "RESULTS.md", help="file whose peers section gets the table"
    )
    options = parser.parse_args(argv)
    if options.budget_s <= 0 or options.threads < 1 or options.probe_epochs < 1:
        parser.error("--budget_s must be > 0, --threads and --probe_epochs >= 1.")
    if not isinstance(options.learning_rates, dict) or not all(
        isinstance(lrs, list) and lrs and all(isinstance(lr, (int, float)) and lr > 0 for lr in lrs)
        for lrs in options.learning_rates.values()
    ):
        parser.error(
            '--learning_rates must be a JSON object of non-empty lists of positive numbers, e.g. {"dino": [0.1]}.'
        )
    return options


def main(argv: list[str] | None = None) -> dict:
    options = parse_args(argv)
    learning_rates_to_run(options.methods, options.learning_rates)  # bad names fail before any training
    results = run(options)
    results["command"] = shlex.join(["python", "benchmarks/peers.py", *(argv if argv is not None else sys.argv[1:])])
    stem = f"peers-{device_slug(torch.device('cpu'))}-{dt.date.today().isoformat()}"
    write_json(options.output_dir / f"{stem}.json", results)
    markdown = results_markdown(results)
    (options.output_dir / f"{stem}.md").write_text(markdown + "\n")
    summary = options.summary.read_text() if options.summary.exists() else ""
    options.summary.write_text(replace_section(summary, markdown))
    print(markdown)
    return results


if __name__ == "__main__":
    main()
