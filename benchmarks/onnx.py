"""Captioning speed at batch 1 on one CPU thread: PyTorch `generate()` against the exported ONNX files in
onnxruntime (`OnnxCaptioner`), fp32 and int8. JSON out.

    python -m benchmarks.onnx --output results/onnx_speed.json                          # a fixed-seed mini-112
    python -m benchmarks.onnx --model_dir outputs/nanovlm-mini-scenes --output bench.json   # a trained folder

Every caption is made `--new_tokens` long (the end-of-text token is ignored on both sides), so that ms per caption
compares the same work; greedy, the image encoded once, the KV cache on both sides.
"""

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser, ViTImageProcessorPil

from modeling_nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMProcessor
from modeling_nanovlm.export_onnx import OnnxCaptioner, export_onnx
from processing import scenes
from processing.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Arguments:
    output: str = field(metadata={"help": "where the JSON goes"})
    model_dir: str | None = field(default=None, metadata={"help": "a saved model and processor (default: a fixed-seed "
                                                                  "untrained --preset model with a scene tokenizer)"})
    preset: str = field(default="mini-112", metadata={"help": "the preset of the default model"})
    new_tokens: int = field(default=24, metadata={"help": "tokens generated per caption"})
    images: int = field(default=5, metadata={"help": "different scenes captioned per repeat"})
    repeats: int = field(default=5, metadata={"help": "timed passes over the images (after one warm-up pass)"})


def default_model(folder: str, preset: str) -> str:
    """A fixed-seed `preset` model with a BPE tokenizer learned from the built-in scenes' captions, saved in `folder`."""
    tokenizer = train_tokenizer(scenes.scene_texts(2000), vocab_size=4000)
    config = NanoVLMConfig.from_preset(preset, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(config).eval()
    size = config.image_size
    processor = NanoVLMProcessor(ViTImageProcessorPil(size={"height": size, "width": size}), tokenizer,
                                 num_image_tokens=config.num_image_tokens)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def timed(captioners: dict, inputs_list, repeats) -> dict[str, list[float]]:
    """Milliseconds per caption for each captioner, after a warm-up pass; interleaved caption by caption, so that
    a busy machine slows every side alike."""
    for caption in captioners.values():
        for inputs in inputs_list:
            caption(inputs)
    times = {name: [] for name in captioners}
    for _ in range(repeats):
        for inputs in inputs_list:
            for name, caption in captioners.items():
                start = time.perf_counter()
                caption(inputs)
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def main(argv=None):
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or default_model(scratch, args.preset)
        if not os.path.exists(os.path.join(model_dir, "onnx", "decoder_model_merged_quantized.onnx")):
            export_onnx(model_dir, output_dir=os.path.join(scratch, "onnx"))
            onnx_dir = os.path.join(scratch, "onnx")
        else:
            onnx_dir = os.path.join(model_dir, "onnx")
        model = NanoVLMForConditionalGeneration.from_pretrained(model_dir).eval()
        processor = NanoVLMProcessor.from_pretrained(model_dir)
        size = processor.image_processor.size["height"]
        images = [scenes.render_scene(scenes.sample_scene(__import__("random").Random(i)), size) for i in range(args.images)]
        inputs_list = [processor(images=[image], text=[""]) for image in images]
        n = args.new_tokens

        def torch_caption(inputs):
            with torch.inference_mode():
                return model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n)

        captioners = {"pytorch_fp32": torch_caption}
        for name, quantized in (("onnxruntime_fp32", False), ("onnxruntime_int8", True)):
            captioner = OnnxCaptioner(model_dir, quantized=quantized, threads=1, onnx_dir=onnx_dir)
            captioner.eos_token_ids = set()  # every caption n tokens long, as min_new_tokens does on the PyTorch side

            def onnx_caption(inputs, captioner=captioner):
                return captioner.generate(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
                                          inputs["pixel_values"].numpy(), max_new_tokens=n)

            captioners[name] = onnx_caption
        results = timed(captioners, inputs_list, args.repeats)
        sizes = {f: os.path.getsize(os.path.join(onnx_dir, f)) for f in sorted(os.listdir(onnx_dir))}
        parameters = sum(p.numel() for p in model.parameters())
    report = {
        "load_average_at_end": os.getloadavg(),
        "command": "python -m benchmarks.onnx " + " ".join(argv or __import__("sys").argv[1:]),
        "settings": asdict(args),
        "model": {"dir": args.model_dir, "preset": model.config.preset, "parameters": parameters,
                  "num_image_tokens": model.config.num_image_tokens, "vocab_size": model.config.vocab_size},
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "onnxruntime": __import__("onnxruntime").__version__, "threads": 1},
        "onnx_file_bytes": sizes,
        "results": {
            name: {"ms_per_caption_median": round(statistics.median(times), 2),
                   "ms_per_caption_min": round(min(times), 2),
                   "tokens_per_s": round(n / (statistics.median(times) / 1000), 1),
                   "captions_timed": len(times)}
            for name, times in results.items()
        },
    }
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    logger.info(json.dumps(report["results"], indent=2))


if __name__ == "__main__":
    main()
