"""Grounding: what a caption of a built-in scene claims (`parse_mentions`, `parse_places`) graded against the
scene's exact ground truth (`ground_description`, `grounding_scores`): object recall and precision, CHAIR-i /
CHAIR-s (named objects whose kind is not in the picture), color, size and count accuracy, where each group
stands (row and column) and how two groups stand to each other ("left of", "above", "next to"), with the
chance level of each; and how much a description repeats itself (`repetition_scores`).

The scenes themselves (drawing, descriptions) are data: `processing/scenes.py`.
"""

import json
import re
from collections.abc import Sequence

from processing.scenes import (
    COLORS, COLUMN_PHRASES, GROUND_PHRASES, HORIZONTAL, KINDS, NUMBER_WORDS, PLURALS, RELATION_PHRASES, ROW_PHRASES,
    VERTICAL, relations,
)

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


_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+|[^a-z\d\s']")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def _token_spans(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The tokens of `_tokens` with their (start, end) character offsets in `text`."""
    found = list(_TOKEN.finditer(text.lower().replace("\u2019", "'")))  # same length as `text`
    return [m.group() for m in found], [m.span() for m in found]


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
    records = _mention_records(_tokens(text))
    merged: dict[tuple, dict] = {}
    negated: dict[tuple, dict] = {}
    for r in records:
        r = {k: v for k, v in r.items() if k != "index"}
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


def group_references(text: str) -> list[dict]:
    """Every word of `text` that refers to a group, in order: the kind noun of each mention that is not negated
    ("box" in "a small white box") and each sentence-initial "It"/"They" that refers to the last one, as
    `parse_mentions` reads them; each {"kind", "color", "span": (start, end) characters}. For losses that teach a
    model what the words it writes refer to (`training.objectives.MentionPlacesObjective`)."""
    tokens, spans = _token_spans(text)
    records = {r["index"]: r for r in _mention_records(tokens)}
    found, last = [], None
    for i, token in enumerate(tokens):
        if i in records:
            last = None if records[i]["negated"] else records[i]
        elif not (token in ("it", "they") and (i == 0 or tokens[i - 1] in (".", "!", "?"))):
            continue
        if last is not None:
            found.append({"kind": last["kind"], "color": last["color"], "span": spans[i]})
    return found


def _mention_records(tokens: list[str]) -> list[dict]:
    """Every kind noun of `tokens` in order, as `parse_mentions` reads it (kind, color, size, number, count,
    negated), with its token index; before any merging."""
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
        found = {"kind": kind, "color": None, "size": None, "number": None, "negated": negated_clause[i], "index": i}
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
    return records


def _phrase_table() -> dict[tuple[str, ...], tuple[str, str]]:
    """Token sequence -> (axis, value) for every place and relation phrase the scenes say (their own
    tables in processing/scenes.py), plus a few synonyms a model may write."""
    table = {}
    for row, phrases in ROW_PHRASES.items():
        for phrase in phrases:
            table[tuple(phrase.split())] = ("row", row)
    for phrase in GROUND_PHRASES.values():
        table[tuple(phrase.split())] = ("row", "bottom")
    for column, phrase in COLUMN_PHRASES.items():
        table[tuple(phrase.split())] = ("column", column)
        table[("at", *phrase.split()[1:])] = ("column", column)  # "at the left"
    for relation, phrases in RELATION_PHRASES.items():
        for phrase in phrases:
            table[tuple(phrase.split())] = ("relation", relation)
    table |= {("in", "the", "sky"): ("row", "top"), ("on", "the", "sand"): ("row", "bottom"),
              ("beside",): ("relation", "next to"), ("on", "the", "left", "of"): ("relation", "left of"),
              ("on", "the", "right", "of"): ("relation", "right of")}
    return dict(sorted(table.items(), key=lambda item: -len(item[0])))  # longest first: "on the left of"


_PHRASES = _phrase_table()
AXES = {"row": VERTICAL, "column": HORIZONTAL, "relation": tuple(RELATION_PHRASES)}
_DETERMINERS = {"the", "a", "an", "this", "that", "these", "those"}
_BE = ("is", "are")


def _sentences(tokens: list[str]) -> list[tuple[int, int]]:
    """(start, end) token ranges of the sentences: a ".", "!" or "?" ends one."""
    out, start = [], 0
    for i, t in enumerate(tokens):
        if t in (".", "!", "?"):
            if i > start:
                out.append((start, i))
            start = i + 1
    return out + ([(start, len(tokens))] if start < len(tokens) else [])


def _noun_at(tokens: list[str], k: int, end: int) -> int | None:
    """The index of the kind noun of a noun phrase starting at `k` ("the big red ball"), else None."""
    while k < end and (tokens[k] in _DETERMINERS or tokens[k] in _MODIFIERS or tokens[k].isdigit()):
        k += 1
    return k if k < end and tokens[k] in _KIND_FORMS else None


def _phrases(tokens: list[str], k: int, end: int) -> tuple[list[tuple], int]:
    """Place and relation phrases after a verb, joined by "," or "and": [(axis, value, first token,
    last token + 1, index of the related noun or None)], and where they stop. Intensifiers and size or
    color words between them are skipped ("They are all down low", "It is big and on the left")."""
    found = []
    while k < end:
        t = tokens[k]
        if t in (",", "and") or t in _INTENSIFIERS or t in _SIZE_FORMS or t in _COLOR_FORMS:
            if t == "and" and k + 1 < end and _number(tokens[k + 1]) is not None:
                break  # "... and two are down low": the next clause
            k += 1
            continue
        match = next((words for words in _PHRASES if tuple(tokens[k:k + len(words)]) == words), None)
        if match is None:
            break
        axis, value = _PHRASES[match]
        stop, noun = k + len(match), None
        if axis == "relation":
            noun = _noun_at(tokens, stop, end)
            if noun is None:
                break  # "next to it": nothing to check it against
            stop = noun + 1
        found.append((axis, value, k, stop, noun))
        k = stop
    return found, k


def parse_places(text: str) -> list[dict]:
    """Every place and relation claim of a description, each a dict with subject (kind, color) and axis
    ("row": top/bottom, "column": left/middle/right, "relation": left of/right of/above/below/next to),
    value, quantifier, number, object (kind, color) for relations, and span (character offsets of the
    phrase, and of the related noun phrase for a relation).

    A claim sentence is a subject, "is"/"are" and a list of phrases joined by "," or "and":
    "The red ball is up high on the left.", "They are on the left and on the right.", "It is next to the
    blue box.", or a split of a group by numbers after a mention: "One is up high and two are down low."
    The subject is a noun phrase ending in a kind ("the red balls"), or "It"/"They" at the start of a
    sentence (the last mention before it), or a number clause (the last mention whose count the numbers
    add up to, else the last mention). Sentences about anything else ("The moon is up in the sky.",
    "There is snow on the ground.") and negated ones ("It is not on the left") claim nothing.

    Quantifier: with a number, "exactly" that many members stand there; without one, a single phrase
    of an axis says "all" the group stands there, and several phrases of one axis ("on the left and on
    the right") say each holds "some" of it. Place words: `ROW_PHRASES`, `GROUND_PHRASES` (bottom) and
    `COLUMN_PHRASES` of processing/scenes.py, plus "in the sky", "on the sand", "at the left"; relation
    words: `RELATION_PHRASES` plus "beside" and "on the left of".
    """
    tokens, spans = _token_spans(text)
    records = _mention_records(tokens)
    at = {r["index"]: r for r in records}
    claims = []
    for start, end in _sentences(tokens):
        before = [r for r in records if r["index"] < start and not r["negated"]]
        k, subject = start, None
        if tokens[k] in ("it", "they"):
            subject, k = (before[-1] if before else None), k + 1
        elif _number(tokens[k]) is None or tokens[k + 1:k + 2] not in (["is"], ["are"]):
            noun = _noun_at(tokens, k, end)
            if noun is None or at[noun]["negated"]:
                continue
            subject, k = at[noun], noun + 1
        clauses = []  # (number or None, phrases)
        while k < end:
            number = _number(tokens[k]) if k + 1 < end and tokens[k + 1] in _BE else None
            k += number is not None
            if k + 1 >= end or tokens[k] not in _BE or tokens[k + 1] == "not":
                break
            phrases, k = _phrases(tokens, k + 1, end)
            clauses.append((number, phrases))
            if not (k + 1 < end and tokens[k] == "and" and _number(tokens[k + 1]) is not None):
                break
            k += 1
        if subject is None and clauses:  # "One is up high and two are down low."
            total = sum(n for n, _ in clauses if n is not None)
            fits = [r for r in before if r["count"] == total or (r["count"] == MANY and total > 1)]
            subject = fits[-1] if fits else (before[-1] if before else None)
        if subject is None:
            continue
        for number, phrases in clauses:
            for axis, value, first, stop, noun in phrases:
                several = sum(a == axis for a, *_ in phrases) > 1
                quantifier = "exactly" if number is not None else "some" if several else "all"
                claims.append({
                    "subject": (subject["kind"], subject["color"]), "axis": axis, "value": value,
                    "quantifier": quantifier if axis != "relation" else "all", "number": number,
                    "object": (at[noun]["kind"], at[noun]["color"]) if noun is not None else None,
                    "span": (spans[first][0], spans[stop - 1][1]),
                })
    return claims


def named_group(kind: str, color: str | None, scene: dict) -> dict | None:
    """The group a (kind, color) names: by both, or by kind alone when one group has that kind."""
    same_kind = [g for g in scene["objects"] if g["kind"] == kind]
    if color is not None:
        return next((g for g in same_kind if g["color"] == color), None)
    return same_kind[0] if len(same_kind) == 1 else None


def _holds(claim: dict, value: str, group: dict, other: dict | None) -> bool:
    """Whether `claim`, with its value replaced by `value`, is true of `group` (and `other`)."""
    if claim["axis"] == "relation":
        return value in relations(group, other)
    where = [p.split()[0 if claim["axis"] == "row" else 1] for p in group["places"]]
    if claim["quantifier"] == "exactly":
        return where.count(value) == claim["number"]
    return value in where if claim["quantifier"] == "some" else all(w == value for w in where)


def ground_places(text: str, scene: dict) -> list[dict]:
    """The claims of `parse_places` that name groups of `scene` (by kind and color, or by kind when one
    group has it; a relation needs two different groups), each with "right" and "right_if": for every
    value of its axis, whether the claim would be right had it named that value (for chance levels)."""
    graded = []
    for claim in parse_places(text):
        group = named_group(*claim["subject"], scene)
        other = named_group(*claim["object"], scene) if claim["object"] else None
        if group is None or (claim["axis"] == "relation" and (other is None or other is group)):
            continue
        right_if = {v: _holds(claim, v, group, other) for v in AXES[claim["axis"]]}
        graded.append({**claim, "right": right_if[claim["value"]], "right_if": right_if})
    return graded


def claim_marks(text: str, scene: dict) -> list[tuple[int, int, bool]]:
    """(start, end, right) character spans of the graded place and relation claims of `text`, for pictures."""
    return [(*c["span"], c["right"]) for c in ground_places(text, scene)]


def repetition_scores(texts: Sequence[str]) -> dict:
    """How much descriptions repeat themselves. A sentence ends at ".", "!" or "?" (or the text's end) and
    is compared lowercased, by its words alone. repeat_description_share: share of texts with a sentence
    that occurs twice or more in it; repeat_sentence_share: share of all sentences that repeat an earlier
    sentence of their own text (the first occurrence is not a repeat)."""
    described = repeats = sentences = 0
    for text in texts:
        said = [" ".join(re.findall(r"[a-z\d']+", s.lower())) for s in re.split(r"[.!?]+", text)]
        said = [s for s in said if s]
        extra = len(said) - len(set(said))
        described += extra > 0
        repeats, sentences = repeats + extra, sentences + len(said)
    return {"repeat_description_share": described / len(texts) if texts else 0.0,
            "repeat_sentence_share": repeats / sentences if sentences else 0.0}


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
    places = ground_places(text, scene)
    return {
        "mentions": mentions,
        "places": places,
        **{f"{axis}_claims": sum(c["axis"] == axis for c in places) for axis in AXES},
        **{f"{axis}_right": sum(c["axis"] == axis and c["right"] for c in places) for axis in AXES},
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
    negated_mentions: objects said not to be there; negation_errors: those that are there;
    place_accuracy: share of right place claims (`parse_places`: rows and columns) about groups of the
    scene, place_row_accuracy and place_column_accuracy per axis, place_claims and
    place_claims_per_description how many; relation_accuracy, relation_claims,
    relation_claims_per_description the same for relations between two groups (`relations` in
    processing/scenes.py says when each holds); place_chance, place_row_chance, place_column_chance
    and relation_chance: the accuracy of the same claims had each named the one value of its axis that
    is right most often over these scenes (always "top", always "left of", ...): what a model that
    looks at nothing but the most common place scores.
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
    claims = {axis: [c for r in results for c in r["places"] if c["axis"] == axis] for axis in AXES}
    # chance: the claims right had each named the value of its axis that makes the most of them right
    best = {axis: max((sum(c["right_if"][v] for c in claims[axis]) for v in AXES[axis]), default=0) for axis in AXES}
    n = {axis: len(claims[axis]) for axis in AXES}
    place_right = total("row_right") + total("column_right")
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
        "place_accuracy": ratio(place_right, n["row"] + n["column"]),
        "place_row_accuracy": ratio(total("row_right"), n["row"]),
        "place_column_accuracy": ratio(total("column_right"), n["column"]),
        "place_claims": n["row"] + n["column"],
        "place_claims_per_description": ratio(n["row"] + n["column"], len(results)),
        "place_chance": ratio(best["row"] + best["column"], n["row"] + n["column"]),
        "place_row_chance": ratio(best["row"], n["row"]),
        "place_column_chance": ratio(best["column"], n["column"]),
        "relation_accuracy": ratio(total("relation_right"), n["relation"]),
        "relation_claims": n["relation"],
        "relation_claims_per_description": ratio(n["relation"], len(results)),
        "relation_chance": ratio(best["relation"], n["relation"]),
        "num_descriptions": len(results),
    }
