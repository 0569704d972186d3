"""The prompts that turn an image's human captions into one child-like description (the paper's
ShortDesc and LongDesc), in one versioned place.

The version is part of every cache key, so a changed prompt never reuses answers of the old one:
change the text here -> bump `PROMPT_VERSION` (a test pins the text of each version). A prompts
file (`--prompts FILE`, JSON with the keys of `Prompts`; missing keys keep the built-in text) gets
the version `<its "version">+<hash of its content>`.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field

from processing.styles import WORD_RANGES

PROMPT_VERSION = "childdesc-v1"

SYSTEM = (
    "You describe pictures the way a 3 to 4 year old child talks: short sentences, simple everyday words "
    "a small child knows, and only what can be seen in the picture."
)

USER = """Here are {n_captions} descriptions of the same picture, written by different people:
{captions}

Write ONE new description of this picture, the way a 3 to 4 year old child would say it.
Rules:
- Use between {min_words} and {max_words} words.
- Use only simple words that a small child knows, and short sentences of about 4 to 8 words.
- Write one paragraph of plain sentences: no list, no title, no quotes, no emoji.
- Say only what the descriptions tell you; do not make things up.
- Answer with the description only."""

REASK = (
    "That description was not accepted: {reason}. Write it again and follow every rule: between {min_words} "
    "and {max_words} words, simple words, short sentences, one paragraph of plain sentences. "
    "Answer with the description only."
)


@dataclass(frozen=True)
class Prompts:
    version: str = PROMPT_VERSION
    system: str = SYSTEM
    user: str = USER
    reask: str = REASK
    word_ranges: dict = field(default_factory=lambda: dict(WORD_RANGES))

    def messages(self, captions: list[str], style: str, merge_system: bool = False) -> list[dict]:
        """Chat messages for one image. `merge_system` puts the system text at the top of the user
        message, for chat templates that drop system messages (llama.cpp's `gemma` format does)."""
        lo, hi = self.word_range(style)
        listed = "\n".join(f"{i}. {c.strip()}" for i, c in enumerate(captions, 1))
        user = self.user.format(n_captions=len(captions), captions=listed, min_words=lo, max_words=hi)
        if merge_system:
            return [{"role": "user", "content": f"{self.system}\n\n{user}"}]
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def reask_message(self, reason: str, style: str) -> str:
        lo, hi = self.word_range(style)
        return self.reask.format(reason=reason.partition(": ")[2] or reason, min_words=lo, max_words=hi)

    def word_range(self, style: str) -> tuple[int, int]:
        if style not in self.word_ranges:
            raise ValueError(f"unknown style {style!r}; the prompts define {sorted(self.word_ranges)}")
        lo, hi = self.word_ranges[style]
        return int(lo), int(hi)

    def text_hash(self) -> str:
        """sha256 of everything that shapes a request (the version string aside)."""
        content = {k: v for k, v in asdict(self).items() if k != "version"}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def load_prompts(path: str | None = None) -> Prompts:
    """The built-in prompts, or those of a JSON file (keys: version, system, user, reask, word_ranges)."""
    if path is None:
        return Prompts()
    with open(path) as f:
        try:
            given = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"prompts file {path} is not valid JSON ({err})") from None
    unknown = set(given) - set(Prompts.__dataclass_fields__)
    if unknown:
        raise ValueError(f"prompts file {path} has unknown keys {sorted(unknown)}; allowed: {sorted(Prompts.__dataclass_fields__)}")
    if not given.get("version"):
        raise ValueError(f"prompts file {path} needs a \"version\" (it names the cache entries of its answers)")
    prompts = Prompts(**{**asdict(Prompts()), **given})
    for key, needed in (("user", ("{captions}", "{min_words}", "{max_words}")), ("reask", ("{reason}",))):
        missing = [n for n in needed if n not in getattr(prompts, key)]
        if missing:
            raise ValueError(f"prompts file {path}: {key!r} must contain {', '.join(missing)}")
    try:
        prompts.messages(["a caption"], next(iter(prompts.word_ranges)))
        prompts.reask_message("code: detail", next(iter(prompts.word_ranges)))
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"prompts file {path}: a template has an unknown placeholder or bad braces ({err!r})") from None
    return Prompts(**{**asdict(prompts), "version": f"{given['version']}+{prompts.text_hash()[:8]}"})
