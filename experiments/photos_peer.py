"""NanoVLM against its transformers peer on real photos: the same data, augmentation, batch, schedule and
training wall time, then caption metrics on the validation photos.

    python -m experiments.photos_peer --recipe configuration/recipes/flickr8k/5_mini_112_v4k_words_aug.json \
        --budget_minutes 20 --output results/photos_peer.json

Both sides read the recipe through train.py (`training.parse_args`): its data (COCO-layout captions), its
tokenizer (trained once on the training captions, shared), its augmentation (`--augment`), learning rate,
batch, warmup and weight decay. NanoVLM trains as `python train.py --recipe` does, with the recipe's
training-only losses; the peer (`benchmarks/peer.py`, a ViT + GPT-2 `VisionEncoderDecoderModel` of the
same sizes), as a user would train it: the caption loss alone. Each side trains for the same wall time
(`--budget_minutes`, evaluation excluded), one after the other in this process, each with a full learning-rate
schedule: its steps are what a short timed run of that side says fits in the budget, and the clock stops it
at the budget in any case; then captions every validation photo (greedy, 48 new tokens) for BLEU-4 and CIDEr-D against
all references (pure-Python tokenization, as `python -m evaluation --caption_tokenizer simple`).
"""

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import datasets
import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback

import training
from benchmarks.peer import build_peer, peer_inputs
from benchmarks.quality import captions
from evaluation.caption_metrics import caption_scores
from evaluation.report import markdown_table
from processing import data
from processing.augment import CaptionAugment
from processing.collator import NanoVLMCollator

logger = logging.getLogger(__name__)
SIDES = ("nanovlm", "peer")


@dataclass
class PeerArguments:
    recipe: str = field(metadata={"help": "a train.py recipe on COCO-layout data (e.g. configuration/recipes/flickr8k/...)"})
    budget_minutes: float = field(default=20.0, metadata={"help": "training wall time of each side"})
    num_validation_examples: int = field(default=0, metadata={"help": "validation photos captioned (0: the recipe's)"})
    output: str = field(default="photos_peer.json", metadata={"help": "JSON results; the markdown table goes next to it"})


class WallClock(TrainerCallback):
    """Stops training after `seconds` of it."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True


def train_side(side: str, recipe: str, processor, train_rows, validation, budget_seconds: float, max_steps: int, work: str) -> dict:
    """Train one side for `budget_seconds` (a schedule of `max_steps`), then caption and score the validation photos."""
    model_args, data_args, training_args = training.parse_args(["--recipe", recipe, "--output_dir", work, "--max_steps", str(max_steps),
                                                             "--save_strategy", "no", "--eval_strategy", "no",
                                                             "--report_to", "none", "--disable_tqdm", "true"])
    torch.manual_seed(training_args.seed)
    model = training.build_model(model_args, len(processor.tokenizer))
    collator = NanoVLMCollator(processor, training.caption_length(model, model_args.max_length))
    if side == "nanovlm":
        train_collator, extra = training.with_objectives(model, data_args, collator, train_rows["text"])
        trainer_class = training.NanoVLMTrainer
    else:
        torch.manual_seed(training_args.seed)
        model = build_peer(model.config)
        train_collator, extra, trainer_class = (lambda examples: peer_inputs(collator(examples))), {}, Trainer
    rows = train_rows.with_transform(CaptionAugment(seed=training_args.seed).transform_batch) if data_args.augment else train_rows
    clock = WallClock(budget_seconds)
    trainer = trainer_class(model=model, args=training_args, train_dataset=rows, data_collator=train_collator, callbacks=[clock], **extra)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    training.remove_training_heads(model)  # training aids, as train.py removes them before saving
    model.eval()
    texts = captions(model, processor, validation["image"], max_new_tokens=48)
    scores = caption_scores(texts, validation["references"], tokenizer="simple")
    return {"side": side, "parameters": model.num_parameters(),
            "steps": trainer.state.global_step, "samples": trainer.state.global_step * training_args.train_batch_size,
            "train_seconds": round(seconds, 1), "bleu4": scores["bleu4"], "cider_d": scores["cider_d"],
            "distinct_captions": len(set(texts)) / len(texts), "samples_captions": texts[:8]}


def main(argv=None):
    (args,) = HfArgumentParser(PeerArguments, description=__doc__.splitlines()[0]).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    datasets.disable_progress_bars()
    model_args, data_args, training_args = training.parse_args(["--recipe", args.recipe])
    if data_args.dataset != "coco":
        raise SystemExit(f"--recipe {args.recipe}: needs COCO-layout data (dataset coco), got {data_args.dataset!r}")
    if args.num_validation_examples:
        data_args.num_validation_examples = args.num_validation_examples
    train_rows, validation = training.load_splits(data_args, training.image_size_of(model_args), training_args.seed, data.BadImages())
    budget = args.budget_minutes * 60
    with tempfile.TemporaryDirectory() as work:
        processor = training.build_processor(model_args, train_rows["text"], training.image_size_of(model_args), work)
        results, schedule = {}, {}
        for side in SIDES:  # each side's schedule: the steps a short timed run of it says fit in the budget
            probe = train_side(side, args.recipe, processor, train_rows, validation.select(range(2)), min(60.0, budget / 10),
                               10**6, os.path.join(work, f"probe-{side}"))
            schedule[side] = max(1, int(probe["steps"] * budget / probe["train_seconds"]))
            logger.info("%s: a %d-step schedule (%d steps in %.0f s)", side, schedule[side], probe["steps"], probe["train_seconds"])
            results[side] = train_side(side, args.recipe, processor, train_rows, validation, budget, schedule[side],
                                       os.path.join(work, side))
    nano, peer = results["nanovlm"], results["peer"]
    report = {"command": "python -m experiments.photos_peer " + " ".join(sys.argv[1:] if argv is None else argv),
              "recipe": args.recipe, "budget_minutes": args.budget_minutes, "schedule_steps": schedule,
              "validation_photos": len(validation), "machine": os.uname().nodename, "cpus": os.cpu_count(),
              "threads": torch.get_num_threads(), "sides": results,
              "cider_d_ratio": nano["cider_d"] / peer["cider_d"] if peer["cider_d"] else None}
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    rows = [(side, f"{r['parameters'] / 1e6:.2f}M", f"{r['steps']:,}", f"{r['samples']:,}", f"{r['train_seconds'] / 60:.1f} min",
             f"{r['bleu4']:.3f}", f"{r['cider_d']:.3f}", f"{r['distinct_captions']:.1%}") for side, r in results.items()]
    table = markdown_table(("side", "parameters", "steps", "samples", "training time", "BLEU-4", "CIDEr-D", "distinct captions"), rows)
    with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"CIDEr-D ratio NanoVLM / peer: {report['cider_d_ratio']}")


if __name__ == "__main__":
    main()
