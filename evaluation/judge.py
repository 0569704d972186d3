"""The paper's LLM judge: a model completes the beginning of a reference description and an
OpenAI-compatible LLM grades the completion like a teacher (after TinyStories' protocol).

Protocol: the beginning is the first 6-7 words ("short") or 18-20 words ("long") of the reference,
the count drawn per item from a seeded generator, always leaving at least one word to complete.
The judge reads "beginning***completion" and gives grammar, consistency, creativity,
meaningfulness and plot, each an integer 1-10, "as if written by a student". The same judge
grades the reference's own completion (the rest of the reference) as a ceiling. The judge reads
text only: it grades language and coherence, not whether the text is true of the picture.

Structured output: `response_format` "json_schema" where the server supports it; "auto" probes
json_schema, then llama.cpp's JSON mode with a schema (a grammar constrains decoding), then plain
JSON mode, then none, one request each, and keeps the first the server accepts (llama.cpp's server
answers 500 to json_schema). Every answer is parsed and range-checked against the schema whatever
the mode, and re-asked at most `max_reasks` times. Requests go through `llm.client`
(the description builder's client: bounded concurrency, retries with backoff, Retry-After, key
redaction), and every graded text is cached in a JSONL file keyed by (judge model, prompt version,
hash of the text), so a rerun or a repeated text asks nothing again. The key is redacted, in every
encoding, from each record before it is written (`llm.client.redact`).

A judge that grades nothing is an error, never a summary of zero grades: `JudgeError` when the
server answers no probe, or when every text failed (the reasons counted in its message).
"""

import asyncio
import hashlib
import logging
import math
import os
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from llm.cache import JsonlCache
from llm.client import LLMClient, count_failures, run_pool
from llm.schema import json_schema_format, json_validator
from llm.settings import ClientSettings

logger = logging.getLogger(__name__)

CRITERIA = ("grammar", "consistency", "creativity", "meaningfulness", "plot")
PROMPT_VERSION = "judge-v1"
PREFIX_WORDS = {"short": (6, 7), "long": (18, 20)}
SCHEMA = {
    "type": "object", "required": list(CRITERIA), "additionalProperties": False,
    "properties": {c: {"type": "integer", "minimum": 1, "maximum": 10} for c in CRITERIA},
}
FORMATS = ("json_schema", "json_object_schema", "json_object", "none")
_ANSWER_SHAPE = "{" + ", ".join(f'"{c}": <1-10>' for c in CRITERIA) + "}"
PROMPT = (
    "In the following exercise, a student is given a picture and the beginning of a description of it, and has to "
    "complete the description in the simple words of a 3-4 year old child. The symbol *** marks the separator between "
    "the given beginning and the student's completion:\n\n{beginning}***{completion}\n\n"
    "Grade the student's completion as if written by a student. Give grammar, consistency (with the beginning), "
    "creativity, meaningfulness and plot each an integer from 1 (worst) to 10 (best). "
    "Answer with JSON only, in this shape: " + _ANSWER_SHAPE.replace("{", "{{").replace("}", "}}")
)
# 95% two-sided Student t quantiles by degrees of freedom; a df between rows takes the row below it
# (a slightly wider, conservative interval).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


class JudgeError(RuntimeError):
    """The judge graded nothing: its server answered no probe, or every text failed."""


def split_prompt(text: str, protocol: str, rng: random.Random) -> tuple[str, str] | None:
    """(beginning, rest) of a reference: its first 6-7 ("short") or 18-20 ("long") words; None if too short."""
    lo, hi = PREFIX_WORDS[protocol]
    words = text.split()
    if len(words) < 2:
        return None
    n = min(rng.randint(lo, hi), len(words) - 1)
    return " ".join(words[:n]), " ".join(words[n:])


def mean_ci95(values: Sequence[float]) -> dict:
    """Mean, 95% confidence half-width (Student t), standard deviation and n."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "sd": None, "n": 0}
    mean = statistics.fmean(values)
    if n == 1:
        return {"mean": mean, "ci95": None, "sd": None, "n": 1}
    sd = statistics.stdev(values)
    t = _T95[max(df for df in _T95 if df <= n - 1)] if n - 1 <= 120 else 1.960
    return {"mean": mean, "ci95": t * sd / math.sqrt(n), "sd": sd, "n": n}


def text_key(beginning: str, completion: str) -> str:
    return hashlib.sha256(f"{beginning}***{completion}".encode()).hexdigest()[:32]


def response_format(name: str) -> dict | None:
    return {
        "json_schema": json_schema_format("judge_scores", SCHEMA),
        "json_object_schema": {"type": "json_object", "schema": SCHEMA},  # llama.cpp: grammar-constrained JSON
        "json_object": {"type": "json_object"},
        "none": None,
    }[name]


# The judge's server settings where they differ from the builder's: fewer requests in flight, grading waits longer.
JUDGE_CLIENT_DEFAULTS = {"concurrency": 4, "timeout": 120.0}


@dataclass
class JudgeSettings(ClientSettings):
    """The judge's server (`ClientSettings`, flags `--judge_...`) and how it is asked."""

    concurrency: int = JUDGE_CLIENT_DEFAULTS["concurrency"]
    timeout: float = JUDGE_CLIENT_DEFAULTS["timeout"]
    response_format: str = "auto"
    max_reasks: int = 2
    max_tokens: int = 120
    temperature: float = 0.0

    def client(self, flag_prefix: str = "judge_", max_attempts: int | None = None, concurrency: int | None = None) -> LLMClient:
        return super().client(flag_prefix, max_attempts, concurrency)


def _messages(beginning: str, completion: str) -> list[dict]:
    # One user message: some chat templates (llama.cpp's gemma) drop system messages.
    return [{"role": "user", "content": PROMPT.format(beginning=beginning, completion=completion)}]


def _reask(reason: str) -> str:
    return f"That answer was not valid ({reason}). Answer again with JSON only, in this shape: {_ANSWER_SHAPE}"


async def _ask(client: LLMClient, settings: JudgeSettings, fmt: str, beginning: str, completion: str, max_reasks: int):
    params = {"temperature": settings.temperature, "max_tokens": settings.max_tokens}
    if (rf := response_format(fmt)) is not None:
        params["response_format"] = rf
    return await client.complete(_messages(beginning, completion), validate=json_validator(SCHEMA),
                                 max_reasks=max_reasks, reask=_reask, **params)


async def probe_format(settings: JudgeSettings, beginning: str, completion: str) -> str:
    """The first of `FORMATS` the server answers (validly or not) with one request each."""
    for fmt in FORMATS:
        client = settings.client(max_attempts=1, concurrency=1)
        try:
            answer = await _ask(client, settings, fmt, beginning, completion, max_reasks=0)
        finally:
            await client.close()
        if answer.asks:  # an answer came back, so the server took this response_format
            logger.info("judge: the server accepts response_format %s", fmt)
            return fmt
        logger.info("judge: response_format %s refused (%s)", fmt, answer.reason)
    raise JudgeError(f"the judge server at {client.base_url} answered no request "
                     f"(last: {answer.reason}); check --judge_base_url and --judge_model")


async def _grade_all(pairs: list[tuple[str, str]], settings: JudgeSettings, cache: JsonlCache, fmt: str) -> dict:
    """Grade every (beginning, completion) not in the cache; return the usage of this run."""
    todo = {}
    for beginning, completion in pairs:
        key = (settings.model, PROMPT_VERSION, text_key(beginning, completion))
        if key not in cache and key[2] not in todo:
            todo[key[2]] = (beginning, completion)
    if not todo:
        return {}
    client = settings.client()

    async def handle(item, progress):
        key, (beginning, completion) = item
        answer = await _ask(client, settings, fmt, beginning, completion, settings.max_reasks)
        cache.append({
            "model": settings.model, "prompt_version": PROMPT_VERSION, "key": key, "beginning": beginning,
            "completion": completion, "format": fmt, "status": "done" if answer.ok else "failed",
            "scores": answer.value if answer.ok else None, "reason": answer.reason,
            "answer": None if answer.ok else answer.text, "attempts": answer.attempts, "asks": answer.asks,
            "rejected": answer.rejected,
        })

    try:
        await run_pool(list(todo.items()), handle, settings.concurrency, "judging", unit="text")
    finally:
        await client.close()
    return client.usage.to_dict()


def summarize(records: Sequence[dict | None]) -> dict:
    """Per criterion mean/ci95/sd/n over the graded records, plus the number that failed."""
    done = [r["scores"] for r in records if r is not None and r["status"] == "done"]
    out = {c: mean_ci95([s[c] for s in done]) for c in CRITERIA}
    out["average"] = mean_ci95([statistics.fmean(s[c] for c in CRITERIA) for s in done])
    out["graded"], out["failed"] = len(done), len(records) - len(done)
    return out


def judge(groups: dict[str, list[tuple[str, str]]], settings: JudgeSettings, cache_path: str) -> dict:
    """Grade each group of (beginning, completion) pairs (e.g. {"model": ..., "reference": ...}).

    Returns {"format": the response_format used, "usage": tokens and errors of this run, "records":
    {group: [cache record or None, ...]}, "summary": {group: `summarize`}}. Raises FatalLLMError
    (bad key, model or URL, an unreachable server), JudgeError (no answer while probing, or no text
    graded) and CacheInUseError (another process writes `cache_path`).
    """
    pairs = [p for ps in groups.values() for p in ps]
    with JsonlCache(cache_path, ("model", "prompt_version", "key"), secret=os.environ.get(settings.api_key_env)) as cache:
        missing = [p for p in pairs if (settings.model, PROMPT_VERSION, text_key(*p)) not in cache]
        fmt, usage = settings.response_format, {}
        if missing:
            if fmt == "auto":
                fmt = asyncio.run(probe_format(settings, *missing[0]))
            usage = asyncio.run(_grade_all(missing, settings, cache, fmt))
        records = {name: [cache.get((settings.model, PROMPT_VERSION, text_key(*p))) for p in ps] for name, ps in groups.items()}
    graded = list({r["key"]: r for rs in records.values() for r in rs if r is not None}.values())
    if pairs and not any(r["status"] == "done" for r in graded):
        raise JudgeError(f"the judge graded none of the {len(graded)} texts: {count_failures([r['reason'] for r in graded])}; "
                         f"each text's reason is in {cache_path}; check --judge_base_url, --judge_model and --judge_format")
    formats = sorted({r["format"] for r in graded})
    return {"format": fmt if missing else ",".join(formats) + " (cached)", "usage": usage, "records": records,
            "summary": {name: summarize(rs) for name, rs in records.items()}}
