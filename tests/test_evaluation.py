"""Evaluation: caption metrics and ROUGE novelty on hand-computed cases, the judge against a scripted
OpenAI-compatible server, the `evaluate` modules offline, train.py's --eval_metrics, and
`python -m evaluation` end to end on a tiny model (report.json, report.md and samples.png agree)."""

import base64
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
from fake_openai_server import FakeOpenAIServer
from PIL import Image
from rouge_score import rouge_scorer
from test_train import QUIET, TINY_MODEL, write_coco, write_imagefolder

import train
from evaluation import caption_metrics
from evaluation.caption_metrics import CiderD, caption_scores, tokenize
from evaluation.cli import main as evaluate_main
from evaluation.grounding import ground_description, grounding_scores
from evaluation.judge import CRITERIA, PREFIX_WORDS, SCHEMA, JudgeError, JudgeSettings, judge, mean_ci95, split_prompt
from evaluation.novelty import RougeNovelty, distinct_n, novelty_scores
from evaluation.report import format_value, parse_markdown_metrics
from processing import scenes

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "evaluation" / "metrics"
GOOD = {c: 7 for c in CRITERIA}


def raw(scores: dict) -> str:
    """A fake-server action that answers `scores` as JSON."""
    return "raw:" + json.dumps(scores)


# --- caption metrics ----------------------------------------------------------------------------------


def test_bleu_and_rouge_l_by_hand():
    s = caption_scores(["a dog runs fast"], [["a dog runs"]], tokenizer="simple")
    # 1-gram precision 3/4, 2-gram 2/3, 3-gram 1/2, no 4-gram match; the candidate is longer: no brevity penalty.
    assert s["bleu1"] == pytest.approx(3 / 4, rel=1e-6)
    assert s["bleu2"] == pytest.approx(math.sqrt(3 / 4 * 2 / 3), rel=1e-6)
    assert s["bleu3"] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3), rel=1e-6)
    assert s["bleu4"] < 1e-3
    # ROUGE-L (coco-caption, beta 1.2): LCS 3, precision 3/4, recall 1.
    p, r, beta2 = 3 / 4, 1.0, 1.2**2
    assert s["rouge_l"] == pytest.approx((1 + beta2) * p * r / (r + beta2 * p))
    short = caption_scores(["a dog"], [["a dog runs", "a cat runs home"]], tokenizer="simple")
    assert short["bleu1"] == pytest.approx(math.exp(1 - 3 / 2), rel=1e-6)  # brevity penalty, closest reference length 3


def test_cider_d_by_hand():
    """Two images; CIDEr-D = 10 * mean over n=1..4 of the clipped, length-penalised tf-idf cosine, averaged over refs.

    Document frequencies over the references: a 2, cat 2, (a cat) 2, dog 1, (a dog) 1; with 2 images
    the idf log(2/df) is 0 for "a", "cat", "a cat" and log 2 for "dog", "a dog".
    Image 1 "a dog" vs "a dog": cosine 1 for 1- and 2-grams, 0 for 3-, 4-grams (none) -> mean 0.5;
    vs "a cat": 0. Average over the 2 references 0.25, x10 = 2.5. Image 2 "a cat": every weight is 0 -> 0.
    """
    s = caption_scores(["a dog", "a cat"], [["a dog", "a cat"], ["a cat", "a cat"]], tokenizer="simple")
    assert s["per_item"]["cider_d"] == pytest.approx([2.5, 0.0])
    assert s["cider_d"] == pytest.approx(1.25)


def test_cider_d_length_penalty_and_clipping():
    refs = [["a dog runs", "a dog runs"], ["a cat sits", "a cat sits"], ["the bird sings", "the bird sings"]]
    exact = caption_scores(["a dog runs", "a cat sits", "the bird sings"], refs, tokenizer="simple")["per_item"]["cider_d"]
    longer = caption_scores(["a dog runs dog runs", "a cat sits", "the bird sings"], refs, tokenizer="simple")["per_item"]["cider_d"]
    assert exact[0] == pytest.approx(10 * 3 / 4)  # cosine 1 for 1-, 2-, 3-grams, no 4-gram: 10 * 3/4
    assert 0 < longer[0] < exact[0]  # repeated n-grams are clipped and two extra words cost exp(-4/72)


def test_cider_d_reward_is_pycocoevalcaps_cider_d_with_fixed_document_frequencies():
    """`CiderD` (the self-critical reward) scores like pycocoevalcap's Cider on the corpus it was built from,
    and a caption's score does not depend on the other captions scored with it (Cider's does: its document
    frequencies come from the references of the batch)."""
    refs = [["A dog runs on the grass.", "a brown dog is running", "The dog plays outside"],
            ["Two children swim in a pool.", "kids in the water"],
            ["A man rides a red bike.", "a man on a bicycle", "A cyclist in red rides down the road."],
            ["A dog jumps into the water.", "a black dog swims"]]
    preds = ["a dog runs on the grass", "two kids swim in the water .", "A man in red rides a bike", "a dog runs"]
    reward = CiderD(refs)
    expected = caption_scores(preds, refs, tokenizer="simple")["per_item"]["cider_d"]
    assert reward(preds, refs) == pytest.approx(expected, rel=1e-9)
    assert min(expected) > 0 and len(set(expected)) == 4
    assert reward(preds[:1], refs[:1]) == pytest.approx(expected[:1], rel=1e-9)  # the batch does not matter
    assert caption_scores(preds[:1], refs[:1], tokenizer="simple")["cider_d"] != pytest.approx(expected[0], rel=1e-3)
    assert reward([""], refs[:1]) == [0.0]
    with pytest.raises(ValueError, match="one list per candidate"):
        reward(preds, refs[:2])


def test_ptb_tokenizer_needs_java_and_the_simple_one_agrees_with_it(monkeypatch):
    captions = {1: ["A dog's ball, isn't it?"], 2: ["Two men play three-on-three basketball ."],
                3: ["A girl in a pink t-shirt jumps into the water!"], 4: ["They're happy; the boys' team won."]}
    if shutil.which("java"):
        assert tokenize(captions, "ptb") == tokenize(captions, "simple")
    assert tokenize(captions, "simple")[1] == ["a dog 's ball is n't it"]
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="`java` is not on PATH.*--caption_tokenizer simple"):
        caption_scores(["a dog"], [["a dog"]], tokenizer="ptb")
    assert caption_scores(["a dog"], [["a dog"]], tokenizer="auto")["tokenizer"] == "simple"


# --- ROUGE novelty -------------------------------------------------------------------------------------


def test_novelty_by_hand():
    index = RougeNovelty(["the cat sat on the mat", "a dog ran", "the cat ran"])
    best = index.best("The cat ran fast!")
    # vs "the cat ran": 3 shared words, LCS 3, F1 = 2*3/(4+3); vs "the cat sat on the mat": 2 shared, F1 = 4/10.
    assert (best["rouge1"], best["rougeL"], best["rouge1_match"], best["candidates"]) == (pytest.approx(6 / 7), pytest.approx(6 / 7), 2, 3)
    # The best ROUGE-1 and the best ROUGE-L can be different training texts.
    other = RougeNovelty(["the cat ran", "ran the cat dog"]).best("ran the cat")
    assert (other["rouge1"], other["rouge1_match"]) == (pytest.approx(1.0), 0)
    assert (other["rougeL"], other["rougeL_match"]) == (pytest.approx(6 / 7), 1)
    assert RougeNovelty(["a dog"]).best("zebra")["rouge1"] == 0.0
    assert distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5) and distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)


def test_novelty_is_exact_and_fast_on_30000_training_texts():
    corpus = scenes.scene_texts(30000)
    texts = scenes.scene_texts(60, scenes.VALIDATION_SEED) + ["I see a big red ball. I like it!", corpus[7]]
    index = RougeNovelty(corpus)
    result = novelty_scores(texts, index)
    assert index.lcs_computed < 200 * len(texts)  # ~2 s here; 30,000 LCS per text would take minutes
    assert result["per_item"][-1]["rougeL"] == 1.0 and result["copied"] == pytest.approx(1 / len(texts))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    sample = corpus[:1000]  # brute force against a slice agrees with the index over the same slice
    small = RougeNovelty(sample)
    for text in texts[:4]:
        brute = [scorer.score(t, text) for t in sample]
        best = small.best(text)
        assert best["rouge1"] == pytest.approx(max(b["rouge1"].fmeasure for b in brute), abs=1e-12)
        assert best["rougeL"] == pytest.approx(max(b["rougeL"].fmeasure for b in brute), abs=1e-12)


# --- the judge -------------------------------------------------------------------------------------------


def test_confidence_interval_and_protocol_beginnings():
    s = mean_ci95([1, 2, 3, 4, 5])
    assert s["mean"] == 3 and s["sd"] == pytest.approx(math.sqrt(2.5))
    assert s["ci95"] == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))  # t(0.975, 4 df) = 2.776
    assert mean_ci95([7]) == {"mean": 7, "ci95": None, "sd": None, "n": 1}
    rng = random.Random(0)
    text = " ".join(f"w{i}" for i in range(30))
    for protocol, (lo, hi) in PREFIX_WORDS.items():
        lengths = set()
        for _ in range(30):
            beginning, rest = split_prompt(text, protocol, rng)
            lengths.add(len(beginning.split()))
            assert f"{beginning} {rest}" == text
        assert lengths == set(range(lo, hi + 1))
    assert split_prompt("two words", "short", rng) == ("two", "words") and split_prompt("one", "short", rng) is None


def fast_settings(url: str, **kw) -> JudgeSettings:
    values = dict(response_format="json_schema", concurrency=3, timeout=2, max_attempts=4, max_reasks=2, backoff_base=0.01, backoff_max=0.05)
    return JudgeSettings("fake", url, **(values | kw))


def test_judge_retries_re_asks_validates_and_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    script = {
        "1": [raw(GOOD)],
        "2": ["raw:The grammar is good, 7 out of 10.", raw(GOOD)],  # not JSON: re-asked
        "3": [raw(GOOD | {"plot": 11}), raw(GOOD | {"plot": 9})],  # out of range: re-asked
        "4": ["500", raw(GOOD | {"grammar": 3})],  # server error: retried
        "5": ["429", "malformed", raw(GOOD)],  # rate limit, then a broken body: retried
        "6": [raw(GOOD | {"creativity": 0})],  # out of range every time: fails after 2 re-asks
    }
    pairs = [(f"img{k} I see a", f"red ball number {k}.") for k in range(1, 7)]
    groups = {"model": pairs, "reference": pairs[:2]}  # the same text in two groups is graded once
    cache = str(tmp_path / "judge.jsonl")
    with FakeOpenAIServer(script=script, retry_after="0.05") as server:
        result = judge(groups, fast_settings(server.url), cache)
        asked = {k: len(server.requests_for(str(k))) for k in range(1, 7)}
        again = judge(groups, fast_settings(server.url), cache)
        assert len(server.log) == sum(asked.values())  # the rerun asked nothing
    assert asked == {1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3}
    model = result["summary"]["model"]
    assert (model["graded"], model["failed"]) == (5, 1)
    assert model["grammar"]["mean"] == pytest.approx((7 + 7 + 7 + 3 + 7) / 5) and model["plot"]["mean"] == pytest.approx(37 / 5)
    assert result["summary"]["reference"]["grammar"] == mean_ci95([7, 7])
    failed = result["records"]["model"][5]
    assert failed["status"] == "failed" and failed["reason"] == "schema: $.creativity = 0 is below 1" and failed["asks"] == 3
    reask = server.requests_for("2")[1]["body"]["messages"]
    assert reask[-1]["role"] == "user" and "not valid (not_json" in reask[-1]["content"]
    assert all(r["body"]["response_format"]["json_schema"]["schema"] == SCHEMA for r in server.log)
    assert result["usage"]["errors"] == {"429": 1, "500": 1, "malformed": 1}
    assert again["summary"] == result["summary"] and again["usage"] == {} and again["format"] == "json_schema (cached)"


def test_judge_falls_back_to_the_json_mode_a_server_accepts(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAIServer(default=raw(GOOD), refuse_formats={"json_schema": 500}) as server:
        result = judge({"t": [("I see", "a dog."), ("I see", "a cat.")]}, fast_settings(server.url, response_format="auto"),
                       str(tmp_path / "judge.jsonl"))
    assert result["format"] == "json_object_schema"
    assert [r["action"] for r in server.log].count("refused") == 1 and server.log[0]["action"] == "refused"
    assert all(r["body"]["response_format"] == {"type": "json_object", "schema": SCHEMA} for r in server.log[1:])
    assert len(server.log) == 4 and result["summary"]["t"]["average"]["mean"] == 7  # refused + probe + 2 grades


def test_a_judge_that_grades_nothing_raises_and_its_cache_keeps_no_key(tmp_path, monkeypatch):
    secret = "sk-judge+Secret/Key=0123456789"
    monkeypatch.setenv("NANOVLM_TEST_KEY", secret)
    echo = 'raw:{"grammar": 7, "note": "{auth:b64} {key:url} {key:b64urlnopad}"}'  # invalid, and it echoes the key
    cache = tmp_path / "judge.jsonl"
    with FakeOpenAIServer(script={"1": [echo], "2": ["500"]}) as server:
        with pytest.raises(JudgeError, match=r"graded none of the 2 texts: ") as refused:
            judge({"t": [("img1 I see", "a dog."), ("img2 I see", "a cat.")]},
                  fast_settings(server.url, max_attempts=2, max_reasks=0, api_key_env="NANOVLM_TEST_KEY"), str(cache))
    assert "1 retries_exhausted (last 500) [" in str(refused.value) and "1 schema [" in str(refused.value)
    assert {r["auth"] for r in server.log} == {f"Bearer {secret}"}
    written = cache.read_text()
    assert written.count('"failed"') == 2 and "[redacted]" in written
    for form in (secret, "sk-judge%2BSecret%2FKey%3D0123456789", base64.b64encode(f"Bearer {secret}".encode()).decode(),
                 base64.urlsafe_b64encode(secret.encode()).decode().rstrip("=")):
        assert form not in written


# --- evaluate modules ------------------------------------------------------------------------------------


def test_every_metric_loads_offline_with_evaluate(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    example = scenes.make_example(3, image_size=32)
    grounding = evaluate.load(str(METRICS / "grounding"))
    assert grounding.compute(predictions=[example["text"]], references=[json.dumps(example["scene"])])["object_recall"] == 1.0
    coco = evaluate.load(str(METRICS / "caption_metrics"))
    scores = coco.compute(predictions=["a dog", "a cat"], references=[["a dog", "a cat"], ["a cat", "a cat"]], tokenizer="simple")
    assert scores["cider_d"] == pytest.approx(1.25) and "per_item" not in scores
    novelty = evaluate.load(str(METRICS / "rouge_novelty"))
    assert novelty.compute(predictions=["the cat ran fast"], training_texts=["the cat ran", "a dog"])["rouge1_max_mean"] == pytest.approx(6 / 7)
    judge_metric = evaluate.load(str(METRICS / "llm_judge"))
    with FakeOpenAIServer(default=raw(GOOD | {"plot": 5})) as server:
        graded = judge_metric.compute(predictions=["a red ball."], references=["I see"], judge_model="fake", base_url=server.url,
                                      cache=str(tmp_path / "judge.jsonl"), response_format="json_schema")
    assert graded["plot"]["mean"] == 5 and graded["graded"] == 1 and graded["format"] == "json_schema"


# --- train.py --eval_metrics -----------------------------------------------------------------------------


def test_train_logs_grounding_and_cider_at_each_evaluation(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [*TINY_MODEL, *QUIET, "--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_strategy", "steps",
              "--eval_steps", "1", "--save_strategy", "no", "--use_cpu", "--eval_metrics_examples", "6"]
    out = tmp_path / "scenes"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5's way (no --logging_dir)
    train.main([*common, "--output_dir", str(out), "--num_train_examples", "32", "--num_validation_examples", "8",
                "--eval_metrics", "grounding", "--report_to", "tensorboard"])
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2]  # two evaluations during training, one at the end
    assert all(0 <= r["eval_grounding_object_recall"] <= 1 and r["captions"] == [] for r in records)  # no samples asked
    final = json.loads((out / "metrics.json").read_text())
    assert final["final.eval_grounding_chair_i"] == records[-1]["eval_grounding_chair_i"]
    # every reporter sees them: TensorBoard has each evaluation's caption metrics next to its loss
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    for tag in ("eval/loss", "eval/grounding_object_recall", "eval/grounding_chair_i", "eval/image_gap"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 2], tag
    assert [e.value for e in events.Scalars("eval/grounding_chair_i")] == pytest.approx([r["eval_grounding_chair_i"] for r in records])

    captions, images = write_coco(tmp_path / "coco", n=8)
    train.main([*common, "--output_dir", str(tmp_path / "coco_run"), "--dataset", "coco", "--caption_file", str(captions),
                "--image_dir", str(images), "--validation_fraction", "0.5", "--eval_metrics", "cider"])
    assert json.loads((tmp_path / "coco_run" / "metrics.json").read_text())["final.eval_cider_d"] >= 0
    with pytest.raises(ValueError, match="--eval_metrics grounding needs --dataset scenes"):
        train.main([*common, "--output_dir", str(tmp_path / "bad"), "--dataset", "coco", "--caption_file", str(captions),
                    "--image_dir", str(images), "--eval_metrics", "grounding"])


# --- python -m evaluation ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_model_dir(tester, processor, tmp_path):
    path = tmp_path / "model"
    tester.get_model().save_pretrained(path)
    processor.save_pretrained(path)
    return path


REQUIRED = [
    "grounding.object_precision", "grounding.object_recall", "grounding.attribute_accuracy", "grounding.chair_i",
    "grounding.chair_s", *(f"captions.bleu{n}" for n in range(1, 5)), "captions.rouge_l", "captions.cider_d",
    "novelty.rouge1_max_mean", "novelty.rougeL_max_mean", "novelty.distinct_1", "novelty.distinct_2",
    *(f"{who}.{c}.{stat}" for who in ("judge", "judge_reference") for c in CRITERIA for stat in ("mean", "ci95")),
]


def test_python_m_evaluation_writes_reports_that_agree(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    with FakeOpenAIServer(default=raw(GOOD)) as server:
        cmd = [sys.executable, "-m", "evaluation", "--model", str(tiny_model_dir), "--dataset", "scenes", "--num_examples", "6",
               "--train_examples", "300", "--max_new_tokens", "12", "--parts", "grounding,captions,novelty,judge",
               "--caption_tokenizer", "simple", "--judge_model", "fake", "--judge_base_url", server.url, "--judge_samples", "4",
               "--judge_format", "json_schema", "--output", str(out)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        env.pop("OPENAI_API_KEY", None)
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert set(REQUIRED) <= set(metrics)
    assert metrics["judge.grammar.mean"] == 7 and metrics["judge.grammar.ci95"] == 0 and metrics["judge.graded"] == 4
    assert report["settings"]["judge_format"] == "json_schema" and report["settings"]["caption_tokenizer"] == "simple"
    assert report["settings"]["num_examples"] == 6 and set(report["seconds"]) >= {"captioning", "judge", "total"}
    # report.md shows exactly report.json's numbers, and the picture is there
    written = parse_markdown_metrics((out / "report.md").read_text())
    assert written == {k: format_value(v) for k, v in metrics.items()}
    assert Image.open(out / "samples.png").size[0] > 500
    # the numbers follow from the texts the report lists
    truth = scenes.scenes_dataset(6, scenes.VALIDATION_SEED, "short", 32)
    texts = [s["model"] for s in report["samples"]]
    assert [s["reference"] for s in report["samples"]] == list(truth["text"])
    regrounded = grounding_scores(texts, truth["scene"])
    assert {f"grounding.{k}": v for k, v in regrounded.items()} == {k: v for k, v in metrics.items() if k.startswith("grounding.")}
    assert caption_scores(texts, [[t] for t in truth["text"]], "simple")["cider_d"] == pytest.approx(metrics["captions.cider_d"])
    # predictions.jsonl: every example, its references, CIDEr-D and graded claims, agreeing with the report
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6)) and [r["model"] for r in rows] == texts
    assert [r["references"] for r in rows] == [[t] for t in truth["text"]]
    assert [r["cider_d"] for r in rows] == [s["cider_d"] for s in report["samples"]]
    claims = [c for r in rows for c in r["claims"]]
    assert all(c["text"] in r["model"] for r in rows for c in r["claims"])
    for axis in ("row", "column", "relation"):
        assert sum(c["axis"] == axis for c in claims) == sum(ground_description(t, json.loads(s))[f"{axis}_claims"]
                                                             for t, s in zip(texts, truth["scene"]))
        assert sum(c["axis"] == axis and c["right"] for c in claims) == sum(ground_description(t, json.loads(s))[f"{axis}_right"]
                                                                           for t, s in zip(texts, truth["scene"]))
    assert len(report["judge_samples"]) == 4 and all(s["model_scores"] == GOOD for s in report["judge_samples"])
    assert len(server.log) == 8  # 4 completions + 4 references, each graded once


def test_predictions_list_every_graded_claim_of_long_descriptions(tiny_model_dir, tmp_path, monkeypatch):
    """A model that writes the generator's own long descriptions, one with a place flipped: predictions.jsonl lists
    each claim by its words, right except the flipped one."""
    from evaluation import cli

    truth = list(scenes.scenes_dataset(4, scenes.VALIDATION_SEED, "long", 32)["text"])
    flipped = truth[0].replace("on the left", "on the right", 1) if "on the left" in truth[0] else truth[0].replace("on the right", "on the left", 1)
    assert flipped != truth[0]
    monkeypatch.setattr(cli, "generate_captions", lambda *args, **kwargs: [flipped, *truth[1:]])
    assert evaluate_main(["--model", str(tiny_model_dir), "--dataset", "scenes", "--scenes_style", "long", "--num_examples", "4",
                          "--parts", "grounding", "--train_examples", "0", "--output", str(tmp_path / "eval")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["scene"] for r in rows] == [json.loads(s) for s in scenes.scenes_dataset(4, scenes.VALIDATION_SEED, "long", 32)["scene"]]
    claims = [c for r in rows for c in r["claims"]]
    assert len(claims) >= 8 and [c for c in claims if not c["right"]] == [
        next(c for c in rows[0]["claims"] if c["axis"] == "column" and not c["right"])]
    assert [c["text"] for c in rows[0]["claims"] if not c["right"]][0] in ("on the right", "on the left")


@pytest.mark.parametrize("version", [1, 3])
def test_scenes_version_picks_the_references_and_training_texts_a_model_was_trained_on(tiny_model_dir, tmp_path, monkeypatch, version):
    from evaluation import cli

    truth = scenes.scene_texts(4, scenes.VALIDATION_SEED, "long", version)
    assert truth != scenes.scene_texts(4, scenes.VALIDATION_SEED, "long")  # the default (version 2) differs
    monkeypatch.setattr(cli, "generate_captions", lambda *args, **kwargs: truth)
    out = tmp_path / "eval"
    assert evaluate_main(["--model", str(tiny_model_dir), "--dataset", "scenes", "--scenes_style", "long", "--scenes_version",
                          str(version), "--num_examples", "4", "--parts", "grounding,novelty", "--train_examples", "30",
                          "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["references"] for r in rows] == [[t] for t in truth]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["data"]["scenes_version"] == version
    assert report["settings"]["novelty_training_texts"] == f"30 training scenes (long, version {version})"
    assert report["metrics"]["grounding.place_accuracy"] == 1.0


def test_evaluation_on_coco_and_hf_data(tiny_model_dir, tmp_path):
    captions, images = write_coco(tmp_path / "coco", n=6)
    out = tmp_path / "coco_eval"
    assert evaluate_main(["--model", str(tiny_model_dir), "--dataset", "coco", "--caption_file", str(captions), "--image_dir",
                          str(images), "--train_caption_file", str(captions), "--max_new_tokens", "8", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["parts"] == ["captions", "novelty"] and report["settings"]["num_examples"] == 6
    assert report["metrics"]["novelty.num_training_texts"] == 12 and 0 <= report["metrics"]["captions.cider_d"]
    assert report["samples"][0]["reference"] == "picture 0 caption 0 ."
    first = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert first["references"][0] == "picture 0 caption 0 ." and len(first["references"]) > 1 and "claims" not in first
    assert report["settings"]["decoding"] == {"do_sample": False, "num_beams": 1, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}

    beam = tmp_path / "coco_beam"  # decoding flags over the model's generation_config, recorded in the report
    assert evaluate_main(["--model", str(tiny_model_dir), "--dataset", "coco", "--caption_file", str(captions), "--image_dir",
                          str(images), "--parts", "captions", "--max_new_tokens", "12", "--num_beams", "3",
                          "--no_repeat_ngram_size", "1", "--output", str(beam)]) == 0
    report = json.loads((beam / "report.json").read_text())
    assert report["settings"]["decoding"] == {"do_sample": False, "num_beams": 3, "no_repeat_ngram_size": 1, "repetition_penalty": 1.0}
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from evaluation.captioning import generate_captions
    from processing.data import load_coco_captions

    model, processor = AutoModelForImageTextToText.from_pretrained(tiny_model_dir), AutoProcessor.from_pretrained(tiny_model_dir)
    pictures = load_coco_captions(str(captions), str(images), "first")["image"]
    expected = generate_captions(model, processor, pictures, max_new_tokens=12, num_beams=3, no_repeat_ngram_size=1)
    assert [s["model"] for s in report["samples"]] == expected  # the flags reached generate()

    folder = write_imagefolder(tmp_path / "hf", 5, "text")
    with pytest.raises(ValueError, match="--split"):
        evaluate_main(["--model", str(tiny_model_dir), "--dataset", "hf", "--data_path", str(folder), "--output", str(tmp_path / "x")])
    assert evaluate_main(["--model", str(tiny_model_dir), "--dataset", "hf", "--data_path", str(folder), "--split", "train",
                          "--max_new_tokens", "8", "--output", str(tmp_path / "hf_eval")]) == 0
    assert json.loads((tmp_path / "hf_eval" / "report.json").read_text())["settings"]["parts"] == ["captions"]
