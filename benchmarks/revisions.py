"""Is this checkout slower than another revision? NanoVLM's training and generation speed, both in one run.

    python -m benchmarks.revisions --baseline c8ac5c4 --output results/revisions_c8ac5c4.json
    python -m benchmarks.revisions --baseline ../old-checkout --repeats 5     # a folder works too

The baseline (a git revision, exported with `git archive`, or a folder holding the project) and this
checkout take turns: each round times both, each in a fresh process that imports its own tree's code, with
the measurements both trees' `benchmarks.speed` have (`train_speed`: samples/s through the Trainer on one
fixed batch of train.py's default preset; `generate_speed`: greedy captions/s, with transformers' peer
model in the same process as a control). Each side keeps its fastest round; the spread of a side's rounds
is the machine's noise, against which the ratio is read.
"""

import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field

from transformers import HfArgumentParser

logger = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in each tree with that tree as the working folder; uses only what every revision's benchmarks have.
MEASURE = """
import json, sys
settings = json.loads(sys.argv[1])
import torch
torch.set_num_threads(settings["threads"])
import modeling_nanovlm
from benchmarks import speed
from processing import scenes
try:
    import training as helpers
except ImportError:  # a revision from before train.py's helpers moved into training/
    import train as helpers
fixed_batch = getattr(speed, "fixed_batch", None) or __import__("benchmarks.__main__", fromlist=["x"]).fixed_batch
model_args = helpers.parse_args(["--preset", settings["preset"]])[0]
processor = helpers.build_processor(model_args, scenes.scene_texts(settings["tokenizer_texts"]),
                                    helpers.image_size_of(model_args), settings["work"])
batch = fixed_batch(processor, settings["batch_size"])
vocab, bos = len(processor.tokenizer), processor.tokenizer.bos_token_id
train = speed.train_speed("cpu", "nanovlm", settings["preset"], batch, vocab, settings["train_steps"], settings["warmup_steps"],
                          False, min_seconds=settings["train_seconds"])
reps = dict(zip(settings["generate_batch_sizes"], settings["generate_calls"]))
generate = speed.generate_speed("cpu", settings["preset"], vocab, batch["pixel_values"][: max(reps)], bos, settings["lengths"], reps, False)
print(json.dumps({"code": modeling_nanovlm.__file__, "train_samples_per_s": train["samples_per_s"], "generate": generate}))
"""


@dataclass
class RevisionArguments:
    baseline: str = field(default="c8ac5c4", metadata={"help": "a git revision of this repository, or a folder holding the project"})
    output: str = field(default="revisions.json", metadata={"help": "JSON report"})
    preset: str = field(default="mini-112", metadata={"help": "the preset timed (train.py's default)"})
    repeats: int = field(default=3, metadata={"help": "rounds; each side keeps its fastest"})
    batch_size: int = field(default=32, metadata={"help": "training batch, and the largest generation batch"})
    train_steps: int = field(default=5, metadata={"help": "timed training steps after the warm-up: at least this many,"})
    train_seconds: float = field(default=8.0, metadata={"help": "and at least this long"})
    warmup_steps: int = field(default=2, metadata={"help": "untimed training steps first"})
    lengths: list[int] = field(default_factory=lambda: [30], metadata={"help": "new tokens per caption in the generation timings"})
    generate_batch_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"help": "generation batch sizes"})
    generate_calls: list[int] = field(default_factory=lambda: [5, 3], metadata={"help": "timed generate() calls at each batch size"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: this machine's cores)"})
    tokenizer_texts: int = field(default=20000, metadata={"help": "scene texts the tokenizer is trained on"})


def export_revision(revision: str, folder: str) -> str:
    """The tree of `revision` (git archive) in `folder`, or `revision` itself when it is a folder."""
    if os.path.isdir(revision):
        return os.path.abspath(revision)
    archive = os.path.join(folder, "baseline.tar")
    subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", "-o", archive, revision], check=True)
    tree = os.path.join(folder, "baseline")
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def measure(tree: str, args: RevisionArguments, work: str) -> dict:
    settings = {**asdict(args), "threads": args.threads or os.cpu_count(), "work": work}
    env = {**os.environ, "PYTHONPATH": tree, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(settings)], cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"timing the tree in {tree} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if not os.path.realpath(measured["code"]).startswith(os.path.realpath(tree) + os.sep):
        raise RuntimeError(f"the tree in {tree} imported another checkout's model code: {measured['code']}")
    return measured


def summarize(rounds: dict) -> dict:
    """Each side's fastest figure, its rounds' spread (max / min), and current over baseline."""
    def figures(run):
        out = {"train_samples_per_s": run["train_samples_per_s"]}
        for side, by_setting in run["generate"].items():
            out.update({f"generate_{side}_{k}_captions_per_s": v["captions_per_s"] for k, v in by_setting.items() if isinstance(v, dict)})
        return out

    per_side = {name: [figures(run) for run in runs] for name, runs in rounds.items()}
    summary = {}
    for key in per_side["current"][0]:
        values = {name: [f[key] for f in runs] for name, runs in per_side.items()}
        summary[key] = {
            "baseline": max(values["baseline"]), "current": max(values["current"]),
            "current_over_baseline": max(values["current"]) / max(values["baseline"]),
            "noise": max(max(v) / min(v) for v in values.values()),  # the widest spread of one side's rounds
        }
    return summary


def main(argv=None):
    args = HfArgumentParser(RevisionArguments, description=__doc__.splitlines()[0]).parse_args_into_dataclasses(args=argv)[0]
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    with tempfile.TemporaryDirectory(prefix="nanovlm-revisions-") as folder:
        trees = {"baseline": export_revision(args.baseline, folder), "current": ROOT}
        rounds = {name: [] for name in trees}
        for i in range(args.repeats):
            for name, tree in trees.items():
                work = os.path.join(folder, f"{name}-{i}")
                rounds[name].append(measure(tree, args, work))
                logger.info("round %d/%d, %s: %.1f training samples/s", i + 1, args.repeats, name, rounds[name][-1]["train_samples_per_s"])
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"command": "python -m benchmarks.revisions " + " ".join(sys.argv[1:] if argv is None else argv),
              "baseline": args.baseline, "current": head or "working tree", "settings": asdict(args), "cpus": os.cpu_count(),
              "summary": summarize(rounds), "rounds": rounds}
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    for key, row in report["summary"].items():
        print(f"{key}: baseline {row['baseline']:.2f}, current {row['current']:.2f}, "
              f"ratio {row['current_over_baseline']:.3f} (noise {row['noise']:.3f})")


if __name__ == "__main__":
    main()
