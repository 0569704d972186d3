"""Grounding: what a caption of a built-in scene claims (`parse_mentions`) graded against the scene's exact
ground truth (`ground_description`, `grounding_scores`): object recall and precision, CHAIR-i / CHAIR-s
(named objects whose kind is not in the picture), and color, size and count accuracy.

The scenes themselves (drawing, descriptions) are data: `processing/scenes.py`.
"""

import json
import re
from collections.abc import Sequence

from processing.scenes import COLORS, KINDS, NUMBER_WORDS, PLURALS

_NUMBERS = {"a": 1, "an": 1, "one": 1, **{w: n for n, w in NUMBER_WORDS.items() if n > 1}}
_SIZE_FORMS = {"big": "big", "large": "big", "huge": "big", "small": "small", "little": "small", "tiny": "small"}
_COLOR_FORMS = {**{c: c for c in COLORS}, "violet": "purple"}
_INTENSIFIERS = {"so", "very", "really", "all"}
_MODIFIERS = set(_NUMBERS) | set(_COLOR_FORMS) | set(_SIZE_FORMS) | _INTENSIFIERS | {"no"}
_KIND_FORMS = {**{k: k for k in KINDS}, **{p: k for k, p in PLURALS.items()}, "fishes": "fish"}
_PLURAL_FORMS = {p for k, p in PLURALS.items() if p != k} | {"fishes"}
_NEGATORS = {"not", "never", "dont", "doesnt", "isnt", "arent", "cant", "didnt"}  # and every "...n't"
_SUBJECTS = {"i", "there", "it", "they", "we", "you", "he", "she"}  # "and I see ..." starts a new clause
MANY = "2+"  # the count a plural without a number word claims


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?|\d+|[^a-z\d\s']", text.lower().replace("\u2019", "'"))


def _negated_clauses(tokens: list[str]) -> list[bool]:
    """True for tokens after "not"/"never"/"...n't" up to the end of the clause: punctuation, "but",
    or "and" before a subject ("I do not see a ball and I see a box": the box is not negated)."""
    flags, active = [], False
    for i, t in enumerate(tokens):
        if not t[0].isalnum() or t == "but" or (t == "and" and tokens[i + 1:i + 2] and tokens[i + 1] in _SUBJECTS):
            active = False
        elif t in _NEGATORS or t.endswith("n't"):
            active = True
        flags.append(active)
    return flags


def _number(token: str) -> int | None:
    return int(token) if token.isdigit() else _NUMBERS.get(token)


def _predicate(tokens: list[str], k: int) -> tuple[str | None, dict]:
    """After a noun or pronoun at `k`: "is/are [so|very] big [and] red" -> ("are", {"size": "big", "color": "red"}).
    A negated predicate ("is not red") claims nothing."""
    if k >= len(tokens) or tokens[k] not in ("is", "are", "isn't", "aren't"):
        return None, {}
    verb, found = tokens[k].removesuffix("n't"), {}
    if tokens[k].endswith("n't") or tokens[k + 1:k + 2] == ["not"]:
        return verb, {}
    k += 1
    while k < len(tokens) and (tokens[k] in _INTENSIFIERS or tokens[k] == "and" or tokens[k] in _COLOR_FORMS or tokens[k] in _SIZE_FORMS):
        if tokens[k] in _COLOR_FORMS:
            found.setdefault("color", _COLOR_FORMS[tokens[k]])
        elif tokens[k] in _SIZE_FORMS:
            found.setdefault("size", _SIZE_FORMS[tokens[k]])
        k += 1
    return verb, found


def parse_mentions(text: str) -> tuple[list[dict], list[dict]]:
    """(mentions, negated mentions) of scene objects in a description, each a dict with kind, color,
    size, number (an explicit number word or digit) and count (what the words claim: a number, "2+"
    for a plural without one, or None when "fish" leaves it open); the negated ones also carry no count.

    A mention is a kind noun (singular or plural) with the number, size and color words right before
    it ("two big red balls"), completed by a predicate after it or after a sentence-initial "It"/"They"
    that refers to the last mention ("The ball is red.", "It is so big."). Words allowed as synonyms:
    little/tiny = small, large/huge = big, violet = purple, fishes = fish, digits for numbers.
    Punctuation ends the look-back, so "The sky is blue. Balls..." does not make a blue ball.
    Negation: "no" before a noun phrase ("no fish", "no red balls") negates it; "not", "never" and
    "...n't" negate the rest of their clause ("I do not see a red ball"); negated objects are not
    mentions. Mentions are unique by (kind, color), the first one's number, size and count kept, and a
    colorless mention of a kind that is also mentioned with a color is dropped.
    """
    tokens = _tokens(text)
    negated_clause = _negated_clauses(tokens)
    records: list[dict] = []
    for i, token in enumerate(tokens):
        sentence_start = i == 0 or tokens[i - 1] in (".", "!", "?")
        if token in ("it", "they") and sentence_start and records and not records[-1]["negated"]:
            for key, value in _predicate(tokens, i + 1)[1].items():  # "It is so big." about the last mention
                records[-1][key] = records[-1][key] or value
            continue
        kind = _KIND_FORMS.get(token)
        if kind is None:
            continue
        found = {"kind": kind, "color": None, "size": None, "number": None, "negated": negated_clause[i]}
        j = i - 1
        while j >= 0 and (tokens[j] in _MODIFIERS or tokens[j].isdigit()):
            t = tokens[j]
            if t in _COLOR_FORMS:
                found["color"] = found["color"] or _COLOR_FORMS[t]
            elif t in _SIZE_FORMS:
                found["size"] = found["size"] or _SIZE_FORMS[t]
            elif t == "no":
                found["negated"] = True
            elif _number(t) is not None and found["number"] is None:
                found["number"] = _number(t)
            j -= 1
        verb, said = _predicate(tokens, i + 1)  # "the ball is red", "the red fish are big"
        for key, value in said.items():
            found[key] = found[key] or value
        if found["number"] is not None:
            found["count"] = found["number"]
        elif token in _PLURAL_FORMS or (token == "fish" and verb == "are"):
            found["count"] = MANY
        else:
            found["count"] = None if token == "fish" and verb is None else 1
        records.append(found)
    merged: dict[tuple, dict] = {}
    negated: dict[tuple, dict] = {}
    for r in records:
        into = negated if r.pop("negated") else merged
        if (r["kind"], r["color"]) in into:
            m = into[r["kind"], r["color"]]
            for key in ("size", "number", "count"):
                m[key] = m[key] if m[key] is not None else r[key]
        else:
            into[r["kind"], r["color"]] = r
    colored_kinds = {k for k, c in merged if c is not None}
    mentions = [m for (k, c), m in merged.items() if c is not None or k not in colored_kinds]
    return mentions, [dict(m, count=None) for m in negated.values()]


def ground_description(text: str, scene: dict) -> dict:
    """Check every object a description mentions (see `parse_mentions`) against the scene.

    Counts: mentions, those whose kind is present, those with a color and those whose (kind, color)
    is a group; groups named; attribute claims and how many are right: the color of a mention whose
    kind is present, and the size and count of a mention that names one group (by kind and color, or
    by kind alone when only one group has that kind); negated mentions, and how many deny an object
    that is there ("no fish" with a fish in the picture).
    """
    mentions, negated = parse_mentions(text)
    kinds = {g["kind"] for g in scene["objects"]}
    pairs = {(g["kind"], g["color"]): g for g in scene["objects"]}
    said = {(m["kind"], m["color"]) for m in mentions}
    claims = {"color": [0, 0], "size": [0, 0], "count": [0, 0]}  # [claims, right]
    for m in mentions:
        if m["kind"] not in kinds:
            continue
        if m["color"] is not None:
            claims["color"][0] += 1
            claims["color"][1] += (m["kind"], m["color"]) in pairs
            group = pairs.get((m["kind"], m["color"]))
        else:
            same_kind = [g for g in scene["objects"] if g["kind"] == m["kind"]]
            group = same_kind[0] if len(same_kind) == 1 else None
        if group is None:
            continue
        if m["size"] is not None:
            claims["size"][0] += 1
            claims["size"][1] += m["size"] == group["size"]
        if m["count"] is not None:
            claims["count"][0] += 1
            claims["count"][1] += m["count"] == group["count"] or (m["count"] == MANY and group["count"] > 1)
    return {
        "mentions": mentions,
        "num_mentioned": len(mentions),
        "num_present": sum(m["kind"] in kinds for m in mentions),
        "num_colored": sum(m["color"] is not None for m in mentions),
        "num_correct": sum((m["kind"], m["color"]) in pairs for m in mentions),
        "num_groups_named": len(pairs.keys() & said),
        "num_groups": len(pairs),
        **{f"{name}_claims": n for name, (n, _) in claims.items()},
        **{f"{name}_right": r for name, (_, r) in claims.items()},
        "negated": negated,
        "num_negated": len(negated),
        "num_negation_errors": sum((m["kind"], m["color"]) in pairs if m["color"] else m["kind"] in kinds for m in negated),
    }


def grounding_scores(texts: Sequence[str], scenes: Sequence[dict | str]) -> dict:
    """Corpus-level grounding of descriptions against their scenes (dicts or JSON strings).

    object_recall: share of scene groups named with the right kind and color;
    object_precision: share of mentioned kind+color objects that exist in the scene;
    chair_i: share of mentioned objects whose kind is not in the image (CHAIR-i);
    chair_s: share of descriptions with at least one such object (CHAIR-s);
    color_accuracy, size_accuracy, count_accuracy: share of right claims of that attribute about
    objects whose kind is present (`ground_description` says which claims count);
    attribute_accuracy: the three pooled; attribute_claims: their number;
    negated_mentions: objects said not to be there; negation_errors: those that are there.
    A ratio with an empty denominator is 0.0.
    """
    if len(texts) != len(scenes):
        raise ValueError(f"got {len(texts)} texts but {len(scenes)} scenes; pass one scene per text")
    results = [ground_description(t, json.loads(s) if isinstance(s, str) else s) for t, s in zip(texts, scenes)]

    def total(key: str) -> int:
        return sum(r[key] for r in results)

    def ratio(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else 0.0

    attributes = ("color", "size", "count")
    return {
        "object_recall": ratio(total("num_groups_named"), total("num_groups")),
        "object_precision": ratio(total("num_correct"), total("num_colored")),
        "chair_i": ratio(total("num_mentioned") - total("num_present"), total("num_mentioned")),
        "chair_s": ratio(sum(r["num_mentioned"] > r["num_present"] for r in results), len(results)),
        **{f"{a}_accuracy": ratio(total(f"{a}_right"), total(f"{a}_claims")) for a in attributes},
        "attribute_accuracy": ratio(sum(total(f"{a}_right") for a in attributes), sum(total(f"{a}_claims") for a in attributes)),
        "attribute_claims": sum(total(f"{a}_claims") for a in attributes),
        "negated_mentions": total("num_negated"),
        "negation_errors": total("num_negation_errors"),
        "num_descriptions": len(results),
    }
