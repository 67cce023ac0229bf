"""TWIST models: a vision backbone, a projection head and a non-affine batch norm over K classes."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, ConvNextImageProcessor, PreTrainedModel, ViTImageProcessor
from transformers import initialization as init
from transformers.image_processing_utils import BaseImageProcessor
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_twist import TWIST_AUTO_MAP, TwistConfig
from .distributed import BunchBatchNorm, bunch_layout, convert_to_distributed_batch_norm, world_size
from .losses import TwistLossTerms, momentum_twist_loss, self_label_loss, twist_loss
from .vit import authors_vit, init_authors_vit, use_authors_position_interpolation

# Backbones whose pooler is a trained dense layer rather than the feature itself: use the CLS token.
_CLS_TOKEN_BACKBONES = ("vit", "deit")


@dataclass
class TwistModelOutput(ModelOutput):
    """
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        The backbone features (pooled CNN features or the final-normed CLS token): the representation.
    logits (`torch.FloatTensor` of shape `(batch_size, num_classes)`):
        The TWIST head's normalised logits; their softmax is the twin class distribution.
    unnormalized_logits (`torch.FloatTensor` of shape `(batch_size, num_classes)`):
        The head's logits before the last (non-affine) batch norm.
    last_hidden_state (`torch.FloatTensor`):
        The backbone's last hidden state (feature map or token sequence).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The backbone's hidden states, when `output_hidden_states=True`.
    """

    pooler_output: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    unnormalized_logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class TwistForPreTrainingOutput(ModelOutput):
    """
    loss (`torch.FloatTensor` of shape `()`):
        The training loss: TWIST `kl + (1 + lam1) * eh - lam2 * he`, or the self-labeling cross-entropy.
    kl_loss, eh_loss, he_loss (`torch.FloatTensor` of shape `()`):
        Consistency (symmetric KL), sharpness (mean entropy) and diversity (entropy of the mean) terms.
    self_label_fraction (`torch.FloatTensor` of shape `()`, *optional*):
        In the self-labeling phase, the fraction of the global batch confident enough to be used.
    logits (`torch.FloatTensor` of shape `(num_views, batch_size, num_classes)`):
        The normalised logits that enter the softmax, per view.
    unnormalized_logits (`torch.FloatTensor` of shape `(num_views, batch_size, num_classes)`):
        The logits before the last batch norm, per view.
    pooler_output (`torch.FloatTensor` of shape `(num_views, batch_size, hidden_size)`):
        The backbone features of every view.
    """

    loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    eh_loss: torch.FloatTensor | None = None
    he_loss: torch.FloatTensor | None = None
    self_label_fraction: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    unnormalized_logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None


def _norm_layer(kind: str, size: int) -> nn.Module:
    """The head's hidden norm; the LayerNorm option uses the authors' eps of 1e-6."""
    if kind == "batch_norm":
        return nn.BatchNorm1d(size)
    return nn.LayerNorm(size, eps=1e-6) if kind == "layer_norm" else nn.Identity()


def _activation(kind: str) -> nn.Module:
    return nn.ReLU(inplace=True) if kind == "relu" else nn.GELU()


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on `device`; nothing to disable where autocast does not exist (the meta device).

    Under torch.compile the device is a real one and the availability check is skipped: torch 2.11's Dynamo
    cannot trace it, and the graph break it made recompiled the rest of the forward until the recompile limit,
    then ran it eager."""
    if torch.compiler.is_compiling() or torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class TwistHead(nn.Module):
    """`Linear(F,H) -> Norm -> Act -> Dropout -> Linear(H,H) -> Norm -> Act -> Linear(H,K) -> last norm`.

    Module indices match the reference checkpoints (`projection_head.0/.1/.4/.5`, `last_linear`, `norm`).
    """

    def __init__(self, config: TwistConfig, in_features: int):
        super().__init__()
        hidden = config.head_hidden_size
        self.projection_head = nn.Sequential(
            nn.Linear(in_features, hidden),
            _norm_layer(config.head_norm, hidden),
            _activation(config.head_activation),
            nn.Dropout(config.head_dropout),
            nn.Linear(hidden, hidden),
            _norm_layer(config.head_norm, hidden),
            _activation(config.head_activation),
        )
        self.last_linear = nn.Linear(hidden, config.num_classes)
        if config.last_norm == "none":
            self.norm = nn.Identity()
        else:
            self.norm = BunchBatchNorm(config.num_classes, mode=config.last_norm, bunch_size=config.bunch_size)

    def forward(self, features: torch.Tensor, num_views: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised logits, logits before the last norm) for view-major features (num_views * B, F).

        The last norm runs in fp32 even under autocast and its output stays fp32, so the loss path (softmax,
        logs, global means) never sees logits rounded to half precision (docs/method.md §2.2).
        """
        unnormalized = self.last_linear(self.projection_head(features))
        with _autocast_off(unnormalized.device):
            if isinstance(self.norm, BunchBatchNorm):
                return self.norm(unnormalized.float(), num_views=num_views), unnormalized
            return self.norm(unnormalized.float()), unnormalized


def _build_backbone(config: TwistConfig) -> PreTrainedModel:
    """The backbone through the Auto classes, without its classifier, with the small stem if asked."""
    backbone_config = config.backbone_config
    kwargs = {"add_pooling_layer": False} if backbone_config.model_type in _CLS_TOKEN_BACKBONES else {}
    backbone = AutoModel.from_config(backbone_config, **kwargs)
    if config.small_image_stem:
        stem = backbone.embedder.embedder
        stem.convolution = nn.Conv2d(
            backbone_config.num_channels,
            backbone_config.embedding_size,
            kernel_size=3,
            stride=1,
            padding=1,
            bias=False,
        )
        backbone.embedder.pooler = nn.Identity()
    use_authors_position_interpolation(backbone)
    return backbone


def _backbone_feature_size(backbone: PreTrainedModel) -> int:
    """Width F of the pooled backbone feature."""
    config = backbone.config
    if getattr(config, "hidden_sizes", None):
        return config.hidden_sizes[-1]
    timm_model = getattr(backbone, "timm_model", None)
    if timm_model is not None:
        return timm_model.num_features
    if hasattr(config, "hidden_size"):
        return config.hidden_size
    raise ValueError(f"Cannot tell the feature size of a {config.model_type!r} backbone.")


def pool_backbone_output(outputs: ModelOutput) -> torch.Tensor:
    """(B, F) features from any HF vision backbone output: its pooler, else CLS token, else mean pool."""
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    hidden = outputs.last_hidden_state
    if hidden.dim() == 3:
        return hidden[:, 0]
    return hidden.mean(dim=tuple(range(2, hidden.dim())))


def twist_image_processor(config: TwistConfig) -> BaseImageProcessor:
    """The standard HF image processor matching the config's input size and normalisation.

    ImageNet-sized models: resize the short side to size / 0.875 and centre-crop (the usual evaluation
    transform). Small-image models: resize the whole image to `image_size`, as in pretraining.
    """
    common = {"image_mean": config.image_mean, "image_std": config.image_std, "resample": 3}
    if config.image_size >= 64:
        return ConvNextImageProcessor(size={"shortest_edge": config.image_size}, crop_pct=0.875, **common)
    return ViTImageProcessor(size={"height": config.image_size, "width": config.image_size}, **common)


def _weights_readable_like_config(folder: Path) -> None:
    """safetensors writes weights with mode 0600: give them config.json's mode (what the umask allows), so that
    other users of a shared filesystem can load the model."""
    mode = (folder / "config.json").stat().st_mode & 0o666
    for weights in folder.glob("*.safetensors"):
        weights.chmod(mode)


class TwistPreTrainedModel(PreTrainedModel):
    config: TwistConfig
    config_class = TwistConfig
    base_model_prefix = "twist"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Save the model and, next to it, the image processor that `AutoImageProcessor` and pipelines load."""
        if self._auto_class is not None:  # every TWIST class, so the folder loads with each Auto class remotely
            self.config.auto_map = dict(TWIST_AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            twist_image_processor(self.config).save_pretrained(save_directory)
            _weights_readable_like_config(Path(save_directory))

    def initialize_weights(self) -> None:
        """Every module's init, then the authors' ViT init where timm's differs (docs/method.md §2.3).

        Weights loaded from a checkpoint are flagged as initialised and left alone.
        """
        super().initialize_weights()
        for module in self.modules():
            vit = authors_vit(module.backbone) if isinstance(module, TwistModel) else None
            if vit is not None:
                init_authors_vit(vit)

    def _init_weights(self, module: nn.Module) -> None:
        """Head Linears as the recipe asks; norms to identity. The backbone initialises itself."""
        if isinstance(module, nn.Linear):
            if self.config.head_init == "trunc_normal":
                init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    init.zeros_(module.bias)
            else:
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                if module.bias is not None:
                    bound = 1 / math.sqrt(module.weight.shape[1])
                    init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, BunchBatchNorm)):
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class TwistModel(TwistPreTrainedModel):
    """Backbone features (`pooler_output`) and TWIST class logits (`logits`) for a batch of images."""

    def __init__(self, config: TwistConfig, add_head: bool = True):
        super().__init__(config)
        self.backbone = _build_backbone(config)
        self.feature_size = _backbone_feature_size(self.backbone)
        self.head = TwistHead(config, self.feature_size) if add_head else None
        self.post_init()

    def encode(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> ModelOutput:
        """Run the backbone on one batch of same-resolution images."""
        return self.backbone(pixel_values=pixel_values, output_hidden_states=output_hidden_states, return_dict=True)

    def encode_views(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Pooled features (num_views * B, F) in view order; same-resolution views share one forward."""
        by_resolution: dict[tuple[int, ...], list[int]] = {}
        for index, view in enumerate(views):
            by_resolution.setdefault(tuple(view.shape[1:]), []).append(index)
        features: list[torch.Tensor | None] = [None] * len(views)
        for indices in by_resolution.values():
            pooled = pool_backbone_output(self.encode(torch.cat([views[i] for i in indices])))
            for index, chunk in zip(indices, pooled.chunk(len(indices))):
                features[index] = chunk
        return torch.cat(features)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TwistModelOutput | tuple:
        if pixel_values is None:
            raise ValueError("TwistModel needs `pixel_values` of shape (batch, channels, height, width).")
        outputs = self.encode(pixel_values, output_hidden_states=bool(output_hidden_states))
        pooled = pool_backbone_output(outputs)
        logits = unnormalized = None
        if self.head is not None:
            logits, unnormalized = self.head(pooled)
        result = TwistModelOutput(
            pooler_output=pooled,
            logits=logits,
            unnormalized_logits=unnormalized,
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )
        return result if return_dict is not False else result.to_tuple()


def _as_views(pixel_values: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """Validate the views of one batch: at least two, each (B, C, H, W), all with the same B."""
    views = list(pixel_values.unbind(0)) if isinstance(pixel_values, torch.Tensor) else list(pixel_values)
    if len(views) < 2:
        raise ValueError(
            f"TwistForPreTraining needs at least two augmented views of each image, got {len(views)}. "
            "Pass pixel_values=[view0, view1, *local_views]."
        )
    sizes = [view.shape[0] for view in views]
    if any(view.dim() != 4 for view in views) or len(set(sizes)) != 1:
        shapes = [tuple(view.shape) for view in views]
        raise ValueError(f"Every view must be a (B, C, H, W) tensor with the same batch size B; got {shapes}.")
    return views


class TwistForPreTraining(TwistPreTrainedModel):
    """TWIST self-supervised pretraining: views in, loss and its kl / eh / he terms out."""

    def __init__(self, config: TwistConfig):
        super().__init__(config)
        self.twist = TwistModel(config)
        if config.sync_batch_norm:
            convert_to_distributed_batch_norm(self.twist)
        self.post_init()

    def forward(
        self,
        pixel_values: list[torch.Tensor] | torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        self_label_quantile: float | None = None,
        return_loss: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TwistForPreTrainingOutput | tuple:
        """Views `[global0, global1, *locals]` -> per-view logits and, by default, the loss.

        `teacher_logits` (2, B, K) switches to the momentum-encoder loss; `self_label_quantile` to the
        self-labeling loss with that confidence quantile.
        """
        views = _as_views(pixel_values)
        num_views, batch = len(views), views[0].shape[0]
        self._check_bunch(batch)
        features = self.twist.encode_views(views)
        logits, unnormalized = self.twist.head(features, num_views=num_views)
        output = TwistForPreTrainingOutput(
            logits=logits.view(num_views, batch, -1),
            unnormalized_logits=unnormalized.view(num_views, batch, -1),
            pooler_output=features.view(num_views, batch, -1),
        )
        if return_loss:
            self._fill_loss(output, teacher_logits, self_label_quantile)
        return output if return_dict is not False else output.to_tuple()

    def _check_bunch(self, batch: int) -> None:
        if self.training and self.config.last_norm == "bunch":
            bunch_layout(batch, self.config.bunch_size, world_size())

    def _fill_loss(
        self, output: TwistForPreTrainingOutput, teacher_logits: torch.Tensor | None, self_label_quantile: float | None
    ) -> None:
        if self_label_quantile is not None:
            output.loss, output.self_label_fraction = self_label_loss(output.logits, self_label_quantile)
            return
        terms = self.compute_loss(output.logits, teacher_logits)
        output.loss, output.kl_loss, output.eh_loss, output.he_loss = terms.loss, terms.kl, terms.eh, terms.he

    def compute_loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> TwistLossTerms:
        """TWIST loss of per-view logits (V, B, K); the momentum variant when teacher logits are given."""
        config = self.config
        if teacher_logits is not None:
            return momentum_twist_loss(logits, teacher_logits, config.tau, config.lam1, config.lam2, config.eps)
        return twist_loss(logits, config.tau, config.lam1, config.lam2, config.eps)


class TwistForImageClassification(TwistPreTrainedModel):
    """A TWIST backbone with a linear classifier over `num_labels`, for linear probing and fine-tuning."""

    _keys_to_ignore_on_load_unexpected = [r"^(twist\.)?head\."]

    def __init__(self, config: TwistConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.twist = TwistModel(config, add_head=False)
        self.classifier = nn.Linear(self.twist.feature_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.classifier:
            init.normal_(module.weight, std=0.01)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        outputs = self.twist(pixel_values, output_hidden_states=output_hidden_states)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        result = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return result if return_dict is not False else result.to_tuple()


__all__ = [
    "TwistPreTrainedModel",
    "TwistModel",
    "TwistForPreTraining",
    "TwistForImageClassification",
    "TwistModelOutput",
    "TwistForPreTrainingOutput",
    "pool_backbone_output",
    "twist_image_processor",
]
