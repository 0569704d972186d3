"""Evaluate a saved NanoVLM: exact grounding on built-in scenes, caption metrics on real photos, ROUGE
novelty against the training texts, and the paper's LLM judge.

    python -m evaluation --model outputs/nanovlm-mini-scenes --dataset scenes --output outputs/eval/mini
    python -m evaluation --model outputs/base-flickr8k --dataset coco \\
        --caption_file ../shared/data/flickr8k/captions_val.json --image_dir ../shared/data/flickr8k/images \\
        --train_caption_file ../shared/data/flickr8k/captions_train.json --output outputs/eval/base-flickr8k
    python -m evaluation ... --judge_model gpt-4o --judge_samples 50          # + the LLM judge ($OPENAI_API_KEY)
    python -m evaluation ... --judge_base_url http://127.0.0.1:8000/v1 --judge_model local   # a local server

Parts (`--parts`, default: what the data allows): grounding (scenes), captions (BLEU-1..4, ROUGE-L,
CIDEr-D against the references), novelty (max ROUGE-1/ROUGE-L against the training texts,
distinct-1/2), judge (when --judge_model is given). Out: OUTPUT/report.json, OUTPUT/report.md,
OUTPUT/samples.png, OUTPUT/predictions.jsonl (every example's text beside its references, with its CIDEr-D and, on
scenes, its scene and graded place and relation claims) and OUTPUT/judge_cache.jsonl. It never replaces a file it did not write: in a folder with
a samples.png of its own (a training run's, evaluated with --output RUN) the pictures go to
OUTPUT/evaluation_samples.png, and a report.json or report.md that no evaluation wrote is refused before anything runs.

A judge that grades nothing (its server unreachable, refusing the key or model, answering errors or
bodies that are not JSON, or every grade unreadable) ends the run with one "judge failed: ..." line
and exit status 1; the other parts' results are written first, with the error in report.json's
settings. The judge's API key is redacted from every file written, in every encoding.
"""

import argparse
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version

import torch
from transformers import HfArgumentParser

from evaluation.caption_metrics import TOKENIZERS, caption_scores
from evaluation.captioning import generate_captions
from evaluation.grounding import claim_marks, ground_places, grounding_scores, repetition_scores
from evaluation.image_use import image_gap, unique_caption_share
from evaluation.judge import (
    CRITERIA, FORMATS, JUDGE_CLIENT_DEFAULTS, PREFIX_WORDS, PROMPT_VERSION, JudgeError, JudgeSettings, judge, split_prompt,
)
from evaluation.novelty import novelty_scores
from evaluation.report import GRID_NAME, write_report
from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMProcessor
from processing import data, scenes
from llm.cache import CacheInUseError
from llm.client import FatalLLMError, redact, safe_url
from llm.settings import arg, client_arguments, client_settings

logger = logging.getLogger(__name__)

PARTS = ("grounding", "captions", "novelty", "judge")
DATA_SETTINGS = {"scenes": ("scenes_style", "scenes_version", "scenes_seed", "train_examples"),
                 "coco": ("caption_file", "image_dir", "train_caption_file", "train_caption_policy"),
                 "hf": ("data_path", "split", "image_column", "text_column", "references_column")}


@dataclass
class EvalData:
    images: list  # PIL images
    texts: list[str]  # one reference text per image: the grid's truth and the judge's beginnings
    references: list[list[str]]  # every reference of each image, for caption metrics
    scenes: list[dict] | None = None  # ground truth of built-in scenes
    train_texts: list[str] | None = None  # what the model was trained on, for novelty
    train_source: str | None = None


_arg = arg


DECODING = {"num_beams": 1, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}  # generate()'s own defaults


def decoding_settings(args, generation_config) -> dict:
    """How captions are decoded: each flag given, else the model's saved generation_config, else generate()'s
    default (greedy); never sampled."""
    chosen = {"do_sample": False}
    for key, default in DECODING.items():
        for value in (getattr(args, key), getattr(generation_config, key, None), default):
            if value is not None:
                chosen[key] = value
                break
    return chosen


@dataclass
class EvaluationArguments:
    model: str = field(metadata={"help": "a saved NanoVLM folder (model + processor)"})
    dataset: str = field(metadata={"help": "scenes, coco or hf", "choices": ["scenes", "coco", "hf"]})
    output: str = field(metadata={"help": "folder for report.json, report.md, samples.png, judge_cache.jsonl"})
    parts: str | None = _arg(help=f"comma-separated subset of {','.join(PARTS)} (default: all the data allows)")
    num_examples: int | None = _arg(help="evaluate the first N examples (default: scenes 256, else all)")
    batch_size: int = _arg(32, "captions generated at once")
    max_new_tokens: int | None = _arg(help="default: 110 for long scenes, else 48")
    num_beams: int | None = _arg(help="beam search width (default: the model's generation_config, greedy if unset)")
    no_repeat_ngram_size: int | None = _arg(help="never repeat an n-gram of this size (default: the model's generation_config)")
    repetition_penalty: float | None = _arg(help="penalty on tokens already written (default: the model's generation_config)")
    device: str | None = _arg(help="default: cuda when available, else cpu")
    seed: int = _arg(0, "draws the judge protocol's beginning lengths")
    grid_size: int = _arg(12, "pictures in samples.png")


@dataclass
class ScenesArguments:
    _argument_group_name = "scenes"
    scenes_style: str = _arg("short", "short or long descriptions", choices=sorted(scenes.WORD_RANGES))
    scenes_version: int = _arg(scenes.DESCRIPTION_VERSION, "description version of the references and training texts "
                               "(the model's --scenes_version)", choices=sorted(scenes.DESCRIPTION_VERSIONS))
    scenes_seed: int = _arg(scenes.VALIDATION_SEED, "split seed of the evaluated scenes")
    train_examples: int = _arg(20000, "training scenes whose texts novelty compares against")


@dataclass
class CocoArguments:
    _argument_group_name = "coco (MS-COCO-layout captions)"
    caption_file: str | None = _arg(help="captions JSON of the evaluated images")
    image_dir: str | None = _arg(help="folder of the images")
    train_caption_file: str | None = _arg(help="training captions JSON, for novelty")
    train_caption_policy: str = _arg("all", "which training captions count", choices=list(data.CAPTION_POLICIES))


@dataclass
class HfDataArguments:
    _argument_group_name = "hf (Hub name, save_to_disk folder, parquet, imagefolder)"
    data_path: str | None = _arg(help="the dataset")
    split: str | None = _arg(help="evaluated split (default: validation, else test)")
    image_column: str = _arg("image", "image column")
    text_column: str = _arg("text", "text column")
    references_column: str | None = _arg(help="a column of reference lists (default: the text column)")


@dataclass
class MetricArguments:
    _argument_group_name = "caption metrics and the LLM judge (paper protocol)"
    caption_tokenizer: str = _arg("auto", "ptb (COCO's, needs java), simple, or auto", choices=list(TOKENIZERS))
    judge_samples: int = _arg(50, "examples whose completion (and reference) are judged")
    protocol: str | None = _arg(help="beginning of 6-7 or 18-20 words (default: the style)", choices=sorted(PREFIX_WORDS))
    judge_format: str = _arg("auto", "response_format; auto probes the server", choices=["auto", *FORMATS])
    judge_max_reasks: int = _arg(2, "re-asks after an unreadable grade")
    judge_max_tokens: int = _arg(120, "grade length cap")
    judge_cache: str | None = _arg(help="default: OUTPUT/judge_cache.jsonl (share one to reuse grades)")


# --judge_model, --judge_base_url, --judge_api_key_env, --judge_concurrency, --judge_timeout, --judge_max_attempts, --judge_backoff_*
JudgeClientArguments = client_arguments("judge_", "the LLM judge's server (the judge runs when --judge_model is given)",
                                        **JUDGE_CLIENT_DEFAULTS)
ARGUMENTS = (EvaluationArguments, ScenesArguments, CocoArguments, HfDataArguments, MetricArguments, JudgeClientArguments)


def parse_args(argv=None) -> argparse.Namespace:
    """Every flag in one namespace (the dataclasses above are the documentation: `--help`)."""
    p = HfArgumentParser(ARGUMENTS, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = p.parse_args_into_dataclasses(args=argv)
    args = argparse.Namespace(**{k: v for group in groups for k, v in asdict(group).items()})
    if args.parts is not None:
        args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
        if unknown := set(args.parts) - set(PARTS):
            p.error(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
        if "judge" in args.parts and not args.judge_model:
            p.error("--parts judge needs --judge_model")
    if args.num_examples is not None and args.num_examples < 1:
        p.error(f"--num_examples must be at least 1, got {args.num_examples}")
    if args.dataset == "coco" and not (args.caption_file and args.image_dir):
        p.error("--dataset coco needs --caption_file X.json and --image_dir DIR")
    if args.dataset == "hf" and not args.data_path:
        p.error("--dataset hf needs --data_path")
    args.protocol = args.protocol or ("long" if args.dataset == "scenes" and args.scenes_style == "long" else "short")
    return args


def load_data(args, image_size: int) -> EvalData:
    n = args.num_examples
    if args.dataset == "scenes":
        version = args.scenes_version
        rows = scenes.scenes_dataset(n or 256, args.scenes_seed, args.scenes_style, image_size, version=version)
        texts = rows["text"]
        train = scenes.scene_texts(args.train_examples, scenes.TRAIN_SEED, args.scenes_style, version) if args.train_examples else None
        return EvalData(rows["image"], texts, [[t] for t in texts], [json.loads(s) for s in rows["scene"]], train,
                        f"{args.train_examples} training scenes ({args.scenes_style}, version {version})")
    if args.dataset == "coco":
        rows = data.load_coco_captions(args.caption_file, args.image_dir, "first")
        rows = data.check_images(rows.select(range(min(n or len(rows), len(rows)))), "evaluation", False, data.BadImages())
        train = None
        if args.train_caption_file:
            train = data.load_coco_captions(args.train_caption_file, args.image_dir, args.train_caption_policy)["text"]
        return EvalData(rows["image"], rows["text"], rows["references"], train_texts=train,
                        train_source=f"{args.train_caption_file} ({args.train_caption_policy} captions)" if train else None)
    splits = data.load_hf(args.data_path, args.image_column, args.text_column)
    split = args.split or next((s for s in ("validation", "test") if s in splits), None)
    if split not in splits:
        raise ValueError(f"{args.data_path} has splits {sorted(splits)}; name the one to evaluate with --split")
    rows = splits[split]
    rows = data.check_images(rows.select(range(min(n or len(rows), len(rows)))), split, False, data.BadImages())
    references = rows[args.references_column] if args.references_column else [[t] for t in rows["text"]]
    train = splits["train"]["text"] if "train" in splits and split != "train" else None
    return EvalData(rows["image"], rows["text"], references, train_texts=train,
                    train_source=f"{args.data_path} (train split)" if train else None)


def default_parts(args, d: EvalData) -> list[str]:
    parts = ["grounding"] if d.scenes is not None else ["captions"]
    parts += ["novelty"] if d.train_texts else []
    return parts + (["judge"] if args.judge_model else [])


def flatten(prefix: str, values: dict) -> dict:
    """{"a": 1, "b": {"mean": 2}} -> {"prefix.a": 1, "prefix.b.mean": 2}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(f"{prefix}.{key}", value))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def run_judge(args, model, processor, d: EvalData, max_new_tokens: int) -> tuple[dict, list[dict], dict]:
    """Complete the beginnings of the first --judge_samples references and grade them and the references."""
    rng = random.Random(args.seed)
    chosen = [(i, split) for i, t in enumerate(d.texts[: args.judge_samples]) if (split := split_prompt(t, args.protocol, rng))]
    beginnings = [b for _, (b, _) in chosen]
    full = generate_captions(model, processor, [d.images[i] for i, _ in chosen], prompts=beginnings,
                             batch_size=args.batch_size, max_new_tokens=max_new_tokens)
    completions = [f[len(b):].strip() for f, b in zip(full, beginnings)]
    settings = JudgeSettings(**client_settings(args, "judge_"), response_format=args.judge_format,
                             max_reasks=args.judge_max_reasks, max_tokens=args.judge_max_tokens)
    groups = {"model": list(zip(beginnings, completions)), "reference": [(b, rest) for _, (b, rest) in chosen]}
    result = judge(groups, settings, args.judge_cache or os.path.join(args.output, "judge_cache.jsonl"))
    metrics = flatten("judge", result["summary"]["model"]) | flatten("judge_reference", result["summary"]["reference"])
    samples = [{"beginning": b, "model": c, "model_scores": (m or {}).get("scores"), "reference": rest,
                "reference_scores": (r or {}).get("scores")}
               for (b, c), (_, rest), m, r in zip(groups["model"], groups["reference"], result["records"]["model"], result["records"]["reference"])]
    settings_out = {"judge_model": args.judge_model, "judge_base_url": safe_url(args.judge_base_url), "judge_format": result["format"],
                    "judge_prompt_version": PROMPT_VERSION, "judge_criteria": list(CRITERIA), "protocol": args.protocol,
                    "protocol_prefix_words": list(PREFIX_WORDS[args.protocol]), "judge_samples": len(chosen),
                    "judge_usage_this_run": result["usage"]}
    return metrics, samples, settings_out


PREDICTIONS_NAME = "predictions.jsonl"
APART = "evaluation_samples.png"  # the grid's name in a folder whose samples.png is not an evaluation's (a training run's)


def grid_file(folder: str) -> str:
    """The name of the picture grid to write into --output `folder`, so that the evaluation never replaces a file it did
    not write: samples.png, or evaluation_samples.png beside a samples.png of something else (a training run's, when
    --output is the run's folder, so that a pushed model card shows the report). A report.json, report.md or
    predictions.jsonl there that no evaluation wrote is refused. An earlier evaluation's files (its report.json says so)
    are written over: a rerun."""
    path = lambda name: os.path.join(folder, name)  # noqa: E731
    mine = set()
    try:
        with open(path("report.json")) as f:
            settings = json.load(f)["settings"]
        if str(settings["command"]).startswith("python -m evaluation"):
            mine = {"report.json", "report.md", PREDICTIONS_NAME, settings.get("grid", GRID_NAME)}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if foreign := [name for name in ("report.json", "report.md", PREDICTIONS_NAME) if os.path.lexists(path(name)) and name not in mine]:
        raise ValueError(f"--output {folder} already holds {' and '.join(foreign)}, which no evaluation wrote and the evaluation "
                         f"would replace: pass another --output, e.g. {path('evaluation')}")
    grid = next((name for name in (GRID_NAME, APART) if not os.path.lexists(path(name)) or name in mine), None)
    if grid is None:
        raise ValueError(f"--output {folder} already holds {GRID_NAME} and {APART}, which no evaluation wrote; pass another "
                         f"--output, e.g. {path('evaluation')}")
    if grid != GRID_NAME:
        logger.info("%s holds a %s of its own: the evaluation's pictures go to %s", folder, GRID_NAME, APART)
    return grid


def main(argv=None) -> int:
    args = parse_args(argv)
    grid = grid_file(args.output)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    started = time.perf_counter()
    seconds = {}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = NanoVLMForConditionalGeneration.from_pretrained(args.model).to(device).eval()
    processor = NanoVLMProcessor.from_pretrained(args.model)
    d = load_data(args, model.config.image_size)
    parts = args.parts or default_parts(args, d)
    if "grounding" in parts and d.scenes is None:
        raise ValueError("grounding needs --dataset scenes (the scenes' exact ground truth)")
    if "novelty" in parts and not d.train_texts:
        raise ValueError("novelty needs training texts: --train_caption_file (coco), a train split (hf) or --train_examples (scenes)")
    seconds["load"] = time.perf_counter() - started
    max_new_tokens = args.max_new_tokens or (110 if args.dataset == "scenes" and args.scenes_style == "long" else 48)
    decoding = decoding_settings(args, model.generation_config)

    t = time.perf_counter()
    captions = generate_captions(model, processor, d.images, batch_size=args.batch_size, max_new_tokens=max_new_tokens,
                                 progress=True, **decoding)
    seconds["captioning"] = time.perf_counter() - t
    metrics, samples = {}, [{"model": c, "reference": r} for c, r in zip(captions, d.texts)][:16]
    predictions = [{"index": i, "model": c, "references": refs} for i, (c, refs) in enumerate(zip(captions, d.references))]
    settings = {}
    if "grounding" in parts:
        t = time.perf_counter()
        metrics |= {f"grounding.{k}": v for k, v in grounding_scores(captions, d.scenes).items()}
        for row, scene in zip(predictions, d.scenes):
            row["scene"] = scene
            row["claims"] = [{"text": row["model"][slice(*c["span"])], "axis": c["axis"], "right": c["right"]}
                             for c in ground_places(row["model"], scene)]
        seconds["grounding"] = time.perf_counter() - t
    metrics |= {f"repetition.{k}": v for k, v in repetition_scores(captions).items()}
    if "captions" in parts:
        t = time.perf_counter()
        scores = caption_scores(captions, d.references, args.caption_tokenizer)
        per_item = scores.pop("per_item")
        settings["caption_tokenizer"] = scores.pop("tokenizer")
        metrics |= {f"captions.{k}": v for k, v in scores.items()}
        for sample, cider in zip(samples, per_item["cider_d"]):
            sample["cider_d"] = cider
        for row, cider in zip(predictions, per_item["cider_d"]):
            row["cider_d"] = cider
        # Does the model read the image? Shuffled-image loss gap and the share of distinct captions.
        if len(d.images) >= 2:
            metrics |= {f"image_use.{k}": v for k, v in image_gap(model, processor, d.images, d.texts, args.batch_size).items()}
            metrics["image_use.unique_caption_share"] = unique_caption_share(captions)
        seconds["captions"] = time.perf_counter() - t
    if "novelty" in parts:
        t = time.perf_counter()
        scores = novelty_scores(captions, d.train_texts)
        for sample, item in zip(samples, scores.pop("per_item")):
            sample["novelty"] = item
        metrics |= {f"novelty.{k}": v for k, v in scores.items()}
        settings["novelty_training_texts"] = d.train_source
        seconds["novelty"] = time.perf_counter() - t
    judge_samples, judge_error = [], None
    if "judge" in parts:
        t = time.perf_counter()
        try:
            judge_metrics, judge_samples, judge_settings = run_judge(args, model, processor, d, max_new_tokens)
            metrics |= judge_metrics
            settings |= judge_settings
        except (JudgeError, FatalLLMError, CacheInUseError) as err:  # the parts before it are still written
            judge_error = settings["judge_error"] = str(err)
        seconds["judge"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    config = model.config
    report = {
        "metrics": metrics,
        "settings": {
            "model": args.model, "preset": getattr(config, "preset", None), "num_parameters": model.num_parameters(),
            "vision_feature_select": config.vision_feature_select, "dataset": args.dataset,
            "data": {k: getattr(args, k) for k in DATA_SETTINGS[args.dataset] if getattr(args, k) is not None},
            "num_examples": len(d.images), "parts": parts, "max_new_tokens": max_new_tokens, "decoding": decoding,
            "batch_size": args.batch_size, "device": device, "seed": args.seed, "grid": grid, **settings,
            "versions": {p: version(p) for p in ("torch", "transformers", "pycocoevalcap", "rouge_score")},
            "command": "python -m evaluation " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "samples": samples,
        "judge_samples": judge_samples,
    }
    marks = [claim_marks(c, s) for c, s in zip(captions[:args.grid_size], d.scenes)] if "grounding" in parts else None
    if "judge" in parts:  # a judge server may echo its key back: no file gets it, in any encoding
        report = json.loads(redact(json.dumps(report), os.environ.get(args.judge_api_key_env)))
    write_report(args.output, report, d.images, captions, d.texts, args.grid_size, marks=marks)
    with open(os.path.join(args.output, PREDICTIONS_NAME), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in predictions)
    if judge_error is not None:
        logger.error("judge failed: %s. The other parts are in %s", judge_error, os.path.join(args.output, "report.json"))
        return 1
    logger.info("wrote %s (%.1f s)", os.path.join(args.output, "report.json"), seconds["total"])
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=2))
    return 0
