"""TWIST model configuration and the paper's presets."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The one definition of the normalisation statistics, per channel of images in [0, 1]. Fashion-MNIST is
# grayscale: one channel, repeated where a model reads RGB (`rgb_statistics`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

# The one map of the TWIST classes to the Auto classes: it is the `auto_map` a saved folder carries (so it
# loads with `trust_remote_code=True`) and what `import twist_hf` registers with the Auto classes.
TWIST_AUTO_MAP = {
    "AutoConfig": "configuration_twist.TwistConfig",
    "AutoModel": "modeling_twist.TwistModel",
    "AutoModelForPreTraining": "modeling_twist.TwistForPreTraining",
    "AutoModelForImageClassification": "modeling_twist.TwistForImageClassification",
}

HEAD_NORMS = ("batch_norm", "layer_norm", "none")
HEAD_ACTIVATIONS = ("relu", "gelu")
HEAD_INITS = ("default", "trunc_normal")
LAST_NORMS = ("bunch", "global", "none")


def _resnet(**kwargs) -> dict:
    return {"model_type": "resnet", **kwargs}


def _timm_vit(architecture: str, drop_path_rate: float) -> dict:
    model_args = {"dynamic_img_size": True, "drop_path_rate": drop_path_rate}
    return {"model_type": "timm_wrapper", "architecture": architecture, "model_args": model_args}


def rgb_statistics(values: tuple[float, ...]) -> list[float]:
    """Per-channel statistics for RGB input: three values as they are, one grayscale value repeated."""
    return list(values * 3 if len(values) == 1 else values)


_IMAGENET = {"image_size": 224, "image_mean": rgb_statistics(IMAGENET_MEAN), "image_std": rgb_statistics(IMAGENET_STD)}
_FASHION_MNIST = {"image_mean": rgb_statistics(FASHION_MNIST_MEAN), "image_std": rgb_statistics(FASHION_MNIST_STD)}
_VIT_HEAD = {"head_activation": "gelu", "head_init": "trunc_normal", "lam1": -0.6, "lam2": 1.0}

TWIST_PRESETS: dict[str, dict] = {
    "resnet50": {"backbone_config": _resnet(), **_IMAGENET},
    "resnet50w2": {
        "backbone_config": _resnet(embedding_size=128, hidden_sizes=[512, 1024, 2048, 4096]),
        **_IMAGENET,
    },
    "vit-s16": {"backbone_config": _timm_vit("vit_small_patch16_224", 0.0), **_IMAGENET, **_VIT_HEAD},
    "vit-b16": {"backbone_config": _timm_vit("vit_base_patch16_224", 0.1), **_IMAGENET, **_VIT_HEAD},
    "fmnist-resnet": {
        "backbone_config": _resnet(
            embedding_size=16,
            hidden_sizes=[32, 64, 128],
            depths=[1, 1, 1],
            layer_type="basic",
            downsample_in_first_stage=True,
        ),
        "small_image_stem": True,
        "head_hidden_size": 512,
        "num_classes": 256,
        "bunch_size": 128,
        "image_size": 28,
        **_FASHION_MNIST,
    },
    "tiny-resnet": {
        "backbone_config": _resnet(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
        "small_image_stem": True,
        "head_hidden_size": 32,
        "num_classes": 16,
        "bunch_size": 8,
        "image_size": 16,
        **_FASHION_MNIST,
    },
}


@strict
class TwistConfig(PreTrainedConfig):
    r"""
    Configuration of a TWIST network: `backbone -> projection head -> non-affine batch norm -> logits`.

    backbone_config (`dict` or `PreTrainedConfig`, *optional*, defaults to a ResNet-50 `ResNetConfig`):
        Any Hugging Face vision backbone config (ResNet, ConvNeXt, ViT, `timm_wrapper`, ...). It is built
        through the Auto classes, so a backbone is swapped by config alone. Its classifier is never built.
    small_image_stem (`bool`, *optional*, defaults to `False`):
        Replace a ResNet backbone's 7x7 stride-2 convolution and max-pool stem by one 3x3 stride-1
        convolution (CIFAR-style), for images of about 32 pixels or less.
    head_hidden_size (`int`, *optional*, defaults to 4096):
        H, the width of the projection head's two hidden layers.
    num_classes (`int`, *optional*, defaults to 4096):
        K, the number of TWIST classes (the head's output size). At least 2.
    head_norm (`str`, *optional*, defaults to `"batch_norm"`):
        Normalisation after each hidden Linear of the head: `"batch_norm"`, `"layer_norm"` or `"none"`.
    head_activation (`str`, *optional*, defaults to `"relu"`):
        Activation of the head: `"relu"` (ResNet recipes) or `"gelu"` (ViT recipes).
    head_dropout (`float`, *optional*, defaults to 0.0):
        Dropout probability after the head's first activation.
    head_init (`str`, *optional*, defaults to `"default"`):
        Initialisation of the head's Linear layers: `"default"` (PyTorch's) or `"trunc_normal"` (std 0.02,
        zero bias, as the ViT recipes do).
    last_norm (`str`, *optional*, defaults to `"bunch"`):
        The non-affine batch norm of the K logits: `"bunch"` (statistics over `bunch_size` samples,
        synchronised inside groups of ranks), `"global"` (over all ranks) or `"none"`.
    bunch_size (`int`, *optional*, defaults to 256):
        Samples per bunch of the `"bunch"` last norm; the per-device batch size must divide it or be a
        multiple of it.
    sync_batch_norm (`bool`, *optional*, defaults to `True`):
        Synchronise the backbone's and the head's batch norms over all ranks when
        `TwistForPreTraining` trains in a process group of more than one rank.
    tau (`float`, *optional*, defaults to 1.0):
        Temperature of the sharpened distribution `q = softmax(z / tau)` used by the entropy terms. > 0.
    lam1 (`float`, *optional*, defaults to 0.0):
        The sharpness term is weighted by `1 + lam1` (0.0 for ResNet, -0.6 for ViT).
    lam2 (`float`, *optional*, defaults to 1.0):
        Weight of the diversity term.
    eps (`float`, *optional*, defaults to 1e-5):
        Added inside every logarithm of the loss. > 0.
    image_size (`int`, *optional*, defaults to 224):
        Side of the global crops the model is pretrained on; used for the saved image processor.
    image_mean (`list[float]`, *optional*, defaults to the ImageNet mean):
        Per-channel mean used to normalise pixels in training and in the saved image processor.
    image_std (`list[float]`, *optional*, defaults to the ImageNet std):
        Per-channel standard deviation used with `image_mean`.

    Example:
    ```python
    >>> from twist_hf import TwistConfig, TwistModel
    >>> config = TwistConfig.from_preset("resnet50", num_classes=1000)
    >>> model = TwistModel(config)
    ```
    """

    model_type = "twist"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet")}

    backbone_config: dict | PreTrainedConfig | None = None
    small_image_stem: bool = False
    head_hidden_size: int = 4096
    num_classes: int = 4096
    head_norm: str = "batch_norm"
    head_activation: str = "relu"
    head_dropout: float = 0.0
    head_init: str = "default"
    last_norm: str = "bunch"
    bunch_size: int = 256
    sync_batch_norm: bool = True
    tau: float = 1.0
    lam1: float = 0.0
    lam2: float = 1.0
    eps: float = 1e-5
    image_size: int = 224
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.backbone_config, dict):
            self.backbone_config = _backbone_config_from_dict(self.backbone_config)
        self.image_mean = list(self.image_mean) if self.image_mean is not None else rgb_statistics(IMAGENET_MEAN)
        self.image_std = list(self.image_std) if self.image_std is not None else rgb_statistics(IMAGENET_STD)
        self._check_twist_arguments()
        super().__post_init__(**kwargs)
        self._drop_foreign_auto_map()

    def _drop_foreign_auto_map(self) -> None:
        """Keep only TWIST's own `auto_map` entries, warning about others: a folder's config must never make
        `trust_remote_code=True` run code that is not TWIST's, and a model saved from it must not pass it on."""
        auto_map = getattr(self, "auto_map", None)
        if not auto_map:
            return
        foreign = {name: target for name, target in auto_map.items() if TWIST_AUTO_MAP.get(name) != target}
        if foreign:
            logger.warning(
                f"Ignoring auto_map entries that are not TWIST's own classes: {foreign}. A model saved from this "
                "config carries only TWIST's auto_map; check where this folder came from."
            )
            self.auto_map = {name: target for name, target in auto_map.items() if name not in foreign}

    def _check_twist_arguments(self) -> None:
        """Reject values the method cannot train with, saying what to use instead."""
        check_choice("head_norm", self.head_norm, HEAD_NORMS)
        check_choice("head_activation", self.head_activation, HEAD_ACTIVATIONS)
        check_choice("head_init", self.head_init, HEAD_INITS)
        check_choice("last_norm", self.last_norm, LAST_NORMS)
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0 (it divides the logits), got {self.tau}.")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0 (it keeps log() finite), got {self.eps}.")
        if self.num_classes < 2:
            raise ValueError(f"num_classes (K) must be at least 2, got {self.num_classes}.")
        if self.bunch_size < 1:
            raise ValueError(f"bunch_size must be a positive number of samples, got {self.bunch_size}.")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must lie in [0, 1), got {self.head_dropout}.")
        if self.small_image_stem and self.backbone_config.model_type != "resnet":
            raise ValueError(
                "small_image_stem only applies to ResNet backbones, "
                f"but the backbone is {self.backbone_config.model_type!r}. Set small_image_stem=False."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> TwistConfig:
        """Load a TWIST config; a folder or repo holding another model type is a clear error."""
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} model, not a TWIST one "
                f"(model_type {cls.model_type!r}). Load it with its own class or AutoModel, or convert the "
                "authors' TWIST weights with `python -m twist_hf.convert_official_checkpoint`."
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TwistConfig:
        """A config for one of the paper's networks (see `TWIST_PRESETS`), with field overrides."""
        check_choice("TWIST preset", name, tuple(TWIST_PRESETS))
        kwargs = copy.deepcopy(TWIST_PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """The one check of an option with a fixed set of values: a clear error naming the option and its choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")


def _backbone_config_from_dict(config: dict) -> PreTrainedConfig:
    """Build a backbone config from a dict with a ``model_type``, with a clear error for unknown types."""
    kwargs = dict(config)
    model_type = kwargs.pop("model_type", "resnet")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"Unknown backbone type {model_type!r}: backbone_config.model_type must be a Hugging Face vision "
            "model type such as 'resnet', 'convnext', 'vit' or 'timm_wrapper'."
        )
    return CONFIG_MAPPING[model_type](**kwargs)


__all__ = ["TwistConfig", "TWIST_PRESETS"]
