"""Export a saved NanoVLM to ONNX for ONNX Runtime and the browser, and caption with the exported files.

    pip install -e ".[onnx]"
    python -m modeling_nanovlm.export_onnx MODEL_DIR          # writes MODEL_DIR/onnx/*.onnx

The files follow the layout of SmolVLM's Hub repos (what transformers.js and optimum read), beside the tokenizer
and processor files that stay in MODEL_DIR:

    onnx/vision_encoder.onnx        pixel_values (B, 3, S, S) -> image_features (B, num_image_tokens, hidden)
    onnx/embed_tokens.onnx          input_ids (B, T) -> inputs_embeds (B, T, hidden)
    onnx/decoder_model_merged.onnx  inputs_embeds, attention_mask (B, past + T), position_ids (B, T),
                                    past_key_values.{i}.key / .value (B, heads, past, head_dim; past = 0 to prefill)
                                    -> logits (B, T, vocab), present.{i}.key / .value (B, heads, past + T, head_dim)
    onnx/*_quantized.onnx           the same, int8 weights (onnxruntime's dynamic quantization)

A caption is what `generate()` does: the image features replace the `<image>` tokens' embeddings (in order, as
`masked_scatter` puts them), the decoder reads the whole prompt with an empty cache, then one token at a time.
`OnnxCaptioner` is that loop (greedy) in onnxruntime; web/ is the same loop in the browser. This module is not part
of the Hub code: it may import onnx and onnxruntime (lazily, with a message saying how to install them).
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

FILES = ("vision_encoder", "embed_tokens", "decoder_model_merged")
INSTALL = 'pip install -e ".[onnx]"'


def _require(module: str):
    """Import `module` (onnx, onnxscript, onnxruntime), or say which extra brings it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise ImportError(f"exporting to and running ONNX needs {module.split('.')[0]}: {INSTALL} ({err})") from None


class VisionEncoder(nn.Module):
    """pixel_values -> image_features: the vision tower and the projector, rows ready for the `<image>` positions."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.get_image_features(pixel_values)


class EmbedTokens(nn.Module):
    """input_ids -> inputs_embeds (the decoder's token table, without positions: the decoder adds those)."""

    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class _PastKeyValues:
    """The one method of transformers' `Cache` that attention calls (`update`), over plain tensors: each layer's new
    keys and values are appended to the past ones given as inputs, and the results become the `present` outputs."""

    def __init__(self, past: list[torch.Tensor]):
        self.past = past
        self.present = [None] * len(past)

    def update(self, key, value, layer_idx):
        key = torch.cat([self.past[2 * layer_idx], key], dim=2)
        value = torch.cat([self.past[2 * layer_idx + 1], value], dim=2)
        self.present[2 * layer_idx], self.present[2 * layer_idx + 1] = key, value
        return key, value


class Decoder(nn.Module):
    """One decoder call with a cache given as tensors: the prefill (past length 0) or a decoding step.

    `attention_mask` (B, past + T) is 1 on real tokens, 0 on (left) pads; the mask the layers get is causal over the
    absolute positions and hides pads, additive (0 / dtype's min, never -inf: a pad's query row sees no key and
    stays finite, so its keys and values hold no NaN for later steps to multiply by 0)."""

    def __init__(self, model):
        super().__init__()
        self.language_model = model.model.language_model
        self.lm_head = model.get_output_embeddings()

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):
        cache = _PastKeyValues(list(past_key_values))
        T, K = inputs_embeds.shape[1], attention_mask.shape[1]
        query_positions = torch.arange(T, device=inputs_embeds.device) + (K - T)  # absolute positions of the new tokens
        key_positions = torch.arange(K, device=inputs_embeds.device)
        allowed = (key_positions[None, :] <= query_positions[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)  # (B, 1, T, past + T)
        hidden = self.language_model(inputs_embeds, position_ids, mask, cache)[0]
        return (self.lm_head(hidden), *cache.present)


def _io_names(num_layers: int):
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present


def _export(module, args, path, input_names, output_names, dynamic_axes, dynamo: bool, opset: int):
    """torch.onnx.export with named dynamic axes, through torch.export (`dynamo=True`) or TorchScript tracing."""
    if dynamo:
        _require("onnxscript")
        program = torch.onnx.export(module, args, input_names=input_names, output_names=output_names,
                                    dynamic_axes=dynamic_axes, dynamo=True, opset_version=opset, optimize=True,
                                    verbose=False)
        program.save(path)
    else:
        torch.onnx.export(module, args, path, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, dynamo=False, opset_version=opset)


def export_onnx(model_dir: str, output_dir: str | None = None, quantize: bool = True, dynamo: bool = True,
                opset: int = 18) -> list[str]:
    """Write the three ONNX files (and their `_quantized` int8 twins) of the NanoVLM saved in `model_dir` into
    `output_dir` (default `model_dir/onnx`), and `preprocessor_config.json` (the image processor's settings, where
    transformers.js and web/ read them) into `model_dir` when it lacks one. Returns the paths written."""
    _require("onnx")
    from . import NanoVLMForConditionalGeneration

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a folder written by save_pretrained")
    model = NanoVLMForConditionalGeneration.from_pretrained(model_dir).eval()
    config = model.config
    output_dir = output_dir or os.path.join(model_dir, "onnx")
    os.makedirs(output_dir, exist_ok=True)
    _write_preprocessor_config(model_dir)

    L, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = config.hidden_size // heads
    past_names, present_names = _io_names(L)
    B, T, past = 2, 3, 4  # example sizes for tracing; all of them are dynamic in the files
    pixel_values = torch.zeros(B, config.num_channels, config.image_size, config.image_size)
    input_ids = torch.full((B, T), config.bos_token_id or 0, dtype=torch.long)
    past_key_values = tuple(torch.zeros(B, heads, past, head_dim) for _ in range(2 * L))
    decoder_args = (torch.zeros(B, T, config.hidden_size), torch.ones(B, past + T, dtype=torch.long),
                    torch.arange(past, past + T).expand(B, T), past_key_values)
    kv_axes = {0: "batch_size", 2: "past_sequence_length"}
    present_axes = {0: "batch_size", 2: "total_sequence_length"}
    exports = [
        ("vision_encoder", VisionEncoder(model.model), (pixel_values,), ["pixel_values"], ["image_features"],
         {"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}}),
        ("embed_tokens", EmbedTokens(model), (input_ids,), ["input_ids"], ["inputs_embeds"],
         {"input_ids": {0: "batch_size", 1: "sequence_length"}, "inputs_embeds": {0: "batch_size", 1: "sequence_length"}}),
        ("decoder_model_merged", Decoder(model), decoder_args,
         ["inputs_embeds", "attention_mask", "position_ids", *past_names], ["logits", *present_names],
         {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
          "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
          "position_ids": {0: "batch_size", 1: "sequence_length"},
          "logits": {0: "batch_size", 1: "sequence_length"},
          **{name: kv_axes for name in past_names}, **{name: present_axes for name in present_names}}),
    ]
    written = []
    for name, module, args, inputs, outputs, axes in exports:
        path = os.path.join(output_dir, f"{name}.onnx")
        logger.info("exporting %s", path)
        try:
            with torch.no_grad():
                _export(module.eval(), args, path, inputs, outputs, axes, dynamo, opset)
        except Exception as err:
            if dynamo:
                raise
            raise RuntimeError(
                f"torch.onnx's legacy (TorchScript) exporter failed on {name} ({type(err).__name__}: {err}); "
                "export with the dynamo exporter (the default: drop --dynamo false, or dynamo=True)"
            ) from err
        written.append(path)
    if quantize:
        written += [quantize_file(path) for path in list(written)]
    return written


def quantize_file(path: str) -> str:
    """`name_quantized.onnx` beside `name.onnx`: int8 weights of the matrix products and the token table,
    activations quantized at run time (onnxruntime.quantization.quantize_dynamic). Convolutions stay float:
    onnxruntime-web's WebAssembly build has no ConvInteger kernel."""
    quantization = _require("onnxruntime.quantization")
    target = path[: -len(".onnx")] + "_quantized.onnx"
    logger.info("quantizing %s", target)
    quantization.quantize_dynamic(path, target, weight_type=quantization.QuantType.QInt8,
                                  op_types_to_quantize=["MatMul", "Gather"])
    return target


def _write_preprocessor_config(model_dir: str):
    """transformers.js (and web/) read the image processor's settings from preprocessor_config.json; a
    NanoVLMProcessor save nests them in processor_config.json: copy them out when the folder has no
    preprocessor_config.json."""
    target = os.path.join(model_dir, "preprocessor_config.json")
    source = os.path.join(model_dir, "processor_config.json")
    if os.path.exists(target) or not os.path.exists(source):
        return
    with open(source) as f:
        image_processor = json.load(f).get("image_processor")
    if image_processor:
        image_processor = {k: v for k, v in image_processor.items() if k != "auto_map"}
        with open(target, "w") as f:
            json.dump(image_processor, f, indent=2, sort_keys=True)


class OnnxCaptioner:
    """Greedy captioning over a folder's onnx/ files in onnxruntime: the tokens `model.generate()` gives with
    `do_sample=False, num_beams=1` (tests/test_onnx_export.py checks it at batch 1 and on a left-padded batch).

    `quantized=True` loads the int8 files; `threads` sets onnxruntime's intra-op threads (default: its own).
    """

    def __init__(self, model_dir: str, quantized: bool = False, threads: int | None = None, onnx_dir: str | None = None):
        ort = _require("onnxruntime")
        with open(os.path.join(model_dir, "config.json")) as f:
            self.config = json.load(f)
        generation = {}
        if os.path.exists(os.path.join(model_dir, "generation_config.json")):
            with open(os.path.join(model_dir, "generation_config.json")) as f:
                generation = json.load(f)
        eos = generation.get("eos_token_id", self.config.get("eos_token_id"))
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = generation.get("pad_token_id", self.config.get("pad_token_id"))
        onnx_dir = onnx_dir or os.path.join(model_dir, "onnx")
        suffix = "_quantized" if quantized else ""
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.sessions = {}
        for name in FILES:
            path = os.path.join(onnx_dir, f"{name}{suffix}.onnx")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing; run `python -m modeling_nanovlm.export_onnx {model_dir}`")
            self.sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.num_layers = self.config["num_hidden_layers"]
        self.num_heads = self.config["num_attention_heads"]
        self.head_dim = self.config["hidden_size"] // self.num_heads
        self.past_names, _ = _io_names(self.num_layers)

    def embed(self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None) -> np.ndarray:
        """Token embeddings with the image features in the `<image>` tokens' places (row by row, as masked_scatter)."""
        (embeds,) = self.sessions["embed_tokens"].run(None, {"input_ids": input_ids.astype(np.int64)})
        if pixel_values is not None:
            (features,) = self.sessions["vision_encoder"].run(None, {"pixel_values": pixel_values.astype(np.float32)})
            placeholders = input_ids == self.config["image_token_id"]
            if placeholders.sum() != features.shape[0] * features.shape[1]:
                raise ValueError(f"input_ids hold {int(placeholders.sum())} <image> tokens but the images give "
                                 f"{features.shape[0] * features.shape[1]} features; prepare them with NanoVLMProcessor")
            embeds[placeholders] = features.reshape(-1, features.shape[-1])
        return embeds

    def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int = 20) -> np.ndarray:
        """Prompt and new tokens, (B, prompt + new): rows that ended continue with the pad id, as generate() does."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        B, T = input_ids.shape
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        pixel_values = None if pixel_values is None else np.asarray(pixel_values, dtype=np.float32)
        max_new_tokens = min(max_new_tokens, self.config["max_position_embeddings"] - T)  # as generate() caps it
        embeds = self.embed(input_ids, pixel_values)
        past = {name: np.zeros((B, self.num_heads, 0, self.head_dim), np.float32) for name in self.past_names}
        sequences, done = input_ids, np.zeros(B, dtype=bool)
        for _ in range(max_new_tokens):
            position_ids = np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None)[:, -embeds.shape[1]:]
            logits, *present = self.sessions["decoder_model_merged"].run(
                None, {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids, **past})
            past = dict(zip(self.past_names, present))
            token = logits[:, -1].argmax(-1)
            token = np.where(done, self.pad_token_id, token)
            sequences = np.concatenate([sequences, token[:, None]], axis=1)
            done |= np.isin(token, list(self.eos_token_ids))
            if done.all():
                break
            attention_mask = np.concatenate([attention_mask, np.ones((B, 1), np.int64)], axis=1)
            embeds = self.embed(token[:, None])
        return sequences


@dataclass
class ExportArguments:
    model_dir: str = field(metadata={"help": "a folder written by save_pretrained (model and processor)"})
    output_dir: str | None = field(default=None, metadata={"help": "where the .onnx files go (default MODEL_DIR/onnx)"})
    quantize: bool = field(default=True, metadata={"help": "also write the int8 *_quantized.onnx files"})
    dynamo: bool = field(default=True, metadata={"help": "torch.onnx's dynamo exporter (False: the legacy TorchScript one)"})
    opset: int = field(default=18, metadata={"help": "ONNX opset"})


def main(argv=None):
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # onnxruntime's quantizer logs each tensor at INFO
    logger.setLevel(logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # the folder may come first, without its flag
        argv = ["--model_dir", *argv]
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(argv)
    for path in export_onnx(args.model_dir, args.output_dir, args.quantize, args.dynamo, args.opset):
        logger.info("wrote %s (%.1f MB)", path, os.path.getsize(path) / 1e6)


if __name__ == "__main__":
    main()
