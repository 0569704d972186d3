"""The model a run trains: the preset's config with the run's overrides, or a saved model to start from."""

from modeling_nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration

from .arguments import ModelArguments, parse_config_overrides


def caption_length(model, max_length: int | None) -> int:
    """--max_length, checked to fit the decoder's position table after the image tokens (before training,
    not at the first long caption), or the default."""
    room = model.config.max_position_embeddings - model.config.num_image_tokens
    if max_length is None:
        return min(128, room)
    if max_length < 2:
        raise ValueError(f"--max_length must be at least 2 (<bos> and <eos>), got {max_length}")
    if max_length > room:
        raise ValueError(
            f"--max_length {max_length} + {model.config.num_image_tokens} visual tokens exceed max_position_embeddings "
            f"({model.config.max_position_embeddings}): pass --max_length {room} or less, or a larger "
            "--config_overrides max_position_embeddings=N"
        )
    return max_length


def model_config(model_args: ModelArguments, vocab_size: int | None = None) -> NanoVLMConfig:
    """The starting model's config, or the preset's with --vision_feature_select, --image_size and --config_overrides."""
    if model_args.model_name_or_path:
        return NanoVLMConfig.from_pretrained(model_args.model_name_or_path)
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    if model_args.vision_feature_select:
        overrides["vision_feature_select"] = model_args.vision_feature_select
    if model_args.image_size:
        overrides["image_size"] = model_args.image_size
    overrides.update(parse_config_overrides(model_args.config_overrides))
    return NanoVLMConfig.from_preset(model_args.preset, **overrides)


def image_size_of(model_args: ModelArguments) -> int:
    """--image_size, else the starting model's, else the preset's."""
    return model_args.image_size or model_config(model_args).image_size


def build_model(model_args: ModelArguments, vocab_size: int) -> NanoVLMForConditionalGeneration:
    if model_args.model_name_or_path:
        return NanoVLMForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
    return NanoVLMForConditionalGeneration(model_config(model_args, vocab_size))
