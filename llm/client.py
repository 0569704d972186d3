"""An async client for any OpenAI-compatible chat API (OpenAI, vLLM, llama.cpp, Ollama), built for
long paid batch jobs: the description builder here and the evaluation's LLM judge.

- `LLMClient.complete(messages, validate=...)` sends one chat request at a time per item, under a
  global concurrency bound, and returns an `Answer`: the validated value, or the reason it failed.
  Transient failures (429, 408/409, 5xx, timeouts, connection errors, malformed bodies) are retried
  with exponential backoff and jitter; a Retry-After header pauses every request, not just the one
  that got it. An answer that `validate` rejects is re-asked (at most `max_reasks` times) with the
  reason. Every HTTP request, retry or re-ask, counts against `max_attempts` per item.
  401/403/404 raise `FatalLLMError` (a wrong key, model or URL fails every item: stop, do not pay).
- `run_pool(items, handle, concurrency, desc)`: the workers and progress bar of a batch job.
- Beside it: structured output (`llm.schema`), the durable cache (`llm.cache.JsonlCache`) and the settings and
  flags the builder and the judge share (`llm.settings.ClientSettings`).

The API key comes from an environment variable and is sent only as the bearer token. `redact(text,
key)` is the one redaction function of the project: it strips the key in every form a server or a
proxy may echo it back (plain, URL-encoded, base64 of the key or of its "Bearer" header, standard or
URL-safe, padded or not, at any byte offset), and anything shaped like a key. The client applies it to
every answer as it arrives and to every message it logs, raises or returns, and `JsonlCache` to every
line before it is written.
"""

import asyncio
import base64
import email.utils
import json
import logging
import os
import random
import re
import time
import urllib.parse
from collections import Counter
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Any, Callable

import openai
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx
FATAL_STATUS = {401: "authentication failed", 403: "permission denied", 404: "model or URL not found"}
_KEYLIKE = re.compile(r"(\bsk-[A-Za-z0-9_\-*.]{4,}|Bearer\s+\S+)")


REDACTED = "[redacted]"


class FatalLLMError(RuntimeError):
    """An error that every further request would repeat (bad key, unknown model, wrong URL)."""


def _base64_cores(secret: bytes) -> set[str]:
    """The base64 characters that encode only `secret`'s own bytes, for each of the three byte offsets
    it can start at inside a longer encoded text (standard and URL-safe alphabets): whatever the
    surrounding bytes, an encoding that contains `secret` contains one of these."""
    cores = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret).decode().rstrip("=")
        first = -(-offset * 8 // 6)  # the first character with no bit of the padding before
        last = (offset + len(secret)) * 8 // 6  # characters before this hold no bit after the secret
        core = encoded[first:last]
        if len(core) >= 8:  # shorter runs would redact unrelated text
            cores |= {core, core.translate(str.maketrans("+/", "-_"))}
    return cores


@lru_cache(maxsize=8)
def _secret_pattern(secret: str) -> re.Pattern:
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    for text in (secret, f"Bearer {secret}"):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(text.encode()).decode()
            forms |= {encoded, encoded.rstrip("=")}
    forms |= _base64_cores(secret.encode())
    # Longest first, so a whole encoding is replaced before the core inside it.
    return re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True) if f))


def redact(text: str, secret: str | None = None) -> str:
    """`text` with `secret` (an API key) replaced by "[redacted]" in its plain, URL-encoded and base64
    forms (of the key and of "Bearer KEY"; standard and URL-safe; with or without padding; at any
    offset inside a longer base64 text), and anything shaped like a key ("sk-...", "Bearer ...") too."""
    if secret:
        text = _secret_pattern(secret).sub(REDACTED, text)
    return _KEYLIKE.sub(REDACTED, text)


@dataclass
class Usage:
    """Token and request accounting; `errors` counts failed requests by kind ("429", "timeout", ...)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    missing_usage: int = 0
    errors: Counter = field(default_factory=Counter)

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.requests += other.requests
        self.missing_usage += other.missing_usage
        self.errors.update(other.errors)

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "requests": self.requests,
            "missing_usage": self.missing_usage, "errors": dict(sorted(self.errors.items())),
        }


@dataclass
class Answer:
    """The outcome of one item: `ok` with `value`, or not ok with `reason` ("code: detail")."""

    ok: bool
    value: Any = None
    text: str | None = None  # the last answer received, accepted or not
    reason: str | None = None
    attempts: int = 0  # HTTP requests made for this item
    asks: int = 0  # answers received (1 + re-asks)
    rejected: list[str] = field(default_factory=list)  # validation reasons of the rejected answers
    usage: Usage = field(default_factory=Usage)


class _Transient(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


class _ItemError(Exception):
    """Not retryable and specific to this request (400, 422): the item fails, the run goes on."""


def safe_url(url: str | None) -> str | None:
    """`url` without user name or password, fit for logs and reports."""
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) if parts.hostname else url


class LLMClient:
    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_attempts: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_retry_after: float = 300.0,
        flag_prefix: str = "",
    ):
        if concurrency < 1 or max_attempts < 1 or timeout <= 0:
            raise ValueError("concurrency and max_attempts must be >= 1 and timeout > 0")
        self._key = os.environ.get(api_key_env) or None
        if self._key is None and base_url is None and not os.environ.get("OPENAI_BASE_URL"):
            raise ValueError(
                f"no API key: set the environment variable {api_key_env} (or name another one with --{flag_prefix}api_key_env), "
                f"or pass --{flag_prefix}base_url for a local server that needs none"
            )
        if self._key is None:
            logger.info("no API key in $%s: sending a placeholder (fine for local servers)", api_key_env)
        self.model, self.api_key_env, self.flag_prefix = model, api_key_env, flag_prefix
        self.timeout, self.max_attempts = timeout, max_attempts
        self.backoff_base, self.backoff_max, self.max_retry_after = backoff_base, backoff_max, max_retry_after
        self.usage = Usage()
        self.base_url = safe_url(base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1")
        # Connection errors in a row with no HTTP answer between them: a server that is down or a wrong
        # --base_url would otherwise fail every item (and be recorded as failed) one by one.
        self._unreachable, self.max_unreachable = 0, max(3, max_attempts)
        self._semaphore = asyncio.Semaphore(concurrency)
        self._resume_at = 0.0  # monotonic time before which no request is sent (Retry-After)
        # The SDK's own retries are off: this class counts every attempt against the item's cap.
        self._client = openai.AsyncOpenAI(api_key=self._key or "no-key", base_url=base_url, timeout=timeout, max_retries=0)

    async def close(self) -> None:
        await self._client.close()

    def redact(self, text: str) -> str:
        return redact(text, self._key)

    async def complete(
        self,
        messages: list[dict],
        validate: Callable[[str], tuple[Any, str | None]] | None = None,
        max_reasks: int = 2,
        reask: Callable[[str], str] | None = None,
        **params,
    ) -> Answer:
        """One item: request, validate, re-ask or retry until accepted or out of attempts.

        `validate(text)` returns `(value, None)` or `(None, "code: detail")`. `reask(reason)` gives the
        user message sent after a rejected answer (the answer itself goes back as the assistant's
        turn); without it the same messages are sent again. `params` go to chat.completions.create.
        """
        answer = Answer(ok=False)
        try:
            return await self._complete(answer, messages, validate, max_reasks, reask, params)
        finally:
            self.usage.add(answer.usage)  # also when FatalLLMError or cancellation ends the item

    async def _complete(self, answer, messages, validate, max_reasks, reask, params) -> Answer:
        conversation = list(messages)
        transient = 0
        last: str | None = None
        while answer.attempts < self.max_attempts:
            answer.attempts += 1
            try:
                text, finish_reason = await self._request(conversation, params, answer.usage)
            except _Transient as err:
                transient += 1
                last = f"retries_exhausted: {answer.attempts} attempts, last {err.kind}: {err.detail}"
                if answer.attempts < self.max_attempts:
                    await self._backoff(transient, err.retry_after)
                continue
            except _ItemError as err:
                answer.reason = self.redact(str(err))
                break
            answer.asks += 1
            answer.text = text
            if finish_reason == "length":
                value, reason = None, "truncated: the answer hit max_tokens"
            else:
                value, reason = validate(text) if validate else (text, None)
            if reason is None:
                answer.ok, answer.value, answer.reason = True, value, None
                break
            answer.rejected.append(reason)
            last = reason
            if answer.asks > max_reasks:
                break
            conversation = list(messages)
            if reask is not None:
                conversation += [{"role": "assistant", "content": text}, {"role": "user", "content": reask(reason)}]
        if not answer.ok and answer.reason is None:
            answer.reason = last or "retries_exhausted: no attempt left"
        return answer

    async def _request(self, messages: list[dict], params: dict, usage: Usage) -> tuple[str, str | None]:
        """One HTTP request; returns (content, finish_reason) or raises _Transient/_ItemError/FatalLLMError."""
        async with self._semaphore:
            while (wait := self._resume_at - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            usage.requests += 1
            try:
                # wait_for also bounds a server that trickles bytes, which httpx's per-read timeout would not.
                response = await asyncio.wait_for(
                    self._client.chat.completions.create(model=self.model, messages=messages, **params), self.timeout + 1.0
                )
            except (openai.APITimeoutError, asyncio.TimeoutError):
                usage.errors["timeout"] += 1
                raise _Transient("timeout", f"no answer within {self.timeout:g}s") from None
            except openai.APIConnectionError as err:
                usage.errors["connection"] += 1
                self._unreachable += 1
                if self._unreachable >= self.max_unreachable:
                    raise FatalLLMError(
                        f"server unreachable at {self.base_url}: {self._unreachable} connection errors in a row "
                        f"({self.redact(str(err))}); check --{self.flag_prefix}base_url and that the server is running"
                    ) from None
                raise _Transient("connection", self.redact(str(err))) from None
            except openai.APIStatusError as err:
                self._unreachable = 0
                status, detail = err.status_code, self.redact(f"HTTP {err.status_code}: {err.message}")[:300]
                usage.errors[str(status)] += 1
                if status in FATAL_STATUS:
                    hint = (f"check the key in ${self.api_key_env}" if status in (401, 403)
                            else f"check --{self.flag_prefix}model {self.model!r} and --{self.flag_prefix}base_url")
                    raise FatalLLMError(f"{FATAL_STATUS[status]} ({detail}); {hint}") from None
                if status in RETRYABLE_STATUS or status >= 500:
                    raise _Transient(str(status), detail, _retry_after(err.response.headers)) from None
                raise _ItemError(f"bad_request: {detail}") from None
            except (json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError) as err:
                # A body that is not JSON (json.loads reads a leading NUL byte as UTF-16 and raises UnicodeDecodeError).
                self._unreachable = 0
                usage.errors["malformed"] += 1
                raise _Transient("malformed", self._not_json(_body_of(err))) from None
        self._unreachable = 0
        if isinstance(response, str):  # a body that is not JSON, under a content type that is not JSON either
            usage.errors["malformed"] += 1
            raise _Transient("malformed", self._not_json(response.encode()))
        choices = getattr(response, "choices", None)
        if not choices or choices[0].message is None or choices[0].message.content is None:
            usage.errors["malformed"] += 1
            raise _Transient("malformed", "response without choices[0].message.content")
        if response.usage is None:
            usage.missing_usage += 1
        else:
            usage.prompt_tokens += response.usage.prompt_tokens or 0
            usage.completion_tokens += response.usage.completion_tokens or 0
        # Redacted on arrival: a server that echoes the key back cannot get it into a re-ask, a log or a file.
        return self.redact(choices[0].message.content), choices[0].finish_reason

    def _not_json(self, body: bytes | None) -> str:
        first = "unknown" if body is None else repr(body[:60])
        return self.redact(f"the server at {self.base_url} answered something that is not JSON: first bytes {first}")

    async def _backoff(self, retry: int, retry_after: float | None) -> None:
        """Exponential backoff with jitter; a server's Retry-After wins and pauses every request."""
        if retry_after is not None:
            delay = min(retry_after, self.max_retry_after) * random.uniform(1.0, 1.1)
            self._resume_at = max(self._resume_at, time.monotonic() + delay)
        else:
            delay = min(self.backoff_max, self.backoff_base * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)
        await asyncio.sleep(delay)


def _body_of(err: Exception) -> bytes | None:
    """The raw body behind a JSON decoding error, as far as the error keeps it."""
    if isinstance(err, UnicodeDecodeError):
        return bytes(err.object)
    if isinstance(err, json.JSONDecodeError):
        return err.doc.encode() if isinstance(err.doc, str) else bytes(err.doc)
    response = getattr(err, "response", None)
    return getattr(response, "content", None)


def _retry_after(headers) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), if present."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        if (value := headers.get("retry-after")) is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def count_failures(reasons: list[str]) -> str:
    """Failure reasons ("code: detail") counted by code, most frequent first, each with its first
    detail: "4 retries_exhausted (last 500) [2 attempts, last 500: HTTP 500: ...]; 1 too_long [...]".
    A retried error counts under its last kind."""
    groups: dict[str, list[str]] = {}
    for reason in reasons:
        code, _, detail = reason.partition(": ")
        if code == "retries_exhausted" and (last := re.search(r"\blast (\S+?):", detail)):
            code = f"{code} (last {last.group(1)})"
        groups.setdefault(code, []).append(detail)
    return "; ".join(f"{len(details)} {code} [{details[0][:160]}]" for code, details in sorted(groups.items(), key=lambda g: -len(g[1])))


async def run_pool(items: list, handle: Callable, concurrency: int, desc: str, unit: str = "item") -> None:
    """`await handle(item, progress)` for every item, `concurrency` at a time, under one tqdm bar that
    advances after each item; if a handler raises, the other workers are cancelled and it propagates."""
    pending = iter(items)  # shared by the workers: each item is taken once
    progress = tqdm(total=len(items), desc=desc, unit=unit, mininterval=1)

    async def worker():
        for item in pending:
            await handle(item, progress)
            progress.update(1)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, max(1, len(items))))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.close()


# --- structured (JSON) answers, for the judge ---------------------------------------------------


