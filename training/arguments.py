"""train.py's settings: three argument dataclasses read by one HfArgumentParser from DEFAULTS (below), then a
--recipe file (a JSON object of these flags, `configuration/recipes/`), then the command line, each overriding
the one before."""

import argparse
import json
import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from modeling_nanovlm import NanoVLMConfig
from processing.scenes import DESCRIPTION_VERSION, DESCRIPTION_VERSIONS

from .launch import launch_defaults

MAX_VOCAB = 2**31 - 1  # the tokenizer library takes a machine-sized integer; a tokenizer never holds more tokens than its texts give

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
    """The model: a preset (or a saved model to start from), its overrides, its tokenizer and saved decoding."""

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
    """The data (built-in scenes, COCO-layout captions or a Hugging Face dataset), augmentation, the training-only
    objectives' weights and what each evaluation captions."""

    dataset: str = field(default="scenes", metadata={"help": "scenes, coco or hf"})
    scenes_style: str = field(default="short", metadata={"help": "scenes descriptions: short or long"})
    scenes_version: int = field(default=DESCRIPTION_VERSION, metadata={"help": "scenes description version (processing.scenes.DESCRIPTION_VERSIONS): "
                                                     "3 has the long style relate every pair of groups the rules relate"})
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
    aux_places_weight: float = field(
        default=0.0,
        metadata={"help": "scenes: weight of a training-only loss that makes each visual token showing an object say "
                  "where that object stands (row and column of the scene), for long descriptions that place things; "
                  "0 = off. Needs a map of visual tokens (pooled or all). The saved model stays a plain captioner"},
    )
    aux_mention_places_weight: float = field(
        default=0.0,
        metadata={"help": "scenes: weight of a training-only loss that makes the decoder say, at each word naming a group "
                  "(and its It/They), which cells that group stands in and how many it is, so place and relation claims "
                  "bind to the group named; 0 = off. The saved model stays a plain captioner"},
    )
    aux_mention_relations_weight: float = field(
        default=0.0,
        metadata={"help": "scenes: weight of a training-only loss that makes the decoder say, at each word naming a group "
                  "(and its It/They), for each relation (left of, right of, above, below, next to) where the groups stand "
                  "that the named group is in that relation to (none: all zero), so a relation word is written only when "
                  "a group it fits exists; 0 = off. The saved model stays a plain captioner"},
    )
    aux_mention_layer: int = field(
        default=-1,
        metadata={"help": "which decoder state the decoder-side losses (--aux_mention_places_weight, "
                  "--aux_mention_relations_weight) read: -1 the last (after the final norm), k = 1 .. num_hidden_layers - 1 "
                  "the output of decoder layer k. A middle layer's state is what the later words attend to; the last one "
                  "only feeds the next-token prediction"},
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
    captions_per_image: int = field(
        default=1,
        metadata={"help": "coco with --caption_policy all: each batch holds per_device_train_batch_size / K photos with K of "
                  "their captions each; the image tower runs once per photo for its K captions, which see the same "
                  "augmented view (1: each caption its own photo pass). The batch size still counts captions: it must be "
                  "a multiple of K. An epoch is one pass over the photos"},
    )
    language_only: bool = field(
        default=False,
        metadata={"help": "train the decoder on the training captions alone: no image goes in and the image tower does "
                  "not run, so a step costs a fraction of an image step. The texts keep the positions they have behind "
                  "the visual tokens, so a second stage with images (a recipe's \"then\") goes on from this model"},
    )
    augment: bool = field(
        default=False,
        metadata={"help": "augment training images: random resized crop, flip (left/right swapped in the caption), "
                  "brightness/contrast/saturation jitter (no hue: captions name colours)"},
    )


@dataclass
class NanoVLMTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments, plus the output-folder rule and self-critical fine-tuning."""

    resume_with_fresh_state: bool = field(
        default=False,
        metadata={"help": "resume from a checkpoint that lacks optimizer.pt, scheduler.pt or rng_state.pth with fresh ones "
                  "(training then differs from the run it continues); without it --resume_from_checkpoint PATH refuses such "
                  "a checkpoint and latest passes over it"},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "train into an output folder that already holds files (the earlier run's checkpoints and "
                  "samples.jsonl are removed, other files replaced as they are written); without it such a folder is "
                  "refused unless --resume_from_checkpoint is given"},
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


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: NanoVLMTrainingArguments) -> None:
    """Refuse flags the parser cannot judge (a value out of range, flags that do not go together) before anything is
    loaded or written: each refusal names the flag, the value and what would work."""
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(f"--max_steps must be at least 1 (or -1: train --num_train_epochs epochs), got {training_args.max_steps}")
    if not 0 < data_args.validation_fraction < 1:
        raise ValueError(f"--validation_fraction is the share of the data held out for validation: it must be between 0 and 1 "
                         f"(both excluded), got {data_args.validation_fraction}")
    if not 260 <= model_args.vocab_size <= MAX_VOCAB:  # 256 bytes + 4 special tokens (processing.tokenizer)
        raise ValueError(f"--vocab_size must be between 260 and {MAX_VOCAB:,} (the tokenizer stops at the tokens its training "
                         f"texts give), got {model_args.vocab_size}")
    check_output_dir(training_args.output_dir)
    if data_args.scenes_version not in DESCRIPTION_VERSIONS:
        raise ValueError(f"--scenes_version must be one of {sorted(DESCRIPTION_VERSIONS)} ({DESCRIPTION_VERSIONS}), "
                         f"got {data_args.scenes_version}")
    if data_args.eval_metrics not in (None, "grounding", "cider"):
        raise ValueError(f"--eval_metrics must be grounding or cider, got {data_args.eval_metrics!r}")
    if data_args.eval_metrics == "grounding" and data_args.dataset != "scenes":
        raise ValueError("--eval_metrics grounding needs --dataset scenes (it uses the scenes' ground truth); use cider")
    check_captions_per_image(data_args, training_args)
    check_language_only(data_args, training_args)
    weights = {"caption": training_args.self_critical_caption_weight, "distinct": training_args.self_critical_distinct_weight}
    if any(weights.values()) and not training_args.self_critical_samples:
        raise ValueError(f"--self_critical_caption_weight and --self_critical_distinct_weight weigh parts of self-critical "
                         f"training (got {weights}): pass --self_critical_samples too, or leave them at 0")
    if min(weights.values()) < 0:
        raise ValueError(f"--self_critical_caption_weight and --self_critical_distinct_weight must be 0 or more, got {weights}")


def check_language_only(data_args: DataArguments, training_args: NanoVLMTrainingArguments) -> None:
    """--language_only trains on the captions alone: nothing that needs the image may go with it."""
    if not data_args.language_only:
        return
    needs_image = {name: getattr(data_args, name) for name in ("aux_grounding_weight", "aux_places_weight",
                   "aux_mention_places_weight", "aux_mention_relations_weight", "aux_words_weight", "aux_mim_weight")
                  if getattr(data_args, name)}
    if needs_image:
        raise ValueError(f"--language_only trains the decoder on captions alone, but {needs_image} asks for a training-only "
                         "objective on the image: set those weights to 0 for this stage (a recipe's \"then\" can turn them "
                         "back on for the stage with images)")
    if data_args.captions_per_image > 1 or training_args.self_critical_samples:
        raise ValueError("--language_only reads no image: --captions_per_image and --self_critical_samples have nothing to "
                         "act on; leave them out of this stage")


def check_captions_per_image(data_args: DataArguments, training_args: NanoVLMTrainingArguments) -> None:
    """--captions_per_image K groups K captions of a photo in a batch: a whole number of groups per batch, from data
    that has several captions of each photo."""
    k, batch = data_args.captions_per_image, training_args.per_device_train_batch_size
    if k < 1:
        raise ValueError(f"--captions_per_image must be at least 1 (1: one photo pass per caption), got {k}")
    if k == 1:
        return
    if data_args.dataset != "coco" or data_args.caption_policy != "all":
        raise ValueError(f"--captions_per_image {k} groups the captions of each photo: it needs --dataset coco with "
                         f"--caption_policy all (got --dataset {data_args.dataset}, --caption_policy {data_args.caption_policy}); "
                         "pass --captions_per_image 1 for other data")
    if batch % k:
        near = sorted({max(k, batch // k * k), (batch // k + 1) * k})
        raise ValueError(f"--per_device_train_batch_size {batch} is not a multiple of --captions_per_image {k}: a batch holds "
                         f"whole photos of {k} captions each; pass a batch size of {' or '.join(map(str, near))}, or another "
                         f"--captions_per_image that divides {batch}")
    if training_args.self_critical_samples:
        raise ValueError("--captions_per_image groups the captions of the caption loss; self-critical training "
                         "(--self_critical_samples) samples its own: pass --captions_per_image 1")


def check_output_dir(path: str) -> None:
    """--output_dir must be a folder or a path where one can be made: refuse one that is (or lies under) a file."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is" if existing == os.path.abspath(path) else f"lies under {existing}, which is"
        raise ValueError(f"--output_dir {path} {what} a file, not a folder: name a folder (new or one of a run) for the model")


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
