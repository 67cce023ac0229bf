"""twist-hf: TWIST self-supervised learning as Hugging Face models.

Importing the package registers the TWIST classes with the Auto classes, and marks them for
`register_for_auto_class` so that every saved folder also loads with `trust_remote_code=True`.
"""

import transformers

from .configuration_twist import TWIST_AUTO_MAP, TWIST_PRESETS, TwistConfig
from .modeling_twist import (
    TwistForImageClassification,
    TwistForPreTraining,
    TwistForPreTrainingOutput,
    TwistModel,
    TwistModelOutput,
    TwistPreTrainedModel,
    twist_image_processor,
)


def _register_auto_classes() -> None:
    """Register every class of `TWIST_AUTO_MAP` with its Auto class, here and in the folders it saves."""
    for auto_name, target in TWIST_AUTO_MAP.items():
        twist_class = globals()[target.rsplit(".", 1)[1]]
        auto_class = getattr(transformers, auto_name)
        if twist_class is TwistConfig:
            auto_class.register(TwistConfig.model_type, TwistConfig, exist_ok=True)
        else:
            auto_class.register(TwistConfig, twist_class, exist_ok=True)
        twist_class.register_for_auto_class(auto_name)


_register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "TWIST_AUTO_MAP",
    "TWIST_PRESETS",
    "TwistConfig",
    "TwistModel",
    "TwistForPreTraining",
    "TwistForImageClassification",
    "TwistPreTrainedModel",
    "TwistModelOutput",
    "TwistForPreTrainingOutput",
    "twist_image_processor",
]
