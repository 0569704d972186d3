"""What the description builder and the evaluation's LLM judge do with a server that misbehaves, run
from the command line as a user runs them (`python -m ...` in a subprocess, against the scripted
server in fake_openai_server.py): an exit status that says whether the work was done, one line that
says why not (never a traceback), and the API key in no file they write, in any encoding."""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import free_port
from fake_openai_server import NOT_JSON, FakeOpenAIServer
from test_build_descriptions import write_coco

from evaluation.judge import CRITERIA

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "fake", "--backoff_base", "0.01", "--backoff_max", "0.05", "--style", "short"]
# "+", "/" and "=" make the standard, URL-safe and URL-encoded forms differ from each other.
KEY = "sk-test+Very/Secret=Key?~>-0123456789abcdef"


def env(**extra) -> dict:
    values = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    values.pop("OPENAI_API_KEY", None)
    return values | extra


def builder(root: Path, url: str, *extra: str, out: str = "out") -> list[str]:
    return [sys.executable, "-m", "descriptions.build", "--caption_file", str(root / "captions.json"),
            "--image_dir", str(root / "images"), "--base_url", url, "--output", str(root / out), *FAST, *extra]


def run(cmd: list[str], **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=300)


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def key_forms(key: str) -> dict[str, str]:
    """Every form of `key` that must not be written: plain, URL-encoded, and base64 of the key and of
    its Authorization header, standard and URL-safe, with and without padding."""
    forms = {"plain": key, "url": urllib.parse.quote(key, safe="")}
    for name, text in (("key", key), ("bearer", f"Bearer {key}")):
        for alphabet, encode in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
            encoded = encode(text.encode()).decode()
            forms[f"{alphabet}({name})"] = encoded
            forms[f"{alphabet}({name}) unpadded"] = encoded.rstrip("=")
    return forms


def assert_key_absent(folder: Path, key: str) -> None:
    forms = key_forms(key)
    assert len(set(forms.values())) == len(forms) == 10  # the forms really differ
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for name, form in forms.items():
                assert form.encode() not in data, f"{path.name} holds the key ({name})"


# --- the description builder -----------------------------------------------------------------------------


@pytest.mark.parametrize("action, why", [
    ("500", "retries_exhausted (last 500)"),
    ("empty", "empty"),
    ("400", "bad_request"),
    ("hang", "retries_exhausted (last timeout)"),
])
def test_builder_exits_non_zero_when_no_item_was_built(tmp_path, action, why):
    write_coco(tmp_path, 4)
    with FakeOpenAIServer(default=action, hang_seconds=4) as server:
        done = run(builder(tmp_path, server.url, "--timeout", "1", "--max_attempts", "2", "--max_reasks", "1", "--concurrency", "4"))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (summary,) = lines_with(done.stderr, "items failed")
    assert "4 of 4 items failed" in summary and f"4 {why}" in summary and "--max_failed_fraction" in summary
    assert lines_with(done.stderr, "0 of 4 done")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["done"] == 0 and sum(report["failed"].values()) == 4 and report["exit_status"] == 1


def test_builder_records_a_body_that_is_not_json_as_that_items_failure_and_goes_on(tmp_path):
    write_coco(tmp_path, 4)
    with FakeOpenAIServer(script={"2": ["not_json"]}) as server:
        done = run(builder(tmp_path, server.url, "--timeout", "5", "--max_attempts", "2"))
        assert len(server.requests_for("2")) == 2  # retried like any broken body, then recorded
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "codec can't decode" not in done.stderr
    records = {r["image_id"]: r for r in map(json.loads, (tmp_path / "out" / "cache.jsonl").read_text().splitlines())}
    assert [records[k]["status"] for k in (1, 2, 3, 4)] == ["done", "failed", "done", "done"]
    assert f"the server at {server.url} answered something that is not JSON: first bytes {repr(NOT_JSON[:20])[:-1]}" in records[2]["reason"]
    assert lines_with(done.stderr, "3 of 4 done")


def test_builder_writes_no_form_of_a_key_the_server_echoes(tmp_path):
    write_coco(tmp_path, 4)
    words = "I see a dog. The dog is big. A boy can run. The sun is hot. I see a cat. It is red."
    script = {  # accepted-looking answers and rejected ones, each carrying the key in other encodings
        "1": [f"raw:{words} {{key:b64}} {{auth:b64}}"],
        "2": [f"raw:{words} {{key:b64url}} {{auth:b64urlnopad}} {{key:b64nopad}}"],
        "3": [f"raw:{words} {{key:url}} {{auth:url}} {{key:plain}}"],
        "4": ["raw:{auth:b64nopad} {key:b64urlnopad} {auth:plain}"],
    }
    with FakeOpenAIServer(script=script) as server:
        done = run(builder(tmp_path, server.url, "--timeout", "5", "--max_attempts", "2", "--max_reasks", "1",
                           "--api_key_env", "NANOVLM_TEST_KEY"), NANOVLM_TEST_KEY=KEY)
    assert {r["auth"] for r in server.log} == {f"Bearer {KEY}"}
    assert "Traceback" not in done.stderr
    assert_key_absent(tmp_path / "out", KEY)
    assert (tmp_path / "out" / "cache.jsonl").read_text().count("[redacted]") >= 4
    for name, form in key_forms(KEY).items():
        assert form not in done.stderr + done.stdout, name


def test_a_second_builder_on_the_same_output_stops_with_the_locks_message(tmp_path):
    write_coco(tmp_path, 4)
    with FakeOpenAIServer(latency=60) as server:
        log = tmp_path / "first.log"
        with open(log, "w") as stderr:
            first = subprocess.Popen(builder(tmp_path, server.url, "--timeout", "90"), cwd=ROOT, env=env(),
                                     stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.time() + 120
            while "to request" not in log.read_text():  # logged once the cache is open and locked
                assert first.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "the first builder did not start within 120 s"
                time.sleep(0.1)
            second = run(builder(tmp_path, server.url))
        finally:
            first.kill()
            first.wait(timeout=30)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    (line,) = lines_with(second.stderr, "in use by another process")
    assert line.startswith("descriptions.build: error: ") and "cache.jsonl" in line and "--output" in line
    assert not (tmp_path / "out" / "report.json").exists()  # the second wrote nothing


# --- python -m evaluation's judge ----------------------------------------------------------------------


@pytest.fixture
def model_dir(tester, processor, tmp_path):
    path = tmp_path / "model"
    tester.get_model().save_pretrained(path)
    processor.save_pretrained(path)
    return path


def evaluation(model: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "evaluation", "--model", str(model), "--dataset", "scenes", "--num_examples", "4",
            "--train_examples", "0", "--max_new_tokens", "8", "--parts", "grounding,captions,judge", "--caption_tokenizer", "simple",
            "--judge_model", "fake", "--judge_base_url", url, "--judge_samples", "2", "--judge_max_attempts", "2",
            "--judge_backoff_base", "0.01", "--judge_timeout", "5", "--output", str(out), *extra]


@pytest.mark.parametrize("server, judge_format, why", [
    ("unreachable", "auto", "answered no request"),
    ("500", "json_schema", "retries_exhausted (last 500)"),
    ("not_json", "auto", "answered something that is not JSON"),
])
def test_evaluation_stops_with_one_line_when_the_judge_fails_and_keeps_what_it_computed(model_dir, tmp_path, server, judge_format, why):
    out = tmp_path / "eval"
    if server == "unreachable":
        done = run(evaluation(model_dir, out, f"http://127.0.0.1:{free_port()}/v1", "--judge_format", judge_format))
    else:
        with FakeOpenAIServer(default=server) as fake:
            done = run(evaluation(model_dir, out, fake.url, "--judge_format", judge_format))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = lines_with(done.stderr, "judge failed")
    assert why in line and "--judge_" in line
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "samples.png"}
    report = json.loads((out / "report.json").read_text())
    assert {"grounding.object_recall", "captions.cider_d"} <= set(report["metrics"])
    assert not any(k.startswith("judge") for k in report["metrics"]) and why in report["settings"]["judge_error"]
    assert len(report["samples"]) == 4 and all(isinstance(s["model"], str) for s in report["samples"])


def test_evaluation_writes_no_form_of_a_key_the_judge_echoes(model_dir, tmp_path):
    out = tmp_path / "eval"
    scores = ", ".join(f'"{c}": 7' for c in CRITERIA)
    with FakeOpenAIServer(default='raw:{' + scores + ', "note": "{auth:b64} {key:b64urlnopad} {key:url}"}') as fake:
        done = run(evaluation(model_dir, out, fake.url, "--judge_format", "json_schema", "--judge_max_reasks", "0",
                              "--judge_api_key_env", "NANOVLM_TEST_KEY"), NANOVLM_TEST_KEY=KEY)
    assert {r["auth"] for r in fake.log} == {f"Bearer {KEY}"}
    assert_key_absent(out, KEY)
    assert "Traceback" not in done.stderr and lines_with(done.stderr, "judge failed")
    records = [json.loads(line) for line in (out / "judge_cache.jsonl").read_text().splitlines()]
    assert records and all(r["status"] == "failed" and "[redacted]" in r["answer"] for r in records)
    for name, form in key_forms(KEY).items():
        assert form not in done.stderr + done.stdout, name
