"""Train a NanoVLM with transformers' Trainer, on one CPU, one GPU or many.

    python train.py                                   # mini, built-in short scenes, 2-core CPU, ~15 min
    python train.py --scenes_style long --preset base --max_steps 5000
    python train.py --dataset coco --caption_file ../shared/data/flickr8k/captions_train.json \
        --image_dir ../shared/data/flickr8k/images \
        --validation_caption_file ../shared/data/flickr8k/captions_val.json
    python train.py --dataset hf --data_path DIR_OR_HUB_NAME --image_column image --text_column caption
    python train.py --recipe configuration/recipes/flickr8k/best.json   # real photos from scratch (~90 min here)
    python train.py --recipe configuration/recipes/flickr8k/best.json --max_steps 100   # recipe, then overrides
    python train.py --push_to_hub --hub_model_id ORG/NAME   # then push model, code and model card to the Hub
    accelerate launch --config_file configuration/accelerate/multi_gpu.yaml train.py --preset base
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no train.py                    # two CPU ranks (--num_processes 2 alone starts one: refused)

The output folder holds a model + processor + Hub code loadable with `from_pretrained`,
metrics.json, loss_curve.png and samples.png. Resume with `--resume_from_checkpoint latest` (the newest
complete checkpoint); a folder an earlier run used is refused unless `--overwrite_output_dir true`.
A recipe whose "then" object holds a second stage's flags (e.g. self-critical fine-tuning) trains its
first stage into OUTPUT_DIR/stage-1 and the second, from that model, into OUTPUT_DIR.
"""

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import transformers
from torch.distributed.tensor import DTensor
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, ViTImageProcessorPil

from evaluation.captioning import generate_captions
from evaluation.grounding import claim_marks, grounding_scores, repetition_scores
from evaluation.image_use import image_gap, unique_caption_share
from publishing.model_card import write_model_card
from evaluation.plots import plot_caption_grid, plot_loss_curve
from modeling_nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMProcessor
from processing import data, scenes
from publishing import push_to_hub
from processing.augment import CaptionAugment
from processing.collator import NanoVLMCollator
from processing.tokenizer import train_tokenizer
from processing.word_targets import word_targets, word_vocabulary
from training.arguments import check_arguments
from training.checkpoints import asks_to_resume, check_fits, is_complete_checkpoint, resolve_resume

logger = logging.getLogger(__name__)

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
    preset: str = field(default="mini-112", metadata={"help": "the paper's mini, base or large, or ours: mini-112, base-112, "
                                                              "large-112, the decoder-heavy mini-112-dec, base-112-dec, or "
                                                              "mini-112-conv (a convolutional image tower)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "start from a saved NanoVLM folder"})
    vision_feature_select: str | None = field(default=None, metadata={"help": "visual tokens: cls, pooled or all (default: the preset's)"})
    image_size: int | None = field(default=None, metadata={"help": "input resolution (default: the preset's)"})
    config_overrides: str | None = field(
        default=None, metadata={"help": "comma-separated config fields, e.g. 'hidden_dropout=0.0,vision_pool_size=4'; lists '/'-separated, e.g. "
                  "'vision_tower_type=conv,vision_conv_channels=24/48/96/160'"}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "folder with a saved tokenizer; else one is trained"})
    vocab_size: int = field(default=25000, metadata={"help": "BPE vocabulary size when training a tokenizer"})
    generation_num_beams: int | None = field(
        default=None,
        metadata={"help": "beam width saved in the model's generation_config.json: generate(), the pipeline and every evaluation "
                  "caption with it (default: greedy)"},
    )
    generation_no_repeat_ngram_size: int | None = field(
        default=None,
        metadata={"help": "saved in generation_config.json as generate()'s no_repeat_ngram_size: no n-gram of this size is "
                  "written twice in a caption (default: no limit)"},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "longest caption in tokens, longer ones are cut (default: 128, or what the decoder's "
                  "position table holds after the visual tokens if that is less)"},
    )


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
    aux_words_weight: float = field(
        default=0.0,
        metadata={"help": "weight of a training-only loss that predicts which content words an image's captions use "
                  "(multi-label, from the mean visual token); 0 = off. The saved model stays a plain captioner"},
    )
    aux_words_min_count: int = field(default=5, metadata={"help": "words loss: vocabulary = content words used this often"})
    aux_mim_weight: float = field(
        default=0.0,
        metadata={"help": "weight of a training-only masked-image-modelling loss (SimMIM/MAE-style): the vision tower sees "
                  "the image with --aux_mim_mask_ratio of its patches replaced by a mask token and a linear head predicts "
                  "their pixels (each patch normalized); 0 = off. Costs a second pass of the vision tower a step"},
    )
    aux_mim_mask_ratio: float = field(default=0.6, metadata={"help": "masked-image modelling: share of the patches masked"})
    augment: bool = field(
        default=False,
        metadata={"help": "augment training images: random resized crop, flip (left/right swapped in the caption), "
                  "brightness/contrast/saturation jitter (no hue: captions name colours)"},
    )


@dataclass
class NanoVLMTrainingArguments(TrainingArguments):
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "train into an output folder that already holds files (the earlier run's checkpoints and "
                  "samples.jsonl are removed, other files replaced as they are written); without it such a folder is "
                  "refused unless --resume_from_checkpoint is given"},
    )
    resume_with_fresh_state: bool = field(
        default=False,
        metadata={"help": "resume from a checkpoint that lacks optimizer.pt, scheduler.pt or rng_state.pth with fresh ones "
                  "(training then differs from the run it continues); without it --resume_from_checkpoint PATH refuses such "
                  "a checkpoint and latest passes over it"},
    )
    self_critical_samples: int = field(
        default=0,
        metadata={"help": "self-critical sequence training, a fine-tuning stage for a captioner trained with the caption "
                  "loss (--model_name_or_path): sample this many captions (2 or more) of each image, score each with "
                  "CIDEr-D against the image's captions, and make those above the image's mean likelier. 0: the caption loss"},
    )
    self_critical_max_new_tokens: int = field(default=32, metadata={"help": "self-critical training: longest sampled caption"})
    self_critical_caption_weight: float = field(
        default=0.0,
        metadata={"help": "self-critical training: add this weight times the caption loss on the batch's human captions "
                  "(keeps the model near the captions it was trained on; 0: the self-critical loss alone)"},
    )
    self_critical_distinct_weight: float = field(
        default=0.0,
        metadata={"help": "self-critical training: subtract this weight times each sample's mean CIDEr-D against the "
                  "captions of other images of the batch (up to 4), so a caption that would fit any photo earns less "
                  "than one that fits only its own (keeps captions distinct; 0: the plain CIDEr-D reward)"},
    )


def read_recipe(path: str) -> dict:
    """A recipe: a JSON object of train.py flags."""
    try:
        with open(path) as f:
            recipe = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--recipe {path}: no such file (recipes live in configuration/recipes/)") from None
    except ValueError as err:
        raise ValueError(f"--recipe {path} is not valid JSON ({err})") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"--recipe {path} must hold a JSON object of flags, e.g. {{\"preset\": \"mini-112\"}}")
    return recipe


def parse_args(argv: list[str]):
    """The three argument dataclasses: train.py's DEFAULTS, then a --recipe file's values, then the
    command line's flags, each overriding the one before (all through one HfArgumentParser)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, NanoVLMTrainingArguments))
    parser.add_argument("--recipe", default=None, help="a JSON file of these flags (keys starting with _ are notes; "
                        "\"then\": an object of a second stage's flags, trained from the first stage's model); "
                        "the command line's flags override it")
    known = {action.dest for action in parser._actions}
    recipe_path, recipe = recipe_of(argv)
    then = recipe.pop("then", None)
    if then is not None and not isinstance(then, dict):
        raise ValueError(f"--recipe {recipe_path}: \"then\" must be a JSON object of flags for the second stage")
    if unknown := sorted(set(recipe) - known) + sorted(f"then.{k}" for k in set(then or {}) - known):
        raise ValueError(f"--recipe {recipe_path}: unknown flag(s) {unknown}; see python train.py --help")
    parser.set_defaults(**{**DEFAULTS, **launch_defaults(), **recipe})
    *groups, rest = parser.parse_args_into_dataclasses(args=argv)  # rest: the --recipe flag itself
    return tuple(groups)


def recipe_of(argv: list[str]) -> tuple[str | None, dict]:
    """The --recipe file named in argv and its flags (notes, the keys starting with _, left out)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--recipe", default=None)
    path = parser.parse_known_args(argv)[0].recipe
    return path, ({k: v for k, v in read_recipe(path).items() if not k.startswith("_")} if path else {})


FIRST_STAGE = "stage-1"  # a two-stage recipe's first model: OUTPUT_DIR/stage-1


def second_stage(argv: list[str]) -> dict | None:
    """The flags of the --recipe's "then" object: a second stage (e.g. self-critical fine-tuning) that starts
    from the first stage's model; None for a one-stage run."""
    then = recipe_of(argv)[1].get("then")
    if then:
        flag_list(then)  # refuses a value no flag can carry before the first stage starts
    return then


def flag_list(flags: dict) -> list[str]:
    """Command-line words for a recipe's {flag: value} (booleans as true/false, a list as several values)."""
    words = []
    for key, value in flags.items():
        if value is None:
            raise ValueError(f"--recipe: \"then\": {{\"{key}\": null}} cannot be passed as a flag; leave {key} out to keep "
                             "the first stage's value, or give a value")
        values = value if isinstance(value, list) else [value]
        words += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return words


def train_in_stages(argv: list[str], then: dict) -> None:
    """A two-stage recipe: the first stage (the recipe and the command line) trains into OUTPUT_DIR/stage-1,
    the second (those flags, then the recipe's "then" flags) starts from its model and trains into OUTPUT_DIR,
    so OUTPUT_DIR holds the final model as after a one-stage run. With --resume_from_checkpoint latest a
    finished first stage (its metrics.json written) is not run again and each stage resumes from its own
    newest checkpoint; metrics.json sums both stages' wall time and samples."""
    training_args = parse_args(argv)[2]
    check_arguments(*parse_args([*argv, *flag_list(then)]))  # the second stage's flags, before the first stage trains
    out = training_args.output_dir
    first = os.path.join(out, FIRST_STAGE)
    resuming = asks_to_resume(training_args.resume_from_checkpoint)
    if training_args.process_index == 0:
        prepare_output_dir(training_args)  # refuses a used OUTPUT_DIR unless resuming or overwriting
    if resuming and os.path.exists(os.path.join(first, "metrics.json")):
        logger.info("stage 1 of 2 finished before: %s", first)
    else:
        logger.info("stage 1 of 2: training into %s", first)
        train_once(*parse_args([*argv, "--output_dir", first, "--push_to_hub", "false"]))
    resume = resuming and any(
        name.startswith("checkpoint-") and is_complete_checkpoint(os.path.join(out, name)) for name in os.listdir(out))
    stage_two = flag_list(then) + ["--model_name_or_path", first, "--output_dir", out]
    stage_two += ["--resume_from_checkpoint", "latest"] if resume else ["--resume_from_checkpoint", "false", "--overwrite_output_dir", "true"]
    logger.info("stage 2 of 2: %s", " ".join(stage_two))
    train_once(*parse_args([*argv, *stage_two]))
    if training_args.process_index == 0:
        with open(os.path.join(first, "metrics.json")) as f:
            before = json.load(f)
        with open(os.path.join(out, "metrics.json")) as f:
            after = json.load(f)
        after["stages"] = [{k: m.get(k) for k in ("wall_seconds", "global_step", "train_examples_seen", "final.eval_loss")}
                           for m in (before, after)]
        for key in ("wall_seconds", "train_examples_seen"):
            after[key] = sum(stage[key] for stage in after["stages"])
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(after, f, indent=2)


def launch_defaults() -> dict:
    """On a machine without a GPU train.py trains on the CPU as if given --use_cpu true: TrainingArguments refuses
    --bf16 there otherwise, and processes started by a launcher (WORLD_SIZE > 1) would each run alone (no gloo
    world) and all write one output folder. A use_cpu in a recipe or on the command line wins."""
    if not torch.accelerator.is_available():
        return {"use_cpu": True}
    return {}


def check_launch(training_args) -> None:
    """Refuse a launch whose processes would not train together, or that started one process of several asked for."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and (training_args.use_cpu or not torch.accelerator.is_available()):
        raise ValueError(
            "an FSDP launch on the CPU: accelerate trains it as plain DDP (every rank holds the whole model), not sharded. "
            "FSDP needs GPUs; on a CPU use --config_file configuration/accelerate/cpu_2proc.yaml"
        )
    if launched > 1 and training_args.world_size != launched:
        raise ValueError(
            f"the launcher started {launched} processes but each sees a world of {training_args.world_size}: they would train "
            "alone and overwrite one output folder. On a machine without GPUs pass --use_cpu true (or drop --use_cpu false); "
            "with GPUs, check the accelerate config's num_processes against the GPUs present"
        )
    if training_args.use_cpu and not torch.accelerator.is_available():
        logger.info("no GPU here: training on the CPU (use_cpu)")
    if "ACCELERATE_USE_CPU" in os.environ and "WORLD_SIZE" not in os.environ and not torch.accelerator.is_available():
        # accelerate's one-process launcher: it sets MASTER_ADDR only when more processes (or machines) were asked for
        if "MASTER_ADDR" in os.environ:
            raise ValueError(
                "`accelerate launch` was asked for several processes but started one, which would train alone: without "
                "GPUs it starts several only with --multi_gpu. For N CPU ranks run `accelerate launch --multi_gpu "
                "--num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no train.py ...` (two: "
                "`accelerate launch --config_file configuration/accelerate/cpu_2proc.yaml train.py ...`); for one process "
                "drop --num_processes (and unset MASTER_ADDR if your shell exports it)"
            )
        logger.info("one process: on a machine without GPUs `accelerate launch` starts several only with --multi_gpu "
                    "(e.g. --config_file configuration/accelerate/cpu_2proc.yaml)")


def load_splits(args: DataArguments, image_size: int, seed: int, bad: data.BadImages):
    """(train, validation) datasets with image and text columns (scenes also carry `scene`)."""
    if args.dataset == "scenes":
        train = scenes.scenes_dataset(args.num_train_examples, scenes.TRAIN_SEED, args.scenes_style, image_size)
        validation = scenes.scenes_dataset(args.num_validation_examples, scenes.VALIDATION_SEED, args.scenes_style, image_size)
        return train, validation
    if args.dataset == "coco":
        if not args.caption_file or not args.image_dir:
            raise ValueError("--dataset coco needs --caption_file X.json and --image_dir DIR")
        skipped = bad if args.skip_bad_images else None  # paths outside --image_dir: a counted skip, else a stop
        train = data.load_coco_captions(args.caption_file, args.image_dir, args.caption_policy, seed, skipped)
        if args.validation_caption_file:
            validation = data.load_coco_captions(args.validation_caption_file, args.image_dir, "first", seed, skipped)
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
    train, validation = data.drop_empty_texts(train, "train"), data.drop_empty_texts(validation, "validation")
    train = data.check_images(train, "train", args.skip_bad_images, bad)
    validation = data.check_images(validation, "validation", args.skip_bad_images, bad)
    for name, split in (("train", train), ("validation", validation)):
        if len(split) == 0:
            raise ValueError(f"no {name} example is left after skipping unreadable images and empty texts; "
                             "see the warnings above and fix the data")
    return train, validation


def _hold_out(dataset, fraction, seed):
    split = dataset.train_test_split(test_size=max(1, int(len(dataset) * fraction)), seed=seed)
    return split["train"], split["test"]


def build_processor(model_args: ModelArguments, texts, image_size: int, output_dir: str, resume_from: str | None = None) -> NanoVLMProcessor:
    """Load the tokenizer (--tokenizer, the starting model's, or, when resuming, the one the run saved in
    output_dir or in the checkpoint `resume_from`, e.g. one downloaded from the Hub) or train one on `texts`."""
    source = model_args.tokenizer or model_args.model_name_or_path
    if source is None and resume_from is not None:
        saved = [d for d in (output_dir, resume_from) if os.path.exists(os.path.join(d, "tokenizer.json"))]
        if not saved:
            raise ValueError(f"--resume_from_checkpoint: neither {output_dir} nor {resume_from} has the tokenizer.json "
                             "of the run to resume")
        source = saved[0]  # the tokenizer its checkpoints were trained with
    if source is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    else:
        tokenizer = train_tokenizer(texts, vocab_size=model_args.vocab_size)
    image_processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    return NanoVLMProcessor(image_processor, tokenizer, num_image_tokens=model_config(model_args).num_image_tokens)


def prepare_output_dir(training_args) -> None:
    """Refuse to train into a folder an earlier run left files in, unless asked to overwrite or resume.

    Overwriting removes the earlier run's checkpoints and evaluations (samples.jsonl), which would
    otherwise pass for this run's: `--resume_from_checkpoint latest` and the checkpoint rotation take
    the highest step, and samples.jsonl is appended to. Other files are replaced as they are written.
    """
    out = training_args.output_dir
    if not os.path.isdir(out) or not os.listdir(out) or asks_to_resume(training_args.resume_from_checkpoint):
        return
    if not training_args.overwrite_output_dir:
        raise ValueError(
            f"output folder {out} already holds files (an earlier run's?): pass --resume_from_checkpoint latest to continue "
            "that run, --overwrite_output_dir true to replace it, or another --output_dir"
        )
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name.startswith("checkpoint-") and os.path.isdir(path):
            shutil.rmtree(path)
        elif name == "samples.jsonl":
            os.remove(path)


def caption_length(model, max_length: int | None) -> int:
    """--max_length, checked to fit the decoder's position table after the image tokens (before training,
    not at the first long caption), or the default."""
    room = model.config.max_position_embeddings - model.config.num_image_tokens
    if max_length is None:
        return min(128, room)
    if max_length < 2:
        raise ValueError(f"--max_length must be at least 2 (<bos> and <eos>), got {max_length}")
    if max_length > room:
        raise ValueError(
            f"--max_length {max_length} + {model.config.num_image_tokens} visual tokens exceed max_position_embeddings "
            f"({model.config.max_position_embeddings}): pass --max_length {room} or less, or a larger "
            "--config_overrides max_position_embeddings=N"
        )
    return max_length


def model_config(model_args: ModelArguments, vocab_size: int | None = None) -> NanoVLMConfig:
    """The starting model's config, or the preset's with --vision_feature_select, --image_size and --config_overrides."""
    if model_args.model_name_or_path:
        return NanoVLMConfig.from_pretrained(model_args.model_name_or_path)
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    if model_args.vision_feature_select:
        overrides["vision_feature_select"] = model_args.vision_feature_select
    if model_args.image_size:
        overrides["image_size"] = model_args.image_size
    overrides.update(parse_config_overrides(model_args.config_overrides))
    return NanoVLMConfig.from_preset(model_args.preset, **overrides)


def image_size_of(model_args: ModelArguments) -> int:
    """--image_size, else the starting model's, else the preset's."""
    return model_args.image_size or model_config(model_args).image_size


def parse_config_overrides(text: str | None) -> dict:
    """'hidden_dropout=0.0,vision_pool_size=4' -> typed values, each cast to its config field's type."""
    defaults, overrides = NanoVLMConfig().to_dict(), {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"--config_overrides: {item!r} is not FIELD=VALUE (e.g. 'hidden_dropout=0.0,vision_pool_size=4')")
        if key not in defaults:
            raise ValueError(f"--config_overrides: unknown config field {key!r}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                overrides[key] = value.lower() == "true"
            elif isinstance(default, (int, float)):
                overrides[key] = type(default)(value)
            elif isinstance(default, list):  # per-stage lists, '/'-separated: vision_conv_channels=32/64/128/240
                overrides[key] = [int(v) for v in value.split("/")]
            elif value.lower() in ("none", "null"):
                overrides[key] = None
            else:
                overrides[key] = int(value) if value.lstrip("-").isdigit() else value
        except ValueError:
            raise ValueError(f"--config_overrides: {key}={value!r} is not a {type(default).__name__}") from None
    return overrides


def build_model(model_args: ModelArguments, vocab_size: int) -> NanoVLMForConditionalGeneration:
    if model_args.model_name_or_path:
        return NanoVLMForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
    return NanoVLMForConditionalGeneration(model_config(model_args, vocab_size))


class AuxTargetsCollator:
    """The usual batch plus the targets of the training-only losses:
    scenes: `aux_kinds`, `aux_colors` `(B, grid * grid)`, what each visual token's cell shows
    (`scenes.token_labels`, 0 = background); photos: `aux_words` `(B, num_words)`, which content
    words the image's captions use (`word_targets`)."""

    def __init__(self, collator: NanoVLMCollator, grid: int | None = None, word_index: dict[str, int] | None = None):
        self.collator, self.grid, self.word_index = collator, grid, word_index

    def __call__(self, examples):
        batch = self.collator(examples)
        if self.grid is not None:
            labels = [scenes.token_labels(scenes.scene_from_row(ex), self.grid) for ex in examples]
            batch["aux_kinds"] = torch.tensor([k for k, _ in labels])
            batch["aux_colors"] = torch.tensor([c for _, c in labels])
        if self.word_index is not None:
            words = torch.zeros(len(examples), len(self.word_index))
            for row, ex in enumerate(examples):
                words[row, word_targets(ex.get("references") or [ex["text"]], self.word_index)] = 1.0
            batch["aux_words"] = words
        return batch


TRAINING_HEADS = ("aux_grounding_head", "aux_words_head", "aux_mim_head")


def remove_training_heads(model) -> None:
    """Drop the training-only losses' heads: the released model is a plain captioner."""
    for head in TRAINING_HEADS:
        if hasattr(model, head):
            delattr(model, head)


def token_grid(config: NanoVLMConfig) -> int:
    """Side of the square map of visual tokens the decoder reads (the [CLS] token aside)."""
    if config.vision_feature_select == "cls":
        raise ValueError("--aux_grounding_weight needs a map of visual tokens: use --vision_feature_select pooled or all")
    return config.vision_pool_size if config.vision_feature_select == "pooled" else config.vision_grid


def grounding_loss(model, image_tokens, targets):
    """CE(kind) + CE(color) of every visual token's cell (`model.aux_grounding_head` on the map)."""
    kinds, colors = targets["aux_kinds"], targets["aux_colors"]
    logits = model.aux_grounding_head(image_tokens[:, -kinds.shape[1]:]).float()  # the map, without [CLS]
    num_kinds = len(scenes.KINDS) + 1
    return F.cross_entropy(logits[..., :num_kinds].flatten(0, 1), kinds.flatten()) + F.cross_entropy(
        logits[..., num_kinds:].flatten(0, 1), colors.flatten())


class MaskedImageHead(torch.nn.Module):
    """Masked-image modelling's training-only parts: the mask token the vision tower puts in place of the masked
    patches, and a linear map from each patch's output to its pixels (as SimMIM's one-layer head)."""

    def __init__(self, config: NanoVLMConfig, mask_ratio: float):
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"--aux_mim_mask_ratio must be between 0 and 1 (a share of the patches), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.mask_token = torch.nn.Parameter(torch.randn(config.vision_hidden_size) * 0.02)
        self.to_pixels = torch.nn.Linear(config.vision_hidden_size, config.num_channels * config.patch_size**2)


def mim_loss(model, image_tokens, targets):
    """Masked-image modelling: mask a random `mask_ratio` of each image's patches, run the vision tower on the rest
    and the mask tokens, and score the predicted pixels of the masked patches (MSE against each patch's pixels
    normalized to mean 0, variance 1, as MAE's best target). `image_tokens` is unused: it is a second pass. With
    `vision_stem="conv"` the overlapping convolutions let a visible patch see the edge of a masked neighbour."""
    head, pixels, config = model.aux_mim_head, targets["pixel_values"], model.config
    batch, patches = pixels.shape[0], config.num_patches
    masked = round(head.mask_ratio * patches)
    order = torch.rand(batch, patches, device=pixels.device).argsort(dim=1)
    mask = torch.zeros(batch, patches, dtype=torch.bool, device=pixels.device).scatter_(1, order[:, :masked], True)
    hidden = model.model.vision_tower(pixels.to(model.dtype), bool_masked_pos=mask, mask_token=head.mask_token)
    predicted = head.to_pixels(hidden[:, 1:]).float()  # (B, patches, channels * patch * patch)
    target = F.unfold(pixels.float(), config.patch_size, stride=config.patch_size).transpose(1, 2)  # the same layout
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return ((predicted - target) ** 2).mean(-1)[mask].mean()


def words_loss(model, image_tokens, targets):
    """Multi-label BCE of the caption words from the mean visual token (`model.aux_words_head`),
    summed over the vocabulary and divided by the number of target words: a loss per named word."""
    words = targets["aux_words"]
    logits = model.aux_words_head(image_tokens.mean(1)).float()
    bce = F.binary_cross_entropy_with_logits(logits, words, reduction="sum")
    return bce / words.sum().clamp(min=1.0)


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


class WithReferences:
    """The usual batch plus `references`: each image's captions (all of them for COCO-layout rows, else its text),
    the targets self-critical training scores its samples against."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        return {**self.collator(examples), "references": [list(ex.get("references") or [ex["text"]]) for ex in examples]}


class SelfCritical:
    """Self-critical sequence training (Rennie et al. 2017), with the mean reward of the image's other samples as
    each sample's baseline (Luo 2020, "A Better Variant of Self-Critical Sequence Training").

    For each image, sample `num_samples` captions from the model (plain sampling, no beam, no n-gram rule, never
    an `<image>`, `<bos>` or pad token), score each with `reward` (CIDEr-D against the image's captions, document
    frequencies of the training captions), and take the policy-gradient loss
    `-(reward - mean reward of the image's other samples) * log p(token)`, averaged over the sampled tokens (the
    `<eos>` included). Captions that score above their siblings become likelier,
    those below less likely: the model is trained on whole captions of its own, scored by the metric, where the
    caption loss trains the next word after a human's words. With `caption_weight`, the NanoVLMTrainer adds that
    times the caption loss of the batch's human captions (a mixed objective that keeps the model near them).

    With `distinct_weight`, a sample's reward is its score against its own image's captions less that weight
    times its mean score against the captions of up to `num_others` other images of the batch (the next ones,
    cyclically): the metric alone pays a safe caption that fits many photos ("a dog runs through the grass")
    about as well as one that fits this photo only, and plain self-critical training drifts towards the former.
    """

    num_others = 4

    def __init__(self, processor, reward, num_samples: int, max_new_tokens: int, caption_weight: float = 0.0,
                 distinct_weight: float = 0.0):
        if num_samples < 2:
            raise ValueError(f"--self_critical_samples must be 2 or more (each sample's baseline is its siblings' mean), got {num_samples}")
        self.processor, self.reward, self.num_samples, self.max_new_tokens = processor, reward, num_samples, max_new_tokens
        self.caption_weight = caption_weight  # the NanoVLMTrainer adds this times the caption loss
        self.distinct_weight = distinct_weight

    def rewards(self, texts: list[str], references: list[list[str]]) -> tuple[torch.Tensor, float]:
        """(each sample's reward `(B, num_samples)`, the samples' mean score against their own image's captions)
        for `texts`, the samples of image i at `i * num_samples ...`, and `references`, one list per image."""
        k, n = self.num_samples, len(references)
        others = min(self.num_others, n - 1) if self.distinct_weight else 0
        # shift 0 scores each sample against its own image's captions, shift s against those of image i + s
        refs = [references[(i // k + shift) % n] for shift in range(others + 1) for i in range(len(texts))]
        scores = torch.tensor(self.reward(texts * (others + 1), refs), dtype=torch.float32).view(others + 1, -1, k)
        own = scores[0]
        rewards = own - self.distinct_weight * scores[1:].mean(0) if others else own
        return rewards, float(own.mean())

    @torch.no_grad()
    def sample(self, model, pixel_values):
        """(prompt ids `(B, P)`, sampled caption ids `(B * num_samples, L)`, mask of their tokens up to the first
        `<eos>`) from the model in evaluation mode, the samples of one image next to each other."""
        prompt = torch.tensor(self.processor.image_prompt_ids([""] * len(pixel_values)), device=pixel_values.device)
        was_training = model.training
        model.eval()
        tokenizer = self.processor.tokenizer
        never = {self.processor.image_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id} - {tokenizer.eos_token_id, None}
        sequences = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixel_values,
                                   do_sample=True, num_beams=1, num_return_sequences=self.num_samples, top_k=0, top_p=1.0,
                                   temperature=1.0, no_repeat_ngram_size=0, suppress_tokens=sorted(never),
                                   max_new_tokens=self.max_new_tokens)
        model.train(was_training)
        new = sequences[:, prompt.shape[1]:]
        is_eos = new == tokenizer.eos_token_id
        keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # before or at the first <eos>
        return prompt, new, keep

    def loss(self, model, unwrapped, pixel_values, references):
        """(the loss, the samples' mean CIDEr-D against their own image's captions). `model` takes the gradient
        pass (DDP-wrapped or not), `unwrapped` samples."""
        prompt, new, keep = self.sample(unwrapped, pixel_values)
        k = self.num_samples
        rewards, own = self.rewards(self.processor.batch_decode(new), references)
        rewards = rewards.to(new.device)
        baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
        advantage = (rewards - baseline).flatten()
        input_ids = torch.cat([prompt.repeat_interleave(k, 0), new], 1)
        logits = model(input_ids=input_ids, pixel_values=pixel_values.repeat_interleave(k, 0),
                       logits_to_keep=new.shape[1] + 1).logits[:, :-1]  # the logits that predict each sampled token
        log_probs = logits.float().log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
        loss = -(advantage[:, None] * log_probs * keep).sum() / keep.sum().clamp(min=1)
        return loss, own


class NanoVLMTrainer(Trainer):
    """The Trainer, plus NanoVLM's training. Training-only losses: `weight * loss(model, visual tokens, targets)` for
    each is added to the caption loss and logged as `aux_<name>` next to the loss. Caption metrics: at each
    evaluation `caption_eval` (a `CaptionEvaluation`) adds what the captions score to the evaluation's
    metrics before the Trainer logs them, so every `--report_to` reporter, the log history (checkpoints, the
    loss curve) and `trainer.evaluate()`'s result all hold them. Self-critical training: with `self_critical`
    (a `SelfCritical`) the training loss is its loss on the model's own sampled captions, logged with their
    mean reward as `sample_cider_d`; evaluation keeps the caption loss.

    The heads (`model.aux_*_head`, on the projected visual tokens the decoder reads) are trained and
    checkpointed with the model and removed before the final save: the released model is a plain
    captioner. Scenes: each token says which object (kind, color) its cell shows, a dense signal
    that teaches the vision tower to see far faster than the few caption tokens that name objects.
    Photos: the image says which content words its captions use. Any images: masked-image modelling, the vision
    tower fills in the pixels of masked patches (`mim_loss`, a second pass of the tower).

    Label smoothing (`--label_smoothing_factor`) smooths the training caption loss over the next token,
    as the model's own loss predicts it (the Trainer shifts labels only for models in its causal-LM
    list, which NanoVLM is not: unshifted, each token would be trained to predict itself). Evaluation
    keeps the model's plain loss, so validation loss and the image gap stay nats/token of the captions.
    """

    def __init__(self, *args, aux_losses: dict | None = None, caption_eval: "CaptionEvaluation | None" = None,
                 self_critical: SelfCritical | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.self_critical, self._rewards = self_critical, [0.0, 0]
        self.caption_smoother, self.label_smoother = self.label_smoother, None  # training only, labels shifted
        self.aux_losses = aux_losses or {}  # name -> (weight, function)
        self.caption_eval = caption_eval
        self._aux_sums = {name: [0.0, 0] for name in self.aux_losses}
        self.parameter_bytes = ParameterBytes()
        self.add_callback(self.parameter_bytes)

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
            image_tokens = self.accelerator.unwrap_model(model).config.num_image_tokens
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
        if self.caption_smoother is not None and model.training and "labels" in inputs:
            loss, outputs = self._smoothed_caption_loss(model, inputs, num_items_in_batch)
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.aux_losses and model.training:
            unwrapped = self.accelerator.unwrap_model(model)
            targets["pixel_values"] = inputs["pixel_values"]  # masked-image modelling's target
            for name, (weight, function) in self.aux_losses.items():
                aux = function(unwrapped, outputs.image_hidden_states, targets)
                loss = loss + weight * aux / self.args.gradient_accumulation_steps
                self._aux_sums[name][0] += float(aux.detach())
                self._aux_sums[name][1] += 1
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
            for name, (total, count) in self._aux_sums.items():
                if count:
                    logs[f"aux_{name}"] = round(total / count, 4)
                    weighted += self.aux_losses[name][0] * total / count
            if weighted:  # the caption part alone, comparable with the validation loss
                logs["caption_loss"] = round(logs["loss"] - weighted, 4)
            self._aux_sums = {name: [0.0, 0] for name in self.aux_losses}
            if self._rewards[1]:  # self-critical training: the sampled captions' mean CIDEr-D since the last line
                logs["sample_cider_d"] = round(self._rewards[0] / self._rewards[1], 4)
                self._rewards = [0.0, 0]
        super().log(logs, *args, **kwargs)


def trainer_setup(model, data_args: DataArguments, collator: NanoVLMCollator, train_texts=()):
    """(collator, extra NanoVLMTrainer kwargs) for this run, with the training-only losses asked
    for (the per-token grounding loss is on by default on scenes when the decoder reads a map of
    visual tokens); `model` gets their heads."""
    grounding = data_args.aux_grounding_weight
    if grounding is None:
        grounding = 1.0 if data_args.dataset == "scenes" and model.config.vision_feature_select != "cls" else 0.0
    aux_losses, grid, word_index = {}, None, None
    if grounding > 0:
        if data_args.dataset != "scenes":
            raise ValueError("--aux_grounding_weight needs --dataset scenes (it uses the scenes' ground truth)")
        grid = token_grid(model.config)
        model.aux_grounding_head = torch.nn.Linear(model.config.hidden_size, len(scenes.KINDS) + len(scenes.COLORS) + 2)
        aux_losses["grounding"] = (grounding, grounding_loss)
    if data_args.aux_words_weight > 0:
        vocabulary = word_vocabulary(train_texts, data_args.aux_words_min_count)
        if not vocabulary:
            raise ValueError(f"--aux_words_weight: no content word is used {data_args.aux_words_min_count}+ times in the "
                             "training captions; lower --aux_words_min_count")
        logger.info("words loss over %d content words (used %d+ times)", len(vocabulary), data_args.aux_words_min_count)
        word_index = {w: i for i, w in enumerate(vocabulary)}
        hidden = model.config.hidden_size
        model.aux_words_head = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, len(vocabulary)))
        # Start at the prior that a photo's captions use ~10 of the words: a first loss near the caption
        # loss's size, not one dominated by thousands of 50% guesses.
        torch.nn.init.constant_(model.aux_words_head[1].bias, -math.log(len(vocabulary) / 10))
        aux_losses["words"] = (data_args.aux_words_weight, words_loss)
    if data_args.aux_mim_weight > 0:
        if model.config.vision_tower_type != "vit":
            raise ValueError("--aux_mim_weight masks the ViT tower's patches: it needs vision_tower_type='vit' (this model's "
                             f"is {model.config.vision_tower_type!r}); pass --aux_mim_weight 0")
        model.aux_mim_head = MaskedImageHead(model.config, data_args.aux_mim_mask_ratio)
        aux_losses["mim"] = (data_args.aux_mim_weight, mim_loss)
    if not aux_losses:
        return collator, {}
    if grid is not None or word_index is not None:
        collator = AuxTargetsCollator(collator, grid, word_index)
    return collator, {"aux_losses": aux_losses}


def self_critical_setup(model_args: ModelArguments, training_args, processor, train) -> SelfCritical:
    """The self-critical loss for --self_critical_samples: CIDEr-D with the document frequencies of the
    training images' captions. It fine-tunes a trained captioner, without the training-only losses."""
    if not model_args.model_name_or_path:
        raise ValueError("--self_critical_samples fine-tunes a captioner: pass --model_name_or_path, a model trained with the "
                         "caption loss (its samples must already be captions for their rewards to tell them apart)")
    from evaluation.caption_metrics import CiderD  # pycocoevalcap: only loaded when asked for

    texts = train["text"]
    keys = train["image_id"] if "image_id" in train.column_names else range(len(texts))
    references = train["references"] if "references" in train.column_names else [None] * len(texts)
    corpus = {}
    for key, refs, text in zip(keys, references, texts):  # one reference list per image
        corpus.setdefault(key, refs or [text])
    logger.info("self-critical training: %d samples per image, CIDEr-D reward with the document frequencies of %d training "
                "images' captions; the training-only losses are off", training_args.self_critical_samples, len(corpus))
    return SelfCritical(processor, CiderD(list(corpus.values())), training_args.self_critical_samples,
                        training_args.self_critical_max_new_tokens, training_args.self_critical_caption_weight,
                        training_args.self_critical_distinct_weight)


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


def final_report(trainer, processor, validation, data_args, max_new_tokens, bad, started, eval_metrics) -> dict:
    """Caption validation images; grounding for scenes; metrics.json, loss_curve.png, samples.png."""
    out = trainer.args.output_dir
    metrics = {f"final.{k}": v for k, v in eval_metrics.items()}
    n = len(validation) if data_args.dataset == "scenes" else min(len(validation), 64)
    rows = validation.select(range(n))
    images = rows["image"]
    captions = generate_captions(trainer.model, processor, images, max_new_tokens=max_new_tokens, progress=True)
    truth = [scenes.scene_from_row(r) for r in rows] if data_args.dataset == "scenes" else None
    if truth:
        metrics.update({f"grounding.{k}": v for k, v in grounding_scores(captions, truth).items()})
    metrics.update({f"repetition.{k}": v for k, v in repetition_scores(captions).items()})
    if n >= 2:
        metrics.update({f"image_use.{k}": v for k, v in image_gap(trainer.model, processor, images, rows["text"]).items()})
        metrics["image_use.unique_caption_share"] = unique_caption_share(captions)
    metrics.update({
        "wall_seconds": round(time.time() - started, 1),
        "world_size": trainer.args.world_size,
        "train_examples_seen": trainer.state.global_step * trainer.args.train_batch_size * trainer.args.world_size
        * trainer.args.gradient_accumulation_steps,
        "global_step": trainer.state.global_step,
        "num_parameters": trainer.model.num_parameters(),
        "parameter_bytes": trainer.parameter_bytes.total,
        "parameter_bytes_on_rank_0": trainer.parameter_bytes.local,  # less than the whole when FSDP shards
        "data.skipped_bad_images": bad.summary(),
        "samples": [{"model": c, "truth": t} for c, t in zip(captions[:16], rows["text"][:16])],
    })
    for name, key in (("first_logged_loss", "loss"), ("first_eval_loss", "eval_loss")):
        metrics[name] = next((h[key] for h in trainer.state.log_history if key in h), None)
    for key in sorted({k for h in trainer.state.log_history for k in h if k.startswith("aux_") or k in ("caption_loss", "sample_cider_d")}):
        logged = [h[key] for h in trainer.state.log_history if key in h]
        metrics[f"first_logged_{key}"], metrics[f"last_logged_{key}"] = logged[0], logged[-1]
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot_loss_curve(trainer.state.log_history, os.path.join(out, "loss_curve.png"))
    k = min(12, n)
    marks = [claim_marks(c, s) for c, s in zip(captions[:k], truth)] if truth else None  # places right or wrong
    plot_caption_grid(images[:k], captions[:k], os.path.join(out, "samples.png"), references=rows["text"][:k], marks=marks)
    return metrics


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    then = second_stage(argv)
    if then:
        train_in_stages(argv, then)
    else:
        train_once(*parse_args(argv))


def train_once(model_args, data_args, training_args):
    check_arguments(model_args, data_args, training_args)
    if data_args.eval_metrics not in (None, "grounding", "cider"):
        raise ValueError(f"--eval_metrics must be grounding or cider, got {data_args.eval_metrics!r}")
    if data_args.eval_metrics == "grounding" and data_args.dataset != "scenes":
        raise ValueError("--eval_metrics grounding needs --dataset scenes (it uses the scenes' ground truth); use cider")
    weights = {"caption": training_args.self_critical_caption_weight, "distinct": training_args.self_critical_distinct_weight}
    if any(weights.values()) and not training_args.self_critical_samples:
        raise ValueError(f"--self_critical_caption_weight and --self_critical_distinct_weight weigh parts of self-critical "
                         f"training (got {weights}): pass --self_critical_samples too, or leave them at 0")
    if min(weights.values()) < 0:
        raise ValueError(f"--self_critical_caption_weight and --self_critical_distinct_weight must be 0 or more, got {weights}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_launch(training_args)
    transformers.set_seed(training_args.seed)
    hub_repo = push_to_hub.take_over_trainer_push(training_args)  # --push_to_hub: repo checked now, pushed at the end
    started = time.time()
    image_size = image_size_of(model_args)
    bad = data.BadImages()
    if training_args.process_index == 0:  # other ranks could see the files rank 0 is already writing
        prepare_output_dir(training_args)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir, training_args.resume_with_fresh_state)
    os.makedirs(training_args.output_dir, exist_ok=True)
    with training_args.main_process_first(desc="data and tokenizer"):
        train, validation = load_splits(data_args, image_size, training_args.seed, bad)
        processor = build_processor(model_args, train["text"], image_size, training_args.output_dir, resume_from=resume)
        if resume:  # before this run writes over the run's processor and arguments.json
            check_fits(resume, model_config(model_args, len(processor.tokenizer)))
        if training_args.process_index == 0:
            processor.save_pretrained(training_args.output_dir)
            with open(os.path.join(training_args.output_dir, "arguments.json"), "w") as f:  # for the model card
                json.dump({"model": asdict(model_args), "data": asdict(data_args), "training": training_args.to_dict()}, f, indent=2)
    model = build_model(model_args, len(processor.tokenizer))
    if model_args.generation_num_beams is not None:
        model.generation_config.num_beams = model_args.generation_num_beams
    if model_args.generation_no_repeat_ngram_size is not None:
        model.generation_config.no_repeat_ngram_size = model_args.generation_no_repeat_ngram_size
    max_length = caption_length(model, model_args.max_length)
    logger.info("%s parameters, %d training / %d validation examples", f"{model.num_parameters():,}", len(train), len(validation))
    max_new_tokens = data_args.max_new_tokens or (110 if data_args.scenes_style == "long" else 48)
    n_eval = max(data_args.num_sample_captions, data_args.eval_metrics_examples if data_args.eval_metrics else 0)
    samples = [validation[i] for i in range(min(n_eval, len(validation)))]
    if training_args.self_critical_samples:
        collator, extra = WithReferences(NanoVLMCollator(processor, max_length)), {
            "self_critical": self_critical_setup(model_args, training_args, processor, train)}
    else:
        collator, extra = trainer_setup(model, data_args, NanoVLMCollator(processor, max_length), train["text"])
    caption_eval = CaptionEvaluation(processor, samples, max_new_tokens, os.path.join(training_args.output_dir, "samples.jsonl"),
                                     data_args.eval_metrics, data_args.num_sample_captions)
    if data_args.augment:
        train = train.with_transform(CaptionAugment(seed=training_args.seed).transform_batch)
    trainer = NanoVLMTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=processor,
        caption_eval=caption_eval,
        callbacks=push_to_hub.checkpoint_pusher(training_args, hub_repo),  # --hub_strategy checkpoint: each save to the Hub
        **extra,
    )
    trainer.train(resume_from_checkpoint=resume)
    remove_training_heads(model)
    trainer.save_model()
    eval_metrics = trainer.evaluate()  # every rank takes part
    if trainer.is_world_process_zero():
        metrics = final_report(trainer, processor, validation, data_args, max_new_tokens, bad, started, eval_metrics)
        name = os.path.basename(os.path.abspath(training_args.output_dir))
        write_model_card(training_args.output_dir, hub_repo or training_args.hub_model_id or f"ORG/{name}")  # README.md
        for sample in metrics["samples"][:6]:
            print(f"model: {sample['model']}\ntruth: {sample['truth']}\n")
        keys = ("final.eval_loss", "grounding.object_recall", "grounding.chair_i", "image_use.image_gap", "image_use.unique_caption_share")
        summary = {k: metrics[k] for k in keys if k in metrics}
        print(json.dumps(summary | {"wall_seconds": metrics["wall_seconds"], "output_dir": training_args.output_dir}, indent=2))
        if bad.rows:
            print(f"skipped {len(bad.rows)} unreadable image(s); see metrics.json 'data.skipped_bad_images'")
        if hub_repo:
            push_to_hub.push_after_training(training_args, hub_repo)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # a refused input: its message says what to do
        sys.exit(f"train.py: error: {err}")
