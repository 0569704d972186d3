"""The ShortDesc/LongDesc builder against a scripted OpenAI-compatible server on 127.0.0.1:
retries and re-asks down to the request, the cache across SIGKILL, the key kept secret, the output
loading into train.py, and the client's JSON mode for the judge."""

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer, child_text
from PIL import Image

from processing import data
from descriptions.build import main, parse_args, reading_grade, split_of, validate_description
from llm.cache import JsonlCache
from llm.client import LLMClient, count_failures, redact
from llm.schema import json_schema_format, json_validator
from llm.settings import ClientSettings, client_settings
from descriptions.prompts import PROMPT_VERSION, Prompts, load_prompts

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "fake", "--timeout", "2", "--backoff_base", "0.01", "--backoff_max", "0.05"]
KEY = ("fake", PROMPT_VERSION)


def write_coco(root: Path, n_images: int) -> tuple[str, str]:
    """A COCO-layout caption file with 5 captions per image (carrying `img<k>` for the fake server) and tiny PNGs."""
    images = root / "images"
    images.mkdir(parents=True)
    coco = {"images": [], "annotations": []}
    for k in range(1, n_images + 1):
        Image.new("RGB", (8, 8), (k * 7 % 256, 40, 90)).save(images / f"{k}.png")
        coco["images"].append({"id": k, "file_name": f"{k}.png"})
        coco["annotations"] += [{"image_id": k, "id": 10 * k + j, "caption": f"img{k} a dog runs on the grass, take {j}."} for j in range(5)]
    (root / "captions.json").write_text(json.dumps(coco))
    return str(root / "captions.json"), str(images)


def build(server: FakeOpenAIServer, root: Path, *extra: str, out: str = "out") -> tuple[int, dict]:
    caption_file, image_dir = str(root / "captions.json"), str(root / "images")
    status = main(["--caption_file", caption_file, "--image_dir", image_dir, "--base_url", server.url, "--output", str(root / out), *FAST, *extra])
    return status, json.loads((root / out / "report.json").read_text())


def cache_lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "out" / "cache.jsonl").read_text().splitlines()]


# --- validation and prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("answer, code", [
    (child_text(22), None),
    ('"' + child_text(20) + '"', None),  # quotes around the answer are stripped
    (child_text(12), "too_short"),
    (child_text(30), "too_long"),
    ("- a dog\n- a boy\n" + child_text(20), "not_plain_prose"),
    (child_text(12) + "\n\n" + child_text(10), "not_one_paragraph"),
    ("Sure! " + child_text(20), "not_plain_prose"),
    ("Notes about a picture: 1. A child in a pink dress is climbing up a set of stairs in an entry way.", "not_plain_prose"),
    ("A picture: " + child_text(20), "not_plain_prose"),
    ("I see 2 dogs. " + child_text(20), None),
    ("**" + child_text(20) + "**", "not_plain_prose"),
    (child_text(20) + " \U0001f436", "not_plain_prose"),
    ("", "empty"),
    ("A young child wearing a vibrant pink dress is cautiously climbing the wooden staircase inside an unfamiliar residential "
     "building entrance.", "not_simple"),
])
def test_validation_accepts_child_prose_and_names_what_is_wrong(answer, code):
    text, reason = validate_description(answer, (20, 25), max_grade=3.0)
    if code is None:
        assert reason is None and text == answer.strip('"')
        assert text == " ".join(text.split())
    else:
        assert text is None and reason.startswith(code + ": ")


def test_reading_grade_separates_child_talk_from_adult_sentences():
    child = "I see a girl. She has a pink dress. She goes up the stairs. The stairs are in a big house. She is happy."
    adult = "A young girl in a pink dress is climbing up a set of wooden stairs in the entry way of a large house."
    assert reading_grade(child) < 1 < 3 < reading_grade(adult)


def test_prompts_are_versioned_and_a_file_overrides_them(tmp_path):
    prompts = Prompts()
    # Editing the built-in prompt text must come with a new PROMPT_VERSION (the cache key): update both.
    assert (PROMPT_VERSION, prompts.text_hash()) == ("childdesc-v1", "f90851f759488a21e6e0d1f98d84d89a76241e5cac346a996ed9f54223c637b1")
    system, user = prompts.messages(["A dog runs.", "A brown dog."], "long")
    assert system["role"] == "system" and "3 to 4 year old" in system["content"]
    assert "1. A dog runs.\n2. A brown dog." in user["content"] and "between 60 and 70 words" in user["content"]
    (merged,) = prompts.messages(["A dog runs."], "short", merge_system=True)
    assert merged["content"].startswith(prompts.system) and "between 20 and 25 words" in merged["content"]

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"version": "mine", "user": "Captions: {captions}. Say it in {min_words}-{max_words} words."}))
    custom = load_prompts(str(path))
    assert custom.version == f"mine+{custom.text_hash()[:8]}" and custom.system == prompts.system
    assert custom.messages(["A dog."], "short")[1]["content"] == "Captions: 1. A dog.. Say it in 20-25 words."
    path.write_text(json.dumps({"version": "mine", "user": "no placeholders"}))
    with pytest.raises(ValueError, match="must contain"):
        load_prompts(str(path))
    path.write_text(json.dumps({"user": "{captions} {min_words} {max_words}"}))
    with pytest.raises(ValueError, match="needs a \"version\""):
        load_prompts(str(path))


# --- cache --------------------------------------------------------------------------------------------


def test_cache_cuts_a_torn_last_line_and_refuses_a_second_writer(tmp_path, caplog):
    path = str(tmp_path / "cache.jsonl")
    with JsonlCache(path, ("model", "image_id")) as cache:
        cache.append({"model": "m", "image_id": 1, "text": "a"})
        cache.append({"model": "m", "image_id": 2, "text": "b"})
        cache.append({"model": "m", "image_id": 1, "text": "a2"})  # the last record of a key wins
        with pytest.raises(RuntimeError, match="in use by another process"):
            JsonlCache(path, ("model", "image_id"))
    good = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b'{"model": "m", "image_id": 3, "te')  # a write cut off by a kill
    with caplog.at_level(logging.WARNING):
        cache = JsonlCache(path, ("model", "image_id"))
    assert "torn" in caplog.text and cache.torn_bytes > 0
    assert os.path.getsize(path) == good and ("m", 3) not in cache
    assert cache.get(("m", 1))["text"] == "a2" and len(cache) == 2
    cache.append({"model": "m", "image_id": 3, "text": "c"})
    cache.close()
    with open(path) as f:
        assert [json.loads(line)["image_id"] for line in f] == [1, 2, 1, 3]


# --- the builder against the fake server --------------------------------------------------------------


def test_faults_are_retried_re_asked_or_recorded_with_the_right_reason(tmp_path):
    write_coco(tmp_path, 8)
    script = {
        "2": ["429", "ok"], "3": ["500", "500", "ok"], "4": ["hang", "ok"], "5": ["malformed", "ok"],
        "6": ["short", "ok"], "7": ["long"], "8": ["500"],
    }
    with FakeOpenAIServer(script=script, hang_seconds=3) as server:
        status, report = build(server, tmp_path, "--style", "short", "--max_attempts", "4", "--max_reasks", "2", "--concurrency", "4")
    assert status == 0
    # Every retry and re-ask is a request, and there is no other: 1 ok, 429+ok, 500+500+ok, hang+ok,
    # malformed+ok, too short+re-asked ok, 3 asks too long (1 + 2 re-asks), 4 attempts of 500 (the cap).
    assert {k: len(server.requests_for(k)) for k in map(str, range(1, 9))} == {"1": 1, "2": 2, "3": 3, "4": 2, "5": 2, "6": 2, "7": 3, "8": 4}
    first_429, after_429 = server.requests_for("2")
    assert after_429["t"] - first_429["t"] >= 1.0  # Retry-After: 1 honoured ...
    others = [r for r in server.log if first_429["t"] + 0.2 < r["t"] < first_429["t"] + 0.95]
    assert others == []  # ... by every request, not only the item's own
    reask = server.requests_for("6")[1]["body"]["messages"]
    assert [m["role"] for m in reask] == ["system", "user", "assistant", "user"]
    assert reask[2]["content"] == child_text(10) and "it has 10 words, it needs between 20 and 25" in reask[3]["content"]

    assert report["done"] == report["done_this_run"] == 6 and report["cached"] == 0
    assert report["failed"] == {"retries_exhausted": 1, "too_long": 1}
    assert report["validation"]["rejected_by_reason"] == {"too_long": 3, "too_short": 1}
    assert report["word_counts"] == {"short": {"22": 6}}
    served = [r["usage"] for r in server.log if "usage" in r and r["action"] != "hang"]  # a hung answer never arrives
    assert report["tokens"]["this_run"]["prompt_tokens"] == sum(p for p, _ in served)
    assert report["tokens"]["this_run"]["completion_tokens"] == sum(c for _, c in served)
    assert report["tokens"]["this_run"]["errors"] == {"429": 1, "500": 6, "malformed": 1, "timeout": 1}

    records = {r["image_id"]: r for r in cache_lines(tmp_path)}
    assert len(records) == 8 and len(cache_lines(tmp_path)) == 8
    assert records[7]["status"] == "failed" and records[7]["reason"].startswith("too_long: it has 35 words")
    assert records[7]["answer"] == child_text(35)  # the rejected answer is kept for inspection
    assert records[8]["reason"].startswith("retries_exhausted: 4 attempts, last 500")
    assert all(records[k]["status"] == "done" and records[k]["text"] == child_text(22) for k in range(1, 7))


def test_output_loads_into_train_py_with_both_styles_of_an_image_in_one_split(tmp_path):
    write_coco(tmp_path, 30)
    with FakeOpenAIServer() as server:
        status, report = build(server, tmp_path, "--style", "both", "--concurrency", "8")
    assert status == 0 and report["done"] == 60 and report["splits"]["train"] + report["splits"]["validation"] == 60
    assert 2 <= report["splits"]["validation"] <= 12  # about 10% of 30 images, 2 rows each
    splits = data.load_hf(str(tmp_path / "out" / "dataset"))  # what train.py --dataset hf --data_path DIR does
    assert set(splits) == {"train", "validation"}
    train, validation = splits["train"], splits["validation"]
    assert set(train.column_names) == {"image", "text", "style", "captions", "image_id", "word_count"}
    assert not set(train["image_id"]) & set(validation["image_id"])
    per_image = {}
    for image_id, style in zip(validation["image_id"], validation["style"]):
        per_image.setdefault(image_id, []).append(style)
    assert all(sorted(styles) == ["long", "short"] for styles in per_image.values())
    row = validation[0]
    assert row["image"].size == (8, 8) and row["text"] == child_text(22 if row["style"] == "short" else 65)
    assert len(row["captions"]) == 5 and row["captions"][0].startswith(f"img{row['image_id']} ")
    assert validation.filter(lambda r: r["style"] == "long")["word_count"] == [65] * (len(validation) // 2)
    assert set(validation["image_id"]) == split_of(list(range(1, 31)), 0.1)  # deterministic by image id
    for name in ("train", "validation"):  # parquet files carry the images themselves
        parquet = data.load_hf(str(tmp_path / "out" / "parquet" / f"{name}.parquet"))["train"]
        assert len(parquet) == len(splits[name]) and parquet[0]["image"].size == (8, 8)
    assert data.check_images(train, "train", False, data.BadImages()) is train


def test_concurrency_bounds_requests_in_flight(tmp_path):
    """Counted, not timed: with --concurrency N the server sees more than N/2 and at most N requests
    at once (speed belongs in benchmarks; a wall-clock assertion fails on a loaded machine)."""
    write_coco(tmp_path, 12)
    for concurrency in (1, 8):
        with FakeOpenAIServer(latency=0.3) as server:  # a generous timeout: no retry on a loaded machine
            build(server, tmp_path, "--style", "short", "--concurrency", str(concurrency), "--timeout", "30", out=f"out{concurrency}")
        assert concurrency // 2 < server.max_in_flight <= concurrency and len(server.log) == 12


def test_sigkill_then_rerun_requests_nothing_that_was_cached(tmp_path, caplog):
    write_coco(tmp_path, 30)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "descriptions.build", "--caption_file", str(tmp_path / "captions.json"),
        "--image_dir", str(tmp_path / "images"), "--style", "short", "--output", str(out), "--concurrency", "2", *FAST,
    ]
    with FakeOpenAIServer(latency=0.1) as server:
        env = dict(os.environ, OPENAI_API_KEY="sk-test", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        proc = subprocess.Popen([*cmd, "--base_url", server.url], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not (out / "cache.jsonl").exists() or len((out / "cache.jsonl").read_text().splitlines()) < 8:
            assert proc.poll() is None, f"the builder ended before it was killed: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "the builder cached nothing within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        cached = {r["image_id"] for r in cache_lines(tmp_path)}
        assert 8 <= len(cached) < 30
        with open(out / "cache.jsonl", "a") as f:
            f.write('{"model": "fake", "prompt_version": "childdesc-v1", "style": "short", "image_id": 29, "sta')  # a torn write
        requests_before = len(server.log)
        with caplog.at_level(logging.WARNING):
            status, report = build(server, tmp_path, "--style", "short", "--concurrency", "2")
        rerun = {int(r["item"]) for r in server.log[requests_before:]}
    assert status == 0 and "torn" in caplog.text
    assert rerun and not rerun & cached  # nothing cached is asked for again ...
    assert rerun | cached == set(range(1, 31))  # ... and everything else is
    assert report["done"] == 30 and report["cached"] == len(cached) and report["done_this_run"] == 30 - len(cached)
    assert report["splits"]["train"] + report["splits"]["validation"] == 30


def test_failed_items_stay_failed_until_retry_failed_and_missing_images_are_reported(tmp_path):
    write_coco(tmp_path, 4)
    os.remove(tmp_path / "images" / "4.png")
    with FakeOpenAIServer(script={"3": ["500", "500", "ok"]}) as server:
        status, report = build(server, tmp_path, "--style", "short", "--max_attempts", "2")
        assert report["failed"] == {"retries_exhausted": 1} and report["image_missing"] == 1 and report["done"] == 2
        assert "4" not in {r["item"] for r in server.log}
        status, report = build(server, tmp_path, "--style", "short", "--max_attempts", "2")
        assert len(server.log) == 4 and report["failed"] == {"retries_exhausted": 1}  # nothing asked again
        status, report = build(server, tmp_path, "--style", "short", "--max_attempts", "2", "--retry_failed")
    assert [r["item"] for r in server.log[4:]] == ["3"]
    assert report["failed"] == {} and report["done"] == 3 and report["cached"] == 2 and report["done_this_run"] == 1


def test_api_key_is_sent_but_never_logged_or_written(tmp_path, monkeypatch, caplog, capsys):
    secret = "sk-proj-Very5ecretKey0123456789"
    monkeypatch.setenv("NANOVLM_TEST_KEY", secret)
    write_coco(tmp_path, 3)
    with caplog.at_level(logging.DEBUG), FakeOpenAIServer(script={"2": ["401"]}) as server:
        status, report = build(server, tmp_path, "--style", "short", "--api_key_env", "NANOVLM_TEST_KEY", "--concurrency", "1")
    assert {r["auth"] for r in server.log} == {f"Bearer {secret}"}
    assert status == 2 and report["aborted"].startswith("authentication failed") and "$NANOVLM_TEST_KEY" in report["aborted"]
    assert "[redacted]" in report["aborted"]  # the server echoed the key in its error body
    captured = capsys.readouterr()
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())
    for text in (caplog.text, captured.out, captured.err, written):
        assert secret not in text and secret[:12] not in text
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="set the environment variable OPENAI_API_KEY"):
        LLMClient("gpt-4o")


def test_more_failures_than_max_failed_fraction_exit_1_and_the_accepted_items_are_saved(tmp_path, caplog):
    write_coco(tmp_path, 4)
    with FakeOpenAIServer(script={"3": ["400"]}) as server:
        status, report = build(server, tmp_path, "--style", "short")  # 1 of 4 failed: within the default 0.5
        assert status == 0 and report["exit_status"] == 0 and "failure_summary" not in report
        with caplog.at_level(logging.ERROR):
            status, report = build(server, tmp_path, "--style", "short", "--max_failed_fraction", "0.2")
    assert status == 1 and report["exit_status"] == 1 and report["splits"]["train"] + report["splits"].get("validation", 0) == 3
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert line.startswith("descriptions.build: 1 of 4 items failed (--max_failed_fraction allows 0.2): 1 bad_request [HTTP 400: ")
    assert report["failure_summary"] in line and str(tmp_path / "out" / "cache.jsonl") in line
    with pytest.raises(SystemExit):
        main(["--caption_file", "x", "--image_dir", "y", "--max_failed_fraction", "1.5"])


def test_failures_are_counted_by_reason_and_a_retried_error_by_its_last_kind():
    reasons = ["retries_exhausted: 2 attempts, last 500: HTTP 500: server error", "too_long: it has 35 words",
               "retries_exhausted: 2 attempts, last timeout: no answer within 1s", "retries_exhausted: 2 attempts, last 500: HTTP 500: x"]
    assert count_failures(reasons) == (
        "2 retries_exhausted (last 500) [2 attempts, last 500: HTTP 500: server error]; 1 too_long [it has 35 words]; "
        "1 retries_exhausted (last timeout) [2 attempts, last timeout: no answer within 1s]")


@pytest.mark.parametrize("secret", ["sk-proj-Very5ecretKey0123456789", "sk-test+Very/Secret=Key?~>-0123456789", "plain-key-without-prefix-1234"])
def test_redact_finds_a_key_in_every_encoding_at_every_offset(secret):
    texts = [secret, f"Bearer {secret}", urllib.parse.quote(secret, safe=""), urllib.parse.quote(f"Bearer {secret}", safe="")]
    for prefix in ("", "x", "xy", '{"authorization": "Bearer '):  # base64 of a longer text puts the key at any byte offset
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(f"{prefix}{secret}\"}}".encode()).decode()
            texts += [encoded, encoded.rstrip("=")]
    for text in texts:
        cleaned = redact(f"before {text} after", secret)
        assert "[redacted]" in cleaned and cleaned.startswith("before ") and cleaned.endswith(" after"), text
        assert text not in cleaned and secret not in cleaned, text
    assert redact("I see a big dog.", secret) == "I see a big dog." and redact("abc", None) == "abc"


def test_the_builder_and_the_judge_take_their_server_flags_from_one_settings_class(monkeypatch):
    from evaluation.cli import parse_args as evaluation_args
    from evaluation.judge import JudgeSettings

    builder = client_settings(parse_args(["--caption_file", "c", "--image_dir", "i", "--timeout", "5"]))
    assert builder == {**vars(ClientSettings()), "model": "gpt-4o", "timeout": 5.0}
    parsed = evaluation_args(["--model", "m", "--dataset", "scenes", "--output", "o", "--judge_model", "j", "--judge_backoff_max", "2"])
    judge = JudgeSettings(**client_settings(parsed, "judge_"))
    assert (judge.model, judge.concurrency, judge.timeout, judge.backoff_max) == ("j", 4, 120.0, 2.0)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="name another one with --judge_api_key_env.*or pass --judge_base_url"):
        judge.client()  # its errors name the judge's flags


# --- the client's JSON mode, for the judge --------------------------------------------------------------


def test_json_answers_are_validated_against_a_schema_and_re_asked(tmp_path):
    schema = {"type": "object", "required": ["score", "reason"], "additionalProperties": False,
              "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}, "reason": {"type": "string"}}}
    script = {"1": ["raw:not json at all", 'raw:{"score": 11, "reason": "x"}', 'raw:```json\n{"score": 7, "reason": "clear"}\n```']}

    async def ask(url):
        client = LLMClient("judge", base_url=url, concurrency=2, timeout=2, max_attempts=5, backoff_base=0.01)
        try:
            return await client.complete(
                [{"role": "user", "content": "Grade img1."}], validate=json_validator(schema), max_reasks=3,
                reask=lambda reason: f"Invalid: {reason}. Answer with JSON only.", response_format=json_schema_format("grade", schema),
            ), client.usage
        finally:
            await client.close()

    with FakeOpenAIServer(script=script) as server:
        answer, usage = asyncio.run(ask(server.url))
    assert answer.ok and answer.value == {"score": 7, "reason": "clear"} and answer.asks == 3 == len(server.log)
    assert answer.rejected[0].startswith("not_json: ") and answer.rejected[1] == "schema: $.score = 11 is above 10"
    assert server.log[0]["body"]["response_format"]["json_schema"]["schema"] == schema
    assert "Invalid: schema: $.score = 11 is above 10" in server.log[2]["body"]["messages"][-1]["content"]
    assert usage.requests == 3 and usage.completion_tokens == sum(c for _, c in (r["usage"] for r in server.log))
