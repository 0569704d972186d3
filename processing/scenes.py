"""Synthetic picture scenes with child-like descriptions and exact ground truth.

Why: COCO-style captions cannot tell us whether a tiny model *looked* at the image. Here every
picture is drawn from a small structured scene, so each description is true by construction
and any generated description can be graded exactly (`ground_description`, `grounding_scores`).

Scene schema (plain JSON-serialisable data, so it fits a `datasets` column)::

    {"background": "grass" | "beach" | "night" | "snow",
     "objects": [{"kind": "ball", "color": "red", "size": "big", "count": 2,
                  "places": ["top left", "bottom right"]}, ...]}

Each entry of "objects" is a *group* of `count` identical objects (same kind, color and size),
one per place. A place is "<vertical> <horizontal>" from a 3x2 grid of cells (`PLACES`); each
cell holds at most one object, so objects never overlap. Top cells lie wholly on the sky and
bottom cells wholly on the ground, and a color is only used where it stands out from what is
behind it. No two groups share both kind and color, so a "red ball" names exactly one group.
A scene holds 1 to `max_objects` objects (default 4, at most 6).

Datasets (`scenes_dataset`) have columns image, text and scene (the dict as JSON, read it back
with `scene_from_row`). Example i of a split is drawn from `example_seed(split_seed, i)`, a
bijection, so the `TRAIN_SEED` and `VALIDATION_SEED` splits never share an example seed.

Descriptions come in two styles like the paper's ShortDesc/LongDesc: "short" (20-25 words) and
"long" (60-70 words), words being whitespace-separated tokens. Every sentence is a fact about the
picture or a feeling ("I like it!"); facts are phrased several ways so a model must look at the
image. Places name a group's row ("up high", "down low", "on the snow") and column ("on the left",
"in the middle", "on the right"); from `DESCRIPTION_VERSION` 2 the long style also relates two
groups ("The red ball is left of the blue box.") where `relations` says that is unambiguous.
`version=1` rebuilds the texts made before that, seed for seed (the short style is the same in
both). The night sky has a moon but no star dots because "star" is an object kind, and the day
sky has no sun because a yellow disc would look like a yellow ball.
"""

import hashlib
import io
import json
import math
import random
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw

from processing.styles import WORD_RANGES  # the paper's ShortDesc / LongDesc lengths

KINDS = ("ball", "box", "star", "tree", "house", "flower", "fish", "car", "heart")
PLURALS = {"ball": "balls", "box": "boxes", "star": "stars", "tree": "trees", "house": "houses",
           "flower": "flowers", "fish": "fish", "car": "cars", "heart": "hearts"}
COLORS = {"red": (220, 30, 30), "blue": (30, 70, 220), "green": (40, 160, 40), "yellow": (255, 225, 0),
          "orange": (255, 135, 0), "purple": (140, 50, 190), "pink": (255, 120, 200),
          "white": (255, 255, 255), "black": (20, 20, 20), "brown": (130, 75, 25)}
SIZES = {"big": 0.30, "small": 0.16}  # object width as a share of the image side: 67 vs 36 px at 224
SIZE_WORDS = {"big": ("big",), "small": ("small", "little")}
BACKGROUNDS = {  # fill colors behind the top and bottom rows; the beach ground is sea then sand
    "grass": {"sky": (125, 195, 250), "ground": [(90, 200, 90)]},
    "beach": {"sky": (125, 195, 250), "ground": [(40, 120, 200), (240, 210, 130)]},
    "night": {"sky": (20, 30, 90), "ground": [(30, 65, 45)]},
    "snow": {"sky": (195, 220, 240), "ground": [(245, 248, 252)]},
}
VERTICAL = ("top", "bottom")
HORIZONTAL = ("left", "middle", "right")
PLACES = tuple(f"{v} {h}" for v in VERTICAL for h in HORIZONTAL)
TRAIN_SEED, VALIDATION_SEED = 0, 1
MIN_COLOR_DISTANCE = 110.0  # RGB distance below which an object would blend into its backdrop
_SKY_TOP = 0.12  # the band above this share of the height stays empty (it holds the moon)


def _allowed_colors(background: str, row: str) -> set[str]:
    backdrop = BACKGROUNDS[background]
    behind = [backdrop["sky"]] if row == "top" else backdrop["ground"]
    return {c for c, rgb in COLORS.items() if min(math.dist(rgb, b) for b in behind) >= MIN_COLOR_DISTANCE}


_ALLOWED_COLORS = {(b, row): _allowed_colors(b, row) for b in BACKGROUNDS for row in VERTICAL}


def sample_scene(rng: random.Random, max_objects: int = 4) -> dict:
    """A random scene of 1..`max_objects` objects in distinct cells."""
    if not 1 <= max_objects <= len(PLACES):
        raise ValueError(f"max_objects must be in 1..{len(PLACES)}, got {max_objects}")
    background = rng.choice(list(BACKGROUNDS))
    total = rng.randint(1, max_objects)
    cells = rng.sample(PLACES, total)
    groups: list[dict] = []
    while cells:
        count = 1 if len(cells) == 1 or rng.random() < 0.6 else rng.randint(2, len(cells))
        places, cells = sorted(cells[:count], key=PLACES.index), cells[count:]
        rows = {p.split()[0] for p in places}
        kind = rng.choice(KINDS)
        taken = {g["color"] for g in groups if g["kind"] == kind}
        colors = [c for c in COLORS if c not in taken and all(c in _ALLOWED_COLORS[background, r] for r in rows)]
        groups.append({"kind": kind, "color": rng.choice(colors), "size": rng.choice(list(SIZES)),
                       "count": count, "places": places})
    return {"background": background, "objects": groups}


# ----------------------------------------------------------------------------- rendering

def _draw_object(draw: ImageDraw.ImageDraw, kind: str, fill: tuple, cx: float, cy: float, r: float) -> None:
    """Draw one object of half-width `r` centred at (cx, cy); details use a darker shade of `fill`."""
    dark = tuple(int(c * 0.55) for c in fill)
    w = max(1, round(r / 15))
    if kind == "ball":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=dark, width=w)
    elif kind == "box":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill, outline=dark, width=w)
    elif kind == "star":
        pts = [(cx + rr * math.sin(k * math.pi / 5), cy - rr * math.cos(k * math.pi / 5))
               for k in range(10) for rr in [r if k % 2 == 0 else 0.42 * r]]
        draw.polygon(pts, fill=fill, outline=dark)
    elif kind == "tree":
        draw.rectangle((cx - 0.14 * r, cy + 0.2 * r, cx + 0.14 * r, cy + r), fill=dark)
        draw.ellipse((cx - 0.8 * r, cy - r, cx + 0.8 * r, cy + 0.45 * r), fill=fill, outline=dark, width=w)
    elif kind == "house":
        draw.polygon([(cx - r, cy - 0.1 * r), (cx, cy - r), (cx + r, cy - 0.1 * r)], fill=dark)
        draw.rectangle((cx - 0.75 * r, cy - 0.1 * r, cx + 0.75 * r, cy + r), fill=fill, outline=dark, width=w)
        draw.rectangle((cx - 0.2 * r, cy + 0.4 * r, cx + 0.2 * r, cy + r), fill=dark)
    elif kind == "flower":
        for k in range(5):
            px, py = cx + 0.58 * r * math.sin(k * 2 * math.pi / 5), cy - 0.58 * r * math.cos(k * 2 * math.pi / 5)
            draw.ellipse((px - 0.42 * r, py - 0.42 * r, px + 0.42 * r, py + 0.42 * r), fill=fill, outline=dark)
        middle = COLORS["brown"] if fill in (COLORS["yellow"], COLORS["orange"]) else COLORS["yellow"]
        draw.ellipse((cx - 0.3 * r, cy - 0.3 * r, cx + 0.3 * r, cy + 0.3 * r), fill=middle)
    elif kind == "fish":
        draw.polygon([(cx + 0.3 * r, cy), (cx + r, cy - 0.55 * r), (cx + r, cy + 0.55 * r)], fill=fill, outline=dark)
        draw.ellipse((cx - r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r), fill=fill, outline=dark, width=w)
        draw.ellipse((cx - 0.65 * r, cy - 0.2 * r, cx - 0.45 * r, cy), fill=dark)
    elif kind == "car":
        draw.polygon([(cx - 0.55 * r, cy - 0.15 * r), (cx - 0.35 * r, cy - 0.65 * r),
                      (cx + 0.4 * r, cy - 0.65 * r), (cx + 0.6 * r, cy - 0.15 * r)], fill=fill, outline=dark)
        draw.rectangle((cx - r, cy - 0.15 * r, cx + r, cy + 0.45 * r), fill=fill, outline=dark, width=w)
        for wx in (cx - 0.55 * r, cx + 0.55 * r):
            draw.ellipse((wx - 0.25 * r, cy + 0.25 * r, wx + 0.25 * r, cy + 0.75 * r), fill=(60, 60, 60))
    elif kind == "heart":
        ts = [2 * math.pi * k / 40 for k in range(40)]
        draw.polygon([(cx + r * (math.sin(t) ** 3), cy - r / 16 * (13 * math.cos(t) - 5 * math.cos(2 * t)
                       - 2 * math.cos(3 * t) - math.cos(4 * t)) - 0.1 * r) for t in ts], fill=fill, outline=dark)
    else:
        raise ValueError(f"unknown object kind {kind!r}; expected one of {KINDS}")


def _object_center(place: str, size: str, key: str, s: int) -> tuple[float, float, float]:
    """Centre and half-width of an object; a jitter hashed from `key` keeps it inside its cell."""
    v, h = place.split()
    r = SIZES[size] * s / 2
    cell_w, margin = s / 3, 0.02 * s
    top, bottom = (_SKY_TOP * s, s / 2) if v == "top" else (s / 2, s)
    jx, jy = (((zlib.crc32(f"{key}|{axis}".encode()) % 2001) - 1000) / 1000 for axis in "xy")
    dx, dy = max(0.0, cell_w / 2 - r - margin), max(0.0, (bottom - top) / 2 - r - margin)
    return (HORIZONTAL.index(h) + 0.5) * cell_w + jx * dx, (top + bottom) / 2 + jy * dy, r


def render_scene(scene: dict, image_size: int = 224) -> Image.Image:
    """Draw `scene` as an RGB image; the same scene always gives the same pixels."""
    s, backdrop = image_size, BACKGROUNDS[scene["background"]]
    image = Image.new("RGB", (s, s), backdrop["sky"])
    draw = ImageDraw.Draw(image)
    bands = backdrop["ground"]
    for i, rgb in enumerate(bands):  # ground bands: the sea takes the first fifth of the beach
        y0 = s / 2 + (0 if i == 0 else s / 10)
        draw.rectangle((0, y0, s, s), fill=rgb)
    if scene["background"] == "night":  # a crescent moon inside the empty top band
        m, x = 0.045 * s, 0.5 * s
        draw.ellipse((x - m, 0.06 * s - m, x + m, 0.06 * s + m), fill=(250, 240, 180))
        draw.ellipse((x - 0.4 * m, 0.06 * s - 1.1 * m, x + 1.6 * m, 0.06 * s + 0.9 * m), fill=backdrop["sky"])
    for g in scene["objects"]:
        for place in g["places"]:
            cx, cy, r = _object_center(place, g["size"], f"{g['kind']}|{g['color']}|{place}", s)
            _draw_object(draw, g["kind"], COLORS[g["color"]], cx, cy, r)
    return image


def token_labels(scene: dict, grid: int, min_cover: float = 0.3) -> tuple[list[int], list[int]]:
    """What each cell of a `grid` x `grid` map over the picture shows, row by row: two lists of
    ids, 1 + the index in `KINDS` and 1 + the index in `COLORS` of the object drawn over at least
    `min_cover` of the cell (the most-covered one where two are), 0 for background. Every object
    keeps at least its most-covered cell. The map of a model's patch (or pooled) tokens, for a
    per-token training signal."""
    kinds, colors, _ = token_map(scene, grid, min_cover)
    return kinds, colors


def token_map(scene: dict, grid: int, min_cover: float = 0.3) -> tuple[list[int], list[int], list[int]]:
    """`token_labels`' kinds and colours, and a third list: where the object of each map cell stands in the
    scene, 1 + its index in `PLACES` (0 for background), for a per-token signal of where things are."""
    side = 8 * grid  # masks drawn at 8x8 pixels a cell
    kinds, colors, places, cover = [0] * grid * grid, [0] * grid * grid, [0] * grid * grid, np.zeros(grid * grid)
    for g in scene["objects"]:
        k, c = KINDS.index(g["kind"]) + 1, list(COLORS).index(g["color"]) + 1
        for place in g["places"]:
            mask = Image.new("RGB", (side, side))
            _draw_object(ImageDraw.Draw(mask), g["kind"], (255, 255, 255),
                         *_object_center(place, g["size"], f"{g['kind']}|{g['color']}|{place}", side))
            share = (np.asarray(mask).max(-1) > 0).reshape(grid, 8, grid, 8).mean(axis=(1, 3)).ravel()
            for t in set(np.flatnonzero(share >= min_cover)) | {int(share.argmax())}:
                if share[t] > cover[t]:
                    kinds[t], colors[t], places[t], cover[t] = k, c, PLACES.index(place) + 1, share[t]
    return kinds, colors, places


# ----------------------------------------------------------------------------- descriptions

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_SCENERY = {
    "grass": ["The sky is blue.", "The grass is green.", "I see green grass.", "It is a sunny day.",
              "It is day time.", "I see the blue sky.", "It is nice outside."],
    "beach": ["We are at the beach.", "I see the sea.", "The sea is blue.", "The sky is blue.",
              "I see the sand.", "The sand is yellow.", "It is a sunny day."],
    "night": ["It is night time.", "The sky is dark.", "I see the moon.", "The moon is up in the sky.",
              "It is dark outside.", "The moon is yellow.", "It is bed time."],
    "snow": ["I see snow.", "The snow is white.", "It is cold.", "It is a snowy day.",
             "There is snow on the ground.", "It is winter time.", "Brr, it is so cold!"],
}
_GROUND = {"grass": "on the grass", "beach": "on the beach", "night": "on the ground", "snow": "on the snow"}
_FEELINGS = ["I like it!", "I am happy.", "It is so pretty!", "I like this picture.", "I love it!",
             "This is fun!", "I like all the colors.", "So pretty!", "So fun!", "Look at that!"]
_ONE_WORD = ["Wow!", "Yay!", "Look!", "Ooh!", "Yes!", "Hooray!"]
# Place phrases, read back by the grader (evaluation/grounding.py). A bottom row may also be said
# as the ground of the background ("on the snow").
COLUMN_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
ROW_PHRASES = {"top": ["up high", "at the top", "up in the sky"], "bottom": ["down low", "at the bottom"]}
GROUND_PHRASES = _GROUND
# Relations between two groups (`relations` says when each holds) and how the long style says them.
RELATION_PHRASES = {"left of": ["left of", "to the left of"], "right of": ["right of", "to the right of"],
                    "above": ["above"], "below": ["below", "under"], "next to": ["next to"]}
_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above", "next to": "next to"}


DESCRIPTION_VERSIONS = {1: "the first descriptions (no relation sentences)",
                        2: "the long style adds sentences that relate two groups (the short style is version 1's)",
                        3: "the long style relates every pair of groups the rules relate, before any optional detail, so a "
                           "pair it leaves unrelated is one the rules leave open (the short style is version 1's)",
                        4: "the long style says where every group stands before any other optional sentence, then relates "
                           "two groups (in version 3's order) only where it has said where both stand, so each relation can "
                           "be read from the text before it (the short style is version 1's)"}
DESCRIPTION_VERSION = 2  # what datasets are built with unless told otherwise: versions 3 and 4 trained worse (docs/experiments/scenes.md)


def _words(text: str) -> int:
    return len(text.split())


def _noun_phrase(g: dict, rng: random.Random, with_size: bool) -> str:
    """ "a big red ball", "an orange fish", "two little blue boxes"."""
    words = [rng.choice(SIZE_WORDS[g["size"]])] if with_size else []
    words += [g["color"], g["kind"] if g["count"] == 1 else PLURALS[g["kind"]]]
    if g["count"] > 1:
        return " ".join([NUMBER_WORDS[g["count"]], *words])
    article = "one" if rng.random() < 0.2 else "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _intro(g: dict, rng: random.Random, with_size: bool) -> str:
    """ "I see a red ball.", "There are two blue boxes.", "Look, a big green tree!"."""
    if rng.random() < 0.2:
        return f"Look, {_noun_phrase(g, rng, with_size)}!"
    opener = rng.choice(["I see", "I can see", "There are" if g["count"] > 1 else "There is"])
    return f"{opener} {_noun_phrase(g, rng, with_size)}."


def _details(g: dict, background: str, rng: random.Random, pronoun: bool, size_said: bool) -> list[str]:
    """True sentences about one group's size, place and how the child feels about it."""
    plural = g["count"] > 1
    be = "are" if plural else "is"
    ref = f"the {g['color']} {PLURALS[g['kind']] if plural else g['kind']}"

    def subject() -> str:  # a pronoun is only safe right after the group's own intro
        return ("They" if plural else "It") if pronoun and rng.random() < 0.6 else ref.capitalize()

    rows = [p.split()[0] for p in g["places"]]
    cols = sorted({p.split()[1] for p in g["places"]}, key=HORIZONTAL.index)
    vphrase = {v: rng.choice(ROW_PHRASES[v] + ([_GROUND[background]] if v == "bottom" else [])) for v in VERTICAL}
    out = []
    if not size_said:
        out.append(f"{subject()} {be} {rng.choice(['', 'so ', 'very '])}{rng.choice(SIZE_WORDS[g['size']])}.")
    if not plural and rng.random() < 0.5:
        out.append(f"{subject()} {be} {vphrase[rows[0]]} {COLUMN_PHRASES[cols[0]]}.")
    else:
        out.append(f"{subject()} {be} {_join([COLUMN_PHRASES[c] for c in cols])}.")
        if len(set(rows)) == 1:
            out.append(f"{subject()} {be} {'all ' if len(rows) > 2 else ''}{vphrase[rows[0]]}.")
        else:
            parts = [f"{NUMBER_WORDS[n]} {'is' if n == 1 else 'are'} {vphrase[v]}"
                     for v, n in ((v, rows.count(v)) for v in VERTICAL)]
            out.append(" and ".join(parts).capitalize() + ".")  # "One is up high and two are down low."
    out.append(rng.choice([f"I like {ref}.", f"{ref.capitalize()} {be} so pretty."]))
    return out


def group_cells(g: dict) -> tuple[set[str], set[int]]:
    """The rows ("top"/"bottom") and column numbers (0 = left) a group's members stand in."""
    return {p.split()[0] for p in g["places"]}, {HORIZONTAL.index(p.split()[1]) for p in g["places"]}


def relations(a: dict, b: dict) -> set[str]:
    """The relations that hold between group `a` and group `b`, as in "`a` is <relation> `b`".

    A group may stand in several cells, so each relation is defined to be true of every member at once,
    and none is claimed where the picture leaves it open:

    - "left of": `a` and `b` stand in the same rows (the same set of rows), and every member of `a` is in a
      column left of every member of `b` (the rightmost column of `a` < the leftmost column of `b`);
      "right of" is the converse. Two objects on a diagonal (top left, bottom right), or a group that
      stands on both sides of the other, are neither.
    - "above": every member of `a` is in the top row, every member of `b` in the bottom row, and they
      stand in the same set of columns (each of `a` right over one of `b`); "below" is the converse.
    - "next to": `a` and `b` are single objects in the same row in neighbouring columns (groups of more
      than one are never "next to": which member would it be?).
    """
    rows_a, cols_a = group_cells(a)
    rows_b, cols_b = group_cells(b)
    found = set()
    if rows_a == rows_b:
        if max(cols_a) < min(cols_b):
            found.add("left of")
        if max(cols_b) < min(cols_a):
            found.add("right of")
    if cols_a == cols_b and rows_a == {"top"} and rows_b == {"bottom"}:
        found.add("above")
    if cols_a == cols_b and rows_a == {"bottom"} and rows_b == {"top"}:
        found.add("below")
    if a["count"] == b["count"] == 1 and rows_a == rows_b and abs(min(cols_a) - min(cols_b)) == 1:
        found.add("next to")
    return found


def _the(g: dict) -> str:
    """ "the red ball", "the blue boxes": kind and color name exactly one group."""
    return f"the {g['color']} {g['kind'] if g['count'] == 1 else PLURALS[g['kind']]}"


def _relation_sentences(groups: Sequence[dict], rng: random.Random) -> list[tuple[int, int, str]]:
    """At most one true sentence per pair of groups that `relations` relates, with the pair's indices in
    `groups`: (0, 2, "The red ball is left of the blue box."), which group comes first, the relation and its
    wording drawn at random."""
    out = []
    for i, a in enumerate(groups):
        for k, b in enumerate(groups[i + 1:], start=i + 1):
            options = [(a, r, b) for r in sorted(relations(a, b))] + [(b, _CONVERSE[r], a) for r in sorted(relations(a, b))]
            if options:
                x, r, y = rng.choice(options)
                out.append((i, k, f"{_the(x).capitalize()} {'are' if x['count'] > 1 else 'is'} "
                                  f"{rng.choice(RELATION_PHRASES[r])} {_the(y)}."))
    return out


def describe_scene(scene: dict, style: str, rng: random.Random, version: int = DESCRIPTION_VERSION) -> str:
    """A child-like description of `scene` whose word count lies in `WORD_RANGES[style]`.

    Object sentences come first and are mandatory (every group is named with color and kind);
    optional true sentences (sizes, places, relations between groups in the long style from
    `version` 2, scenery, feelings) are then added greedily up to a random target length, with
    one-word exclamations last so the count can always be hit. From `version` 3 the long style
    tries every relation sentence before any other optional sentence, so each pair `relations`
    relates is stated. `version` 4 tries every group's place sentences first, then the relations (as
    version 3), and says a relation only where the place sentences of both its groups were said, so the
    text has said where both stand. Relation sentences follow every group's own sentences, so both
    groups they name have been introduced.
    """
    if style not in WORD_RANGES:
        raise ValueError(f"style must be one of {sorted(WORD_RANGES)}, got {style!r}")
    if version not in DESCRIPTION_VERSIONS:
        raise ValueError(f"version must be one of {sorted(DESCRIPTION_VERSIONS)} ({DESCRIPTION_VERSIONS}), got {version!r}")
    lo, hi = WORD_RANGES[style]
    background, groups = scene["background"], list(scene["objects"])
    rng.shuffle(groups)
    with_size = [rng.random() < 0.5 for _ in groups]
    intros = [_intro(g, rng, s) for g, s in zip(groups, with_size)]
    if style == "short" and (sum(map(_words, intros)) > hi - 3 or rng.random() < 0.5):
        # one list sentence: "I see a red ball, two blue boxes and a green tree."
        phrases = [_noun_phrase(g, rng, s) for g, s in zip(groups, with_size)]
        intros = [f"{rng.choice(['I see', 'I can see'])} {_join(phrases)}."]
        if _words(intros[0]) > hi - 3:  # only with more than 4 groups: drop the sizes
            with_size = [False] * len(groups)
            intros = [f"I see {_join([_noun_phrase(g, rng, False) for g in groups])}."]
    own_intros = len(intros) == len(groups)  # then each group's details follow its own intro
    details = [_details(g, background, rng, own_intros, s) for g, s in zip(groups, with_size)]
    scenery = rng.sample(_SCENERY[background], k=len(_SCENERY[background]))
    feelings = rng.sample(_FEELINGS, k=len(_FEELINGS))
    total_objects = sum(g["count"] for g in groups)
    count_sentence = [f"I see {NUMBER_WORDS[total_objects]} things."] if total_objects > 1 else []
    # candidates: (kind of sentence, (group, detail) index for details, text), in the order tried
    candidates = [("detail", (i, j), d) for i, ds in enumerate(details) for j, d in enumerate(ds)]
    relation_candidates = []
    if style == "long" and version >= 2:  # version 1 draws nothing here, so its texts stay as they were
        relation_candidates = [("relation", (i, k), t) for i, k, t in _relation_sentences(groups, rng)]
    others = [("scenery", None, t) for t in scenery] + [("feeling", None, t) for t in feelings]
    others += [("count", None, t) for t in count_sentence]
    if style == "long":
        if version >= 3:  # every relation first: the data's silence about a pair then means the rules leave it open
            rng.shuffle(candidates)
            candidates = relation_candidates + candidates
        else:  # version 2: relations drawn among the details, so some related pairs go unsaid
            candidates += relation_candidates
            rng.shuffle(candidates)
        rng.shuffle(others)
        candidates += others
    else:
        candidates += others
        rng.shuffle(candidates)
    candidates += [("feeling", None, t) for t in rng.sample(_ONE_WORD, k=len(_ONE_WORD))]
    # version 4 (on version 3's order): every group's place sentences (those between the optional size sentence
    # and the closing "I like ..." one) are tried first, then the relations, and a relation is said only if the
    # place sentences of both its groups were, so the text says where both stand before it relates them
    place_details = [{(g, j) for j in range(0 if sized else 1, len(ds) - 1)} for g, (ds, sized) in enumerate(zip(details, with_size))]
    said_details = set()
    if style == "long" and version >= 4:
        first = set().union(*place_details)
        candidates.sort(key=lambda c: not (c[0] == "detail" and c[1] in first))  # stable: each part keeps its order

    def placed(cand) -> bool:
        return version < 4 or cand[0] != "relation" or all(place_details[g] <= said_details for g in cand[1])

    total, target, chosen = sum(map(_words, intros)), rng.randint(lo, hi), []
    for cand in candidates:
        if total >= target:
            break
        if placed(cand) and total + _words(cand[2]) <= hi:
            chosen.append(cand)
            total += _words(cand[2])
            if cand[0] == "detail":
                said_details.add(cand[1])
    while total < lo:  # pools are large enough that this never runs; it guards the range promise
        chosen.append(("feeling", None, "Yay!"))
        total += 1
    picked = {c[1] for c in chosen if c[0] == "detail"}
    said = [[d for j, d in enumerate(ds) if (i, j) in picked] for i, ds in enumerate(details)]
    if own_intros:
        body = [s for intro, ds in zip(intros, said) for s in [intro, *ds]]
    else:
        body = intros + [d for ds in said for d in ds]
    body = [c[2] for c in chosen if c[0] == "count"] + body + [c[2] for c in chosen if c[0] == "relation"]
    scenery_said = [c[2] for c in chosen if c[0] == "scenery"]
    body = scenery_said + body if rng.random() < 0.5 else body + scenery_said
    return " ".join(body + [c[2] for c in chosen if c[0] == "feeling"])


# ----------------------------------------------------------------------------- examples and datasets

def example_seed(split_seed: int, index: int) -> int:
    """Seed of example `index` of a split: a bijection of (split_seed, index), so distinct
    splits (e.g. `TRAIN_SEED` and `VALIDATION_SEED`) never share an example seed."""
    if not 0 <= split_seed < 2**32 or index < 0:
        raise ValueError(f"need 0 <= split_seed < 2**32 and index >= 0, got {split_seed}, {index}")
    return index * 2**32 + split_seed


def make_example(seed_or_rng: int | random.Random, style: str = "short", image_size: int = 224,
                 version: int = DESCRIPTION_VERSION) -> dict:
    """{"image": PIL image, "text": description, "scene": scene dict} from one seed.

    The scene is sampled before the text, so the same seed gives the same picture in both styles
    and every `version`.
    """
    rng = seed_or_rng if isinstance(seed_or_rng, random.Random) else random.Random(seed_or_rng)
    scene = sample_scene(rng)
    text = describe_scene(scene, style, rng, version)
    return {"image": render_scene(scene, image_size), "text": text, "scene": scene}


def scene_texts(num_examples: int, seed: int = TRAIN_SEED, style: str = "short",
                version: int = DESCRIPTION_VERSION) -> list[str]:
    """The `text` column of `scenes_dataset(num_examples, seed, style, version=version)`, without drawing
    a picture (e.g. a model's training texts, to check its output for copies)."""
    texts = []
    for i in range(num_examples):
        rng = random.Random(example_seed(seed, i))
        texts.append(describe_scene(sample_scene(rng), style, rng, version))
    return texts


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # flat colors compress well even at level 1
    return buffer.getvalue()


def _rows(num_examples: int, seed: int, style: str, image_size: int, version: int = DESCRIPTION_VERSION) -> Iterator[dict]:
    for i in range(num_examples):
        ex = make_example(example_seed(seed, i), style, image_size, version)
        image = {"bytes": _png(ex["image"]), "path": None}
        yield {"image": image, "text": ex["text"], "scene": json.dumps(ex["scene"])}


SCENE_FEATURES = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "scene": datasets.Value("string")})


def scenes_dataset(num_examples: int, seed: int = TRAIN_SEED, style: str = "short", image_size: int = 224,
                   cache_dir: str | None = None, version: int = DESCRIPTION_VERSION) -> datasets.Dataset:
    """A `datasets.Dataset` of `num_examples` scenes; "scene" holds JSON (see `scene_from_row`).

    Example i depends only on (seed, i, style, image_size, version), so datasets built in different
    processes, or of different lengths, agree on their common rows; `version=1` rebuilds a long-style
    set made before relation sentences. `cache_dir` defaults to the datasets cache.
    """
    if style not in WORD_RANGES:
        raise ValueError(f"style must be one of {sorted(WORD_RANGES)}, got {style!r}")
    if version not in DESCRIPTION_VERSIONS:
        raise ValueError(f"version must be one of {sorted(DESCRIPTION_VERSIONS)} ({DESCRIPTION_VERSIONS}), got {version!r}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}")
    args = {"num_examples": num_examples, "seed": seed, "style": style, "image_size": image_size, "version": version}
    # datasets caches generated data under a hash of the generator, which for an importable function
    # is its name, not its code: hash this file too, so an edited generator never serves stale rows.
    fingerprint = hashlib.sha256(Path(__file__).read_bytes() + json.dumps(args).encode()).hexdigest()[:32]
    return datasets.Dataset.from_generator(_rows, features=SCENE_FEATURES, gen_kwargs=args,
                                           fingerprint=fingerprint, cache_dir=cache_dir)


def scene_from_row(row: dict) -> dict:
    """The scene dict of a `scenes_dataset` row (stored as JSON so it round-trips exactly)."""
    return json.loads(row["scene"])
