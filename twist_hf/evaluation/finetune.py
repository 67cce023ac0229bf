"""Image-level protocols: the paper's linear probe on augmented images, semi-supervised fine-tuning."""

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification, BaseImageProcessor, PreTrainedModel

from .data import ImageClassificationCollator, LabelledSplits, ProcessorTransform, training_augmentation
from .features import FeatureModel
from .metrics import topk_accuracy

REFERENCE_BATCH = 256


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


def train_classifier(
    model: nn.Module,
    param_groups: list[dict],
    train_loader: DataLoader,
    epochs: int,
    accelerator: Accelerator,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Cross-entropy training with SGD + momentum, every group's lr following one cosine over all steps."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    optimizer = torch.optim.SGD(param_groups, momentum=momentum, weight_decay=weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, train_loader)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    total_steps, step = epochs * len(loader), 0
    model.train()
    for epoch in range(epochs):
        progress = tqdm(loader, desc=f"train epoch {epoch + 1}/{epochs}", disable=not accelerator.is_local_main_process)
        for batch in progress:
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            with accelerator.autocast():
                loss = F.cross_entropy(model(batch["pixel_values"]).float(), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
            step += 1
    return accelerator.unwrap_model(model)


def evaluate_classifier(model: nn.Module, test_loader: DataLoader, accelerator: Accelerator) -> dict[int, float]:
    """Top-1 / top-5 accuracy of pixel_values -> logits over the whole (gathered) test split."""
    model, loader = accelerator.prepare(model, test_loader)
    model.eval()
    logits, labels = [], []
    with torch.inference_mode(), accelerator.autocast():
        for batch in tqdm(loader, desc="test", disable=not accelerator.is_local_main_process):
            gathered = accelerator.gather_for_metrics((model(batch["pixel_values"]).float(), batch["labels"]))
            logits.append(gathered[0].cpu())
            labels.append(gathered[1].cpu())
    return topk_accuracy(torch.cat(logits), torch.cat(labels), (1, 5))


def linear_probe_on_images(
    backbone: FeatureModel,
    splits: LabelledSplits,
    processor: BaseImageProcessor,
    epochs: int = 100,
    batch_size: int = 256,
    base_lr: float = 0.2,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """The paper's linear probe: frozen backbone, augmented images, SGD lr base_lr x batch/256, cosine."""
    accelerator = accelerator or Accelerator()
    train_loader, test_loader = _image_loaders(splits, splits.train, processor, batch_size, num_workers)
    model = FrozenBackboneLinear(backbone, _feature_size(backbone, test_loader), splits.num_classes)
    lr = base_lr * batch_size * accelerator.num_processes / REFERENCE_BATCH
    model = train_classifier(
        model, [{"params": model.classifier.parameters(), "lr": lr}], train_loader, epochs, accelerator
    )
    accuracy = evaluate_classifier(model, test_loader, accelerator)
    return {"linear_top1": accuracy[1], "linear_top5": accuracy[5]}


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
    head_lr: float = 0.2,
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Fine-tune backbone + new classifier on the labelled rows `train_indices`; top-1/top-5 on test.

    Learning rates are per 256 images and scale linearly with the global batch.
    """
    accelerator = accelerator or Accelerator()
    if len(train_indices) == 0:
        raise ValueError("The semi-supervised label subset is empty; raise the fraction or fix the subset file.")
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
    """Train backbone + classifier, learning rates per 256 images scaled linearly with the global batch of
    `train_loader`; top-1/top-5 on `test_loader`."""
    scale = train_loader.batch_size * accelerator.num_processes / REFERENCE_BATCH
    groups = backbone_and_head_groups(classifier, backbone_lr * scale, head_lr * scale)
    model = train_classifier(ClassifierLogits(classifier), groups, train_loader, epochs, accelerator)
    accuracy = evaluate_classifier(model, test_loader, accelerator)
    return {"top1": accuracy[1], "top5": accuracy[5]}


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
