"""NanoVLM: tiny vision-language models as transformers-native classes.

Importing this package registers NanoVLM with transformers' Auto classes (AutoConfig, AutoProcessor,
and AutoModel and AutoModelForImageTextToText, both the captioner `NanoVLMForConditionalGeneration`; the
headless `NanoVLMModel` is its `.model`, or loaded by name) and marks the classes so that `save_pretrained`
writes `auto_map` and copies the three code files next to the weights, for
`from_pretrained(..., trust_remote_code=True)` in environments without this package.

It also registers a pipeline so that `pipeline("image-to-text", model=<loaded model>, processor=...)` captions,
as `pipeline("image-to-text", model=<folder or repo>, trust_remote_code=True)` does through the config's
`custom_pipelines` (which transformers reads only when the model is given as a name).
"""

import logging
import os

from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    ImageTextToTextPipeline,
)
from transformers.image_utils import is_valid_image
from transformers.pipelines import PIPELINE_REGISTRY

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


def _is_nanovlm(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == NanoVLMConfig.model_type


class NanoVLMImageTextToTextPipeline(ImageTextToTextPipeline):
    """transformers' "image-text-to-text" pipeline that also captions images given alone, for NanoVLM models.

    transformers 5.2x turns `pipeline("image-to-text", ...)` into "image-text-to-text" before reading its
    registry, and that pipeline demands text; older 5.x have no "image-to-text" task. Registered for both
    tasks, this class gives a NanoVLM model (this package's or remote code's) a pipeline whose `(images)` call
    returns the checkpoint's own captions (`NanoVLMImageToTextPipeline`) and whose `(images, text)` and chat
    calls stay transformers'; any other model gets transformers' `ImageTextToTextPipeline` itself.
    """

    # None: a processor is loaded from a model name when there is one, and no error stops a loaded model that
    # comes with `image_processor=` and `tokenizer=` instead (True fails before this class is reached).
    _load_processor = None

    def __new__(cls, model=None, *args, **kwargs):
        if not _is_nanovlm(model):
            if kwargs.get("processor") is None:  # what transformers' own class requires
                raise ValueError(
                    f"no processor for the {getattr(getattr(model, 'config', None), 'model_type', None)!r} model: pass "
                    "processor= (e.g. AutoProcessor.from_pretrained(<the model's name or folder>)) to pipeline()"
                )
            return ImageTextToTextPipeline(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model, *args, processor=None, image_processor=None, tokenizer=None, **kwargs):
        if processor is None:
            if image_processor is None or tokenizer is None:
                raise ValueError(
                    "a NanoVLM pipeline needs processor=NanoVLMProcessor.from_pretrained(<folder or repo>), or both "
                    "image_processor= and tokenizer= to build one"
                )
            processor = NanoVLMProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)
        super().__init__(model, *args, processor=processor, image_processor=image_processor, tokenizer=tokenizer,
                         **kwargs)
        # on this pipeline's device; a model placed by accelerate (device_map) may not be given one
        device = {} if getattr(self.model, "hf_device_map", None) else {"device": self.device}
        self.captioner = NanoVLMImageToTextPipeline(model=self.model, processor=self.processor, **device)

    def __call__(self, images=None, text=None, **kwargs):
        items = images if isinstance(images, (list, tuple)) else [images]
        if text is None and items and all(isinstance(i, (str, os.PathLike, Image.Image)) or is_valid_image(i)
                                          for i in items):
            return self.captioner(images, **kwargs)  # images (files) alone: captions, list in, list out
        return super().__call__(images, text, **kwargs)


def _register_pipelines() -> None:
    """Route "image-text-to-text", and "image-to-text" where transformers has no such task, to the class above."""
    _, builtin, _ = PIPELINE_REGISTRY.check_task("image-text-to-text")
    if builtin["impl"] is NanoVLMImageTextToTextPipeline:
        return
    tasks = ["image-text-to-text"]
    if "image-to-text" not in PIPELINE_REGISTRY.get_supported_tasks():
        tasks.append("image-to-text")
    registry_logger = logging.getLogger("transformers.pipelines.base")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)  # "already registered. Overwriting": intended, and other models keep it
    try:
        for task in tasks:
            PIPELINE_REGISTRY.register_pipeline(task, NanoVLMImageTextToTextPipeline, pt_model=builtin["pt"],
                                                default=builtin.get("default"), type=builtin.get("type"))
    finally:
        registry_logger.setLevel(level)


class _RedirectWarningArguments(logging.Filter):
    """transformers 5.2x logs its "image-to-text" -> "image-text-to-text" redirect as `warning_once(message,
    UserWarning)`: the stray argument makes logging print a traceback instead of the message (and fails a pytest
    run). This drops that argument from transformers' pipelines logger's records, so the warning reads as meant."""

    def filter(self, record):
        if record.args == (UserWarning,):
            record.args = ()
        return True


_register_pipelines()
logging.getLogger("transformers.pipelines").addFilter(_RedirectWarningArguments())

__all__ = [
    "PRESETS",
    "NanoVLMConfig",
    "NanoVLMModel",
    "NanoVLMPreTrainedModel",
    "NanoVLMForConditionalGeneration",
    "NanoVLMProcessor",
    "NanoVLMImageToTextPipeline",
    "NanoVLMImageTextToTextPipeline",
]
