"""Image-level protocols: the paper's linear probe on augmented images, semi-supervised fine-tuning."""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification, BaseImageProcessor, PreTrainedModel

from .data import (
    ImageClassificationCollator,
    LabelledSplits,
    ProcessorTransform,
    decoded_rows,
    training_augmentation,
)
from .features import FeatureModel
from .metrics import topk_accuracy

logger = logging.getLogger(__name__)

REFERENCE_BATCH = 256
# The authors' linear probe (docs/method.md §7.1): global batch 1024, 100 epochs; ResNet lr 0.2 as is,
# ViT lr per 256 images by width (ViT-S is 384 wide), on the CLS tokens of the last 4 blocks.
LINEAR_GLOBAL_BATCH = 1024
RESNET_LINEAR_LR = 0.2
VIT_LINEAR_BASE_LRS = {"ViT-S": 0.02, "ViT-B": 0.0015}
VIT_S_WIDTH = 384
VIT_CLS_BLOCKS = 4
# Semi-supervised fine-tuning: global batch 256, head lr 0.2, both lrs unscaled.
SEMI_GLOBAL_BATCH = 256
SEMI_HEAD_LR = 0.2


class FrozenBackboneLinear(nn.Module):
    """A linear classifier on a frozen feature model kept in eval mode (frozen batch-norm statistics)."""

    def __init__(self, backbone: FeatureModel, feature_size: int, num_classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.classifier = nn.Linear(feature_size, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def train(self, mode: bool = True) -> "FrozenBackboneLinear":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features, _ = self.backbone(pixel_values)
        return self.classifier(features.float())


class ClassifierLogits(nn.Module):
    """Adapts a Hugging Face image-classification model to pixel_values -> logits."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


@dataclass(frozen=True)
class LinearProbeRecipe:
    """The authors' image-level linear probe for one backbone: absolute lr, global batch, epochs, features."""

    lr: float
    global_batch_size: int
    epochs: int
    cls_blocks: int
    rule: str

    def per_process_batch_size(self, num_processes: int) -> int:
        return per_process_batch_size(self.global_batch_size, num_processes, "--linear_batch_size")


def linear_probe_recipe(
    backbone: FeatureModel,
    epochs: int = 100,
    global_batch_size: int | None = None,
    base_lr: float | None = None,
    cls_blocks: int | None = None,
) -> LinearProbeRecipe:
    """The authors' linear probe for this backbone; None values take the backbone's defaults.

    ResNets (any non-ViT): global batch 1024, lr 0.2 NOT scaled with the batch, the pooled feature.
    timm ViTs: global batch 1024, lr 0.02 (ViT-S, width <= 384) or 0.0015 (ViT-B) x global batch / 256,
    the CLS tokens of the last 4 blocks concatenated.
    """
    batch = global_batch_size or LINEAR_GLOBAL_BATCH
    vit = backbone.vision_transformer
    if vit is None:
        if cls_blocks not in (None, 1):
            raise ValueError(
                f"--linear_cls_blocks {cls_blocks}: only Vision Transformers have CLS tokens to concatenate; "
                "leave it unset (or 1) for this backbone."
            )
        lr = RESNET_LINEAR_LR if base_lr is None else base_lr
        return LinearProbeRecipe(lr, batch, epochs, 1, f"ResNet protocol: lr {lr:g}, not scaled with the batch")
    family = "ViT-S" if vit.embed_dim <= VIT_S_WIDTH else "ViT-B"
    base = VIT_LINEAR_BASE_LRS[family] if base_lr is None else base_lr
    blocks = cls_blocks or VIT_CLS_BLOCKS
    if blocks > len(vit.blocks):
        raise ValueError(f"--linear_cls_blocks {blocks}: this ViT has only {len(vit.blocks)} blocks; use at most that.")
    rule = f"{family} protocol: lr {base:g} x global batch {batch} / {REFERENCE_BATCH}, CLS of the last {blocks} blocks"
    return LinearProbeRecipe(base * batch / REFERENCE_BATCH, batch, epochs, blocks, rule)


def per_process_batch_size(global_batch_size: int, num_processes: int, option: str = "the batch size") -> int:
    """The share of a global batch each process takes; the global batch must split evenly."""
    if global_batch_size < num_processes or global_batch_size % num_processes:
        raise ValueError(
            f"{option} {global_batch_size} is the global batch, split over {num_processes} processes: it must be a "
            f"multiple of {num_processes}. Change {option} or the number of processes."
        )
    return global_batch_size // num_processes


def train_and_evaluate(
    model: nn.Module,
    param_groups: list[dict],
    train_loader: DataLoader,
    test_loader: DataLoader,
    epochs: int,
    accelerator: Accelerator,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> dict[str, float]:
    """Cross-entropy SGD (momentum, one cosine to 0 over all steps), scored on test after every epoch.

    Returns the last epoch's top1/top5, the best top1 over the epochs (as the authors report) and its epoch,
    the optimizer's starting lr of each group (`lr_0`, `lr_1`, ...), the per-process and global batch, and
    `skipped_images` (undecodable images in one pass over train and test). Those rows never count.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    optimizer = torch.optim.SGD(param_groups, momentum=momentum, weight_decay=weight_decay)
    model, optimizer, train, test = accelerator.prepare(model, optimizer, train_loader, test_loader)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    history, skipped_train = [], 0
    for epoch in range(epochs):
        skipped_train = _train_one_epoch(model, optimizer, base_lrs, train, epoch, epochs, accelerator)
        accuracy, skipped_test = _evaluate(model, test, accelerator)
        history.append(accuracy)
    best_epoch = max(range(epochs), key=lambda e: history[e][1])
    per_process = train_loader.batch_size
    skipped = skipped_train + skipped_test
    if skipped:
        logger.warning("Skipped %d undecodable images (%d train, %d test).", skipped, skipped_train, skipped_test)
    return {
        "top1": history[-1][1],
        "top5": history[-1][5],
        "best_top1": history[best_epoch][1],
        "best_epoch": best_epoch + 1,
        **{f"lr_{i}": lr for i, lr in enumerate(base_lrs)},
        "batch_size_per_process": per_process,
        "batch_size": per_process * accelerator.num_processes,
        "skipped_images": skipped,
    }


def _train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    base_lrs: list[float],
    loader: DataLoader,
    epoch: int,
    epochs: int,
    accelerator: Accelerator,
) -> int:
    """One epoch of the cosine schedule; returns the number of undecodable images seen (all processes)."""
    model.train()
    total_steps, skipped = epochs * len(loader), torch.zeros((), dtype=torch.long, device=accelerator.device)
    progress = tqdm(loader, desc=f"train epoch {epoch + 1}/{epochs}", disable=not accelerator.is_local_main_process)
    for index, batch in enumerate(progress):
        step = epoch * len(loader) + index
        for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
        labels = batch["labels"]
        kept = decoded_rows(labels)
        skipped += (~kept).sum()
        with accelerator.autocast():
            logits = model(batch["pixel_values"]).float()
        # Skipped rows (placeholder images) add nothing; a batch of only skipped rows still steps (DDP-safe).
        loss = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")[kept].sum() / kept.sum().clamp_min(1)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return int(accelerator.reduce(skipped, reduction="sum").item())


def _evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> tuple[dict[int, float], int]:
    """Top-1 / top-5 over the whole (gathered) test split, and how many of its images were undecodable."""
    model.eval()
    logits, labels = [], []
    with torch.inference_mode(), accelerator.autocast():
        for batch in tqdm(loader, desc="test", disable=not accelerator.is_local_main_process):
            gathered = accelerator.gather_for_metrics((model(batch["pixel_values"]).float(), batch["labels"]))
            logits.append(gathered[0].cpu())
            labels.append(gathered[1].cpu())
    logits, labels = torch.cat(logits), torch.cat(labels)
    kept = decoded_rows(labels)
    return topk_accuracy(logits[kept], labels[kept], (1, 5)), int((~kept).sum())


def linear_probe_on_images(
    backbone: FeatureModel,
    splits: LabelledSplits,
    processor: BaseImageProcessor,
    recipe: LinearProbeRecipe | None = None,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """The authors' linear probe (default: `linear_probe_recipe(backbone)`): frozen backbone, augmented
    images, SGD momentum 0.9 at recipe.lr, cosine, wd 0; last and best top-1 over the epochs."""
    accelerator = accelerator or Accelerator()
    recipe = recipe or linear_probe_recipe(backbone)
    backbone = backbone.with_cls_blocks(recipe.cls_blocks)
    batch_size = recipe.per_process_batch_size(accelerator.num_processes)
    train_loader, test_loader = _image_loaders(splits, splits.train, processor, batch_size, num_workers)
    feature_size = _feature_size(backbone, test_loader)
    model = FrozenBackboneLinear(backbone, feature_size, splits.num_classes)
    result = train_and_evaluate(
        model,
        [{"params": model.classifier.parameters(), "lr": recipe.lr}],
        train_loader,
        test_loader,
        recipe.epochs,
        accelerator,
    )
    return {
        "linear_top1": result["top1"],
        "linear_top5": result["top5"],
        "linear_best_top1": result["best_top1"],
        "linear_best_epoch": result["best_epoch"],
        "linear_lr": result["lr_0"],
        "linear_batch_size": result["batch_size"],
        "linear_batch_size_per_process": result["batch_size_per_process"],
        "linear_feature_size": feature_size,
        "skipped_images": result["skipped_images"],
    }


def load_classifier(name_or_path: str, class_names: Sequence[str]) -> PreTrainedModel:
    """An image classifier over `class_names` initialised from a TWIST folder or any HF vision checkpoint."""
    return AutoModelForImageClassification.from_pretrained(
        name_or_path,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        ignore_mismatched_sizes=True,
    )


def backbone_and_head_groups(model: PreTrainedModel, backbone_lr: float, head_lr: float) -> list[dict]:
    """Optimizer groups: the base model (backbone) at backbone_lr, everything else (classifier) at head_lr."""
    backbone_ids = {id(p) for p in model.base_model.parameters()}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    if not head:
        raise ValueError(f"Cannot split {type(model).__name__} into a backbone and a classifier head.")
    return [
        {"params": list(model.base_model.parameters()), "lr": backbone_lr},
        {"params": head, "lr": head_lr},
    ]


def semi_supervised_finetune(
    name_or_path: str,
    splits: LabelledSplits,
    processor: BaseImageProcessor,
    train_indices: np.ndarray,
    epochs: int,
    backbone_lr: float,
    head_lr: float = SEMI_HEAD_LR,
    global_batch_size: int = SEMI_GLOBAL_BATCH,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Fine-tune backbone + new classifier on the labelled rows `train_indices`; last and best top-1 on test.

    As the authors: the global batch is split over the processes, both learning rates are used as given
    (not scaled with the batch), SGD momentum 0.9, wd 0, cosine.
    """
    accelerator = accelerator or Accelerator()
    if len(train_indices) == 0:
        raise ValueError("The semi-supervised label subset is empty; raise the fraction or fix the subset file.")
    batch_size = per_process_batch_size(global_batch_size, accelerator.num_processes, "--semi_batch_size")
    train_loader, test_loader = _image_loaders(
        splits, splits.train.select(train_indices), processor, batch_size, num_workers
    )
    classifier = load_classifier(name_or_path, splits.class_names)
    return finetune_classifier(classifier, train_loader, test_loader, epochs, backbone_lr, head_lr, accelerator)


def finetune_classifier(
    classifier: PreTrainedModel,
    train_loader: DataLoader,
    test_loader: DataLoader,
    epochs: int,
    backbone_lr: float,
    head_lr: float,
    accelerator: Accelerator,
) -> dict[str, float]:
    """Train backbone + classifier at the given (unscaled) learning rates; `train_and_evaluate`'s results,
    with the groups' lrs named `backbone_lr` and `head_lr`."""
    groups = backbone_and_head_groups(classifier, backbone_lr, head_lr)
    result = train_and_evaluate(ClassifierLogits(classifier), groups, train_loader, test_loader, epochs, accelerator)
    result["backbone_lr"], result["head_lr"] = result.pop("lr_0"), result.pop("lr_1")
    return result


def _feature_size(backbone: FeatureModel, loader: DataLoader) -> int:
    """Width of the backbone's features, read off one evaluation image."""
    pixel_values = next(iter(loader))["pixel_values"][:1]
    with torch.inference_mode():
        features, _ = backbone(pixel_values.to(next(backbone.parameters()).device))
    return features.shape[1]


def _image_loaders(
    splits: LabelledSplits,
    train: Dataset,
    processor: BaseImageProcessor,
    batch_size: int,
    num_workers: int,
) -> tuple[DataLoader, DataLoader]:
    """Shuffled augmented training batches and ordered evaluation batches of the test split."""
    train_collator = ImageClassificationCollator(
        training_augmentation(processor), splits.image_column, splits.label_column
    )
    test_collator = ImageClassificationCollator(ProcessorTransform(processor), splits.image_column, splits.label_column)
    train_loader = DataLoader(
        train,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=train_collator,
        num_workers=num_workers,
        drop_last=False,
    )
    test_loader = DataLoader(splits.test, batch_size=batch_size, collate_fn=test_collator, num_workers=num_workers)
    return train_loader, test_loader
