"""NanoVLM side by side with its peer, and against this machine's matmul peak.

    python -m benchmarks --output bench.json             # full run (CPU: about 20 minutes on 2 cores)
    python -m benchmarks --output bench.json --quick     # about 3 minutes: the mini preset, few steps
    python -m benchmarks --output bench.json --device cuda               # bf16, as train.py runs on a GPU
    python -m benchmarks --output bench.json --ttq_seconds 60 --presets base large   # any setting (--help lists them)

The peer (`benchmarks/peer.py`) is transformers' `VisionEncoderDecoderModel` (ViT + GPT-2 with
cross-attention) at each preset's size. Every figure is measured in this one run, both sides on
the same data, batch, threads and steps, each measurement in its own process (peak memory):
training samples/s through the Trainer, generate() captions/s, NanoVLM's cache on and off,
processor images/s on real JPEGs, training FLOP/s against the measured matmul peak (MFU) and
the time to the same grounding score. "As a user runs it" means train.py's defaults for NanoVLM
(bf16 on a GPU, fp32 on a CPU) and the Trainer's defaults (fp32) for the peer.
"""

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
from transformers import HfArgumentParser

from benchmarks import quality, speed
from benchmarks.peer import build_peer
from modeling_nanovlm import NanoVLMConfig
from processing import scenes
import training

logger = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLICKR8K_IMAGES = os.path.join(ROOT, "..", "shared", "data", "flickr8k", "images")
# The performance goals; each is a ratio of two figures of one run.
TARGETS = {
    "train_speedup_vs_peer": 1.5, "train_speedup_vs_peer_equal_precision": 1.1, "generate_speedup_vs_peer": 2.0,
    "cache_speedup": 3.0, "mfu_fp32": 0.85, "mfu_bf16": 0.65, "time_to_quality_speedup": 2.0, "data_to_train_ratio": 5.0,
}


def _setting(default, help: str):
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Settings:
    """What `python -m benchmarks` measures and how long; every field is a flag (`--train_steps 20`)."""

    presets: list[str] = _setting(["mini-112", "mini", "base", "large"],
                                  "presets timed in training (the headline: train.py's default, mini-112)")
    batch_size: int = _setting(32, "batch of every timing")
    train_steps: int = _setting(5, "timed training steps after the warm-up: at least this many,")
    train_seconds: float = _setting(8.0, "and at least this long")
    train_repeats: int = _setting(3, "NanoVLM and the peer take turns this many times; each side's fastest counts")
    warmup_steps: int = _setting(2, "untimed training steps first")
    lengths: list[int] = _setting([30, 90], "new tokens per caption in the generation timings")
    generate_batch_sizes: list[int] = _setting([1, 32], "batch sizes of the generation timings")
    generate_calls: list[int] = _setting([10, 5], "timed generate() calls a side at each of those batch sizes (the fastest counts)")
    cache_reps: int = _setting(3, "timed calls with and without the KV cache")
    processor_images: int = _setting(256, "Flickr8k JPEGs the processor benchmark decodes")
    matmul_sizes: list[int] = _setting([1024, 2048, 4096], "square matmul sizes of the machine's peak")
    matmul_seconds: float = _setting(3.0, "seconds of each matmul size")
    mfu_preset: str = _setting("base", "the preset whose training FLOP/s is compared with the matmul peak")
    bf16_steps: int = _setting(2, "NanoVLM's bf16 MFU run: timed steps")
    bf16_mfu: bool | None = _setting(None, "run the bf16 MFU (default: where bf16 is native, CUDA or a CPU with avx512_bf16/amx_bf16; "
                                           "elsewhere bf16 matmuls run a fallback near 1 GFLOP/s)")
    ttq_seconds: float = _setting(600.0, "time to quality: training seconds a side")
    ttq_eval_seconds: float = _setting(60.0, "time to quality: seconds between evaluations")
    ttq_train_examples: int = _setting(60000, "time to quality: training scenes")
    ttq_validation_examples: int = _setting(128, "time to quality: validation scenes")
    tokenizer_texts: int = _setting(20000, "scene texts the tokenizer is trained on")
    checkpointing_preset: str = _setting("large", "peak memory with and without --gradient_checkpointing, at --batch_size")
    checkpointing_steps: int = _setting(3, "timed steps of each checkpointing run")


QUICK = Settings(presets=["mini-112"], train_steps=2, train_seconds=1.0, train_repeats=1, warmup_steps=1, generate_calls=[1, 1],
                 cache_reps=1, processor_images=64, matmul_sizes=[1024], matmul_seconds=0.5, mfu_preset="mini", bf16_steps=1,
                 ttq_seconds=12.0, ttq_eval_seconds=6.0, ttq_train_examples=1024, ttq_validation_examples=16,
                 checkpointing_preset="mini", checkpointing_steps=1)


@dataclasses.dataclass
class BenchmarkArguments:
    output: str = _setting("bench.json", "JSON report")
    quick: bool = _setting(False, "QUICK's settings (the mini preset, few steps: about 3 minutes on 2 CPU cores) as the defaults")
    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu or cuda", "choices": ["cpu", "cuda"]})
    threads: int | None = _setting(None, "torch threads (default: torch's, e.g. OMP_NUM_THREADS)")
    bf16: bool | None = _setting(None, "NanoVLM's precision and the equal-precision comparisons (default: bf16 on cuda, fp32 on cpu)")
    image_dir: str = _setting(FLICKR8K_IMAGES, "JPEGs for the processor benchmark")


def ratio(a, b):
    return a / b if a and b else None


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
        env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # `git status` takes no index lock another git command could meet
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, env=env).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except OSError:
        return {"commit": None, "dirty": None}


class Benchmark:
    """One run's shared state (processor, batches, the training runs measured so far) and one method per
    measurement; each adds its figures to `self.report`."""

    def __init__(self, settings: Settings, device: str, threads: int | None, bf16: bool | None, work: str):
        self.settings, self.device, self.work = settings, device, work
        self.threads = threads or torch.get_num_threads()
        self.bf16 = device == "cuda" if bf16 is None else bf16  # NanoVLM's precision as train.py runs it
        self.measure = functools.partial(speed.isolated, device=device, threads=self.threads)
        self.model_args = training.parse_args([])[0]
        self.preset = self.model_args.preset  # train.py's default
        self.texts = scenes.scene_texts(settings.tokenizer_texts)
        self.processor = training.build_processor(self.model_args, self.texts, training.image_size_of(self.model_args), work)
        self.processor.save_pretrained(work)
        self.vocab, self.bos = len(self.processor.tokenizer), self.processor.tokenizer.bos_token_id
        self.batch = speed.fixed_batch(self.processor, settings.batch_size)
        self.batches = {}  # (image size, image tokens) -> the same scenes for those presets (mini-112 vs the paper's 224)
        self.runs = {}  # (side, preset, bf16) -> result: a run two figures share is measured once
        self.report = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": machine(device, self.threads), "git": git_state(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
            "settings": dataclasses.asdict(settings), "default_preset": self.preset, "vocab_size": self.vocab,
            "text_tokens_per_sample": self.batch["input_ids"].shape[1],
            "precision": {"nanovlm_as_user_runs_it": "bf16" if self.bf16 else "fp32", "peer_as_user_runs_it": "fp32",
                          "equal_precision": "bf16" if self.bf16 else "fp32"},
        }

    def batch_for(self, name: str) -> dict:
        """The fixed batch at `name`'s image size and number of image tokens."""
        model_args = training.parse_args(["--preset", name])[0]
        key = (training.image_size_of(model_args), training.model_config(model_args).num_image_tokens)
        if key not in self.batches:
            processor = training.build_processor(model_args, self.texts, key[0], self.work)
            self.batches[key] = speed.fixed_batch(processor, self.settings.batch_size)
        return self.batches[key]

    def train_runs(self, preset: str, keys: list, steps=None, warmup=None, seconds=None, repeats=None) -> list[dict]:
        """Measure each (side, bf16) in `keys` not measured yet, taking turns `repeats` times; keep each one's fastest."""
        s = self.settings
        steps, warmup = s.train_steps if steps is None else steps, s.warmup_steps if warmup is None else warmup
        seconds, repeats = s.train_seconds if seconds is None else seconds, s.train_repeats if repeats is None else repeats
        todo = list(dict.fromkeys((side, preset, b) for side, b in keys if (side, preset, b) not in self.runs))
        measured = {key: [] for key in todo}
        for repeat in range(repeats):
            for side, name, b in todo:
                mfu_run = side == "nanovlm" and name == s.mfu_preset  # pairs each repeat with a matmul peak
                measured[side, name, b].append(self.measure(
                    speed.train_speed, side=side, preset=name, batch=self.batch_for(name), vocab_size=self.vocab, steps=steps,
                    warmup=warmup, bf16=b, min_seconds=seconds, count_flops=repeat == 0 or mfu_run,
                    peak_sizes=s.matmul_sizes if mfu_run else (), peak_seconds=s.matmul_seconds,
                ))
        for key, results in measured.items():
            self.runs[key] = best = max(results, key=lambda r: r["samples_per_s"])
            best["samples_per_s_repeats"] = [r["samples_per_s"] for r in results]
            best["flops_per_step"] = results[0]["flops_per_step"]
            best["achieved_gflops"] = best["flops_per_step"] * best["samples_per_s"] / best["batch_size"] / 1e9
            if "matmul_peak_after" in best:  # each repeat's FLOP/s over the peak measured right after it
                precision = "bf16" if key[2] else "fp32"
                best["mfu_repeats"] = [r["flops_per_step"] * r["samples_per_s"] / r["batch_size"] / 1e9
                                       / r["matmul_peak_after"][f"{precision}_gflops"] for r in results]
            logger.info("train %s %s %s: %s samples/s, peak %.0f MB", key[0], key[1], "bf16" if key[2] else "fp32",
                        " / ".join(f"{r['samples_per_s']:.1f}" for r in results), best["peak_rss_mb"])
        return [self.runs[side, preset, b] for side, b in keys]

    def matmul_peak(self):
        self.report["matmul_peak"] = peak = self.measure(speed.matmul_peak, sizes=self.settings.matmul_sizes,
                                                         seconds=self.settings.matmul_seconds)
        logger.info("matmul peak: %.0f GFLOP/s fp32, %.0f GFLOP/s bf16", peak["fp32_gflops"], peak["bf16_gflops"])

    def training_speed(self):
        """Samples/s of each preset, NanoVLM and the peer, as a user runs each and at equal precision."""
        report, speedups = self.report, {}
        report["parameters"], report["train"] = {}, {}
        for name in self.settings.presets:
            report["parameters"][name] = parameters(name, self.vocab)
            nano, peer_user, peer_equal = self.train_runs(name, [("nanovlm", self.bf16), ("peer", False), ("peer", self.bf16)])
            user, equal = {"nanovlm": nano, "peer": peer_user}, {"nanovlm": nano, "peer": peer_equal}
            report["train"][name] = {"as_user_runs_it": user, "equal_precision": equal}
            speedups[name] = {k: ratio(v["nanovlm"]["samples_per_s"], v["peer"]["samples_per_s"]) for k, v in (("user", user), ("equal", equal))}
        report["train_speedup_vs_peer_by_preset"] = {k: v["user"] for k, v in speedups.items()}
        report["train_speedup_vs_peer_equal_precision_by_preset"] = {k: v["equal"] for k, v in speedups.items()}
        headline = self.preset if self.preset in speedups else self.settings.presets[0]
        report["train_speedup_vs_peer"] = speedups[headline]["user"]
        report["train_speedup_vs_peer_equal_precision"] = speedups[headline]["equal"]

    def mfu(self):
        """Training FLOP/s of `mfu_preset` over the matmul peak measured right after each run, in its process."""
        s, report = self.settings, self.report
        (fp32,) = self.train_runs(s.mfu_preset, [("nanovlm", False)])
        native_bf16 = self.device == "cuda" or report["machine"]["cpu_native_bf16"]
        bf16_run = None
        if s.bf16_mfu or (s.bf16_mfu is None and native_bf16):
            (bf16_run,) = self.train_runs(s.mfu_preset, [("nanovlm", True)], steps=s.bf16_steps, warmup=1, seconds=0.0, repeats=1)
        not_run = ("not run: this CPU has no bf16 instructions (--bf16_mfu true runs it)" if not native_bf16
                   else "not run: --bf16_mfu false")
        report["mfu"] = {"preset": s.mfu_preset, "batch_size": s.batch_size, "flops_per_step": fp32["flops_per_step"],
                         "fp32_train": fp32, "bf16_train": bf16_run or not_run}
        peak = report["matmul_peak"]
        for name, result in (("fp32", fp32), ("bf16", bf16_run)):
            # The MFU: the median over repeats of FLOP/s over the peak measured right after, in the same
            # process; also the fastest repeat over the peak measured at the start of the run.
            report["mfu"][f"{name}_achieved_gflops"] = result["achieved_gflops"] if result else None
            report["mfu"][f"{name}_vs_run_start_peak"] = result["achieved_gflops"] / peak[f"{name}_gflops"] if result else None
            report[f"mfu_{name}"] = statistics.median(result["mfu_repeats"]) if result else None
        logger.info("MFU %s: fp32 %.2f, bf16 %s", s.mfu_preset, report["mfu_fp32"], report["mfu_bf16"])

    def gradient_checkpointing(self):
        """Peak memory and speed of one training setup with and without --gradient_checkpointing."""
        name, s = self.settings.checkpointing_preset, self.settings
        runs = {flag: self.measure(speed.train_speed, side="nanovlm", preset=name, batch=self.batch_for(name), vocab_size=self.vocab,
                                   steps=s.checkpointing_steps, warmup=1, bf16=self.bf16, gradient_checkpointing=flag)
                for flag in (False, True)}
        memory = "peak_cuda_mb" if self.device == "cuda" else "peak_rss_mb"
        self.report["gradient_checkpointing"] = result = {
            "preset": name, "batch_size": s.batch_size, "memory": memory, "off": runs[False], "on": runs[True],
            "peak_saving_mb": runs[False][memory] - runs[True][memory],
            "slowdown": ratio(runs[False]["samples_per_s"], runs[True]["samples_per_s"]),
        }
        logger.info("gradient checkpointing, %s at batch %d: %s %.0f -> %.0f MB, %.2fx slower", name, s.batch_size, memory,
                    runs[False][memory], runs[True][memory], result["slowdown"])

    def generation(self):
        """generate() captions/s of NanoVLM and the peer, at each batch size and caption length; the KV cache's speedup."""
        s, report = self.settings, self.report
        reps = dict(zip(s.generate_batch_sizes, s.generate_calls))
        pixel_values = self.batch["pixel_values"][: max(reps)]
        report["generate"] = self.measure(speed.generate_speed, preset=self.preset, vocab_size=self.vocab, pixel_values=pixel_values,
                                          bos=self.bos, lengths=s.lengths, reps=reps, bf16=self.bf16)
        report["generate_speedup_vs_peer"] = {
            f"batch_{b}": {f"tokens_{n}": ratio(*(report["generate"][side][f"batch_{b}_tokens_{n}"]["captions_per_s"] for side in speed.SIDES))
                           for n in s.lengths} for b in reps
        }
        logger.info("generate speedup vs peer: %s", report["generate_speedup_vs_peer"])
        report["cache"] = cache = self.measure(speed.cache_speed, preset=self.preset, vocab_size=self.vocab, pixel_values=pixel_values[:1],
                                               bos=self.bos, new_tokens=max(s.lengths), reps=s.cache_reps, bf16=self.bf16)
        report["cache_speedup"] = cache["uncached_seconds"] / cache["cached_seconds"]
        logger.info("cache speedup: %.1fx (identical tokens)", report["cache_speedup"])

    def processor_speed(self, image_dir: str):
        """Images/s of the processor on real JPEGs, against NanoVLM's training samples/s."""
        report = self.report
        paths = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))[: self.settings.processor_images]
        if not paths:
            report["processor"] = {"skipped": f"no JPEG images in {os.path.abspath(image_dir)} (the Flickr8k images)"}
            report["data_to_train_ratio"] = None
            logger.warning("processor benchmark skipped: %s", report["processor"]["skipped"])
            return
        report["processor"] = self.measure(speed.processor_speed, processor_dir=self.work, image_paths=paths,
                                           batch_size=self.settings.batch_size)
        report["processor"]["image_dir"] = os.path.abspath(image_dir)
        train_speed = self.train_runs(self.preset, [("nanovlm", self.bf16)])[0]["samples_per_s"]
        report["data_to_train_ratio"] = report["processor"]["images_per_s"] / train_speed
        logger.info("processor: %.0f images/s, %.1fx NanoVLM's training samples/s", report["processor"]["images_per_s"],
                    report["data_to_train_ratio"])

    def time_to_quality(self):
        """Each side trains train.py's default recipe for the same wall time; how soon NanoVLM reaches the peer's end."""
        s = self.settings
        batch = training.parse_args([])[2].per_device_train_batch_size  # train.py's default
        ttq = {side: self.measure(quality.time_to_quality, side=side, preset=self.preset, processor_dir=self.work, batch_size=batch,
                                  num_train=s.ttq_train_examples, num_validation=s.ttq_validation_examples,
                                  budget_seconds=s.ttq_seconds, eval_seconds=s.ttq_eval_seconds, bf16=self.bf16)
               for side in speed.SIDES}
        self.report["time_to_quality"] = {**ttq, "summary": quality_summary(ttq["nanovlm"], ttq["peer"])}
        self.report["time_to_quality_speedup"] = self.report["time_to_quality"]["summary"]["object_recall"]["speedup"]
        logger.info("time to quality: %s", self.report["time_to_quality"]["summary"])

    def targets(self):
        """Each goal of TARGETS against its figure (the slowest generation setting for generation)."""
        report = self.report
        generate_worst = min((v for by_length in report["generate_speedup_vs_peer"].values() for v in by_length.values() if v), default=None)
        values = {**{k: report.get(k) for k in TARGETS}, "generate_speedup_vs_peer": generate_worst}
        report["targets"] = {k: {"goal": goal, "value": values[k], "met": None if values[k] is None else values[k] >= goal}
                             for k, goal in TARGETS.items()}
        if self.device == "cpu" and not report["machine"]["cpu_native_bf16"]:
            report["targets"]["mfu_bf16"].update(met=None, note="this CPU has no bf16 instructions: its bf16 'peak' is a slow fallback")


def run(settings: Settings, device: str = "cpu", threads: int | None = None, bf16: bool | None = None,
        image_dir: str = FLICKR8K_IMAGES) -> dict:
    """Every measurement, in one report (a dict of plain JSON values)."""
    with tempfile.TemporaryDirectory(prefix="nanovlm-bench-") as work:  # the processor every measurement loads
        bench = Benchmark(settings, device, threads, bf16, work)
        bench.matmul_peak()
        bench.training_speed()
        bench.mfu()
        bench.gradient_checkpointing()
        bench.generation()
        bench.processor_speed(image_dir)
        bench.time_to_quality()
        bench.targets()
        return bench.report


def parse_args(argv=None) -> tuple[BenchmarkArguments, Settings]:
    """The flags of both dataclasses; with --quick, QUICK's settings are the defaults the other flags override."""
    parser = HfArgumentParser((BenchmarkArguments, Settings), description=__doc__.splitlines()[0])
    argv = sys.argv[1:] if argv is None else argv
    if parser.parse_args_into_dataclasses(args=argv)[0].quick:
        parser.set_defaults(**dataclasses.asdict(QUICK))
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def main(argv=None):
    args, settings = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    report = run(settings, args.device, args.threads, args.bf16, args.image_dir)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in TARGETS} | {"targets_met": {k: v["met"] for k, v in report["targets"].items()}}, indent=2))


if __name__ == "__main__":
    main()
