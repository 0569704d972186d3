"""Auto classes, remote code in a fresh process, both pipelines, and a tiny model that learns."""

import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import CAPTIONS, toy_image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

from modeling_nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMModel, NanoVLMProcessor
from processing.collator import NanoVLMCollator

ROOT = Path(__file__).resolve().parents[1]


def overfit(model, processor, images, captions, steps=300, lr=3e-3, optimizer=None):
    """Full-batch AdamW on a handful of pairs (continuing `optimizer` when given); returns the losses."""
    batch = NanoVLMCollator(processor)([{"image": i, "text": t} for i, t in zip(images, captions)])
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def captions_of(model, processor, images, **kwargs):
    inputs = processor(images=images)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False, **kwargs)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tester, processor):
    """A tiny model that has memorised the eight toy captions, saved with its processor.

    It trains in rounds until greedy decoding gives back every caption, so the fixture converges
    by construction on any CPU's numerics (a fixed step count landed on 6 of 8 on one CPU and 8 of 8
    on another); the cap only stops a model that does not learn.
    """
    torch.manual_seed(0)
    model = tester.get_model(hidden_dropout=0.0, attention_dropout=0.0)
    images = [toy_image(i) for i in range(8)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # 3e-3 can stall on a plateau
    losses = []
    for _ in range(12):  # rounds of 100 full-batch steps
        losses += overfit(model, processor, images, CAPTIONS, steps=100, optimizer=optimizer)
        if captions_of(model.eval(), processor, images) == CAPTIONS:
            break
    path = tmp_path_factory.mktemp("tiny")
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, losses


def test_tiny_model_memorises_eight_captions(trained_dir, processor):
    _, model, losses = trained_dir
    assert losses[-1] < 0.05 * losses[0]
    got = captions_of(model, processor, [toy_image(i) for i in range(8)])
    assert got == CAPTIONS, f"not memorised after {len(losses)} steps: {got}"


def test_saved_folder_has_weights_code_and_auto_map(trained_dir):
    path, _, _ = trained_dir
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "configuration_nanovlm.py", "modeling_nanovlm.py", "processing_nanovlm.py",
            "tokenizer.json", "processor_config.json", "chat_template.jinja"} <= names
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_nanovlm.NanoVLMConfig",
        "AutoModel": "modeling_nanovlm.NanoVLMForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_nanovlm.NanoVLMForConditionalGeneration",
    }
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "processing_nanovlm.NanoVLMImageToTextPipeline"
    assert json.loads((path / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_nanovlm.NanoVLMProcessor"
    }


def test_auto_classes_resolve_to_nanovlm(trained_dir):
    path, _, _ = trained_dir
    assert isinstance(AutoConfig.from_pretrained(path), NanoVLMConfig)
    assert isinstance(AutoModel.from_pretrained(path), NanoVLMForConditionalGeneration)  # the captioner, as on the Hub
    assert isinstance(NanoVLMModel.from_pretrained(path), NanoVLMModel)  # the headless model, by name
    assert isinstance(AutoModelForImageTextToText.from_pretrained(path), NanoVLMForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(path), NanoVLMProcessor)


# The start of a script for a fresh process in which the project cannot be imported (`.format(project=ROOT)`).
BLOCK_PROJECT = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):  # the project package must not be importable
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_nanovlm", "processing", "evaluation"):
                raise ImportError(name + " is blocked: remote code must not need the project")
    sys.meta_path.insert(0, Block())
    sys.path = [p for p in sys.path if p not in ("", {project!r})]
    """
)
FRESH_PROCESS = BLOCK_PROJECT + textwrap.dedent(
    """
    import transformers
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
    path = {path!r}
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    images = [Image.open(p) for p in {images!r}]
    inputs = processor(images=images)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    auto = AutoModel.from_pretrained(path, trust_remote_code=True).eval()  # the model card's own call
    captioner = pipeline("image-to-text", model=path, trust_remote_code=True)
    print(json.dumps({{"tokens": out.tolist(), "module": type(model).__module__, "transformers": transformers.__version__,
                      "auto_model_tokens": auto.generate(**inputs, max_new_tokens=20, do_sample=False).tolist(),
                      "pipeline": captioner({images!r}[0])}}))
    """
)



def declared_transformers_range() -> tuple[str, str]:
    """The oldest and the newest transformers minors that setup.cfg declares (`>=5.15,<5.26` -> 5.15, 5.25)."""
    low, major, minor = re.search(r"transformers>=(\d+\.\d+),<(\d+)\.(\d+)", (ROOT / "setup.cfg").read_text()).groups()
    return low, f"{major}.{int(minor) - 1}"


def link_distribution(name: str, python: str) -> None:
    """Put this environment's installed `name` into `python`'s environment as hard links of its files (copies across
    file systems): pip then finds it installed, and torch's ~1 GB is neither unpacked nor copied again."""
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    distribution = importlib.metadata.distribution(name)
    root = Path(distribution.locate_file("")).resolve()
    for file in distribution.files:
        source = Path(distribution.locate_file(file)).resolve()
        if not source.is_file() or not source.is_relative_to(root):  # e.g. bin/torchrun: its shebang names our Python
            continue
        target = Path(purelib) / source.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


@pytest.fixture(scope="session")
def oldest_transformers_python():
    """A Python whose environment has only torch (this one's, linked), Pillow and the oldest transformers the project
    declares, in `.venv-transformers-<minor>` at the repository root: built once, reused after."""
    oldest, _ = declared_transformers_range()
    venv = ROOT / f".venv-transformers-{oldest}"
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import PIL, torch, transformers; print(transformers.__version__)"]
    # Tests on parallel workers may ask at once: one builds, the others wait for it and reuse it.
    with open(Path(tempfile.gettempdir()) / f"nanovlm-venv-transformers-{oldest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        installed = subprocess.run(check, capture_output=True, text=True) if python.exists() else None
        if installed is None or installed.returncode or not installed.stdout.startswith(oldest + "."):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            link_distribution("torch", str(python))  # the same torch: only transformers differs
            packages = [f"torch=={torch.__version__}", f"transformers~={oldest}.0", "pillow"]  # torch's own dependencies come too
            result = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
                                    capture_output=True, text=True, timeout=1800)
            assert result.returncode == 0, f"could not install {packages} into {venv}: {result.stderr[-2000:]}"
    return python


def test_declared_newest_transformers_is_the_one_installed():
    """The suite runs on the newest transformers minor that setup.cfg allows; the oldest gets the Hub-code check."""
    oldest, newest = declared_transformers_range()
    assert transformers.__version__.startswith(newest + "."), (transformers.__version__, newest)
    assert tuple(map(int, oldest.split("."))) <= tuple(map(int, newest.split(".")))


TRANSFORMERS_VERSIONS = ["installed", pytest.param("oldest declared", marks=pytest.mark.slow)]


@pytest.mark.parametrize("transformers_version", TRANSFORMERS_VERSIONS)
def test_fresh_process_loads_remote_code_and_gets_same_tokens(trained_dir, processor, tmp_path, transformers_version, request):
    """The folder's own code, in a process that cannot import the project, under the installed transformers and
    under the oldest one setup.cfg declares (its own virtual environment), gives the same greedy tokens."""
    path, model, _ = trained_dir
    assert_remote_code_gives_the_same_tokens(path, model, processor, tmp_path, transformers_version, request, CAPTIONS[0])


def assert_remote_code_gives_the_same_tokens(path, model, processor, tmp_path, transformers_version, request, caption):
    """The check of `test_fresh_process_loads_remote_code_and_gets_same_tokens` for any saved model (each image tower's
    tests call it with theirs): `model`'s greedy tokens for three toy images from the folder's code in a fresh process
    that cannot import the project, and `caption` from its "image-to-text" pipeline for the first."""
    python = sys.executable if transformers_version == "installed" else str(request.getfixturevalue("oldest_transformers_python"))
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"{i}.png"))
        toy_image(i).save(files[-1])
    script = FRESH_PROCESS.format(path=str(path), images=files, project=str(ROOT))
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules.")
    oldest, _ = declared_transformers_range()
    if transformers_version == "installed":
        assert remote["transformers"] == transformers.__version__
    else:
        assert remote["transformers"].startswith(oldest + ".")
    expected = model.generate(**processor(images=files), max_new_tokens=20, do_sample=False)
    assert remote["tokens"] == expected.tolist()
    assert remote["auto_model_tokens"] == expected.tolist()
    assert remote["pipeline"] == [{"generated_text": caption}]


def test_image_to_text_pipeline(trained_dir, tmp_path):
    path, _, _ = trained_dir
    captioner = pipeline("image-to-text", model=str(path), trust_remote_code=True)
    file = tmp_path / "one.png"
    toy_image(1).save(file)
    assert captioner(toy_image(0)) == [{"generated_text": CAPTIONS[0]}]
    assert captioner(str(file)) == [{"generated_text": CAPTIONS[1]}]
    assert captioner([toy_image(2), toy_image(3)]) == [
        [{"generated_text": CAPTIONS[2]}], [{"generated_text": CAPTIONS[3]}]
    ]
    continued = captioner(toy_image(4), prompt="Two pink")
    assert continued == [{"generated_text": CAPTIONS[4]}]


# A loaded model with its processor, or with the processor's parts, in a process that imports the project: no path, so
# transformers never reads the config's custom_pipelines, and 5.2x turns "image-to-text" into "image-text-to-text".
OBJECTS_PIPELINE = textwrap.dedent(
    """
    import json, sys
    from PIL import Image
    from transformers import pipeline
    from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMProcessor
    model = NanoVLMForConditionalGeneration.from_pretrained({path!r}).eval()
    processor = NanoVLMProcessor.from_pretrained({path!r})
    parts = {{"processor": dict(processor=processor),
              "image_processor and tokenizer": dict(image_processor=processor.image_processor, tokenizer=processor.tokenizer)}}
    images = [Image.open(p) for p in {images!r}]
    out = {{}}
    for name, kwargs in parts.items():
        captioner = pipeline("image-to-text", model=model, **kwargs)
        out[name] = [captioner(images[0]), captioner(images[1:3]), captioner(images[4], prompt="Two pink"),
                     pipeline("image-text-to-text", model=model, **kwargs)(images=images[2], text="There is a",
                                                                            max_new_tokens=20)[0]["generated_text"]]
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("transformers_version", ["installed", "oldest declared"])
def test_image_to_text_pipeline_from_loaded_objects(trained_dir, tmp_path, transformers_version, request):
    """pipeline("image-to-text", model=<loaded model>, processor=<loaded processor>), or with image_processor= and
    tokenizer=, captions as the folder's pipeline does, and "image-text-to-text" still continues a text; under the
    installed transformers and the oldest declared (which has no "image-to-text" task of its own)."""
    python = sys.executable if transformers_version == "installed" else str(request.getfixturevalue("oldest_transformers_python"))
    path, _, _ = trained_dir
    files = []
    for i in range(5):
        files.append(str(tmp_path / f"{i}.png"))
        toy_image(i).save(files[-1])
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run([python, "-c", OBJECTS_PIPELINE.format(path=str(path), images=files)], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [[{"generated_text": CAPTIONS[0]}], [[{"generated_text": CAPTIONS[1]}], [{"generated_text": CAPTIONS[2]}]],
                [{"generated_text": CAPTIONS[4]}], CAPTIONS[2]]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"processor": expected, "image_processor and tokenizer": expected}


def test_image_text_to_text_pipeline_continues_a_prefix(trained_dir):
    path, _, _ = trained_dir
    vlm = pipeline("image-text-to-text", model=str(path), trust_remote_code=True)
    out = vlm(images=toy_image(2), text="There is a", max_new_tokens=20)
    assert out[0]["generated_text"] == CAPTIONS[2]
    chat = [{"role": "user", "content": [{"type": "image", "image": toy_image(5)}, {"type": "text", "text": "I see"}]}]
    reply = vlm(text=chat, max_new_tokens=20)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and "I see" + reply["content"] == CAPTIONS[5]
    image_only = [{"role": "user", "content": [{"type": "image", "image": toy_image(6)}]}]  # a chat with a picture, no text
    assert vlm(text=image_only, max_new_tokens=20)[0]["generated_text"][-1]["content"] == CAPTIONS[6]
