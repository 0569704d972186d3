"""Train a NanoVLM with transformers' Trainer, on one CPU, one GPU or many.

    python train.py                                   # mini, built-in short scenes, 2-core CPU, ~15 min
    python train.py --scenes_style long --preset base --max_steps 5000
    python train.py --dataset coco --caption_file ../shared/data/flickr8k/captions_train.json \
        --image_dir ../shared/data/flickr8k/images \
        --validation_caption_file ../shared/data/flickr8k/captions_val.json
    python train.py --dataset hf --data_path DIR_OR_HUB_NAME --image_column image --text_column caption
    python train.py --recipe configuration/recipes/mini_scenes.json --max_steps 100   # recipe, then overrides
    python train.py --push_to_hub --hub_model_id ORG/NAME   # then push model, code and model card to the Hub
    accelerate launch --config_file configuration/accelerate/multi_gpu.yaml train.py --preset base
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no train.py --use_cpu          # two CPU ranks (plain --cpu starts one)

The output folder holds a model + processor + Hub code loadable with `from_pretrained`,
metrics.json, loss_curve.png and samples.png. Resume with `--resume_from_checkpoint latest`.
"""

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import transformers
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, ViTImageProcessorPil

from evaluation.captioning import generate_captions
from evaluation.plots import plot_caption_grid, plot_loss_curve
from modeling_nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMProcessor
from processing import data, push_to_hub, scenes
from processing.collator import NanoVLMCollator
from processing.tokenizer import train_tokenizer

logger = logging.getLogger("train")

# What `python train.py` does without arguments; any flag given on the command line wins.
DEFAULTS = {
    "output_dir": "outputs/nanovlm-mini-scenes",
    "learning_rate": 5e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 100,
    "weight_decay": 0.01,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "num_train_epochs": 1,
    "logging_steps": 20,
    "eval_strategy": "steps",
    "eval_steps": 500,
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "none",
    "remove_unused_columns": False,
    "seed": 0,
    "ddp_find_unused_parameters": False,
}


@dataclass
class ModelArguments:
    preset: str = field(default="mini-112", metadata={"help": "the paper's mini, base or large, or ours: mini-112, base-112, large-112"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "start from a saved NanoVLM folder"})
    vision_feature_select: str | None = field(default=None, metadata={"help": "visual tokens: cls, pooled or all (default: the preset's)"})
    image_size: int | None = field(default=None, metadata={"help": "input resolution (default: the preset's)"})
    config_overrides: str | None = field(
        default=None, metadata={"help": "comma-separated config fields, e.g. 'hidden_dropout=0.0,vision_pool_size=4'"}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "folder with a saved tokenizer; else one is trained"})
    vocab_size: int = field(default=25000, metadata={"help": "BPE vocabulary size when training a tokenizer"})
    max_length: int = field(default=128, metadata={"help": "longest caption in tokens (longer ones are cut)"})


@dataclass
class DataArguments:
    dataset: str = field(default="scenes", metadata={"help": "scenes, coco or hf"})
    scenes_style: str = field(default="short", metadata={"help": "scenes descriptions: short or long"})
    num_train_examples: int = field(default=50000, metadata={"help": "scenes: training examples"})
    num_validation_examples: int = field(default=256, metadata={"help": "validation examples (scenes; cap for others)"})
    caption_file: str | None = field(default=None, metadata={"help": "coco: captions JSON for training"})
    image_dir: str | None = field(default=None, metadata={"help": "coco: folder of the images"})
    validation_caption_file: str | None = field(default=None, metadata={"help": "coco: captions JSON for validation"})
    caption_policy: str = field(default="all", metadata={"help": "coco: all (one example per caption), first, random"})
    data_path: str | None = field(default=None, metadata={"help": "hf: Hub name, save_to_disk folder, parquet, imagefolder"})
    image_column: str = field(default="image", metadata={"help": "hf: image column"})
    text_column: str = field(default="text", metadata={"help": "hf: text column"})
    validation_fraction: float = field(default=0.05, metadata={"help": "held out when the data has no validation split"})
    skip_bad_images: bool = field(default=False, metadata={"help": "skip (and count) unreadable images instead of stopping"})
    num_sample_captions: int = field(default=8, metadata={"help": "validation images captioned at each evaluation"})
    max_new_tokens: int = field(default=0, metadata={"help": "caption length at evaluation (0: from the style)"})
    eval_metrics: str | None = field(
        default=None,
        metadata={"help": "at each evaluation also caption --eval_metrics_examples validation images and log "
                  "grounding (scenes: recall, precision, CHAIR-i, attribute accuracy) or cider (CIDEr-D vs the references)"},
    )
    eval_metrics_examples: int = field(default=64, metadata={"help": "validation images --eval_metrics is computed on"})
    aux_grounding_weight: float | None = field(
        default=None,
        metadata={"help": "scenes: weight of a training-only loss that makes each visual token say which "
                  "object (kind, color) its cell shows; 0 = off, default 1.0 on scenes when the decoder reads "
                  "a map of visual tokens (pooled or all), else off. The saved model stays a plain captioner"},
    )


def parse_args(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    recipe = []
    if "--recipe" in argv:  # a JSON file of flags ("_"-keys are notes), applied before the command line's
        i = argv.index("--recipe")
        with open(argv[i + 1]) as f:
            recipe = [a for k, v in json.load(f).items() if not k.startswith("_") for a in (f"--{k}", str(v))]
        argv = argv[:i] + argv[i + 2 :]
    defaults = [a for k, v in DEFAULTS.items() for a in (f"--{k}", str(v))]
    return parser.parse_args_into_dataclasses(args=defaults + recipe + argv)


def load_splits(args: DataArguments, image_size: int, seed: int, bad: data.BadImages):
    """(train, validation) datasets with image and text columns (scenes also carry `scene`)."""
    if args.dataset == "scenes":
        train = scenes.scenes_dataset(args.num_train_examples, scenes.TRAIN_SEED, args.scenes_style, image_size)
        validation = scenes.scenes_dataset(args.num_validation_examples, scenes.VALIDATION_SEED, args.scenes_style, image_size)
        return train, validation
    if args.dataset == "coco":
        if not args.caption_file or not args.image_dir:
            raise ValueError("--dataset coco needs --caption_file X.json and --image_dir DIR")
        train = data.load_coco_captions(args.caption_file, args.image_dir, args.caption_policy, seed)
        if args.validation_caption_file:
            validation = data.load_coco_captions(args.validation_caption_file, args.image_dir, "first", seed)
        else:
            train, validation = _hold_out(train, args.validation_fraction, seed)
    elif args.dataset == "hf":
        if not args.data_path:
            raise ValueError("--dataset hf needs --data_path (Hub name, save_to_disk folder, parquet files or imagefolder)")
        splits = data.load_hf(args.data_path, args.image_column, args.text_column)
        train = splits["train"]
        validation = splits.get("validation")
        if validation is None:
            train, validation = _hold_out(train, args.validation_fraction, seed)
    else:
        raise ValueError(f"--dataset must be scenes, coco or hf, got {args.dataset!r}")
    validation = validation.select(range(min(len(validation), args.num_validation_examples)))
    train = data.check_images(train, "train", args.skip_bad_images, bad)
    validation = data.check_images(validation, "validation", args.skip_bad_images, bad)
    return train, validation


def _hold_out(dataset, fraction, seed):
    split = dataset.train_test_split(test_size=max(1, int(len(dataset) * fraction)), seed=seed)
    return split["train"], split["test"]


def build_processor(model_args: ModelArguments, texts, image_size: int, output_dir: str) -> NanoVLMProcessor:
    """Load the tokenizer (given, or saved earlier in output_dir by this run) or train one on `texts`."""
    source = model_args.tokenizer or model_args.model_name_or_path
    if source is None and os.path.exists(os.path.join(output_dir, "tokenizer.json")):
        source = output_dir  # a resumed or repeated run keeps the tokenizer its checkpoints were trained with
    if source is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    else:
        tokenizer = train_tokenizer(texts, vocab_size=model_args.vocab_size)
    image_processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    return NanoVLMProcessor(image_processor, tokenizer)


def image_size_of(model_args: ModelArguments) -> int:
    """--image_size, else the starting model's, else the preset's."""
    if model_args.image_size:
        return model_args.image_size
    if model_args.model_name_or_path:
        return NanoVLMConfig.from_pretrained(model_args.model_name_or_path).image_size
    return NanoVLMConfig.from_preset(model_args.preset).image_size


def build_model(model_args: ModelArguments, vocab_size: int) -> NanoVLMForConditionalGeneration:
    if model_args.model_name_or_path:
        return NanoVLMForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
    overrides = {"vocab_size": vocab_size}
    if model_args.vision_feature_select:
        overrides["vision_feature_select"] = model_args.vision_feature_select
    if model_args.image_size:
        overrides["image_size"] = model_args.image_size
    for item in filter(None, (model_args.config_overrides or "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in NanoVLMConfig().to_dict():
            raise ValueError(f"--config_overrides: unknown config field {key.strip()!r}")
        overrides[key.strip()] = json.loads(value) if value.strip()[:1] in "0123456789-[{tfn" else value.strip()
    return NanoVLMForConditionalGeneration(NanoVLMConfig.from_preset(model_args.preset, **overrides))


class SceneTargetsCollator:
    """The usual batch plus `aux_kinds` and `aux_colors`: `(B, grid * grid)` ids of what each visual
    token's cell of the picture shows (`scenes.token_labels`, 0 = background)."""

    def __init__(self, collator: NanoVLMCollator, grid: int):
        self.collator, self.grid = collator, grid

    def __call__(self, examples):
        batch = self.collator(examples)
        labels = [scenes.token_labels(scenes.scene_from_row(ex), self.grid) for ex in examples]
        batch["aux_kinds"] = torch.tensor([k for k, _ in labels])
        batch["aux_colors"] = torch.tensor([c for _, c in labels])
        return batch


def token_grid(config: NanoVLMConfig) -> int:
    """Side of the square map of visual tokens the decoder reads (the [CLS] token aside)."""
    if config.vision_feature_select == "cls":
        raise ValueError("--aux_grounding_weight needs a map of visual tokens: use --vision_feature_select pooled or all")
    return config.vision_pool_size if config.vision_feature_select == "pooled" else config.image_size // config.patch_size


class AuxGroundingTrainer(Trainer):
    """Adds `weight * (CE(kind) + CE(color))` over every visual token's cell to the training loss.

    The head (`model.aux_grounding_head`, one Linear on the projected visual tokens the decoder
    reads) tells each token which object, if any, it covers: a dense signal that teaches the
    vision tower to see far faster than the few caption tokens that name objects. It is trained
    and checkpointed with the model and removed before the final save.
    """

    def __init__(self, *args, aux_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_weight = aux_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kinds, colors = inputs.pop("aux_kinds", None), inputs.pop("aux_colors", None)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if kinds is not None and model.training:
            tokens = outputs.image_hidden_states[:, -kinds.shape[1]:]  # the map, without [CLS]
            logits = self.accelerator.unwrap_model(model).aux_grounding_head(tokens).float()
            num_kinds = len(scenes.KINDS) + 1
            aux = F.cross_entropy(logits[..., :num_kinds].flatten(0, 1), kinds.flatten()) + F.cross_entropy(
                logits[..., num_kinds:].flatten(0, 1), colors.flatten())
            loss = loss + self.aux_weight * aux / self.args.gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss


def trainer_setup(model, data_args: DataArguments, collator: NanoVLMCollator):
    """(collator, Trainer class, extra Trainer kwargs) for this run: with the per-token grounding loss
    (default on scenes when the decoder reads a map of visual tokens) `model` gets its auxiliary head."""
    aux_weight = data_args.aux_grounding_weight
    if aux_weight is None:
        aux_weight = 1.0 if data_args.dataset == "scenes" and model.config.vision_feature_select != "cls" else 0.0
    if aux_weight <= 0:
        return collator, Trainer, {}
    if data_args.dataset != "scenes":
        raise ValueError("--aux_grounding_weight needs --dataset scenes (it uses the scenes' ground truth)")
    grid = token_grid(model.config)
    model.aux_grounding_head = torch.nn.Linear(model.config.hidden_size, len(scenes.KINDS) + len(scenes.COLORS) + 2)
    return SceneTargetsCollator(collator, grid), AuxGroundingTrainer, {"aux_weight": aux_weight}


def eval_metric_scores(name: str, captions: list[str], examples: list[dict]) -> dict:
    """`--eval_metrics` on captions of validation rows: grounding (scenes) or cider (CIDEr-D)."""
    if name == "grounding":
        scores = scenes.grounding_scores(captions, [ex["scene"] for ex in examples])
        keys = ("object_recall", "object_precision", "chair_i", "attribute_accuracy")
        return {f"eval_grounding_{k}": scores[k] for k in keys}
    from evaluation.caption_metrics import caption_scores  # pycocoevalcap: only loaded when asked for

    references = [ex.get("references") or [ex["text"]] for ex in examples]  # coco rows carry every caption
    return {"eval_cider_d": caption_scores(captions, references, tokenizer="simple")["cider_d"]}


class SampleCaptionsCallback(TrainerCallback):
    """At each evaluation, caption a few fixed validation images and log them next to the truth; with
    `metric`, caption `examples` (the first `num_samples` of which are logged) and add the metric to
    the evaluation's metrics and log."""

    def __init__(self, processor, examples, max_new_tokens, path, metric=None, num_samples=None):
        self.processor, self.examples, self.max_new_tokens, self.path = processor, examples, max_new_tokens, path
        self.metric, self.num_samples = metric, len(examples) if num_samples is None else num_samples

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not state.is_world_process_zero or not self.examples:
            return
        captions = generate_captions(model, self.processor, [ex["image"] for ex in self.examples], max_new_tokens=self.max_new_tokens)
        for caption, ex in list(zip(captions, self.examples))[:min(3, self.num_samples)]:
            logger.info("step %d | model: %s | truth: %s", state.global_step, caption, ex["text"])
        record = {"step": state.global_step, "captions": captions[: self.num_samples]}
        if self.metric:
            scores = eval_metric_scores(self.metric, captions, self.examples)
            logger.info("step %d | %s", state.global_step, scores)
            record.update(scores)
            if metrics is not None:
                metrics.update(scores)  # returned by trainer.evaluate(): final.* in metrics.json
            if state.log_history and "eval_loss" in state.log_history[-1]:
                state.log_history[-1].update(scores)  # the evaluation's own log line: loss curve data, checkpoints
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def final_report(trainer, processor, validation, data_args, max_new_tokens, bad, started, eval_metrics) -> dict:
    """Caption validation images; grounding for scenes; metrics.json, loss_curve.png, samples.png."""
    out = trainer.args.output_dir
    metrics = {f"final.{k}": v for k, v in eval_metrics.items()}
    n = len(validation) if data_args.dataset == "scenes" else min(len(validation), 64)
    rows = validation.select(range(n))
    images = rows["image"]
    captions = generate_captions(trainer.model, processor, images, max_new_tokens=max_new_tokens, progress=True)
    if data_args.dataset == "scenes":
        scores = scenes.grounding_scores(captions, [scenes.scene_from_row(r) for r in rows])
        metrics.update({f"grounding.{k}": v for k, v in scores.items()})
    metrics.update({
        "wall_seconds": round(time.time() - started, 1),
        "world_size": trainer.args.world_size,
        "train_examples_seen": trainer.state.global_step * trainer.args.train_batch_size * trainer.args.world_size
        * trainer.args.gradient_accumulation_steps,
        "global_step": trainer.state.global_step,
        "num_parameters": trainer.model.num_parameters(),
        "data.skipped_bad_images": bad.summary(),
        "samples": [{"model": c, "truth": t} for c, t in zip(captions[:16], rows["text"][:16])],
    })
    for name, key in (("first_logged_loss", "loss"), ("first_eval_loss", "eval_loss")):
        metrics[name] = next((h[key] for h in trainer.state.log_history if key in h), None)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot_loss_curve(trainer.state.log_history, os.path.join(out, "loss_curve.png"))
    k = min(12, n)
    plot_caption_grid(images[:k], captions[:k], os.path.join(out, "samples.png"), references=rows["text"][:k])
    return metrics


def main(argv=None):
    model_args, data_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    if data_args.eval_metrics not in (None, "grounding", "cider"):
        raise ValueError(f"--eval_metrics must be grounding or cider, got {data_args.eval_metrics!r}")
    if data_args.eval_metrics == "grounding" and data_args.dataset != "scenes":
        raise ValueError("--eval_metrics grounding needs --dataset scenes (it uses the scenes' ground truth); use cider")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.set_seed(training_args.seed)
    hub_repo = push_to_hub.take_over_trainer_push(training_args)  # --push_to_hub: repo checked now, pushed at the end
    started = time.time()
    image_size = image_size_of(model_args)
    bad = data.BadImages()
    os.makedirs(training_args.output_dir, exist_ok=True)
    with training_args.main_process_first(desc="data and tokenizer"):
        train, validation = load_splits(data_args, image_size, training_args.seed, bad)
        processor = build_processor(model_args, train["text"], image_size, training_args.output_dir)
        if training_args.process_index == 0:
            processor.save_pretrained(training_args.output_dir)
            with open(os.path.join(training_args.output_dir, "arguments.json"), "w") as f:  # for the model card
                json.dump({"model": asdict(model_args), "data": asdict(data_args), "training": training_args.to_dict()}, f, indent=2)
    model = build_model(model_args, len(processor.tokenizer))
    logger.info("%s parameters, %d training / %d validation examples", f"{model.num_parameters():,}", len(train), len(validation))
    max_new_tokens = data_args.max_new_tokens or (110 if data_args.scenes_style == "long" else 48)
    n_eval = max(data_args.num_sample_captions, data_args.eval_metrics_examples if data_args.eval_metrics else 0)
    samples = [validation[i] for i in range(min(n_eval, len(validation)))]
    collator, trainer_class, extra = trainer_setup(model, data_args, NanoVLMCollator(processor, model_args.max_length))
    trainer = trainer_class(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=processor,
        callbacks=[SampleCaptionsCallback(processor, samples, max_new_tokens, os.path.join(training_args.output_dir, "samples.jsonl"),
                                          data_args.eval_metrics, data_args.num_sample_captions)],
        **extra,
    )
    resume = training_args.resume_from_checkpoint
    if resume in ("latest", "true", "True"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    if hasattr(model, "aux_grounding_head"):
        del model.aux_grounding_head  # a training aid: the released model is a plain captioner
    trainer.save_model()
    eval_metrics = trainer.evaluate()  # every rank takes part
    if trainer.is_world_process_zero():
        metrics = final_report(trainer, processor, validation, data_args, max_new_tokens, bad, started, eval_metrics)
        for sample in metrics["samples"][:6]:
            print(f"model: {sample['model']}\ntruth: {sample['truth']}\n")
        summary = {k: metrics[k] for k in ("final.eval_loss", "grounding.object_recall", "grounding.chair_i") if k in metrics}
        print(json.dumps(summary | {"wall_seconds": metrics["wall_seconds"], "output_dir": training_args.output_dir}, indent=2))
        if bad.rows:
            print(f"skipped {len(bad.rows)} unreadable image(s); see metrics.json 'data.skipped_bad_images'")
        if hub_repo:
            push_to_hub.push_after_training(training_args, hub_repo)


if __name__ == "__main__":
    main()
