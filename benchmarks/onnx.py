"""Captioning speed at batch 1 on one CPU thread: PyTorch `generate()` against the exported ONNX files in
onnxruntime (`OnnxCaptioner`), fp32 and int8, and in the browser (web/'s page in headless Chromium, onnxruntime-web's
WebAssembly on one thread), fp32 and int8. JSON out.

    python -m benchmarks.onnx --output results/onnx_speed.json                          # a fixed-seed mini-112
    python -m benchmarks.onnx --model_dir outputs/nanovlm-mini-scenes --output bench.json   # a trained folder
    python -m benchmarks.onnx --output bench.json --browser false                        # without the browser

Every caption is made `--new_tokens` long (the end-of-text token is ignored, or held off as generate()'s
min_new_tokens does), so that ms per caption compares the same work; greedy, the image encoded once, the KV cache on
every side. A caption's time starts from pixel_values: the page's image decoding and resizing (in JavaScript) are
timed apart (`ms_preprocess_median`). The sides take turns caption by caption, so that a busy machine slows each alike.
The browser needs Node.js and `npm ci --prefix web`; by default it is timed when both are there (`--browser true`
requires it). The page is driven by web/bench.mjs.

Whether the ONNX files caption as the model does (token equality with generate(), int8's cost in caption quality) on
a trained model is `python -m benchmarks.onnx_check` (its docstring).
"""

import json
import logging
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
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
    browser: bool | None = field(default=None, metadata={"help": "time the page in headless Chromium too (true / "
                                                                 "false; default: when node and web/node_modules are there)"})


WEB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")


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


def wall_clock(caption):
    """A captioner that returns its own milliseconds, timed here."""
    def timed_caption(index):
        start = time.perf_counter()
        caption(index)
        return (time.perf_counter() - start) * 1000
    return timed_caption


def timed(captioners: dict, images: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per caption for each captioner (called with an image's index, it returns the milliseconds it
    took), after a warm-up pass; interleaved caption by caption, so that a busy machine slows every side alike."""
    for caption in captioners.values():
        for index in range(images):
            caption(index)
    times = {name: [] for name in captioners}
    for _ in range(repeats):
        for index in range(images):
            for name, caption in captioners.items():
                times[name].append(caption(index))
    return times


class BrowserCaptioners:
    """web/bench.mjs in a child process: the page in headless Chromium, one tab per variant with the model loaded.
    `captioner(variant)` captions an image by index there and returns the page's milliseconds (from pixel_values to
    the last token, as the Python sides are timed); `preprocess_ms[variant]` keeps the page's image decoding and
    resizing time."""

    def __init__(self, model_dir: str, onnx_dir: str, image_paths: list[str], tokens: int, variants=("fp32", "int8")):
        if shutil.which("node") is None or not os.path.isdir(os.path.join(WEB, "node_modules")):
            raise RuntimeError(f"--browser true needs Node.js (>= 20.11) on PATH and {WEB}/node_modules: "
                               "run `npm ci --prefix web`, or pass --browser false")
        self.names, self.tokens = [os.path.basename(p) for p in image_paths], tokens
        settings = {"model": os.path.abspath(model_dir), "onnx": os.path.abspath(onnx_dir),
                    "images": os.path.dirname(os.path.abspath(image_paths[0])), "tokens": tokens, "variants": list(variants)}
        self.process = subprocess.Popen(["node", os.path.join(WEB, "bench.mjs"), json.dumps(settings)], cwd=WEB, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.browser = self._read()["browser"]
        self.preprocess_ms = {variant: [] for variant in variants}

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=30)
            raise RuntimeError(f"web/bench.mjs stopped (exit status {self.process.returncode}): "
                               f"{self.process.stderr.read()[-3000:]}")
        return json.loads(line)

    def captioner(self, variant: str):
        def caption(index):
            self.process.stdin.write(json.dumps({"variant": variant, "image": self.names[index]}) + "\n")
            self.process.stdin.flush()
            result = self._read()
            if len(result["tokens"]) != self.tokens:
                raise RuntimeError(f"the page gave {len(result['tokens'])} tokens, not {self.tokens}: {result}")
            self.preprocess_ms[variant].append(result["msPreprocess"])
            return result["ms"]
        return caption

    def close(self):
        self.process.stdin.close()  # bench.mjs closes the browser at the end of its input
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def web_version(package: str) -> str:
    """The version of one of web/'s npm packages, as installed."""
    with open(os.path.join(WEB, "node_modules", package, "package.json")) as f:
        return json.load(f)["version"]


def main(argv=None):
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(argv)
    load_at_start = os.getloadavg()
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
        images = [scenes.render_scene(scenes.sample_scene(random.Random(i)), size) for i in range(args.images)]
        inputs_list = [processor(images=[image], text=[""]) for image in images]
        n = args.new_tokens

        def torch_caption(index):
            with torch.inference_mode():
                return model.generate(**inputs_list[index], do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n)

        captioners = {"pytorch_fp32": wall_clock(torch_caption)}
        for name, quantized in (("onnxruntime_fp32", False), ("onnxruntime_int8", True)):
            captioner = OnnxCaptioner(model_dir, quantized=quantized, threads=1, onnx_dir=onnx_dir)
            captioner.eos_token_ids = set()  # every caption n tokens long, as min_new_tokens does on the PyTorch side

            def onnx_caption(index, captioner=captioner):
                inputs = inputs_list[index]
                return captioner.generate(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
                                          inputs["pixel_values"].numpy(), max_new_tokens=n)

            captioners[name] = wall_clock(onnx_caption)
        browser = None
        if args.browser or (args.browser is None and shutil.which("node") and os.path.isdir(os.path.join(WEB, "node_modules"))):
            paths = []
            os.makedirs(os.path.join(scratch, "images"))
            for i, image in enumerate(images):  # PNG: the page reads the very pixels Python does
                paths.append(os.path.join(scratch, "images", f"{i}.png"))
                image.save(paths[-1])
            browser = BrowserCaptioners(model_dir, onnx_dir, paths, n)
            captioners |= {f"browser_{variant}": browser.captioner(variant) for variant in ("fp32", "int8")}
        elif args.browser is None:
            logger.info("no node or web/node_modules: the browser is not timed (npm ci --prefix web adds it)")
        try:
            results = timed(captioners, len(inputs_list), args.repeats)
        finally:
            if browser is not None:
                browser.close()
        sizes = {f: os.path.getsize(os.path.join(onnx_dir, f)) for f in sorted(os.listdir(onnx_dir))}
        parameters = sum(p.numel() for p in model.parameters())
    report = {
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "cores": os.cpu_count(),
        "command": "python -m benchmarks.onnx " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": asdict(args),
        "model": {"dir": args.model_dir, "preset": model.config.preset, "parameters": parameters,
                  "num_image_tokens": model.config.num_image_tokens, "vocab_size": model.config.vocab_size},
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "onnxruntime": __import__("onnxruntime").__version__, "threads": 1,
                    "browser": browser and f"{browser.browser}, onnxruntime-web {web_version('onnxruntime-web')}, "
                                           "WebAssembly, 1 thread"},
        "onnx_file_bytes": sizes,
        "results": {
            name: {"ms_per_caption_median": round(statistics.median(times), 2),
                   "ms_per_caption_min": round(min(times), 2),
                   "tokens_per_s": round(n / (statistics.median(times) / 1000), 1),
                   "captions_timed": len(times)}
            for name, times in results.items()
        },
    }
    if browser is not None:
        for variant, times in browser.preprocess_ms.items():
            report["results"][f"browser_{variant}"]["ms_preprocess_median"] = round(statistics.median(times[args.images:]), 2)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    logger.info(json.dumps(report["results"], indent=2))


if __name__ == "__main__":
    main()
