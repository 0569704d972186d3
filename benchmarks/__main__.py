"""NanoVLM side by side with its peer, and against this machine's matmul peak.

    python -m benchmarks --output bench.json             # full run (CPU: about 20 minutes on 2 cores)
    python -m benchmarks --output bench.json --quick     # about 3 minutes: the mini preset, few steps
    python -m benchmarks --output bench.json --device cuda               # bf16, as train.py runs on a GPU

The peer (`benchmarks/peer.py`) is transformers' `VisionEncoderDecoderModel` (ViT + GPT-2 with
cross-attention) at each preset's size. Every figure is measured in this one run, both sides on
the same data, batch, threads and steps, each measurement in its own process (peak memory):
training samples/s through the Trainer, generate() captions/s, NanoVLM's cache on and off,
processor images/s on real JPEGs, training FLOP/s against the measured matmul peak (MFU) and
the time to the same grounding score. "As a user runs it" means train.py's defaults for NanoVLM
(bf16 on a GPU, fp32 on a CPU) and the Trainer's defaults (fp32) for the peer.
"""

import argparse
import dataclasses
import functools
import glob
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

import torch
import transformers

from benchmarks import quality, speed
from benchmarks.peer import build_peer
from modeling_nanovlm import NanoVLMConfig
from processing import scenes
from processing.collator import NanoVLMCollator

logger = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLICKR8K_IMAGES = os.path.join(ROOT, "..", "shared", "data", "flickr8k", "images")
# The performance goals; each is a ratio of two figures of one run.
TARGETS = {
    "train_speedup_vs_peer": 1.5, "train_speedup_vs_peer_equal_precision": 1.1, "generate_speedup_vs_peer": 2.0,
    "cache_speedup": 3.0, "mfu_fp32": 0.85, "mfu_bf16": 0.65, "time_to_quality_speedup": 2.0, "data_to_train_ratio": 5.0,
}


@dataclasses.dataclass
class Settings:
    # training speed and parameters (the headline: train.py's default, mini-112); the rest use train.py's preset
    presets: tuple = ("mini-112", "mini", "base", "large")
    batch_size: int = 32
    train_steps: int = 5  # timed, after the warm-up steps: at least this many,
    train_seconds: float = 8.0  # and at least this long
    train_repeats: int = 3  # NanoVLM and the peer take turns; each side's fastest repeat counts
    warmup_steps: int = 2
    lengths: tuple = (30, 90)  # new tokens per caption
    generate_reps: dict = dataclasses.field(default_factory=lambda: {1: 10, 32: 5})  # batch size: timed calls a side (the fastest counts)
    cache_reps: int = 3
    processor_images: int = 256
    matmul_sizes: tuple = (1024, 2048, 4096)
    matmul_seconds: float = 3.0
    mfu_preset: str = "base"
    bf16_steps: int = 2  # NanoVLM's bf16 MFU run
    # Whether to run it: None = where bf16 is native (CUDA, or a CPU with avx512_bf16/amx_bf16). Without
    # bf16 instructions a CPU runs bf16 matmuls in a fallback near 1 GFLOP/s: base would take minutes a step.
    bf16_mfu: bool | None = None
    ttq_seconds: float = 600.0  # training budget per side: long enough for NanoVLM's default to pass its turn
    ttq_eval_seconds: float = 60.0
    ttq_train_examples: int = 60000
    ttq_validation_examples: int = 128
    tokenizer_texts: int = 20000  # train.py trains its tokenizer on the 20,000 training scenes
    checkpointing_preset: str = "large"  # peak memory with and without --gradient_checkpointing, at batch_size
    checkpointing_steps: int = 3


QUICK = Settings(presets=("mini-112",), train_steps=2, train_seconds=1.0, train_repeats=1, warmup_steps=1, generate_reps={1: 1, 32: 1}, cache_reps=1,
                 processor_images=64, matmul_sizes=(1024,), matmul_seconds=0.5, mfu_preset="mini", bf16_steps=1,
                 ttq_seconds=12.0, ttq_eval_seconds=6.0, ttq_train_examples=1024, ttq_validation_examples=16,
                 checkpointing_preset="mini", checkpointing_steps=1)


def override(settings: Settings, items: list[str]) -> Settings:
    """A copy of `settings` with `FIELD=VALUE` items applied (VALUE is JSON, or a plain string)."""
    changes = {}
    for item in items:
        key, _, text = item.partition("=")
        names = [f.name for f in dataclasses.fields(Settings)]
        if key not in names:
            raise SystemExit(f"--set: unknown setting {key!r}; settings: {', '.join(names)}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if isinstance(getattr(settings, key), tuple):
            value = tuple(value)
        elif isinstance(getattr(settings, key), dict):  # batch size -> timed calls
            value = {int(k): v for k, v in value.items()}
        changes[key] = value
    return dataclasses.replace(settings, **changes)


def ratio(a, b):
    return a / b if a and b else None


def fixed_batch(processor, batch_size: int) -> dict:
    """train.py's collator over the first `batch_size` training scenes: the batch every timing uses
    (drawn at the processor's image size)."""
    size = processor.image_processor.size["height"]
    examples = [scenes.make_example(scenes.example_seed(scenes.TRAIN_SEED, i), image_size=size) for i in range(batch_size)]
    return NanoVLMCollator(processor, max_length=128)(examples)


def parameters(preset: str, vocab_size: int) -> dict:
    """Both sides' parameter counts (tied embeddings once), at this run's vocabulary and the preset's 25,000."""
    counts = {}
    for vocab, suffix in ((vocab_size, ""), (NanoVLMConfig().vocab_size, "_vocab_25000")):
        with torch.device("meta"):
            nano = speed.build_model("nanovlm", preset, vocab)
            counts["nanovlm" + suffix], counts["peer" + suffix] = nano.num_parameters(), build_peer(nano.config).num_parameters()
    return counts


def time_to_reach(points, key, target, higher_is_better) -> float | None:
    hits = [p["train_seconds"] for p in points if (p[key] >= target if higher_is_better else p[key] <= target)]
    return hits[0] if hits else None


def quality_summary(nano: dict, peer: dict) -> dict:
    """How soon NanoVLM reaches the peer's final object recall (and validation loss).

    `speedup`: the peer's training wall time (its whole budget) over NanoVLM's seconds to reach the
    peer's final score (the issue's "in at most half the peer's wall time" is speedup >= 2);
    `speedup_vs_peer_first_reach`: the stricter ratio to the time the peer itself first reached it.
    """
    summary = {}
    for key, higher in (("object_recall", True), ("eval_loss", False)):
        target = peer["points"][-1][key]
        t_nano, t_peer = (time_to_reach(r["points"], key, target, higher) for r in (nano, peer))
        peer_total = peer["points"][-1]["train_seconds"]
        summary[key] = {"target": target, "nanovlm_seconds": t_nano, "peer_seconds": t_peer, "peer_total_seconds": peer_total,
                        "speedup": ratio(peer_total, t_nano), "speedup_vs_peer_first_reach": ratio(t_peer, t_nano),
                        "nanovlm_final": nano["points"][-1][key], "peer_final": target}
    if summary["object_recall"]["target"] == 0:
        summary["object_recall"].update(speedup=None, speedup_vs_peer_first_reach=None,
                                        note="the peer's final recall is 0, which any model reaches: no figure")
    return summary


def machine(device: str, threads: int) -> dict:
    cpu, flags = platform.processor(), []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            first = [line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line]
        fields = {k.strip(): v.strip() for k, v in first}
        cpu, flags = fields.get("model name", cpu), fields.get("flags", "").split()
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads, "device": device, "host": platform.node(),
            # without these, bf16 matmuls on the CPU run a slow fallback: the bf16 peak and MFU mean little
            "cpu_native_bf16": any(f in flags for f in ("avx512_bf16", "amx_bf16"))}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except OSError:
        return {"commit": None, "dirty": None}


def run(settings: Settings, device: str = "cpu", threads: int | None = None, bf16: bool | None = None,
        image_dir: str = FLICKR8K_IMAGES) -> dict:
    """Every measurement, in one report (a dict of plain JSON values)."""
    with tempfile.TemporaryDirectory(prefix="nanovlm-bench-") as work:  # the processor every measurement loads
        return _run(settings, device, threads, bf16, image_dir, work)


def _run(settings, device, threads, bf16, image_dir, work) -> dict:
    threads = threads or torch.get_num_threads()
    bf16 = device == "cuda" if bf16 is None else bf16  # NanoVLM's precision as train.py runs it
    measure = functools.partial(speed.isolated, device=device, threads=threads)
    model_args = speed.train.parse_args([])[0]
    preset = model_args.preset  # train.py's default
    texts = scenes.scene_texts(settings.tokenizer_texts)
    processor = speed.train.build_processor(model_args, texts, speed.train.image_size_of(model_args), work)
    processor.save_pretrained(work)
    vocab, bos = len(processor.tokenizer), processor.tokenizer.bos_token_id
    batch = fixed_batch(processor, settings.batch_size)
    batches = {}  # image size -> the same scenes at that size (presets differ: mini-112 vs the paper's 224)

    def batch_for(name: str) -> dict:
        size = speed.train.image_size_of(speed.train.parse_args(["--preset", name])[0])
        if size not in batches:
            batches[size] = fixed_batch(speed.train.build_processor(model_args, texts, size, work), settings.batch_size)
        return batches[size]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "machine": machine(device, threads), "git": git_state(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "settings": dataclasses.asdict(settings), "default_preset": preset, "vocab_size": vocab,
        "text_tokens_per_sample": batch["input_ids"].shape[1],
        "precision": {"nanovlm_as_user_runs_it": "bf16" if bf16 else "fp32", "peer_as_user_runs_it": "fp32",
                      "equal_precision": "bf16" if bf16 else "fp32"},
    }

    report["matmul_peak"] = peak = measure(speed.matmul_peak, sizes=settings.matmul_sizes, seconds=settings.matmul_seconds)
    logger.info("matmul peak: %.0f GFLOP/s fp32, %.0f GFLOP/s bf16", peak["fp32_gflops"], peak["bf16_gflops"])

    runs = {}  # (side, preset, bf16) -> result: a run two figures share is measured once

    def train_runs(preset, keys, steps=settings.train_steps, warmup=settings.warmup_steps, seconds=settings.train_seconds,
                   repeats=settings.train_repeats):
        """Measure each (side, bf16) in `keys` not measured yet, taking turns `repeats` times; keep each one's fastest."""
        todo = list(dict.fromkeys((side, preset, b) for side, b in keys if (side, preset, b) not in runs))
        measured = {key: [] for key in todo}
        for repeat in range(repeats):
            for side, name, b in todo:
                mfu_run = side == "nanovlm" and name == settings.mfu_preset  # pairs each repeat with a matmul peak
                measured[side, name, b].append(measure(
                    speed.train_speed, side=side, preset=name, batch=batch_for(name), vocab_size=vocab, steps=steps, warmup=warmup,
                    bf16=b, min_seconds=seconds, count_flops=repeat == 0 or mfu_run,
                    peak_sizes=settings.matmul_sizes if mfu_run else (), peak_seconds=settings.matmul_seconds,
                ))
        for key, results in measured.items():
            runs[key] = best = max(results, key=lambda r: r["samples_per_s"])
            best["samples_per_s_repeats"] = [r["samples_per_s"] for r in results]
            best["flops_per_step"] = results[0]["flops_per_step"]
            best["achieved_gflops"] = best["flops_per_step"] * best["samples_per_s"] / best["batch_size"] / 1e9
            if "matmul_peak_after" in best:  # each repeat's FLOP/s over the peak measured right after it
                precision = "bf16" if key[2] else "fp32"
                best["mfu_repeats"] = [r["flops_per_step"] * r["samples_per_s"] / r["batch_size"] / 1e9
                                       / r["matmul_peak_after"][f"{precision}_gflops"] for r in results]
            logger.info("train %s %s %s: %s samples/s, peak %.0f MB", key[0], key[1], "bf16" if key[2] else "fp32",
                        " / ".join(f"{r['samples_per_s']:.1f}" for r in results), best["peak_rss_mb"])
        return [runs[side, preset, b] for side, b in keys]

    report["parameters"], report["train"], speedups = {}, {}, {}
    for name in settings.presets:
        report["parameters"][name] = parameters(name, vocab)
        nano, peer_user, peer_equal = train_runs(name, [("nanovlm", bf16), ("peer", False), ("peer", bf16)])
        user, equal = {"nanovlm": nano, "peer": peer_user}, {"nanovlm": nano, "peer": peer_equal}
        report["train"][name] = {"as_user_runs_it": user, "equal_precision": equal}
        speedups[name] = {k: ratio(v["nanovlm"]["samples_per_s"], v["peer"]["samples_per_s"]) for k, v in (("user", user), ("equal", equal))}
    report["train_speedup_vs_peer_by_preset"] = {k: v["user"] for k, v in speedups.items()}
    report["train_speedup_vs_peer_equal_precision_by_preset"] = {k: v["equal"] for k, v in speedups.items()}
    headline = preset if preset in speedups else settings.presets[0]
    report["train_speedup_vs_peer"] = speedups[headline]["user"]
    report["train_speedup_vs_peer_equal_precision"] = speedups[headline]["equal"]

    (fp32,) = train_runs(settings.mfu_preset, [("nanovlm", False)])
    native_bf16 = device == "cuda" or report["machine"]["cpu_native_bf16"]
    bf16_run = None
    if settings.bf16_mfu or (settings.bf16_mfu is None and native_bf16):
        (bf16_run,) = train_runs(settings.mfu_preset, [("nanovlm", True)], steps=settings.bf16_steps, warmup=1, seconds=0.0, repeats=1)
    report["mfu"] = {"preset": settings.mfu_preset, "batch_size": settings.batch_size, "flops_per_step": fp32["flops_per_step"],
                     "fp32_train": fp32,
                     "bf16_train": bf16_run or ("not run: this CPU has no bf16 instructions (--set bf16_mfu=true runs it)" if not native_bf16
                                                 else "not run: --set bf16_mfu=false")}
    for name, result in (("fp32", fp32), ("bf16", bf16_run)):
        # The MFU: the median over repeats of FLOP/s over the peak measured right after, in the same
        # process; also the fastest repeat over the peak measured at the start of the run.
        report["mfu"][f"{name}_achieved_gflops"] = result["achieved_gflops"] if result else None
        report["mfu"][f"{name}_vs_run_start_peak"] = result["achieved_gflops"] / peak[f"{name}_gflops"] if result else None
        report[f"mfu_{name}"] = statistics.median(result["mfu_repeats"]) if result else None
    logger.info("MFU %s: fp32 %.2f, bf16 %s", settings.mfu_preset, report["mfu_fp32"], report["mfu_bf16"])

    name = settings.checkpointing_preset
    checkpointing = {flag: measure(speed.train_speed, side="nanovlm", preset=name, batch=batch_for(name), vocab_size=vocab,
                                   steps=settings.checkpointing_steps, warmup=1, bf16=bf16, gradient_checkpointing=flag)
                     for flag in (False, True)}
    memory = "peak_cuda_mb" if device == "cuda" else "peak_rss_mb"
    report["gradient_checkpointing"] = {
        "preset": name, "batch_size": settings.batch_size, "memory": memory, "off": checkpointing[False], "on": checkpointing[True],
        "peak_saving_mb": checkpointing[False][memory] - checkpointing[True][memory],
        "slowdown": ratio(checkpointing[False]["samples_per_s"], checkpointing[True]["samples_per_s"]),
    }
    logger.info("gradient checkpointing, %s at batch %d: %s %.0f -> %.0f MB, %.2fx slower", name, settings.batch_size, memory,
                checkpointing[False][memory], checkpointing[True][memory], report["gradient_checkpointing"]["slowdown"])

    pixel_values = batch["pixel_values"][: max(settings.generate_reps)]
    report["generate"] = measure(speed.generate_speed, preset=preset, vocab_size=vocab, pixel_values=pixel_values,
                                 bos=bos, lengths=settings.lengths, reps=settings.generate_reps, bf16=bf16)
    report["generate_speedup_vs_peer"] = {
        f"batch_{b}": {f"tokens_{n}": ratio(*(report["generate"][s][f"batch_{b}_tokens_{n}"]["captions_per_s"] for s in speed.SIDES))
                       for n in settings.lengths} for b in settings.generate_reps
    }
    logger.info("generate speedup vs peer: %s", report["generate_speedup_vs_peer"])

    report["cache"] = cache = measure(speed.cache_speed, preset=preset, vocab_size=vocab, pixel_values=pixel_values[:1], bos=bos,
                                      new_tokens=max(settings.lengths), reps=settings.cache_reps, bf16=bf16)
    report["cache_speedup"] = cache["uncached_seconds"] / cache["cached_seconds"]
    logger.info("cache speedup: %.1fx (identical tokens)", report["cache_speedup"])

    paths = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))[: settings.processor_images]
    if paths:
        report["processor"] = measure(speed.processor_speed, processor_dir=work, image_paths=paths, batch_size=settings.batch_size)
        report["processor"]["image_dir"] = os.path.abspath(image_dir)
        train_speed = train_runs(preset, [("nanovlm", bf16)])[0]["samples_per_s"]
        report["data_to_train_ratio"] = report["processor"]["images_per_s"] / train_speed
        logger.info("processor: %.0f images/s, %.1fx NanoVLM's training samples/s", report["processor"]["images_per_s"],
                    report["data_to_train_ratio"])
    else:
        report["processor"] = {"skipped": f"no JPEG images in {os.path.abspath(image_dir)} (the Flickr8k images)"}
        report["data_to_train_ratio"] = None
        logger.warning("processor benchmark skipped: %s", report["processor"]["skipped"])

    ttq_batch = speed.train.parse_args([])[2].per_device_train_batch_size  # train.py's default
    ttq = {side: measure(quality.time_to_quality, side=side, preset=preset, processor_dir=work, batch_size=ttq_batch,
                         num_train=settings.ttq_train_examples, num_validation=settings.ttq_validation_examples,
                         budget_seconds=settings.ttq_seconds, eval_seconds=settings.ttq_eval_seconds, bf16=bf16)
           for side in speed.SIDES}
    report["time_to_quality"] = {**ttq, "summary": quality_summary(ttq["nanovlm"], ttq["peer"])}
    report["time_to_quality_speedup"] = report["time_to_quality"]["summary"]["object_recall"]["speedup"]
    logger.info("time to quality: %s", report["time_to_quality"]["summary"])

    generate_worst = min((v for by_length in report["generate_speedup_vs_peer"].values() for v in by_length.values() if v), default=None)
    values = {**{k: report.get(k) for k in TARGETS}, "generate_speedup_vs_peer": generate_worst}
    report["targets"] = {k: {"goal": goal, "value": values[k], "met": None if values[k] is None else values[k] >= goal}
                         for k, goal in TARGETS.items()}
    if device == "cpu" and not report["machine"]["cpu_native_bf16"]:
        report["targets"]["mfu_bf16"].update(met=None, note="this CPU has no bf16 instructions: its bf16 'peak' is a slow fallback")
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench.json", help="JSON report")
    parser.add_argument("--quick", action="store_true", help="the mini preset and few steps: about 3 minutes on 2 CPU cores")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, e.g. OMP_NUM_THREADS)")
    parser.add_argument("--bf16", choices=("true", "false"), default=None,
                        help="NanoVLM's precision and the equal-precision comparisons (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--image_dir", default=FLICKR8K_IMAGES, help="JPEGs for the processor benchmark")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override settings (JSON values), e.g. --set train_steps=20 ttq_seconds=60 presets='[\"base\"]'")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    settings = override(QUICK if args.quick else Settings(), args.set)
    bf16 = None if args.bf16 is None else args.bf16 == "true"
    report = run(settings, args.device, args.threads, bf16, args.image_dir)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in TARGETS} | {"targets_met": {k: v["met"] for k, v in report["targets"].items()}}, indent=2))


if __name__ == "__main__":
    main()
