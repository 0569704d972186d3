"""Time to quality: training wall time until a model's captions of the built-in short scenes are
grounded as well as the other model's.

Both sides start from the same point: freshly initialized (seed 0), the same scenes in the same
order at the default preset's image size, train.py's collator and training arguments (lr 5e-4,
cosine, warmup, batch 16; the Trainer's default lr of 5e-5 would only handicap the peer). NanoVLM
trains as `python train.py` does, with its per-token grounding loss; the peer, which has no
visual-token map to put it on, as a user would train it: the caption loss alone. Every
`eval_seconds` of training the clock stops while the model captions the validation scenes;
grounding (object recall, CHAIR-i) and the validation loss of those captions are recorded against
the training seconds so far.
"""

import time

import datasets
import torch
from transformers import Trainer, TrainerCallback, VisionEncoderDecoderModel

from benchmarks.peer import peer_inputs
from benchmarks.speed import build_model, fit, synchronize, training_arguments
from evaluation.captioning import generate_captions
from evaluation.grounding import grounding_scores
from modeling_nanovlm import NanoVLMProcessor
from processing import data, scenes
from processing.collator import NanoVLMCollator
import training


@torch.no_grad()
def captions(model, processor, images, max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy captions from NanoVLM or its peer."""
    if not isinstance(model, VisionEncoderDecoderModel):
        return generate_captions(model, processor, images, batch_size=batch_size, max_new_tokens=max_new_tokens)
    texts = []
    for start in range(0, len(images), batch_size):
        pixel_values = processor(images=images[start : start + batch_size])["pixel_values"].to(model.device)
        texts.extend(processor.batch_decode(model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, do_sample=False)))
    return texts


class QualityClock(TrainerCallback):
    """Grades the model every `eval_seconds` of training time and stops training after `budget_seconds`."""

    def __init__(self, grade, budget_seconds, eval_seconds, device):
        self.grade, self.budget, self.every, self.device = grade, budget_seconds, eval_seconds, device
        self.points = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.paused, self.next = time.perf_counter(), 0.0, self.every

    def on_step_end(self, args, state, control, model=None, **kwargs):
        seconds = self._seconds()
        if seconds >= self.next or seconds >= self.budget:
            self._grade(args, state, model, seconds)
        if seconds >= self.budget:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.points or self.points[-1]["step"] != state.global_step:  # the data ran out before the budget
            self._grade(args, state, model, self._seconds())

    def _seconds(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self.start - self.paused

    def _grade(self, args, state, model, seconds):
        paused_at = time.perf_counter()
        model.eval()
        self.points.append({"train_seconds": round(seconds, 2), "step": state.global_step,
                            "samples": state.global_step * args.train_batch_size, **self.grade(model)})
        model.train()
        self.next = seconds + self.every
        self.paused += time.perf_counter() - paused_at


def time_to_quality(device, side, preset, processor_dir, batch_size, num_train, num_validation, budget_seconds, eval_seconds, bf16) -> dict:
    model_args, data_args, _ = training.parse_args(
        ["--preset", preset, "--num_train_examples", str(num_train), "--num_validation_examples", str(num_validation)]
    )
    datasets.disable_progress_bars()
    train_rows, validation = training.load_splits(data_args, training.image_size_of(model_args), 0, data.BadImages())
    processor = NanoVLMProcessor.from_pretrained(processor_dir)
    model = build_model(side, preset, len(processor.tokenizer)).to(device)
    collator = NanoVLMCollator(processor, model_args.max_length)
    side_collator = collator if side == "nanovlm" else (lambda examples: peer_inputs(collator(examples)))
    train_collator, extra = training.with_objectives(model, data_args, collator) if side == "nanovlm" else (side_collator, {})
    trainer_class = training.NanoVLMTrainer if side == "nanovlm" else Trainer
    images, truth = validation["image"], [scenes.scene_from_row(row) for row in validation]

    @torch.no_grad()
    def grade(model) -> dict:
        grounding = grounding_scores(captions(model, processor, images, max_new_tokens=48), truth)
        rows = [validation[i] for i in range(len(validation))]
        losses = [model(**{k: v.to(device) for k, v in side_collator(rows[i : i + 32]).items()}).loss.item()
                  for i in range(0, len(rows), 32)]
        return {"object_recall": grounding["object_recall"], "chair_i": grounding["chair_i"], "eval_loss": sum(losses) / len(losses)}

    clock = QualityClock(grade, budget_seconds, eval_seconds, device)
    fit(model, training_arguments("nanovlm", batch_size, -1, device, bf16, num_train_epochs=1), train_rows, train_collator, clock,
        trainer_class, **extra)
    return {"preset": preset, "bf16": bf16, "train_examples": num_train, "validation_examples": num_validation,
            "budget_seconds": budget_seconds, "points": clock.points}
