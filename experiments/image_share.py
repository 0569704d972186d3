"""The image side's share of a photo training step, and what one image pass for several captions saves.

    OMP_NUM_THREADS=1 python -m experiments.image_share share --output results/photos_image_share.json
    OMP_NUM_THREADS=1 python -m experiments.image_share steps --output results/photos_image_share.json

`share`: for the models of configuration/recipes/flickr8k/conv/w4_112.json (conv tower) and ../best.json (ViT),
on one batch of 32 Flickr8k training captions (4 of each of 8 photos, each caption with its own copy of its photo at
112 px, as one-row-per-caption batches are), in one process with one thread, in
turns (each repeat times both models, each part's median of 3 calls, the parts called in turns after one untimed
call each): the whole training
step (forward, the caption and words losses, backward, AdamW), the image side alone (vision tower + projector,
forward and backward of the features' gradient) and the step without it (the same step on the features
computed beforehand: no tower pass). Share = image side / step, and 1 - step without it / step (the latter also
leaves out AdamW on the tower's weights). Also the step and the image side on the grouped batch (the same captions,
one copy of each photo, `image_index`): the compute a step saves, data loading aside.

`steps`: each recipe against its `_grouped` twin (`--captions_per_image 4`) through transformers' Trainer as
train.py builds it, with the real data pipeline (decoding, augmentation, collation: the Trainer's main process,
as in the recipes), runs of 35 steps in turns; the time of steps 6-35 (30 steps). Both write their part
into --output, keeping the other part.
"""

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers
from transformers import TrainerCallback

from benchmarks.ablations import times_in_turns
from processing import data
from processing.augment import CaptionAugment
from processing.collator import NanoVLMCollator
from processing.photo_groups import group_by_photo
from training.arguments import parse_args
from training.data import build_processor
from training.model import build_model, caption_length, image_size_of
from training.objectives import ObjectiveTargets, objectives_for, with_objectives
from training.trainer import NanoVLMTrainer

logger = logging.getLogger(__name__)
RECIPES = {"conv (w4_112.json)": "configuration/recipes/flickr8k/conv/w4_112.json",
           "vit (best.json)": "configuration/recipes/flickr8k/best.json"}
STEP_RECIPES = {"conv": "configuration/recipes/flickr8k/conv/w4_112.json", "vit": "configuration/recipes/flickr8k/conv/vit_112.json"}


def recipe_setup(recipe: str, out: str, *flags: str):
    """(model_args, data_args, training_args, training rows, processor) of a recipe, as train.py reads them."""
    model_args, data_args, training_args = parse_args(["--recipe", recipe, "--output_dir", out, *flags])
    train = data.load_coco_captions(data_args.caption_file, data_args.image_dir, "all", training_args.seed)
    processor = build_processor(model_args, train["text"], image_size_of(model_args), out)
    return model_args, data_args, training_args, train, processor


class Parts:
    """One recipe's model, optimizer and batches (32 captions, 4 of each of 8 photos: 32 photo copies, or 8 photos
    shared), and the timed parts."""

    def __init__(self, recipe: str, out: str):
        model_args, data_args, training_args, train, processor = recipe_setup(recipe, out)
        torch.manual_seed(0)
        self.model = build_model(model_args, len(processor.tokenizer)).train()
        self.objectives = objectives_for(self.model, data_args, train["text"])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        collator = NanoVLMCollator(processor, caption_length(self.model, None))
        grouped_collator = ObjectiveTargets(NanoVLMCollator(processor, caption_length(self.model, None), share_images=True),
                                            self.objectives)
        first = {}  # image id -> its first row
        for row, image_id in enumerate(train["image_id"]):
            first.setdefault(image_id, row)
        # 4 captions of 8 photos (a photo's captions are consecutive rows), each caption with its own copy of the photo;
        # the grouped batch: the same captions, one image object per photo (what PhotoGroupTransform gives)
        rows = [train[first[p] + k] for p in sorted(first)[:8] for k in range(4)]
        self.batch = ObjectiveTargets(collator, self.objectives)(rows)
        shared = {}
        self.grouped = grouped_collator([dict(row, image=shared.setdefault(row["image_id"], row["image"])) for row in rows])
        assert torch.equal(self.batch["input_ids"], self.grouped["input_ids"])
        assert self.grouped["pixel_values"].shape[0] == 8 and self.grouped["input_ids"].shape[0] == 32
        self.image_tokens = self.model.config.num_image_tokens
        with torch.no_grad():
            self.features = self.model.model.get_image_features(self.batch["pixel_values"])
        self.features_grad = torch.randn_like(self.features)
        self.grouped_grad = self.features_grad[:8]

    def _loss(self, inputs, outputs, features):
        targets = {k: v for k, v in inputs.items() if k.startswith("aux_")}
        return outputs.loss + sum(o.weight * o.loss(self.model, features, targets) for o in self.objectives)

    def _model_inputs(self, inputs):
        return {k: v for k, v in inputs.items() if not k.startswith("aux_")}

    def _update(self, loss):
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, inputs=None):
        inputs = self.batch if inputs is None else inputs
        keep = inputs["input_ids"].shape[1] - self.image_tokens
        outputs = self.model(**self._model_inputs(inputs), logits_to_keep=keep)
        self._update(self._loss(inputs, outputs, outputs.image_hidden_states))

    def step_grouped(self):
        self.step(self.grouped)

    def image(self, pixel_values=None, grad=None):
        pixel_values = self.batch["pixel_values"] if pixel_values is None else pixel_values
        self.model.model.get_image_features(pixel_values).backward(self.features_grad if grad is None else grad)
        self.optimizer.zero_grad(set_to_none=True)

    def image_grouped(self):
        self.image(self.grouped["pixel_values"], self.grouped_grad)

    def rest(self):
        inputs = self._model_inputs(self.batch)
        embeds = self.model.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == self.model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, self.features)
        keep = inputs["input_ids"].shape[1] - self.image_tokens
        outputs = self.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                             logits_to_keep=keep)
        self._update(self._loss(self.batch, outputs, self.features))


def timed_in_turns(fns: dict, calls: int = 3) -> dict:
    """{name: median seconds of `calls` calls}, the calls of the functions in turns (one untimed call each first)."""
    for fn in fns.values():
        fn()  # untimed: allocator and caches warm
    return {name: statistics.median(t) for name, t in times_in_turns(fns, calls).items()}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "each": [round(v, 4) for v in values]}


def measure_share(repeats: int, out: str) -> dict:
    models = {name: Parts(recipe, os.path.join(out, name.split()[0])) for name, recipe in RECIPES.items()}
    kinds = ("step", "image", "rest", "step_grouped", "image_grouped")
    seconds = {name: {kind: [] for kind in kinds} for name in models}
    for rep in range(repeats):
        for name, parts in models.items():
            order = kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]  # the order turns each repeat
            for kind, median in timed_in_turns({kind: getattr(parts, kind) for kind in order}).items():
                seconds[name][kind].append(median)
            s = {k: v[-1] for k, v in seconds[name].items()}
            logger.info("%s repeat %d: %s; share %.3f", name, rep, {k: round(v, 3) for k, v in s.items()}, s["image"] / s["step"])
    result = {}
    for name, s in seconds.items():
        pairs = list(zip(*(s[k] for k in kinds)))
        result[name] = {
            "seconds": {kind: spread(s[kind]) for kind in kinds},
            "image_share": spread([image / step for step, image, *_ in pairs]),
            "image_share_by_difference": spread([1 - rest / step for step, _, rest, *_ in pairs]),
            "grouped_image_share": spread([image_g / step_g for _, _, _, step_g, image_g in pairs]),
            "grouped_step_over_step": spread([step_g / step for step, _, _, step_g, _ in pairs]),
        }
    return result


class StepClock(TrainerCallback):
    """The wall time of each training step's end (data loading of the next step falls between two)."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def timed_run(recipe: str, out: str, setup, steps: int, skip: int) -> float:
    """Seconds of steps skip+1..steps of a recipe's training, built as train.py builds it."""
    model_args, _, _, train, processor = setup  # the data and tokenizer, shared by a recipe and its grouped twin
    _, data_args, training_args = parse_args(["--recipe", recipe, "--output_dir", out, "--max_steps", str(steps), "--eval_strategy",
                                              "no", "--save_strategy", "no", "--logging_steps", "1000", "--disable_tqdm", "true",
                                              "--report_to", "none"])
    transformers.set_seed(training_args.seed)
    model = build_model(model_args, len(processor.tokenizer))
    grouped = data_args.captions_per_image > 1
    collator, extra = with_objectives(model, data_args, NanoVLMCollator(processor, caption_length(model, None), share_images=grouped),
                                      train["text"])
    if grouped:
        rows, extra["train_sampler"] = group_by_photo(train, data_args.captions_per_image, training_args.seed, data_args.augment)
    else:
        rows = train.with_transform(CaptionAugment(seed=training_args.seed).transform_batch)
    clock = StepClock()
    trainer = NanoVLMTrainer(model=model, args=training_args, data_collator=collator, train_dataset=rows,
                             processing_class=processor, callbacks=[clock], **extra)
    trainer.train()
    return clock.ends[steps - 1] - clock.ends[skip - 1]


def measure_steps(repeats: int, steps: int, skip: int, out: str) -> dict:
    result = {}
    setups = {name: recipe_setup(recipe, os.path.join(out, name)) for name, recipe in STEP_RECIPES.items()}
    seconds = {name: {"per_caption": [], "grouped": []} for name in STEP_RECIPES}
    for rep in range(repeats):
        for name, recipe in STEP_RECIPES.items():
            runs = {"per_caption": recipe, "grouped": recipe.replace(".json", "_grouped.json")}
            for mode in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                seconds[name][mode].append(timed_run(runs[mode], os.path.join(out, f"{name}-{mode}-{rep}"), setups[name], steps, skip))
                logger.info("%s %s repeat %d: %.1f s for %d steps", name, mode, rep, seconds[name][mode][-1], steps - skip)
    for name, s in seconds.items():
        result[name] = {
            "recipes": [STEP_RECIPES[name], STEP_RECIPES[name].replace(".json", "_grouped.json")],
            "seconds_per_step": {mode: spread([t / (steps - skip) for t in s[mode]]) for mode in s},
            "grouped_over_per_caption": spread([g / p for p, g in zip(s["per_caption"], s["grouped"])]),
        }
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("share", "steps"))
    parser.add_argument("--output", default="results/photos_image_share.json")
    parser.add_argument("--repeats", type=int, default=None, help="share: 6, steps: 3")
    parser.add_argument("--steps", type=int, default=35, help="steps: each run's length (the first --skip are not timed)")
    parser.add_argument("--skip", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        if args.what == "share":
            part = {"share": measure_share(args.repeats or 6, out)}
        else:
            part = {"steps": measure_steps(args.repeats or 3, args.steps, args.skip, out)}
    results = json.load(open(args.output)) if os.path.exists(args.output) else {}
    command = "OMP_NUM_THREADS=1 python -m experiments.image_share " + " ".join(argv if argv is not None else sys.argv[1:])
    part[args.what] = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads(), **part[args.what]}
    results.update(part)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(part, indent=2))


if __name__ == "__main__":
    main()
