"""Build the paper's ShortDesc / LongDesc data: every image's human captions go to an LLM (any
OpenAI-compatible server), which writes one description in the words of a 3-4 year old.

    export OPENAI_API_KEY=...            # never logged; --api_key_env NAME reads another variable
    python -m descriptions.build --caption_file ../shared/data/flickr8k/captions_train.json \\
        --image_dir ../shared/data/flickr8k/images --style both --model gpt-4o --output outputs/desc
    python -m descriptions.build ... --base_url http://127.0.0.1:8000/v1 --model local \\
        --merge_system                   # a local server (vLLM, llama.cpp, Ollama); no key needed
    python train.py --dataset hf --data_path outputs/desc/dataset ...

Every finished item (done, or failed with its reason) is appended to OUTPUT/cache.jsonl, keyed by
(model, prompt version, style, image id), before it counts; a rerun of the same command requests
only what is not there (`--retry_failed` also re-requests the failed ones). So a killed or crashed
run loses nothing and pays for nothing twice: rerun it.

Out: OUTPUT/dataset (save_to_disk: splits train/validation 90/10 by a hash of the image id; columns
image, text = the description, style, captions = the human ones, image_id, word_count),
OUTPUT/parquet/{split}.parquet, OUTPUT/report.json (counts, failures by reason, word-count
histogram, tokens), and with --push_to_hub REPO the dataset on the Hub.

An answer is accepted when it has the style's word count, is one paragraph of plain prose (no
list or numbering, title, markup, preamble or emoji) and reads simply: Flesch-Kincaid grade <= --max_grade (default 3;
text in short sentences of short words, as the prompt asks, scores about -2 to 2, while Flickr8k's
adult one-sentence captions have a median of 3.8 and a 25-word single sentence scores about 7). A rejected answer is re-asked with the
reason, at most --max_reasks times; then the item is recorded as failed with that reason.

The exit status says whether the data was built: 0 when at least one item was accepted and at most
--max_failed_fraction (default 0.5) of the finished items failed; 1, with one line that counts the
failures by reason, when none was accepted or more failed (what was accepted is still saved); 2 when
the server refused the key, model or URL or could not be reached (a rerun goes on where it stopped).
"""

import argparse
import asyncio
import codecs
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import datasets
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import HfArgumentParser

from processing.data import BadImages, decode_error, load_coco_captions
from llm.cache import CacheInUseError, JsonlCache
from llm.client import FatalLLMError, LLMClient, count_failures, run_pool, safe_url
from llm.settings import ClientSettings, arg, client_arguments, client_settings
from descriptions.prompts import Prompts, load_prompts

logger = logging.getLogger(__name__)

KEY_FIELDS = ("model", "prompt_version", "style", "image_id")

# --- validation ---------------------------------------------------------------------------------

WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")
LIST_LINE = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)])\s+", re.M)
NUMBERED = re.compile(r"(?:^|\s)\d+[.)]\s")  # "1. a dog 2. a cat" on one line is a list too
MARKUP = re.compile(r"[#*_`<>\[\]{}|\\]|https?://")
PREAMBLE = re.compile(r"^(?:sure|okay|ok|certainly|of course|here is|here's|here are|description|answer)\b", re.I)
NON_TEXT = re.compile(r"[^\x20-\x7E]")
_STRAIGHTEN = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-", "\u2026": "..."})


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def syllables(word: str) -> int:
    """Vowel groups, less a silent final -e/-es/-ed (the usual heuristic; good to about +-1)."""
    word = word.lower().strip("'")
    if len(word) <= 3:
        return 1
    word = re.sub(r"(?:[^laeiouy]es|[^laeiouy]ed|[^laeiouy]e)$", "", word)
    return max(1, len(re.findall(r"[aeiouy]{1,2}", re.sub(r"^y", "", word))))


def reading_grade(text: str) -> float:
    """Flesch-Kincaid grade: 0.39 * words/sentence + 11.8 * syllables/word - 15.59."""
    words = WORD.findall(text)
    if not words:
        return 0.0
    sentences = len(re.findall(r"[.!?]+", text)) + (0 if re.search(r"[.!?][\"')]*\s*$", text) else 1)
    return 0.39 * len(words) / max(1, sentences) + 11.8 * sum(map(syllables, words)) / len(words) - 15.59


def validate_description(text: str, word_range: tuple[int, int], max_grade: float) -> tuple[str | None, str | None]:
    """(cleaned text, None) if the answer is accepted, else (None, "code: what is wrong")."""
    text = text.strip().translate(_STRAIGHTEN)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if not text:
        return None, "empty: the answer is empty"
    if LIST_LINE.search(text):
        return None, "not_plain_prose: it is a list, not sentences"
    if re.search(r"\n\s*\n", text):
        return None, "not_one_paragraph: it has more than one paragraph"
    text = " ".join(text.split())
    if PREAMBLE.match(text):
        return None, "not_plain_prose: it starts with a preamble instead of the description"
    if NUMBERED.search(text):
        return None, "not_plain_prose: it numbers its parts like a list"
    if ":" in text:
        return None, "not_plain_prose: it has a title or label (a colon)"
    if MARKUP.search(text) or NON_TEXT.search(text):
        return None, "not_plain_prose: it has markup, links, emoji or other symbols"
    lo, hi = word_range
    n = count_words(text)
    if n < lo:
        return None, f"too_short: it has {n} words, it needs between {lo} and {hi}"
    if n > hi:
        return None, f"too_long: it has {n} words, it needs between {lo} and {hi}"
    if (grade := reading_grade(text)) > max_grade:
        return None, f"not_simple: its reading grade is {grade:.1f}, above {max_grade:g}; use shorter sentences and simpler words"
    return text, None


# --- items ------------------------------------------------------------------------------------------


@dataclass
class Item:
    image_id: int | str
    image: str  # path
    captions: list[str]
    style: str


def load_items(caption_file: str, image_dir: str, styles: list[str], limit: int | None) -> tuple[list[Item], list[dict]]:
    """One item per (image, style), images in id order, the first `limit` images; and the images
    skipped with their reason: a file missing, outside `image_dir` or not an image (they are
    reported, never requested, never copied into the dataset)."""
    outside = BadImages()
    rows = load_coco_captions(caption_file, image_dir, caption_policy="first", bad=outside).cast_column("image", datasets.Image(decode=False))
    missing = [{"image_id": image_id, "image": name, "reason": reason} for _, image_id, name, reason in outside.rows]
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    items = []
    for image, image_id, captions in zip(rows["image"], rows["image_id"], rows["references"]):
        if (reason := decode_error(image)) is not None:
            missing.append({"image_id": image_id, "image": image["path"], "reason": reason})
            continue
        items.extend(Item(image_id, image["path"], captions, style) for style in styles)
    return items, missing


# --- requests ---------------------------------------------------------------------------------------


async def describe(items: list[Item], client: LLMClient, prompts: Prompts, cache: JsonlCache, args) -> None:
    """Ask for every item with `args.concurrency` workers; each outcome goes to the cache at once."""
    failed = Counter()

    async def handle(item: Item, progress):
        lo, hi = prompts.word_range(item.style)
        answer = await client.complete(
            prompts.messages(item.captions, item.style, args.merge_system),
            validate=lambda text: validate_description(text, (lo, hi), args.max_grade),
            max_reasks=args.max_reasks,
            reask=lambda reason: prompts.reask_message(reason, item.style),
            temperature=args.temperature,
            max_tokens=args.max_tokens or hi * 3 + 50,
            **({"stop": args.stop} if args.stop else {}),
        )
        text = client.redact(answer.value) if answer.ok else None  # a server may echo the key back
        cache.append({
            "model": client.model, "prompt_version": prompts.version, "style": item.style, "image_id": item.image_id,
            "status": "done" if answer.ok else "failed", "text": text, "reason": answer.reason,
            "answer": None if answer.ok or answer.text is None else client.redact(answer.text), "word_count": count_words(text) if text else None,
            "grade": round(reading_grade(text), 2) if text else None, "attempts": answer.attempts, "asks": answer.asks,
            "rejected": [client.redact(r) for r in answer.rejected], "prompt_tokens": answer.usage.prompt_tokens,
            "completion_tokens": answer.usage.completion_tokens, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        if not answer.ok:
            failed[answer.reason.partition(":")[0]] += 1
            progress.set_postfix(failed=sum(failed.values()), refresh=False)

    try:
        await run_pool(items, handle, args.concurrency, "describing")
    finally:
        await client.close()


# --- output -----------------------------------------------------------------------------------------


def split_of(image_ids: list, validation_fraction: float) -> set:
    """The validation image ids: those whose id hashes below the fraction (stable as data grows; both
    styles of an image land in one split); at least one image when there are two or more."""
    position = {i: int(hashlib.sha256(str(i).encode()).hexdigest()[:12], 16) / 16**12 for i in image_ids}
    chosen = {i for i, p in position.items() if p < validation_fraction}
    if not chosen and len(position) > 1:
        chosen = {min(position, key=position.get)}
    if len(chosen) == len(position):
        chosen = set()  # a single image trains
    return chosen


def build_dataset(items: list[Item], records: list[dict], validation_fraction: float) -> datasets.DatasetDict:
    by_key = {(r["style"], r["image_id"]): r for r in records}
    done = [(item, by_key[(item.style, item.image_id)]) for item in items if by_key.get((item.style, item.image_id), {}).get("status") == "done"]
    validation = split_of(sorted({item.image_id for item, _ in done}, key=str), validation_fraction)
    int_ids = all(isinstance(item.image_id, int) for item, _ in done)
    features = datasets.Features({
        "image": datasets.Image(), "text": datasets.Value("string"), "style": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")), "image_id": datasets.Value("int64" if int_ids else "string"),
        "word_count": datasets.Value("int32"),
    })
    splits = {}
    for name in ("train", "validation"):
        rows = [(item, r) for item, r in done if (item.image_id in validation) == (name == "validation")]
        splits[name] = datasets.Dataset.from_dict({
            "image": [item.image for item, _ in rows], "text": [r["text"] for _, r in rows], "style": [item.style for item, _ in rows],
            "captions": [item.captions for item, _ in rows], "image_id": [item.image_id if int_ids else str(item.image_id) for item, _ in rows],
            "word_count": [r["word_count"] for _, r in rows],
        }, features=features)
    return datasets.DatasetDict(splits)


def save_dataset(dataset: datasets.DatasetDict, output: str) -> datasets.DatasetDict:
    """save_to_disk (images embedded) into OUTPUT/dataset, replaced atomically, and parquet per split."""
    final, staging = os.path.join(output, "dataset"), os.path.join(output, "dataset.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    # One accepted image makes an empty validation split, which datasets cannot save: keep the splits with rows.
    dataset = datasets.DatasetDict({name: split for name, split in dataset.items() if len(split)})
    dataset.save_to_disk(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    saved = datasets.load_from_disk(final)  # images are bytes now, so parquet embeds them too
    os.makedirs(os.path.join(output, "parquet"), exist_ok=True)
    for name, split in saved.items():
        split.to_parquet(os.path.join(output, "parquet", f"{name}.parquet"))
    return saved


def make_report(args, prompts: Prompts, client: LLMClient | None, items: list[Item], missing: list[dict], records: list[dict],
                before: set, seconds: float, aborted: str | None) -> dict:
    """Counts over the selected items: done (this run / cached), failed by reason, word counts, tokens."""
    mine = [r for r in records if (r["style"], r["image_id"]) not in before]
    done = [r for r in records if r["status"] == "done"]
    failed = Counter(r["reason"].partition(":")[0] for r in records if r["status"] == "failed")
    failed_now = Counter(r["reason"].partition(":")[0] for r in mine if r["status"] == "failed")
    answers = sum(r["asks"] for r in mine)
    first_ok = sum(1 for r in mine if r["asks"] >= 1 and not r["rejected"])
    histogram = {style: dict(sorted(Counter(r["word_count"] for r in done if r["style"] == style).items())) for style in args.styles}
    return {
        "model": args.model, "base_url": safe_url(args.base_url), "prompt_version": prompts.version, "styles": args.styles,
        "items": len(items) + len(missing) * len(args.styles),
        "done": len(done), "done_this_run": sum(1 for r in mine if r["status"] == "done"),
        "cached": sum(1 for r in done if (r["style"], r["image_id"]) in before),
        "failed": dict(sorted(failed.items())), "failed_this_run": dict(sorted(failed_now.items())),
        "image_missing": len(missing) * len(args.styles), "missing_images": missing[:20],
        "not_finished": len(items) - len(records), "aborted": aborted,
        "validation": {
            "answers_this_run": answers, "accepted_this_run": sum(1 for r in mine if r["status"] == "done"),
            "first_answer_pass_rate": round(first_ok / len(mine), 4) if mine else None,
            "answer_pass_rate": round(sum(1 for r in mine if r["status"] == "done") / answers, 4) if answers else None,
            "rejected_by_reason": dict(sorted(Counter(x.partition(":")[0] for r in mine for x in r["rejected"]).items())),
            "max_grade": args.max_grade,
        },
        "word_counts": histogram,
        "mean_reading_grade": {s: round(sum(g) / len(g), 2) if (g := [r["grade"] for r in done if r["style"] == s]) else None for s in args.styles},
        "tokens": {
            "this_run": client.usage.to_dict() if client else None,
            "all_cached_items": {"prompt_tokens": sum(r["prompt_tokens"] for r in records),
                                 "completion_tokens": sum(r["completion_tokens"] for r in records)},
        },
        "seconds": round(seconds, 2), "items_per_second": round(len(mine) / seconds, 3) if mine and seconds > 0 else None,
    }


def failure_summary(records: list[dict], total: int, max_failed_fraction: float) -> str | None:
    """One line when the run did not build what it should: no item accepted, or more than
    `max_failed_fraction` of the finished items failed; the failures counted by reason (a retried
    error by its last kind: "retries_exhausted (last 500)"), each with one example. None otherwise."""
    failed = [r["reason"] for r in records if r["status"] == "failed"]
    done = len(records) - len(failed)
    if done and len(failed) <= max_failed_fraction * len(records):
        return None
    if not records:
        return f"0 of {total} items done: no item could be requested (every image was skipped; report.json says why)"
    return f"{len(failed)} of {len(records)} items failed (--max_failed_fraction allows {max_failed_fraction:g}): {count_failures(failed)}"


# --- command line -----------------------------------------------------------------------------------


@dataclass
class BuilderArguments:
    caption_file: str = field(metadata={"help": "MS-COCO captions JSON (images + annotations)"})
    image_dir: str = field(metadata={"help": "folder of the images named in the caption file"})
    style: str = arg("both", "ShortDesc (20-25 words), LongDesc (60-70) or both", choices=["short", "long", "both"])
    limit: int | None = arg(help="only the first N images (by id)")
    output: str = arg("outputs/descriptions", "folder for cache.jsonl, dataset/, parquet/, report.json")
    cache: str | None = arg(help="cache file (default OUTPUT/cache.jsonl); share one across outputs to reuse answers")
    retry_failed: bool = arg(False, "re-request items the cache holds as failed")
    max_reasks: int = arg(2, "re-asks after an answer that fails validation")
    temperature: float = arg(0.7, "sampling temperature")
    max_tokens: int | None = arg(help="answer length cap (default: 3 x the style's top word count + 50)")
    stop: list[str] | None = arg(help="stop sequence(s); escapes allowed (--stop '\\n' ends a base model's answer at its first line)")
    max_grade: float = arg(3.0, "highest Flesch-Kincaid grade accepted (the simple-language check)")
    prompts: str | None = arg(help="JSON file overriding the built-in prompts (see descriptions/prompts.py)")
    merge_system: bool = arg(False, "send the system prompt inside the user message (for chat templates that drop system "
                              "messages, e.g. llama.cpp's gemma)")
    validation_fraction: float = arg(0.1, "share of images in the validation split")
    max_failed_fraction: float = arg(0.5, "exit with status 1 when more than this share of the finished items failed "
                                      "(or none was accepted); what was accepted is saved either way")
    push_to_hub: str | None = arg(help="also push the dataset to this Hub repo", metavar="REPO")


# --model, --base_url, --api_key_env, --concurrency, --timeout, --max_attempts, --backoff_base, --backoff_max
ClientArguments = client_arguments("", "the LLM server", model="gpt-4o")


def parse_args(argv=None):
    p = HfArgumentParser((BuilderArguments, ClientArguments), description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    args = argparse.Namespace(**{k: v for parsed in p.parse_args_into_dataclasses(args=argv) for k, v in asdict(parsed).items()})
    args.styles = ["short", "long"] if args.style == "both" else [args.style]
    args.stop = [codecs.decode(s, "unicode_escape") for s in args.stop] if args.stop else None
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if not 0 <= args.validation_fraction < 1:
        p.error("--validation_fraction must be in [0, 1)")
    if not 0 <= args.max_failed_fraction <= 1:
        p.error("--max_failed_fraction must be in [0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # one line per request otherwise (openai 3 uses httpx2)
        logging.getLogger(name).setLevel(logging.WARNING)
    prompts = load_prompts(args.prompts)
    for style in args.styles:
        prompts.word_range(style)
    items, missing = load_items(args.caption_file, args.image_dir, args.styles, args.limit)
    if missing:
        logger.warning("%d image(s) are skipped and will not be requested, e.g. %s (%s); report.json lists them",
                       len(missing), missing[0]["image"], missing[0]["reason"])
    os.makedirs(args.output, exist_ok=True)
    cache = JsonlCache(args.cache or os.path.join(args.output, "cache.jsonl"), KEY_FIELDS, secret=os.environ.get(args.api_key_env))
    key = lambda item: (args.model, prompts.version, item.style, item.image_id)  # noqa: E731
    finished = {(i.style, i.image_id) for i in items if key(i) in cache and (cache.get(key(i))["status"] == "done" or not args.retry_failed)}
    pending = [i for i in items if (i.style, i.image_id) not in finished]
    cached_failed = sum(1 for i in items if key(i) in cache and cache.get(key(i))["status"] == "failed")
    logger.info(
        "%d items (%d images x %s), prompt %s, model %s: %d finished in %s, %d to request",
        len(items), len(items) // len(args.styles), "+".join(args.styles), prompts.version, args.model, len(finished), cache.path, len(pending),
    )
    if cached_failed and not args.retry_failed:
        logger.info("%d failed items in the cache are kept as failed; pass --retry_failed to ask again", cached_failed)
    client, aborted, status = None, None, 0
    start = time.perf_counter()
    try:
        if pending:
            client = ClientSettings(**client_settings(args)).client()
            with logging_redirect_tqdm():
                asyncio.run(describe(pending, client, prompts, cache, args))
    except FatalLLMError as err:
        aborted, status = str(err), 2
        logger.error("stopped: %s. Finished items are in %s; rerun the same command to go on.", err, cache.path)
    except KeyboardInterrupt:
        aborted, status = "interrupted", 130
        logger.error("interrupted. Finished items are in %s; rerun the same command to go on.", cache.path)
    seconds = time.perf_counter() - start
    records = [cache.get(key(i)) for i in items if key(i) in cache]
    report = make_report(args, prompts, client, items, missing, records, finished, seconds, aborted)
    cache.close()
    if aborted is None:
        dataset = build_dataset(items, records, args.validation_fraction)
        if sum(len(s) for s in dataset.values()):
            saved = save_dataset(dataset, args.output)
            report["splits"] = {name: len(split) for name, split in saved.items()}
            report["dataset"] = os.path.join(args.output, "dataset")
            if args.push_to_hub:
                saved.push_to_hub(args.push_to_hub)
                report["pushed_to"] = args.push_to_hub
        else:
            logger.warning("no item was accepted, so no dataset was written; see the failures in report.json")
        if (summary := failure_summary(records, len(items), args.max_failed_fraction)) is not None:
            status = 1
            report["failure_summary"] = f"{summary}; each item's reason is in {cache.path}"
    report["exit_status"] = status
    with open(os.path.join(args.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    logger.info(
        "%d of %d done (this run %d, cached %d), failed %s, tokens %s -> %s",
        report["done"], report["items"], report["done_this_run"], report["cached"], report["failed"] or "none",
        {k: report["tokens"]["this_run"][k] for k in ("prompt_tokens", "completion_tokens")} if client else "none", args.output,
    )
    if "failure_summary" in report:
        logger.error("descriptions.build: %s", report["failure_summary"])
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, CacheInUseError) as err:  # a refused input: its message says what to do
        sys.exit(f"descriptions.build: error: {err}")
