"""Does a trained model's ONNX export caption as the model does? Token equality with `generate()` and what int8 costs
in caption quality, on N validation images. JSON out.

    python -m benchmarks.onnx_check --model_dir outputs/nanovlm-mini-scenes --dataset scenes \\
        --output results/onnx_check_mini_scenes.json
    python -m benchmarks.onnx_check --model_dir outputs/base-flickr8k --dataset coco \\
        --caption_file ../shared/data/flickr8k/captions_val.json --image_dir ../shared/data/flickr8k/images \\
        --output results/onnx_check_base_flickr8k.json

The model's onnx/ files are used when the folder has them (`python -m modeling_nanovlm.export_onnx MODEL_DIR`), else
an export is made in a scratch folder. Every image is captioned by PyTorch `generate()`, onnxruntime fp32 and int8
(`OnnxCaptioner`), greedy whatever the model's saved generation settings say (no beams, no n-gram blocking, no
repetition penalty: the loop the ONNX files run), in two ways:

- batch 1, a plain caption per image;
- batches of `--batch_size`, each row's prompt the first 0, 1 or 2 words of its reference text in turn, so that the
  batch is left-padded and its rows end at different steps (as the judge protocol's continuations run).

The JSON gives, per way, the share of images whose ONNX tokens are exactly generate()'s (fp32 and int8), with the first
differences; and the quality of the batch-1 captions of each side: object recall, precision and CHAIR-i against the
scenes' ground truth (`evaluation.grounding.grounding_scores`, `--dataset scenes`), or BLEU-4, ROUGE-L and CIDEr-D
against the references (`evaluation.caption_metrics.caption_scores`, `--dataset coco`); and int8 minus fp32.
Images come from the evaluation's own loader (`evaluation.cli.load_data`): the first N validation scenes of the
model's style and description version (its arguments.json's `scenes_style`, `scenes_version`), or the first N
images of a captions file.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

from evaluation.caption_metrics import TOKENIZERS, caption_scores
from evaluation.cli import load_data
from evaluation.grounding import grounding_scores
from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMProcessor
from modeling_nanovlm.export_onnx import FILES, OnnxCaptioner, export_onnx
from processing import scenes

logger = logging.getLogger(__name__)

GROUNDING = ("object_recall", "object_precision", "chair_i", "chair_s", "attribute_accuracy", "num_descriptions")
CAPTIONS = ("bleu4", "rouge_l", "cider_d", "bleu1", "tokenizer")
# Plain greedy decoding, given to generate() as arguments: they override what the model's saved generation_config says
# (beams, n-gram blocking, a penalty), which a GenerationConfig object would not (generate() fills its unset fields
# from the saved one). The loop the ONNX files run.
GREEDY = {"do_sample": False, "num_beams": 1, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}


@dataclass
class CheckArguments:
    model_dir: str = field(metadata={"help": "a trained model's folder (model and processor; onnx/ used when there)"})
    output: str = field(metadata={"help": "where the JSON goes"})
    dataset: str = field(default="scenes", metadata={"help": "scenes or coco", "choices": ["scenes", "coco"]})
    num_examples: int = field(default=50, metadata={"help": "images captioned"})
    batch_size: int = field(default=8, metadata={"help": "rows of the left-padded batches"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "default: 110 for long scenes, else 48 (as the "
                                                                       "evaluation)"})
    scenes_style: str | None = field(default=None, metadata={"help": "default: the model's (arguments.json), else short",
                                                             "choices": sorted(scenes.WORD_RANGES)})
    scenes_seed: int = field(default=scenes.VALIDATION_SEED, metadata={"help": "split seed of the scenes"})
    caption_file: str | None = field(default=None, metadata={"help": "coco: captions JSON of the images"})
    image_dir: str | None = field(default=None, metadata={"help": "coco: folder of the images"})
    caption_tokenizer: str = field(default="auto", metadata={"help": "coco metrics' tokenizer", "choices": list(TOKENIZERS)})
    threads: int = field(default=1, metadata={"help": "torch and onnxruntime threads"})


def model_scenes(model_dir: str) -> tuple[str, int]:
    """The scenes style and description version the model was trained on (train.py's arguments.json), else short
    and the current version."""
    try:
        with open(os.path.join(model_dir, "arguments.json")) as f:
            data = json.load(f)["data"]
        return data["scenes_style"], data.get("scenes_version", scenes.DESCRIPTION_VERSION)
    except (OSError, ValueError, KeyError, TypeError):
        return "short", scenes.DESCRIPTION_VERSION


def new_tokens(row, prompt_length: int, eos: set) -> list[int]:
    """A row's tokens after the prompt, up to and with the first end-of-text token (the pads after it dropped)."""
    out = []
    for token in row[prompt_length:].tolist():
        out.append(token)
        if token in eos:
            break
    return out


def prompts_for(texts: list[str]) -> list[str]:
    """The first 0, 1 or 2 words of each reference in turn: prompts of different lengths, a left-padded batch."""
    return [" ".join(text.split()[: i % 3]) for i, text in enumerate(texts)]


def caption_all(model, processor, captioners: dict, images, prompts, batch_size: int, max_new_tokens: int) -> dict[str, list]:
    """Each side's new tokens for every image, `batch_size` images (and their prompts) at a time."""
    eos = set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    out = {"pytorch": [], **{name: [] for name in captioners}}
    for start in range(0, len(images), batch_size):
        inputs = processor(images=images[start:start + batch_size], text=prompts[start:start + batch_size])
        T = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            sequences = model.generate(**inputs, **GREEDY, max_new_tokens=max_new_tokens).numpy()
        out["pytorch"] += [new_tokens(row, T, eos) for row in sequences]
        for name, captioner in captioners.items():
            sequences = captioner.generate(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
                                           inputs["pixel_values"].numpy(), max_new_tokens=max_new_tokens)
            out[name] += [new_tokens(row, T, eos) for row in sequences]
    return out


def equality(tokens: dict[str, list], processor, prompts, shown: int = 5) -> dict:
    """Per ONNX side: the share of images whose tokens are generate()'s exactly, and the first differences."""
    report = {}
    for name in (n for n in tokens if n != "pytorch"):
        pairs = list(zip(tokens["pytorch"], tokens[name]))
        equal = [a == b for a, b in pairs]
        differences = []
        for i, (a, b) in enumerate(pairs):
            if a != b and len(differences) < shown:
                step = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                differences.append({"image": i, "prompt": prompts[i], "first_different_step": step,
                                    "pytorch": processor.decode(a), name: processor.decode(b)})
        report[name] = {"tokens_equal_fraction": sum(equal) / len(equal), "tokens_equal": sum(equal), "captions": len(equal),
                        "first_differences": differences}
    return report


def quality(captions: dict[str, list[str]], data, dataset: str, tokenizer: str) -> dict:
    """Each side's captions scored with the evaluation's own scorers."""
    out = {}
    for name, texts in captions.items():
        if dataset == "scenes":
            scores = grounding_scores(texts, data.scenes)
            out[name] = {k: scores[k] for k in GROUNDING}
        else:
            scores = caption_scores(texts, data.references, tokenizer)
            out[name] = {k: scores[k] for k in CAPTIONS}
    return out


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    (args,) = HfArgumentParser(CheckArguments).parse_args_into_dataclasses(argv)
    if args.dataset == "coco" and not (args.caption_file and args.image_dir):
        raise SystemExit("--dataset coco needs --caption_file X.json and --image_dir DIR")
    if args.num_examples < 1 or args.batch_size < 2:
        raise SystemExit(f"--num_examples must be at least 1 and --batch_size at least 2 (a padded batch); got "
                         f"{args.num_examples} and {args.batch_size}")
    torch.set_num_threads(args.threads)
    trained_style, version = model_scenes(args.model_dir)
    style = args.scenes_style or trained_style
    model = NanoVLMForConditionalGeneration.from_pretrained(args.model_dir).eval()
    processor = NanoVLMProcessor.from_pretrained(args.model_dir)
    max_new_tokens = args.max_new_tokens or (110 if args.dataset == "scenes" and style == "long" else 48)
    data = load_data(argparse.Namespace(
        dataset=args.dataset, num_examples=args.num_examples, scenes_seed=args.scenes_seed, scenes_style=style,
        scenes_version=version, train_examples=0, caption_file=args.caption_file, image_dir=args.image_dir,
        train_caption_file=None, train_caption_policy="all"), model.config.image_size)
    images = list(data.images)

    with tempfile.TemporaryDirectory() as scratch:
        onnx_dir = os.path.join(args.model_dir, "onnx")
        exported = all(os.path.exists(os.path.join(onnx_dir, f"{name}{suffix}.onnx")) for name in FILES
                       for suffix in ("", "_quantized"))
        if not exported:
            logger.info("%s has no complete ONNX export: exporting into a scratch folder", args.model_dir)
            onnx_dir = os.path.join(scratch, "onnx")
            export_onnx(args.model_dir, output_dir=onnx_dir)
        captioners = {f"onnxruntime_{kind}": OnnxCaptioner(args.model_dir, quantized=kind == "int8", threads=args.threads,
                                                           onnx_dir=onnx_dir) for kind in ("fp32", "int8")}
        logger.info("captioning %d images at batch 1", len(images))
        single = caption_all(model, processor, captioners, images, [""] * len(images), 1, max_new_tokens)
        logger.info("captioning them in left-padded batches of %d", args.batch_size)
        prompts = prompts_for(data.texts)
        batched = caption_all(model, processor, captioners, images, prompts, args.batch_size, max_new_tokens)

    captions = {name: processor.batch_decode(tokens) for name, tokens in single.items()}
    scores = quality(captions, data, args.dataset, args.caption_tokenizer)
    int8_minus_fp32 = {k: v - scores["onnxruntime_fp32"][k] for k, v in scores["onnxruntime_int8"].items()
                       if isinstance(v, float)}
    report = {
        "command": "python -m benchmarks.onnx_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": asdict(args) | {"scenes_style": style if args.dataset == "scenes" else None,
                                    "max_new_tokens": max_new_tokens, "onnx_files": "the model's onnx/" if exported
                                    else "exported for this check"},
        "decoding": GREEDY | {"max_new_tokens": max_new_tokens,
                              "model_generation_config": model.generation_config.to_diff_dict()},
        "model": {"dir": args.model_dir, "preset": model.config.preset, "parameters": model.num_parameters()},
        "token_equality": {"batch_1": equality(single, processor, [""] * len(images)),
                           f"batch_{args.batch_size}_left_padded": equality(batched, processor, prompts)},
        "quality": scores,
        "quality_int8_minus_fp32": int8_minus_fp32,
        "samples": [{"pytorch": captions["pytorch"][i], "onnxruntime_fp32": captions["onnxruntime_fp32"][i],
                     "onnxruntime_int8": captions["onnxruntime_int8"][i], "reference": data.texts[i]}
                    for i in range(min(5, len(images)))],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    for way, sides in report["token_equality"].items():
        logger.info("%s: fp32 tokens equal generate()'s for %.1f%%, int8 for %.1f%%", way,
                    100 * sides["onnxruntime_fp32"]["tokens_equal_fraction"], 100 * sides["onnxruntime_int8"]["tokens_equal_fraction"])
    logger.info("quality: %s", json.dumps(scores))
    return report


if __name__ == "__main__":
    main()
