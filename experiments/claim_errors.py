"""Where a long-style model's place and relation claims go wrong, read from an evaluation's predictions.jsonl.

    python -m evaluation --model RUN --dataset scenes --scenes_style long --parts grounding --output EVAL
    python -m experiments.claim_errors EVAL/predictions.jsonl [MORE.jsonl ...] --output results/long_claim_errors.json

Each graded place claim (`evaluation.grounding.ground_places`) is counted by the group it is about (one object or
several) and by its form: "all" ("It is on the left.", "They are all up high."), "some" ("They are on the left and
on the right.") or "exactly" ("One is up high and two are down low."). A form meant for several objects said of
one object is a count error, not a misread place. Each relation claim is counted by what `scenes.relations` says
of that pair: a pair it relates otherwise, or one it leaves open, and why (`why_open`: a diagonal, the same rows
with overlapping columns, or a group standing in both rows). Each relation claim is also read against the
description's own earlier place claims (`relation_against_own_places`, the output's "against_own_places"): where
the text has said a row and a column of both groups before it, does the claimed relation follow from the places
the text said ("follows") or not ("contradicts"), split by right and wrong; "unplaced" where it has not. A wrong
relation that follows from the text's own places is a place error carried into a relation; one that contradicts
them is not read from the text.
Also: the share of the scene's groups named, for one object and for several.
"""

import argparse
import collections
import json
import logging

from evaluation.grounding import ground_places, named_group, parse_mentions
from processing.scenes import group_cells, relations

logger = logging.getLogger(__name__)


def why_open(a: dict, b: dict) -> str:
    """Why `scenes.relations` relates neither way two groups it leaves open."""
    rows_a, rows_b = group_cells(a)[0], group_cells(b)[0]
    if rows_a == rows_b:
        return "same rows, columns overlap"  # one group stands on both sides of the other, or they share a column
    if len(rows_a) == len(rows_b) == 1:
        return "diagonal"  # one up high, one down low, not in the same set of columns
    return "a group in both rows"


def relation_against_own_places(relation: dict, claims: list[dict], scene: dict) -> str:
    """ "follows", "contradicts" or "unplaced": `relation` (a claim of `ground_places`) against the rows and columns the
    same description's place `claims` said of its two groups before it. The rules (`scenes.relations`) read only each
    group's set of rows, set of columns and count, so the said sets stand for the group (with its true count)."""
    said = []
    for name in (relation["subject"], relation["object"]):
        group = named_group(*name, scene)  # "the ball" and "the red ball" are one group where only one ball is red
        before = [c for c in claims if c["axis"] in ("row", "column") and c["span"][0] < relation["span"][0]
                  and named_group(*c["subject"], scene) is group]
        rows = {c["value"] for c in before if c["axis"] == "row"}
        columns = {c["value"] for c in before if c["axis"] == "column"}
        if not rows or not columns:
            return "unplaced"
        said.append({"count": group["count"], "places": [f"{r} {c}" for r in rows for c in columns]})
    return "follows" if relation["value"] in relations(*said) else "contradicts"


def claim_errors(rows: list[dict]) -> dict:
    """The tables of this module's docstring for predictions.jsonl `rows` (each with "model" and "scene")."""
    places = collections.defaultdict(lambda: [0, 0])  # (axis, "one"/"several", form) -> [claims, right]
    related = collections.Counter()  # (claimed relation, what the rules say of the pair) -> claims
    named = collections.defaultdict(lambda: [0, 0])  # "one"/"several" -> [groups, named]
    own = collections.Counter()  # ("follows"/"contradicts"/"unplaced", "right"/"wrong") -> relation claims
    for row in rows:
        text, scene = row["model"], row["scene"]
        claims = ground_places(text, scene)
        for claim in claims:
            group = named_group(*claim["subject"], scene)
            if claim["axis"] == "relation":
                other = named_group(*claim["object"], scene)
                truth = sorted(relations(group, other)) or [f"none ({why_open(group, other)})"]
                related[claim["value"], " / ".join(truth)] += 1
                own[relation_against_own_places(claim, claims, scene), "right" if claim["right"] else "wrong"] += 1
                continue
            key = (claim["axis"], "several" if group["count"] > 1 else "one", claim["quantifier"])
            places[key][0] += 1
            places[key][1] += claim["right"]
        said = {(m["kind"], m["color"]) for m in parse_mentions(text)[0]}
        for group in scene["objects"]:
            size = "several" if group["count"] > 1 else "one"
            named[size][0] += 1
            named[size][1] += (group["kind"], group["color"]) in said
    return {
        "places": [{"axis": axis, "group": size, "form": form, "claims": n, "right": r, "accuracy": r / n}
                   for (axis, size, form), (n, r) in sorted(places.items())],
        "relations": [{"claimed": claimed, "rules_say": truth, "claims": n, "right": claimed in truth.split(" / ")}
                      for (claimed, truth), n in related.most_common()],
        "against_own_places": {reading: {verdict: own[reading, verdict] for verdict in ("right", "wrong")}
                               for reading in ("follows", "contradicts", "unplaced")},
        "groups_named": {size: {"groups": n, "named": k, "share": k / n} for size, (n, k) in sorted(named.items())},
        "descriptions": len(rows),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("predictions", nargs="+", help="predictions.jsonl files of python -m evaluation on scenes")
    parser.add_argument("--output", required=True, help="the JSON written: one entry per predictions file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = {}
    for path in args.predictions:
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        if rows and "scene" not in rows[0]:
            raise ValueError(f"{path} has no scenes: claim_errors reads python -m evaluation --dataset scenes's predictions")
        out[path] = claim_errors(rows)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
