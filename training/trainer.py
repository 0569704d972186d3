"""NanoVLMTrainer (transformers' Trainer plus the training-only objectives, self-critical training and label
smoothing on the shifted caption) and the caption evaluation it runs at each evaluation."""

import json
import logging

from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback

from evaluation.captioning import generate_captions
from evaluation.grounding import grounding_scores
from evaluation.image_use import image_gap, unique_caption_share

from .self_critical import SelfCritical

logger = logging.getLogger(__name__)


class ParameterBytes(TrainerCallback):
    """When training starts (after FSDP has sharded the model, if it does): the parameter bytes this process
    holds, a sharded (DTensor) parameter counting its local shard only, against the whole model's."""

    local = total = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = list(model.parameters())
        self.local = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in params)
        self.total = sum(p.numel() * p.element_size() for p in params)
        if args.world_size > 1:
            logger.info("rank %d holds %s of the model's %s parameter bytes", args.process_index, f"{self.local:,}", f"{self.total:,}")


class NanoVLMTrainer(Trainer):
    """The Trainer, plus NanoVLM's training. Caption metrics: at each
    evaluation `caption_eval` (a `CaptionEvaluation`) adds what the captions score to the evaluation's
    metrics before the Trainer logs them, so every `--report_to` reporter, the log history (checkpoints, the
    loss curve) and `trainer.evaluate()`'s result all hold them. Self-critical training: with `self_critical`
    (a `SelfCritical`) the training loss is its loss on the model's own sampled captions, logged with their
    mean reward as `sample_cider_d`; evaluation keeps the caption loss.

    `train_sampler`: the order of the training rows, in place of the Trainer's random one
    (`processing.photo_groups.PhotoGroupSampler` under `--captions_per_image`).

    The training-only objectives (`training.objectives`) each add `weight * loss` on the projected visual tokens,
    logged as `aux_<name>`; their heads are trained and checkpointed with the model and removed before the final save.

    Label smoothing (`--label_smoothing_factor`) smooths the training caption loss over the next token,
    as the model's own loss predicts it (the Trainer shifts labels only for models in its causal-LM
    list, which NanoVLM is not: unshifted, each token would be trained to predict itself). Evaluation
    keeps the model's plain loss, so validation loss and the image gap stay nats/token of the captions.
    """

    def __init__(self, *args, objectives: list | None = None, caption_eval: "CaptionEvaluation | None" = None,
                 self_critical: SelfCritical | None = None, train_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_sampler = train_sampler  # the order of the training rows (--captions_per_image), else the Trainer's
        self.self_critical, self._rewards = self_critical, [0.0, 0]
        self.caption_smoother, self.label_smoother = self.label_smoother, None  # training only, labels shifted
        self.objectives = objectives or []  # training.objectives.Objective
        self.caption_eval = caption_eval
        self._aux_sums = {objective.name: [0.0, 0] for objective in self.objectives}
        self.parameter_bytes = ParameterBytes()
        self.add_callback(self.parameter_bytes)

    def _get_train_sampler(self, train_dataset=None):
        return self.train_sampler if self.train_sampler is not None else super()._get_train_sampler(train_dataset)

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        if self.caption_eval is not None and self.is_world_process_zero():
            output.metrics.update(self.caption_eval(self.model, self.state.global_step, metric_key_prefix))
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = {k: inputs.pop(k) for k in [k for k in inputs if k.startswith("aux_")]}
        references = inputs.pop("references", None)  # self-critical training's targets
        if model.training and "labels" in inputs:
            # Training rows start with the image tokens, whose next tokens (image, <bos>) are never targets:
            # the LM head and its softmax skip them (the same loss; a 1.12x faster step of recipe 9's model).
            # (Captions alone, --language_only, have no image tokens: every position is kept.)
            image_tokens = self.accelerator.unwrap_model(model).config.num_image_tokens if "pixel_values" in inputs else 0
            inputs["logits_to_keep"] = inputs["input_ids"].shape[1] - image_tokens
        if self.self_critical is not None and model.training:
            loss, reward = self.self_critical.loss(model, self.accelerator.unwrap_model(model), inputs["pixel_values"], references)
            self._rewards[0] += reward
            self._rewards[1] += 1
            loss = loss / self.args.gradient_accumulation_steps
            if self.self_critical.caption_weight:  # and the caption loss on the batch's human captions
                caption = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
                loss = loss + self.self_critical.caption_weight * caption
            return (loss, None) if return_outputs else loss
        if model.training and any(objective.reads_text for objective in self.objectives):
            inputs["output_hidden_states"] = True
        if self.caption_smoother is not None and model.training and "labels" in inputs:
            loss, outputs = self._smoothed_caption_loss(model, inputs, num_items_in_batch)
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.objectives and model.training:
            unwrapped = self.accelerator.unwrap_model(model)
            targets["pixel_values"] = inputs["pixel_values"]  # masked-image modelling's target
            if outputs.hidden_states is not None:  # the decoder's states, for objectives that read the caption
                targets["decoder_hidden_states"] = outputs.hidden_states
            for objective in self.objectives:
                aux = objective.loss(unwrapped, outputs.image_hidden_states, targets)
                loss = loss + objective.weight * aux / self.args.gradient_accumulation_steps
                self._aux_sums[objective.name][0] += float(aux.detach())
                self._aux_sums[objective.name][1] += 1
        return (loss, outputs) if return_outputs else loss

    def _smoothed_caption_loss(self, model, inputs, num_items_in_batch):
        labels = inputs.pop("labels")[:, -inputs["logits_to_keep"]:]
        outputs = model(**inputs)
        loss = self.caption_smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as the Trainer scales a loss over all ranks' tokens
        return loss, outputs

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log line: the auxiliary losses' means since the last one
            weighted = 0.0
            for objective in self.objectives:
                total, count = self._aux_sums[objective.name]
                if count:
                    logs[f"aux_{objective.name}"] = round(total / count, 4)
                    weighted += objective.weight * total / count
            if weighted:  # the caption part alone, comparable with the validation loss
                logs["caption_loss"] = round(logs["loss"] - weighted, 4)
            self._aux_sums = {objective.name: [0.0, 0] for objective in self.objectives}
            if self._rewards[1]:  # self-critical training: the sampled captions' mean CIDEr-D since the last line
                logs["sample_cider_d"] = round(self._rewards[0] / self._rewards[1], 4)
                self._rewards = [0.0, 0]
        super().log(logs, *args, **kwargs)


def eval_metric_scores(name: str, captions: list[str], examples: list[dict]) -> dict:
    """`--eval_metrics` on captions of validation rows: grounding (scenes) or cider (CIDEr-D)."""
    if name == "grounding":
        scores = grounding_scores(captions, [ex["scene"] for ex in examples])
        keys = ("object_recall", "object_precision", "chair_i", "attribute_accuracy", "place_accuracy", "relation_accuracy")
        return {f"grounding_{k}": scores[k] for k in keys}
    from evaluation.caption_metrics import caption_scores  # pycocoevalcap: only loaded when asked for

    references = [ex.get("references") or [ex["text"]] for ex in examples]  # coco rows carry every caption
    return {"cider_d": caption_scores(captions, references, tokenizer="simple")["cider_d"]}


class CaptionEvaluation:
    """At each evaluation, caption a few fixed validation images, log them next to the truth and append
    them to `path` (samples.jsonl); with `metric`, caption `examples` (the first `num_samples` of which
    are logged) and score them. Returns the scores, prefixed like the evaluation's metrics."""

    def __init__(self, processor, examples, max_new_tokens, path, metric=None, num_samples=None):
        self.processor, self.examples, self.max_new_tokens, self.path = processor, examples, max_new_tokens, path
        self.metric, self.num_samples = metric, len(examples) if num_samples is None else num_samples

    def __call__(self, model, step: int, prefix: str = "eval") -> dict:
        if not self.examples:
            return {}
        images = [ex["image"] for ex in self.examples]
        captions = generate_captions(model, self.processor, images, max_new_tokens=self.max_new_tokens)
        for caption, ex in list(zip(captions, self.examples))[:min(3, self.num_samples)]:
            logger.info("step %d | model: %s | truth: %s", step, caption, ex["text"])
        scores = eval_metric_scores(self.metric, captions, self.examples) if self.metric else {}
        if len(self.examples) >= 2:  # does the decoder read the image? (evaluation.image_use)
            scores["image_gap"] = image_gap(model, self.processor, images, [ex["text"] for ex in self.examples])["image_gap"]
            scores["unique_caption_share"] = unique_caption_share(captions)
        scores = {f"{prefix}_{k}": v for k, v in scores.items()}
        logger.info("step %d | %s", step, scores)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "captions": captions[: self.num_samples], **scores}) + "\n")
        return scores
