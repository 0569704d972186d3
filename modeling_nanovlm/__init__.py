"""NanoVLM: tiny vision-language models as transformers-native classes.

Importing this package registers NanoVLM with transformers' Auto classes (AutoConfig, AutoProcessor,
and AutoModel and AutoModelForImageTextToText, both the captioner `NanoVLMForConditionalGeneration`; the
headless `NanoVLMModel` is its `.model`, or loaded by name) and marks the classes so that `save_pretrained`
writes `auto_map` and copies the three code files next to the weights, for
`from_pretrained(..., trust_remote_code=True)` in environments without this package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_nanovlm import PRESETS, NanoVLMConfig
from .modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMModel, NanoVLMPreTrainedModel
from .processing_nanovlm import NanoVLMImageToTextPipeline, NanoVLMProcessor

AutoConfig.register(NanoVLMConfig.model_type, NanoVLMConfig, exist_ok=True)
AutoModel.register(NanoVLMConfig, NanoVLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(NanoVLMConfig, NanoVLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(NanoVLMConfig, NanoVLMProcessor, exist_ok=True)

NanoVLMConfig.register_for_auto_class()
NanoVLMModel.register_for_auto_class("AutoModel")
NanoVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
NanoVLMProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "PRESETS",
    "NanoVLMConfig",
    "NanoVLMModel",
    "NanoVLMPreTrainedModel",
    "NanoVLMForConditionalGeneration",
    "NanoVLMProcessor",
    "NanoVLMImageToTextPipeline",
]
