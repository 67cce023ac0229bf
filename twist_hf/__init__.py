"""twist-hf: TWIST self-supervised learning as Hugging Face models.

Importing the package registers the TWIST classes with the Auto classes, and marks them for
`register_for_auto_class` so that every saved folder also loads with `trust_remote_code=True`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_twist import TWIST_PRESETS, TwistConfig
from .modeling_twist import (
    TwistForImageClassification,
    TwistForPreTraining,
    TwistForPreTrainingOutput,
    TwistModel,
    TwistModelOutput,
    TwistPreTrainedModel,
    twist_image_processor,
)

AutoConfig.register(TwistConfig.model_type, TwistConfig, exist_ok=True)
AutoModel.register(TwistConfig, TwistModel, exist_ok=True)
AutoModelForPreTraining.register(TwistConfig, TwistForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(TwistConfig, TwistForImageClassification, exist_ok=True)

TwistConfig.register_for_auto_class()
TwistModel.register_for_auto_class("AutoModel")
TwistForPreTraining.register_for_auto_class("AutoModelForPreTraining")
TwistForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__version__ = "0.1.0"

__all__ = [
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
