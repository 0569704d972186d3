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
OUTPUT/samples.png and OUTPUT/judge_cache.jsonl.
"""

import argparse
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version

import torch

from evaluation.caption_metrics import TOKENIZERS, caption_scores
from evaluation.captioning import generate_captions
from evaluation.image_use import image_gap, unique_caption_share
from evaluation.judge import CRITERIA, FORMATS, PREFIX_WORDS, PROMPT_VERSION, JudgeSettings, judge, split_prompt
from evaluation.novelty import novelty_scores
from evaluation.report import write_report
from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMProcessor
from processing import data, scenes
from processing.llm_client import safe_url

logger = logging.getLogger("evaluation")

PARTS = ("grounding", "captions", "novelty", "judge")
DATA_SETTINGS = {"scenes": ("scenes_style", "scenes_seed", "train_examples"),
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a saved NanoVLM folder (model + processor)")
    p.add_argument("--dataset", required=True, choices=("scenes", "coco", "hf"))
    p.add_argument("--output", required=True, help="folder for report.json, report.md, samples.png, judge_cache.jsonl")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} (default: all the data allows)")
    p.add_argument("--num_examples", type=int, default=None, help="evaluate the first N examples (default: scenes 256, else all)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: 110 for long scenes, else 48")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="draws the judge protocol's beginning lengths")
    p.add_argument("--grid_size", type=int, default=12, help="pictures in samples.png")
    g = p.add_argument_group("scenes")
    g.add_argument("--scenes_style", default="short", choices=sorted(scenes.WORD_RANGES))
    g.add_argument("--scenes_seed", type=int, default=scenes.VALIDATION_SEED, help="split seed of the evaluated scenes")
    g.add_argument("--train_examples", type=int, default=20000, help="training scenes whose texts novelty compares against")
    g = p.add_argument_group("coco (MS-COCO-layout captions)")
    g.add_argument("--caption_file", help="captions JSON of the evaluated images")
    g.add_argument("--image_dir", help="folder of the images")
    g.add_argument("--train_caption_file", help="training captions JSON, for novelty")
    g.add_argument("--train_caption_policy", default="all", choices=data.CAPTION_POLICIES, help="which training captions count")
    g = p.add_argument_group("hf (Hub name, save_to_disk folder, parquet, imagefolder)")
    g.add_argument("--data_path")
    g.add_argument("--split", default=None, help="evaluated split (default: validation, else test)")
    g.add_argument("--image_column", default="image")
    g.add_argument("--text_column", default="text")
    g.add_argument("--references_column", default=None, help="a column of reference lists (default: the text column)")
    g = p.add_argument_group("caption metrics")
    g.add_argument("--caption_tokenizer", default="auto", choices=TOKENIZERS, help="ptb (COCO's, needs java), simple, or auto")
    g = p.add_argument_group("LLM judge (paper protocol)")
    g.add_argument("--judge_model", default=None, help="judge model name as the server knows it (the paper: gpt-4o)")
    g.add_argument("--judge_base_url", default=None, help="OpenAI-compatible API root (default: OpenAI)")
    g.add_argument("--judge_api_key_env", default="OPENAI_API_KEY")
    g.add_argument("--judge_samples", type=int, default=50, help="examples whose completion (and reference) are judged")
    g.add_argument("--protocol", default=None, choices=sorted(PREFIX_WORDS), help="beginning of 6-7 or 18-20 words (default: the style)")
    g.add_argument("--judge_format", default="auto", choices=("auto", *FORMATS), help="response_format; auto probes the server")
    g.add_argument("--judge_concurrency", type=int, default=4)
    g.add_argument("--judge_timeout", type=float, default=120.0)
    g.add_argument("--judge_max_attempts", type=int, default=6)
    g.add_argument("--judge_max_reasks", type=int, default=2)
    g.add_argument("--judge_max_tokens", type=int, default=120)
    g.add_argument("--judge_backoff_base", type=float, default=1.0)
    g.add_argument("--judge_cache", default=None, help="default: OUTPUT/judge_cache.jsonl (share one to reuse grades)")
    args = p.parse_args(argv)
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
        rows = scenes.scenes_dataset(n or 256, args.scenes_seed, args.scenes_style, image_size)
        texts = rows["text"]
        return EvalData(rows["image"], texts, [[t] for t in texts], [json.loads(s) for s in rows["scene"]],
                        scenes.scene_texts(args.train_examples, scenes.TRAIN_SEED, args.scenes_style) if args.train_examples else None,
                        f"{args.train_examples} training scenes ({args.scenes_style})")
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
    settings = JudgeSettings(
        args.judge_model, args.judge_base_url, args.judge_api_key_env, args.judge_format, args.judge_concurrency,
        args.judge_timeout, args.judge_max_attempts, args.judge_max_reasks, args.judge_max_tokens,
        backoff_base=args.judge_backoff_base,
    )
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


def main(argv=None) -> int:
    args = parse_args(argv)
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

    t = time.perf_counter()
    captions = generate_captions(model, processor, d.images, batch_size=args.batch_size, max_new_tokens=max_new_tokens, progress=True)
    seconds["captioning"] = time.perf_counter() - t
    metrics, samples = {}, [{"model": c, "reference": r} for c, r in zip(captions, d.texts)][:16]
    settings = {}
    if "grounding" in parts:
        t = time.perf_counter()
        metrics |= {f"grounding.{k}": v for k, v in scenes.grounding_scores(captions, d.scenes).items()}
        seconds["grounding"] = time.perf_counter() - t
    if "captions" in parts:
        t = time.perf_counter()
        scores = caption_scores(captions, d.references, args.caption_tokenizer)
        per_item = scores.pop("per_item")
        settings["caption_tokenizer"] = scores.pop("tokenizer")
        metrics |= {f"captions.{k}": v for k, v in scores.items()}
        for sample, cider in zip(samples, per_item["cider_d"]):
            sample["cider_d"] = cider
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
    judge_samples = []
    if "judge" in parts:
        t = time.perf_counter()
        judge_metrics, judge_samples, judge_settings = run_judge(args, model, processor, d, max_new_tokens)
        metrics |= judge_metrics
        settings |= judge_settings
        seconds["judge"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    config = model.config
    report = {
        "metrics": metrics,
        "settings": {
            "model": args.model, "preset": getattr(config, "preset", None), "num_parameters": model.num_parameters(),
            "vision_feature_select": config.vision_feature_select, "dataset": args.dataset,
            "data": {k: getattr(args, k) for k in DATA_SETTINGS[args.dataset] if getattr(args, k) is not None},
            "num_examples": len(d.images), "parts": parts, "max_new_tokens": max_new_tokens, "decoding": "greedy",
            "batch_size": args.batch_size, "device": device, "seed": args.seed, **settings,
            "versions": {p: version(p) for p in ("torch", "transformers", "pycocoevalcap", "rouge_score")},
            "command": "python -m evaluation " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "samples": samples,
        "judge_samples": judge_samples,
    }
    write_report(args.output, report, d.images, captions, d.texts, args.grid_size)
    logger.info("wrote %s (%.1f s)", os.path.join(args.output, "report.json"), seconds["total"])
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=2))
    return 0
