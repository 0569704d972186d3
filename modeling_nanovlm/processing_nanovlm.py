"""NanoVLM processor (image processor + BPE tokenizer) and its "image-to-text" pipeline.

The image side is transformers' `ViTImageProcessorPil` (resize to 224x224, rescale, normalize);
this file only turns any PIL mode, EXIF orientation or file into an upright RGB image first.
The tokenizer is a byte-level BPE `PreTrainedTokenizerFast` whose post-processor adds `<bos>`, so
an empty prompt means "caption this image". Shipped to the Hub as remote code: imports only
torch, transformers, PIL (a transformers image dependency), numpy and stdlib.
"""

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import Pipeline, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

# Renders the text of every message: NanoVLM is a captioner, so a chat is just the text to
# continue (empty for "describe the image"); image entries become pixel_values.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)


def to_rgb(image, name="image", min_size: int | None = None) -> Image.Image:
    """An upright 8-bit RGB copy of a PIL image or an image file; `ValueError` naming what failed.

    `min_size`: a JPEG file may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: 2-5x
    faster) as long as both sides stay at least `min_size` pixels, for a processor that resizes
    to that size anyway.
    """
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        if os.path.exists(name) and not os.path.isfile(name):  # a folder, a FIFO (would block), a device
            raise ValueError(f"{name} is not a regular file; pass an image file (JPEG/PNG/...)")
        try:
            with Image.open(name) as opened:
                if min_size:
                    opened.draft(None, (min_size, min_size))  # only JPEGs act on it
                opened.load()
                image = opened.copy() if opened.mode != "P" else opened.convert("RGBA")
        except FileNotFoundError:
            raise ValueError(f"{name}: no such image file") from None
        except Image.DecompressionBombError as err:
            raise ValueError(f"{name} is too large to decode safely ({err}); resize it first") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"{name} could not be decoded as an image ({err}); pass a JPEG/PNG/... file") from None
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image or a path to an image file, got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) gray: convert("RGB") would clip everything above 255 to white.
        array = np.asarray(image, dtype=np.float32) / (257.0 if image.mode.startswith("I;16") else 65793.0)
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels have arbitrary color values: lay the image on white, as a viewer shows it.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


class NanoVLMProcessor(ProcessorMixin):
    """Turns images and/or text into `pixel_values`, `input_ids` and `attention_mask`.

    With an image, a sample's ids are `num_image_tokens` `<image>` tokens, then `<bos>` and the text
    (`<bos>` alone: "caption this image"); the model puts the image's features where the `<image>`
    tokens are, as LLaVA does. Left-padded (what `generate()` needs) unless `padding_side="right"`;
    `batch_decode` drops special tokens.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=CHAT_TEMPLATE, num_image_tokens=None,
                 image_token="<image>", **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.tokenizer.padding_side = "left"
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {image_token} token: a folder saved before NanoVLM wrote image tokens into input_ids; "
                "convert it with `python -m modeling_nanovlm.convert_nanovlm_checkpoint FOLDER OUTPUT`"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ProcessorMixin.from_pretrained`; a local folder must hold the files `save_pretrained` writes, else an
        error naming the folder and the file (without tokenizer_config.json the tokenizer would load with no
        `<pad>`/`<bos>`, and fail or mis-tokenize later)."""
        name = os.fspath(pretrained_model_name_or_path)
        folder = os.path.join(os.path.expanduser(name), kwargs.get("subfolder") or "")
        if os.path.isdir(folder):
            needed = {
                "tokenizer.json": "the tokenizer's vocabulary and merges",
                "tokenizer_config.json": "the tokenizer's special tokens",
                "processor_config.json": "the image processor's settings",
            }
            if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):  # an older save's image processor file
                needed.pop("processor_config.json")
            for file, holds in needed.items():
                if not os.path.isfile(os.path.join(folder, file)):
                    raise OSError(
                        f"{name}: {file} ({holds}) is missing from the folder; copy it from where the processor was "
                        "saved (NanoVLMProcessor.save_pretrained writes it), or save the processor there again"
                    )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def image_prompt_ids(self, text: list[str], **kwargs) -> list[list[int]]:
        """Token ids of each text behind `num_image_tokens` `<image>` tokens: `<image>... <bos> text`."""
        if not self.num_image_tokens:
            raise ValueError("NanoVLMProcessor needs num_image_tokens (the model config's) to prepare images")
        prefix = [self.image_token_id] * self.num_image_tokens
        return [prefix + ids for ids in self.tokenizer(text, **kwargs)["input_ids"]]

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True, **kwargs) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("NanoVLMProcessor needs images, text or both; got neither")
        texts = [text] if isinstance(text, str) else text if isinstance(text, (list, tuple)) else None
        if text is not None and (texts is None or not all(isinstance(t, str) for t in texts)):
            bad = text if texts is None else next(t for t in texts if not isinstance(t, str))
            raise ValueError(f"text must be a string or a list of strings (one prompt per image; \"\" for a plain caption), "
                             f"got {type(bad).__name__} {bad!r:.40}")
        data = {}
        if images is not None:
            single = not isinstance(images, (list, tuple))
            images = [images] if single else list(images)
            if not images:
                raise ValueError("images is an empty list; pass at least one image (or images=None for text only)")
            if images and isinstance(images[0], (list, tuple)):  # one image per sample, as chat templates nest them
                images = [image for group in images for image in group]
            min_size = max(self.image_processor.size.get("height", 0), self.image_processor.size.get("width", 0)) or None
            rgb = [to_rgb(image, f"image {i}", min_size) for i, image in enumerate(images)]
            data.update(self.image_processor(rgb, return_tensors=return_tensors))
            if text is None:
                text = [""] * len(rgb)  # image-only captioning: the prompt is just <bos>
        if text is not None:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("images_kwargs", "text_kwargs")}
            if images is None:
                data.update(self.tokenizer(text, padding=padding, return_tensors=return_tensors, **kwargs))
            else:
                text = [text] if isinstance(text, str) else list(text)
                if len(text) != len(data["pixel_values"]):
                    raise ValueError(f"got {len(data['pixel_values'])} images but {len(text)} texts; pass one text per image")
                pad_kwargs = {k: kwargs.pop(k) for k in ("padding_side", "pad_to_multiple_of") if k in kwargs}
                ids = self.image_prompt_ids(text, **kwargs)
                data.update(self.tokenizer.pad({"input_ids": ids}, padding=padding, return_tensors=return_tensors, **pad_kwargs))
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, sequence, skip_special_tokens=True, **kwargs):
        return self.tokenizer.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


class NanoVLMImageToTextPipeline(Pipeline):
    """`pipeline("image-to-text", model=..., trust_remote_code=True)`: one caption per image.

    Accepts a PIL image, a path, or a list of them (list in, list out); `prompt="I see"` continues
    a description; generation settings go in `generate_kwargs` or as `max_new_tokens`.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, prompt=None, max_new_tokens=None, generate_kwargs=None, **kwargs):
        preprocess = {} if prompt is None else {"prompt": prompt}
        generate_kwargs = dict(generate_kwargs or {}, **kwargs)
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = max_new_tokens
        return preprocess, {"generate_kwargs": generate_kwargs}, {}

    def preprocess(self, image, prompt=""):
        inputs = self.processor(images=image, text=[prompt], return_tensors="pt")
        inputs["prompt"] = prompt
        return inputs

    def _forward(self, model_inputs, generate_kwargs=None):
        prompt = model_inputs.pop("prompt")
        prompt_length = model_inputs["input_ids"].shape[1]
        generate_kwargs = dict(generate_kwargs or {})
        generate_kwargs.setdefault("max_new_tokens", 96)
        sequences = self.model.generate(**model_inputs, **generate_kwargs)
        return {"new_tokens": sequences[:, prompt_length:], "prompt": prompt}

    def postprocess(self, model_outputs):
        prompt = model_outputs["prompt"]
        texts = self.processor.batch_decode(model_outputs["new_tokens"])
        return [{"generated_text": prompt + text} for text in texts]


__all__ = ["NanoVLMProcessor", "NanoVLMImageToTextPipeline", "to_rgb"]
