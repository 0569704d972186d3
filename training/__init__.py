"""What `train.py` calls, in rooms named for what they hold: its settings (`arguments`), two-stage recipes
(`recipes`), launch checks (`launch`), the output folder and checkpoints (`checkpoints`), the data and
processor (`data`), the model (`model`), the training-only objectives (`objectives`), self-critical training
(`self_critical`) and the Trainer subclass with its caption evaluation (`trainer`). Not installed: like
`train.py`, it runs from the repository root."""

from .arguments import parse_args
from .data import build_processor, load_splits
from .model import build_model, caption_length, image_size_of, model_config
from .objectives import remove_training_heads, with_objectives
from .recipes import FIRST_STAGE, second_stage
from .self_critical import SelfCritical
from .trainer import NanoVLMTrainer

__all__ = [
    "FIRST_STAGE", "NanoVLMTrainer", "SelfCritical", "build_model", "build_processor", "caption_length", "image_size_of",
    "load_splits", "model_config", "parse_args", "remove_training_heads", "second_stage", "with_objectives",
]
