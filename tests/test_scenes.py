"""Synthetic scenes: deterministic, true descriptions of the right length, exact grounding."""

import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from processing.scenes import (
    BACKGROUNDS, COLORS, KINDS, MIN_COLOR_DISTANCE, PLACES, PLURALS, TRAIN_SEED, VALIDATION_SEED, WORD_RANGES,
    describe_scene, example_seed, ground_description, grounding_scores, make_example, render_scene,
    sample_scene, scene_from_row, scenes_dataset,
)

N = 500


def scenes(n=N, seed=0):
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_same_seed_gives_same_example_and_different_seeds_differ():
    a, b = make_example(123, "long"), make_example(123, "long")
    assert a["text"] == b["text"] and a["scene"] == b["scene"]
    assert a["image"].tobytes() == b["image"].tobytes()
    assert len({json.dumps(make_example(i)["scene"]) for i in range(20)}) > 15


def test_style_does_not_change_the_scene():
    assert make_example(5, "short")["scene"] == make_example(5, "long")["scene"]


def test_train_and_validation_seeds_never_overlap():
    train = {example_seed(TRAIN_SEED, i) for i in range(10_000)}
    validation = {example_seed(VALIDATION_SEED, i) for i in range(10_000)}
    assert len(train) == len(validation) == 10_000
    assert not train & validation


def test_scenes_follow_the_schema():
    for scene in scenes():
        assert json.loads(json.dumps(scene)) == scene
        assert scene["background"] in BACKGROUNDS
        groups = scene["objects"]
        places = [p for g in groups for p in g["places"]]
        assert 1 <= len(places) <= 4 and len(set(places)) == len(places) and set(places) <= set(PLACES)
        assert len({(g["kind"], g["color"]) for g in groups}) == len(groups)
        for g in groups:
            assert g["kind"] in KINDS and g["color"] in COLORS and g["size"] in ("big", "small")
            assert g["count"] == len(g["places"])


def test_object_colors_stand_out_from_what_is_behind_them():
    for scene in scenes():
        backdrop = BACKGROUNDS[scene["background"]]
        for g in scene["objects"]:
            for place in g["places"]:
                behind = [backdrop["sky"]] if place.startswith("top") else backdrop["ground"]
                assert min(math.dist(COLORS[g["color"]], b) for b in behind) >= MIN_COLOR_DISTANCE


@pytest.mark.parametrize("style", sorted(WORD_RANGES))
def test_word_counts_always_in_range(style):
    lo, hi = WORD_RANGES[style]
    rng = random.Random(1)
    counts = [len(describe_scene(s, style, rng).split()) for s in scenes()]
    assert lo <= min(counts) and max(counts) <= hi
    assert len(set(counts)) > 1  # lengths vary, not one template


@pytest.mark.parametrize("style", sorted(WORD_RANGES))
def test_every_description_grounds_perfectly(style):
    rng = random.Random(2)
    all_scenes = scenes()
    texts = [describe_scene(s, style, rng) for s in all_scenes]
    scores = grounding_scores(texts, all_scenes)
    assert scores == {"object_recall": 1.0, "object_precision": 1.0, "chair_i": 0.0, "chair_s": 0.0,
                      "num_descriptions": N}


def test_descriptions_vary_for_one_scene():
    scene = scenes(1)[0]
    assert len({describe_scene(scene, "long", random.Random(i)) for i in range(10)}) > 5


def test_absent_object_is_a_hallucination():
    scene = {"background": "grass", "objects": [{"kind": "ball", "color": "red", "size": "big", "count": 1,
                                                 "places": ["bottom left"]}]}
    good = describe_scene(scene, "short", random.Random(0))
    bad = good + " I see two blue cars."
    scores = grounding_scores([good, bad], [scene, json.dumps(scene)])
    assert scores["chair_i"] > 0 and scores["chair_s"] == 0.5
    assert scores["object_precision"] < 1.0 and scores["object_recall"] == 1.0


def test_wrong_color_lowers_precision_but_is_not_chair():
    scene = {"background": "snow", "objects": [{"kind": "fish", "color": "red", "size": "small", "count": 2,
                                                "places": ["top left", "top right"]}]}
    result = ground_description("I see two blue fish.", scene)
    assert result["num_present"] == 1 and result["num_correct"] == 0 and result["num_groups_named"] == 0
    assert grounding_scores(["I see two blue fish."], [scene])["chair_i"] == 0.0


def test_mention_parsing():
    scene = {"background": "beach", "objects": []}
    result = ground_description("I see two big red balls. The sky is blue. Boxes are fun. The fishes are pink.", scene)
    mentions = {(m["kind"], m["color"]): m["number"] for m in result["mentions"]}
    assert mentions == {("ball", "red"): 2, ("box", None): None, ("fish", "pink"): None}
    assert result["num_mentioned"] == 3 and result["num_present"] == 0 and result["num_colored"] == 2
    assert set(PLURALS) == set(KINDS)


def test_rendered_image_size_mode_and_differences():
    a, b = scenes(2)
    image = render_scene(a)
    assert isinstance(image, Image.Image) and image.size == (224, 224) and image.mode == "RGB"
    assert not np.array_equal(np.asarray(image), np.asarray(render_scene(b)))
    assert render_scene(a, image_size=96).size == (96, 96)


def test_object_colors_are_drawn():
    for scene in scenes(200):
        drawn = {rgb for _, rgb in render_scene(scene).getcolors(maxcolors=224 * 224)}
        for g in scene["objects"]:
            assert COLORS[g["color"]] in drawn, (g, scene["background"])
        if scene["background"] == "night":
            assert (250, 240, 180) in drawn  # "I see the moon." must stay true


def test_big_objects_are_clearly_bigger():
    def red_pixels(size):
        ball = {"kind": "ball", "color": "red", "size": size, "count": 1, "places": ["bottom middle"]}
        pixels = np.asarray(render_scene({"background": "snow", "objects": [ball]}))
        return int((pixels == COLORS["red"]).all(axis=-1).sum())

    assert red_pixels("big") > 2.5 * red_pixels("small") > 0


def test_dataset_columns_length_and_round_trip(tmp_path):
    ds = scenes_dataset(12, VALIDATION_SEED, style="long", cache_dir=str(tmp_path))
    assert ds.column_names == ["image", "text", "scene"] and len(ds) == 12
    row = ds[3]
    expected = make_example(example_seed(VALIDATION_SEED, 3), "long")
    assert row["text"] == expected["text"] and scene_from_row(row) == expected["scene"]
    assert row["image"].size == (224, 224)
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(expected["image"]))


def test_bad_style_raises():
    with pytest.raises(ValueError, match="long.*short"):
        describe_scene(scenes(1)[0], "medium", random.Random(0))
    with pytest.raises(ValueError, match="style"):
        scenes_dataset(2, style="medium")
    with pytest.raises(ValueError, match="max_objects"):
        sample_scene(random.Random(0), max_objects=0)
