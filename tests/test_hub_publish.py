"""Share on the Hub and load back by name, against a Hub on 127.0.0.1 (tests/hub_server.py: olah
serving git repositories, behind a front that takes uploads).

A tiny training pushes with `train.py --push_to_hub`; a fresh process that cannot import the project
loads it by name through HF_ENDPOINT with the four public calls and gets the same weights and
captions; `python -m publishing.push_to_hub` pushes again with an evaluation report and updates the
repo. A bad name, a token without rights, a refused token, an unreachable or offline Hub each give
one clear line. The token is read from --hub_token, HF_TOKEN and the `hf auth login` file, and
appears in no log and no pushed file.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, toy_image
from hub_server import LocalHub
from huggingface_hub import constants
from safetensors.torch import load_file
from test_hub_code import BLOCK_PROJECT
from test_train import QUIET, ROOT, TINY_MODEL

from modeling_nanovlm.export_onnx import OnnxCaptioner, export_onnx
from publishing import push_to_hub

TOKEN = "hf_NanoVLMtestToken0123456789abcdefXYZ"
REPO = "org/nanovlm-tiny"
CODE = {"configuration_nanovlm.py", "modeling_nanovlm.py", "processing_nanovlm.py"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    if importlib.util.find_spec("olah") is None:
        message = "olah is not installed; `pip install -e \".[test]\"` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs the test extra: a missing package is a broken install there
        pytest.skip(message)
    with LocalHub(tmp_path_factory.mktemp("hub"), TOKEN) as hub:
        yield hub
    assert hub.errors == []


def hub_env(hub: LocalHub, home: Path, **extra: str) -> dict:
    """A user's shell pointed at the local Hub: no HF_HUB_OFFLINE (conftest sets it for every other test)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    return env | {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"} | extra


def run(args: list[str], env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def git_objects(hub: LocalHub, repo: str) -> bytes:
    """Every object of the repo's history, uncompressed."""
    return subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=hub.repo_dir(repo), capture_output=True).stdout


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """`train.py --push_to_hub --hub_token ...`: a tiny model trained for 4 steps, pushed when training ends."""
    tmp = tmp_path_factory.mktemp("pushed")
    out = tmp / "run"
    result = run([
        sys.executable, str(ROOT / "train.py"), *TINY_MODEL, *QUIET, "--output_dir", str(out), "--num_train_examples", "64",
        "--num_validation_examples", "8", "--max_steps", "4", "--per_device_train_batch_size", "16", "--eval_strategy", "no",
        "--save_strategy", "no", "--use_cpu", "--push_to_hub", "--hub_model_id", REPO, "--hub_token", TOKEN,
    ], hub_env(hub, tmp / "hf_home"))
    assert result.returncode == 0, result.stderr[-4000:]
    return {"out": out, "logs": result.stdout + result.stderr, "commit": hub.git(REPO, "rev-parse", "main")}


def test_train_push_to_hub_uploads_model_processor_code_and_card(hub, pushed):
    files = set(hub.git(REPO, "ls-tree", "--name-only", pushed["commit"]).split())
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json", "README.md", "samples.png",
            "metrics.json", "arguments.json"} | CODE <= files
    assert "training_args.bin" not in files and not any(f.startswith("checkpoint") for f in files)
    card = hub.git(REPO, "show", f"{pushed['commit']}:README.md")
    metadata = card.split("---")[1]
    for line in ("library_name: transformers", "pipeline_tag: image-to-text", "license: apache-2.0", "- nanovlm", "preset: mini"):
        assert line in metadata
    metrics = json.loads((pushed["out"] / "metrics.json").read_text())
    assert f"{metrics['num_parameters'] / 1e6:.2f}M ({metrics['num_parameters']:,})" in card  # the parameter table's total
    assert "64 built-in picture scenes" in card and "![validation pictures" in card and "(samples.png)" in card
    for call in ('pipeline("image-to-text", model="org/nanovlm-tiny"', "AutoModelForImageTextToText.from_pretrained(",
                 "AutoModel.from_pretrained(", "AutoProcessor.from_pretrained("):
        assert call in card
    assert "## Limitations" in card and "3-4 year old" in card
    # the token: sent on every write, in no log, in no object of the repo (training_args.bin holds it and stayed home)
    writes = [entry for entry in hub.log if entry[0] == "POST"]
    assert writes and all(bearer == TOKEN for *_, bearer in writes)
    assert TOKEN.encode() in (pushed["out"] / "training_args.bin").read_bytes()
    assert TOKEN not in pushed["logs"] and TOKEN.encode() not in git_objects(hub, REPO)


LOAD_BY_NAME = BLOCK_PROJECT + textwrap.dedent(
    """
    import hashlib
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
    digest = lambda model: {{k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()}}
    model = AutoModelForImageTextToText.from_pretrained({repo!r}, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained({repo!r}, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained({repo!r}, trust_remote_code=True)
    captioner = pipeline("image-to-text", model={repo!r}, trust_remote_code=True)
    tokens = model.generate(**processor(images=[Image.open(p) for p in {images!r}]), max_new_tokens=12, do_sample=False)
    print(json.dumps({{"modules": [type(o).__module__ for o in (model, base, processor, captioner)], "model": digest(model),
                      "base": digest(base), "tokens": tokens.tolist(),
                      "base_tokens": base.generate(**processor(images=[Image.open(p) for p in {images!r}]), max_new_tokens=12,
                                                   do_sample=False).tolist(), "captions": captioner({images!r}, max_new_tokens=12)}}))
    """
)


def test_fresh_process_loads_by_name_with_the_same_weights_and_captions(hub, pushed, tmp_path):
    out = pushed["out"]
    images = []
    for i in range(3):
        images.append(str(tmp_path / f"{i}.png"))
        toy_image(i).save(images[-1])
    script = LOAD_BY_NAME.format(project=str(ROOT), repo=REPO, images=images)
    result = run([sys.executable, "-c", script], hub_env(hub, tmp_path / "hf_home"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(m.startswith("transformers_modules.") for m in remote["modules"])  # model, processor and pipeline: Hub code

    weights = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in load_file(out / "model.safetensors").items()}
    assert {k: remote["model"][k] for k in weights} == weights
    assert {k: remote["base"][k] for k in weights} == weights  # AutoModel: the same captioner

    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    model = AutoModelForImageTextToText.from_pretrained(out).eval()  # the original, through this project's classes
    processor = AutoProcessor.from_pretrained(out)
    assert remote["tokens"] == model.generate(**processor(images=images), max_new_tokens=12, do_sample=False).tolist()
    assert remote["base_tokens"] == remote["tokens"]
    assert remote["captions"] == pipeline("image-to-text", model=str(out), trust_remote_code=True)(images, max_new_tokens=12)


def test_second_push_with_a_report_updates_the_repo(hub, pushed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(pushed["out"], out)
    report = {"settings": {"dataset": "scenes", "num_examples": 8},
              "metrics": {"grounding.object_recall": 0.125, "captions.cider_d": 0.4321}}
    (out / "report.json").write_text(json.dumps(report))
    home = tmp_path / "hf_home"
    home.mkdir()
    (home / "token").write_text(TOKEN)  # where `hf auth login` keeps it; HF_TOKEN is unset
    before = len(hub.log)
    result = run([sys.executable, "-m", "publishing.push_to_hub", str(out), "--repo_id", REPO], hub_env(hub, home))
    assert result.returncode == 0, result.stderr[-4000:]
    second = hub.git(REPO, "rev-parse", "main")
    assert hub.git(REPO, "rev-parse", "main~1") == pushed["commit"]
    # only what changed went up: the report, and the card that now shows it
    assert set(hub.git(REPO, "diff", "--name-only", pushed["commit"], second).split()) == {"README.md", "report.json"}
    url = f"{hub.url}/{REPO}/resolve/main/README.md"  # served at once
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as response:
        assert response.headers["X-Repo-Commit"] == second
    with urllib.request.urlopen(url) as response:
        card = response.read().decode()
    assert "From the evaluation report on 8 examples of scenes data" in card and "| `captions.cider_d` | 0.432 |" in card
    assert all(bearer == TOKEN for method, _, _, bearer in hub.log[before:] if method == "POST")
    assert TOKEN not in result.stdout + result.stderr and TOKEN.encode() not in git_objects(hub, REPO)


@pytest.mark.parametrize("repo_id, where, token, expected", [
    ("not a name/", "hub", TOKEN, "'not a name/' is not a valid Hub repo name"),
    ("someone-else/nanovlm", "hub", TOKEN, "your token cannot write to 'someone-else'"),
    (REPO, "hub", "hf_wrong", "the Hub refused the token"),
    (REPO, "unreachable", TOKEN, "cannot reach the Hub at http://127.0.0.1:"),
    (REPO, "offline", TOKEN, "HF_HUB_OFFLINE is set"),
], ids=["bad-name", "no-rights", "refused-token", "unreachable", "offline"])
def test_failed_push_says_what_to_check(hub, pushed, monkeypatch, caplog, repo_id, where, token, expected):
    url = {"hub": hub.url, "unreachable": f"http://127.0.0.1:{free_port()}", "offline": hub.url}[where]
    monkeypatch.setattr(constants, "ENDPOINT", url)  # what HF_ENDPOINT sets when huggingface_hub is imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", where == "offline")
    monkeypatch.setenv("HF_TOKEN", token)
    commits = hub.git("org/nanovlm-tiny", "rev-list", "--count", "main")
    assert push_to_hub.main([str(pushed["out"]), "--repo_id", repo_id]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and expected in errors[0], errors
    assert TOKEN not in caplog.text and "hf_wrong" not in caplog.text
    assert hub.git("org/nanovlm-tiny", "rev-list", "--count", "main") == commits


def test_a_file_holding_the_token_is_not_pushed(hub, pushed, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    shutil.copytree(pushed["out"], out)
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps(metrics | {"note": f"pushed with {TOKEN}"}))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    requests = len(hub.log)
    assert push_to_hub.main([str(out), "--repo_id", REPO]) == 1
    assert "metrics.json contains your Hub token; nothing was pushed" in caplog.text and TOKEN not in caplog.text
    assert len(hub.log) == requests  # stopped before any request


def test_train_push_to_hub_fails_before_training_on_a_repo_it_cannot_write(hub, tmp_path):
    out = tmp_path / "run"
    result = run([sys.executable, str(ROOT / "train.py"), *TINY_MODEL, "--output_dir", str(out), "--max_steps", "1",
                  "--push_to_hub", "--hub_model_id", "someone-else/nanovlm"], hub_env(hub, tmp_path / "hf_home", HF_TOKEN=TOKEN))
    assert result.returncode != 0
    assert "--push_to_hub: push to someone-else/nanovlm" in result.stderr and "cannot write to 'someone-else'" in result.stderr
    assert not out.exists() and TOKEN not in result.stdout + result.stderr


def test_push_carries_the_onnx_export_and_a_download_captions_with_it(hub, pushed, tmp_path, monkeypatch, caplog):
    """An output folder with `python -m modeling_nanovlm.export_onnx`'s files pushes them under onnx/ in the same
    commit as the weights (SmolVLM's layout, what web/ loads); a download of the repo captions in onnxruntime with
    generate()'s tokens. A partial export stops the push."""
    import numpy as np
    from transformers import AutoModelForImageTextToText, AutoProcessor

    repo = "org/nanovlm-onnx"
    out = tmp_path / "run"
    shutil.copytree(pushed["out"], out)
    export_onnx(str(out), dynamo=False)  # the legacy exporter: the same files, faster here
    exported = {f"onnx/{name}{suffix}.onnx" for name in ("vision_encoder", "embed_tokens", "decoder_model_merged")
                for suffix in ("", "_quantized")}
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert push_to_hub.main([str(out), "--repo_id", repo]) == 0
    assert hub.git(repo, "rev-list", "--count", "main") == "2"  # the repo's creation, then one commit with everything
    files = set(hub.git(repo, "ls-tree", "-r", "--name-only", "main").split())
    assert exported | {"model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json", "README.md"} <= files
    for name in exported:  # the bytes uploaded
        assert int(hub.git(repo, "cat-file", "-s", f"main:{name}")) == (out / name).stat().st_size
    assert TOKEN.encode() not in git_objects(hub, repo)
    assert "## ONNX" in hub.git(repo, "show", "main:README.md") and "## ONNX" not in (pushed["out"] / "README.md").read_text()

    download = tmp_path / "downloaded"
    fetch = run([sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download; "
                 f"snapshot_download({repo!r}, local_dir=sys.argv[1])", str(download)], hub_env(hub, tmp_path / "hf_home"))
    assert fetch.returncode == 0, fetch.stderr[-2000:]
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=[toy_image(i) for i in range(3)], text=[""] * 3)
    expected = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=8).numpy()
    for quantized in (False, True):
        got = OnnxCaptioner(str(download), quantized=quantized, threads=1).generate(
            inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), inputs["pixel_values"].numpy(), max_new_tokens=8)
        if not quantized:
            np.testing.assert_array_equal(got, expected)
        assert got.shape[0] == 3

    (out / "onnx" / "embed_tokens.onnx").unlink()
    assert push_to_hub.main([str(out), "--repo_id", repo]) == 1
    assert "lacks embed_tokens.onnx: export again with `python -m modeling_nanovlm.export_onnx" in caplog.text
    assert hub.git(repo, "rev-list", "--count", "main") == "2"


def test_hub_strategy_checkpoint_pushes_each_save_and_another_machine_resumes_from_it(hub, tmp_path):
    """`--push_to_hub --hub_strategy checkpoint`: every save replaces `last-checkpoint/` in the repo (without
    training_args.bin, which holds the token); a second machine downloads it and resumes into a new folder."""
    repo = "org/nanovlm-checkpoints"
    common = [sys.executable, str(ROOT / "train.py"), *TINY_MODEL, *QUIET, "--num_train_examples", "64",
              "--num_validation_examples", "8", "--per_device_train_batch_size", "16", "--eval_strategy", "no", "--use_cpu",
              "--save_strategy", "steps", "--save_steps", "2"]
    first = run([*common, "--output_dir", str(tmp_path / "first"), "--max_steps", "4", "--push_to_hub", "--hub_model_id", repo,
                 "--hub_token", TOKEN, "--hub_strategy", "checkpoint"], hub_env(hub, tmp_path / "hf_home"))
    assert first.returncode == 0, first.stderr[-4000:]
    history = hub.git(repo, "log", "--format=%s", "main").splitlines()
    assert history[1:3] == ["Checkpoint at step 4", "Checkpoint at step 2"]  # then the final push on top
    files = set(hub.git(repo, "ls-tree", "-r", "--name-only", "main").split())
    checkpoint = {f.split("/", 1)[1] for f in files if f.startswith("last-checkpoint/")}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "tokenizer.json"} <= checkpoint
    assert "training_args.bin" not in checkpoint and "model.safetensors" in files  # and the finished model at the top
    state = json.loads(hub.git(repo, "show", "main:last-checkpoint/trainer_state.json"))
    assert state["global_step"] == 4
    assert TOKEN.encode() not in git_objects(hub, repo)

    download = tmp_path / "downloaded"
    fetch = run([sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download; "
                 f"snapshot_download({repo!r}, allow_patterns=['last-checkpoint/*'], local_dir=sys.argv[1])", str(download)],
                hub_env(hub, tmp_path / "hf_home_2"))
    assert fetch.returncode == 0, fetch.stderr[-2000:]
    second = run([*common, "--output_dir", str(tmp_path / "second"), "--max_steps", "6",
                  "--resume_from_checkpoint", str(download / "last-checkpoint")], hub_env(hub, tmp_path / "hf_home_2"))
    assert second.returncode == 0, second.stderr[-4000:]
    # it went on from step 4: the only checkpoint it wrote is step 6's (a fresh start would have saved 2 and 4 too)
    assert sorted(p.name for p in (tmp_path / "second").glob("checkpoint-*")) == ["checkpoint-6"]
    assert json.loads((tmp_path / "second" / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
