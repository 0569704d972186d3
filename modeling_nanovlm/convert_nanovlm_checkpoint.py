"""Convert a NanoVLM saved before image tokens went into `input_ids` (its decoder read the visual prefix in
front of the text, outside `input_ids`) to the current format.

    python -m modeling_nanovlm.convert_nanovlm_checkpoint OLD_FOLDER NEW_FOLDER

The converted model computes the same thing: the tokenizer gets an `<image>` token (the next free id), the
token embedding (tied with the LM head) one row for it, the config its `image_token_id`, the processor its
`num_image_tokens`, and `generation_config.json` suppresses the new token (the old model had no such
output). A prompt is now `<image>... <bos> text` at the positions the prefix and the text had, so the
logits of the text positions and the generated tokens are the old ones (tested on a folder written by the
old code). Other files of the folder (metrics, pictures, arguments) are copied as they are.

Folders of that age all hold the ViT image tower (`vision_tower_type` came later and defaults to it); the
conversion touches only the token embedding and builds the model from the folder's config, so a config that
names either tower converts.
"""

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, HfArgumentParser

from .configuration_nanovlm import NanoVLMConfig
from .modeling_nanovlm import NanoVLMForConditionalGeneration
from .processing_nanovlm import NanoVLMProcessor

IMAGE_TOKEN = "<image>"
REWRITTEN = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
             "configuration_nanovlm.py", "modeling_nanovlm.py", "processing_nanovlm.py"}


def convert(source: str | Path, target: str | Path) -> Path:
    source, target = Path(source), Path(target)
    if not (source / "config.json").is_file() or not (source / "model.safetensors").is_file():
        raise ValueError(f"{source} is not a saved NanoVLM (config.json and model.safetensors are missing)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise ValueError(f"{source} already has an {IMAGE_TOKEN} token: it is in the current format")
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    config = NanoVLMConfig.from_pretrained(source, image_token_id=0)  # the old vocabulary has no room for the new id yet
    state = load_file(source / "model.safetensors")
    embedding = state["model.language_model.embed_tokens.weight"]
    if image_token_id != embedding.shape[0]:
        raise ValueError(f"the tokenizer of {source} ({len(tokenizer) - 1} tokens) does not match its embedding ({embedding.shape[0]} rows)")
    # The <image> row is never read (the image features replace it) and never a target; zeros, and suppressed.
    state["model.language_model.embed_tokens.weight"] = torch.cat([embedding, embedding.new_zeros(1, embedding.shape[1])])
    config.vocab_size, config.image_token_id = image_token_id + 1, image_token_id
    model = NanoVLMForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{source}: weights that do not fit a NanoVLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    generation = GenerationConfig.from_pretrained(source) if (source / "generation_config.json").is_file() else model.generation_config
    generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | {image_token_id})
    model.generation_config = generation

    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor = NanoVLMProcessor(AutoImageProcessor.from_pretrained(source), tokenizer, num_image_tokens=config.num_image_tokens)
    processor.save_pretrained(target)
    for path in source.iterdir():  # the run's other files: metrics.json, arguments.json, pictures, the card
        if path.is_file() and path.name not in REWRITTEN and not (target / path.name).exists():
            shutil.copy2(path, target / path.name)
    return target


def main(argv=None):
    parser = HfArgumentParser((), description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a NanoVLM folder saved before image tokens went into input_ids")
    parser.add_argument("target", help="where the converted folder goes")
    args = parser.parse_args(argv)
    print(f"converted: {convert(args.source, args.target)}")


if __name__ == "__main__":
    main()
