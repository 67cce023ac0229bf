"""Frozen-feature extraction for TWIST models and the backbone of any Hugging Face vision model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel, BaseImageProcessor, PreTrainedModel

from ..transforms import batched_eval_transform

if TYPE_CHECKING:
    from datasets import Dataset

TWIST_MODEL_TYPE = "twist"


@dataclass
class FeatureSet:
    """Features (N, F), TWIST head logits (N, K) or None, and labels (N,), in dataset order, on the CPU."""

    features: torch.Tensor
    logits: torch.Tensor | None
    labels: torch.Tensor


class FeatureModel(nn.Module):
    """Maps pixel_values to (features, head logits or None) for a TwistModel or any HF vision backbone.

    Backbone features are pooler_output flattened; without a (trained) pooler, the CLS token of a
    transformer or the spatial mean of a CNN feature map. Head logits only come from a trained TWIST head.
    With `cls_blocks` = n > 1 (timm Vision Transformers only) the features are the final-norm CLS tokens of
    the last n blocks concatenated (n x D wide, the last block last), as the authors' ViT linear probe uses.
    """

    def __init__(self, model: PreTrainedModel, use_pooler: bool = True, trained_head: bool = True, cls_blocks: int = 1):
        super().__init__()
        self.model = model
        self.use_pooler = use_pooler
        self.trained_head = trained_head
        self.has_head = model.config.model_type == TWIST_MODEL_TYPE and trained_head
        self.cls_blocks = cls_blocks
        if cls_blocks < 1 or (cls_blocks > 1 and self.vision_transformer is None):
            raise ValueError(
                f"cls_blocks={cls_blocks}: concatenating the CLS tokens of several blocks needs a timm Vision "
                "Transformer backbone and cls_blocks >= 1; use 1 for other backbones."
            )

    @property
    def vision_transformer(self) -> nn.Module | None:
        """The timm Vision Transformer (with a CLS token) inside the model, or None for other backbones."""
        backbone = self.model.backbone if self._is_twist else self.model
        timm_model = getattr(backbone, "timm_model", None)
        is_vit = hasattr(timm_model, "forward_intermediates") and hasattr(timm_model, "blocks")
        return timm_model if is_vit and getattr(timm_model, "cls_token", None) is not None else None

    def with_cls_blocks(self, cls_blocks: int) -> "FeatureModel":
        """The same model (shared weights) giving the CLS tokens of the last `cls_blocks` blocks."""
        return FeatureModel(self.model, self.use_pooler, self.trained_head, cls_blocks)

    @property
    def _is_twist(self) -> bool:
        return self.model.config.model_type == TWIST_MODEL_TYPE

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cls_blocks > 1:
            return self._last_blocks_cls(pixel_values), None
        outputs = self.model(pixel_values=pixel_values, return_dict=True)
        if self._is_twist:
            return outputs.pooler_output, (outputs.logits if self.has_head else None)
        pooled = getattr(outputs, "pooler_output", None)
        if self.use_pooler and pooled is not None:
            return pooled.flatten(1), None
        hidden = outputs.last_hidden_state
        return (hidden[:, 0] if hidden.ndim == 3 else hidden.flatten(2).mean(dim=2)), None

    def _last_blocks_cls(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, cls_blocks x D): the final-norm CLS token of each of the last cls_blocks blocks, in block order."""
        vit = self.vision_transformer
        outputs = vit.forward_intermediates(
            pixel_values.to(vit.cls_token.dtype),
            indices=self.cls_blocks,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
        return torch.cat([prefix[:, 0] for _, prefix in outputs], dim=-1)


def load_feature_model(name_or_path: str) -> tuple[FeatureModel, BaseImageProcessor]:
    """Load a model folder or Hub id with AutoModel, and its image processor, ready for extraction.

    Parts the checkpoint lacks are freshly random, so they are not used: a pooler (e.g. ViTModel from a
    classifier) gives way to the CLS token, and a TWIST head (a backbone-only checkpoint) to no logits.
    A TWIST model's processor resizes bilinearly, as the authors' evaluation transforms do.
    """
    model, loading_info = AutoModel.from_pretrained(name_or_path, output_loading_info=True)
    untrained_pooler = any(key.startswith("pooler.") for key in loading_info["missing_keys"])
    untrained_head = any(key.startswith("head.") for key in loading_info["missing_keys"])
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except OSError as error:
        raise ValueError(
            f"{name_or_path} has no image processor (preprocessor_config.json); save one next to the model "
            "so that evaluation preprocesses images the way the model expects."
        ) from error
    if model.config.model_type == TWIST_MODEL_TYPE:
        processor.resample = PIL.Image.Resampling.BILINEAR  # the authors' evaluation resize (training: bicubic)
    return FeatureModel(model.eval(), use_pooler=not untrained_pooler, trained_head=not untrained_head), processor


def extract_features(
    model: FeatureModel,
    dataset: Dataset,
    processor: BaseImageProcessor,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    description: str = "features",
) -> FeatureSet:
    """Run the frozen model over a labelled dataset in batches and return its FeatureSet in dataset order.

    Under several Accelerate processes each takes a shard; results are gathered in order, padding dropped.
    """
    from .data import ImageClassificationCollator, ProcessorTransform

    if len(dataset) == 0:
        raise ValueError(f"Cannot extract {description} from an empty dataset; check the split and its size.")
    accelerator = accelerator or Accelerator()
    collator = ImageClassificationCollator(ProcessorTransform(processor), image_column, label_column)
    loader = accelerator.prepare_data_loader(
        DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator, num_workers=num_workers)
    )
    model = model.to(accelerator.device).eval()
    parts: list[dict[str, torch.Tensor]] = []
    progress = tqdm(loader, desc=description, disable=not accelerator.is_local_main_process)
    with torch.inference_mode(), _bf16_autocast_on_gpu(accelerator.device):
        for batch in progress:
            features, logits = model(batch["pixel_values"])
            outputs = {"features": features.float(), "labels": batch["labels"]}
            if logits is not None:
                outputs["logits"] = logits.float()
            parts.append({key: value.cpu() for key, value in accelerator.gather_for_metrics(outputs).items()})
    return FeatureSet(
        features=torch.cat([part["features"] for part in parts]),
        logits=torch.cat([part["logits"] for part in parts]) if "logits" in parts[0] else None,
        labels=torch.cat([part["labels"] for part in parts]),
    )


def _bf16_autocast_on_gpu(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def image_features(
    model: PreTrainedModel | FeatureModel,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    with_logits: bool = False,
    batch_size: int = 512,
    accelerator: Accelerator | None = None,
) -> FeatureSet:
    """Features (and head logits) of an in-memory uint8 split (N, H, W) or (N, 3, H, W), resized and normalised
    as the model's config says, in batches; with an `accelerator`, sharded over its processes and gathered in
    order. Needs neither `datasets` nor Ray, so benchmarks and the training loop share it."""
    feature_model = model if isinstance(model, FeatureModel) else FeatureModel(model, trained_head=with_logits)
    if with_logits and not feature_model.has_head:
        raise ValueError("with_logits=True needs a TWIST model with a trained head; pass with_logits=False.")
    processes = accelerator.num_processes if accelerator is not None else 1
    parts = np.array_split(np.arange(len(images)), processes)
    mine = parts[accelerator.process_index if accelerator is not None else 0]
    device = accelerator.device if accelerator is not None else next(feature_model.parameters()).device
    was_training = feature_model.model.training
    feature_model.eval()
    with accelerator.autocast() if accelerator is not None else _bf16_autocast_on_gpu(device):
        batches = [
            _batch_outputs(feature_model, torch.as_tensor(images[mine[start : start + batch_size]]), device)
            for start in range(0, len(mine), batch_size)
        ]
    feature_model.train(was_training)
    sizes = [len(part) for part in parts]
    outputs = [
        gather_in_order(_concatenated(batches, index, feature_model, device), sizes, accelerator).cpu()
        for index in range(2 if with_logits else 1)
    ]
    return FeatureSet(outputs[0], outputs[1] if with_logits else None, torch.tensor(np.asarray(labels)))


def _batch_outputs(model: FeatureModel, images: torch.Tensor, device: torch.device) -> tuple:
    """(features, logits or None) of one uint8 batch, in float32."""
    config = model.model.config
    pixels = batched_eval_transform(images.to(device), config.image_size, config.image_mean, config.image_std)
    features, logits = model(pixels)
    return features.float(), (logits.float() if logits is not None else None)


def _concatenated(batches: list[tuple], index: int, model: FeatureModel, device: torch.device) -> torch.Tensor:
    """One output (0: features, 1: logits) of every batch in order; an empty (0, width) tensor for an empty shard."""
    if batches:
        return torch.cat([batch[index] for batch in batches])
    width = model.model.feature_size if index == 0 else model.model.config.num_classes
    return torch.zeros(0, width, device=device)


def gather_in_order(local: torch.Tensor, sizes: list[int], accelerator: Accelerator | None) -> torch.Tensor:
    """Concatenate each process's rows in process order (a process may hold one row more than others)."""
    if accelerator is None or accelerator.num_processes == 1:
        return local
    padded = torch.zeros(max(sizes), *local.shape[1:], device=local.device, dtype=local.dtype)
    padded[: local.shape[0]] = local
    gathered = accelerator.gather(padded).view(len(sizes), max(sizes), *local.shape[1:])
    return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])
