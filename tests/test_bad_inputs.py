"""Bad input at every entry point: a message that names the input and what to do, or a counted skip
where the user asked for one; never a raw traceback, a hang or a silently wrong result.

One table per entry point; each row is (id, a function making the bad input under tmp_path and
running the entry point, the expected error type, a pattern its message must match).
"""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, toy_image
from fake_openai_server import FakeOpenAIServer, child_text
from PIL import Image

import train
from evaluation import cli as evaluation_cli
from modeling_nanovlm import NanoVLMForConditionalGeneration
from descriptions import build as build_descriptions

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--preset", "mini", "--vision_feature_select", "pooled", "--image_size", "32", "--vocab_size", "300", "--config_overrides",
    "hidden_size=32,num_hidden_layers=2,num_attention_heads=4,vision_hidden_size=32,vision_num_attention_heads=4,"
    "patch_size=8,vision_stem_channels=16,vision_pool_size=2,max_position_embeddings=128",
    "--num_sample_captions", "0", "--max_new_tokens", "8", "--disable_tqdm", "true", "--use_cpu", "--report_to", "none",
    "--num_train_examples", "32", "--num_validation_examples", "8", "--max_steps", "1", "--save_strategy", "no",
    "--eval_strategy", "no",
]


def write_coco(root: Path, n: int = 3, *, captions=None, file_names=None) -> tuple[str, str]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": []}
    for k in range(n):
        Image.new("RGB", (16, 16), (k * 40, 90, 20)).save(images / f"{k}.png")
        name = file_names[k] if file_names else f"{k}.png"
        coco["images"].append({"id": k, "file_name": name})
        for j, caption in enumerate(captions[k] if captions else [f"img{k} a dog runs on the grass, take {j}." for j in range(2)]):
            coco["annotations"].append({"image_id": k, "id": 10 * k + j, "caption": caption})
    (root / "captions.json").write_text(json.dumps(coco))
    return str(root / "captions.json"), str(images)


def coco_args(caption_file, image_dir, *extra):
    return ["--dataset", "coco", "--caption_file", caption_file, "--image_dir", image_dir, *extra]


# --- train.py ----------------------------------------------------------------------------------------


def _csv_as_captions(tmp):
    (tmp / "captions.csv").write_text("image,caption\n0.png,a dog\n")
    _, images = write_coco(tmp)
    return coco_args(str(tmp / "captions.csv"), images)


def _coco_edited(edit):
    """A train.py argument maker: a valid COCO caption file, then `edit(coco)` applied to it."""

    def make(tmp):
        caption_file, images = write_coco(tmp)
        coco = json.loads(Path(caption_file).read_text())
        edit(coco)
        Path(caption_file).write_text(json.dumps(coco))
        return coco_args(caption_file, images)

    return make


def _hf_folder(tmp, texts):
    import datasets

    ds = datasets.Dataset.from_dict({"image": [toy_image(i) for i in range(len(texts))], "text": texts})
    ds.save_to_disk(str(tmp / "hf"))
    return ["--dataset", "hf", "--data_path", str(tmp / "hf"), "--validation_fraction", "0.25"]


def _output_folder_of_an_earlier_run(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "tokenizer.json").write_text("{}")
    return []


def _resume_without_checkpoint(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "tokenizer.json").write_text("{}")
    return ["--resume_from_checkpoint", "latest"]


TRAIN_CASES = [
    ("unknown dataset", lambda tmp: ["--dataset", "csv"], ValueError, "--dataset must be scenes, coco or hf"),
    ("unknown preset", lambda tmp: ["--preset", "huge"], ValueError, "preset must be one of"),
    ("coco without files", lambda tmp: ["--dataset", "coco"], ValueError, "needs --caption_file"),
    ("caption file missing", lambda tmp: coco_args(str(tmp / "nope.json"), str(tmp)), FileNotFoundError, "caption file .*nope.json does not exist"),
    ("CSV as caption file", _csv_as_captions, ValueError, r"captions.csv is not JSON .*MS-COCO"),
    ("annotation without image_id", _coco_edited(lambda coco: coco["annotations"][1].pop("image_id")), ValueError,
     "annotation 1 .*needs 'image_id' and 'caption'"),
    ("image without file_name", _coco_edited(lambda coco: coco["images"][0].pop("file_name")), ValueError, "image 0 .*needs 'id' and a 'file_name'"),
    ("absolute path outside image_dir", lambda tmp: coco_args(*write_coco(tmp, file_names=["/etc/passwd", "1.png", "2.png"])),
     ValueError, "image 0: file_name '/etc/passwd' resolves outside the image folder"),
    ("../ path outside image_dir", lambda tmp: coco_args(*write_coco(tmp, file_names=["../captions.json", "1.png", "2.png"])),
     ValueError, "resolves outside the image folder"),
    ("every caption empty", lambda tmp: coco_args(*write_coco(tmp, captions=[[""], [None], ["  "]])), ValueError, "no image with a caption"),
    ("all images missing, skipping asked",
     lambda tmp: coco_args(*write_coco(tmp, file_names=["x.png", "y.png", "z.png"]), "--skip_bad_images", "true"),
     ValueError, "no train example is left"),
    ("image missing, no skipping", lambda tmp: coco_args(*write_coco(tmp, file_names=["x.png", "1.png", "2.png"])),
     ValueError, "could not be read: .*x.png .*--skip_bad_images"),
    ("hf: wrong text column", lambda tmp: _hf_folder(tmp, ["a dog"] * 4) + ["--text_column", "caption"], ValueError, "has no column 'caption'"),
    ("hf: every text null", lambda tmp: _hf_folder(tmp, [None] * 4), ValueError, "no train example is left"),
    ("max_length 0", lambda tmp: ["--max_length", "0"], ValueError, "--max_length must be at least 2"),
    ("max_length past the position table", lambda tmp: ["--max_length", "1000"], ValueError,
     r"--max_length 1000 \+ 4 visual tokens exceed .*--max_length 124"),
    ("config override without =", lambda tmp: ["--config_overrides", "hidden_size"], ValueError, "'hidden_size' is not FIELD=VALUE"),
    ("config override of a wrong type", lambda tmp: ["--config_overrides", "hidden_dropout=high"], ValueError,
     "hidden_dropout='high' is not a float"),
    ("config override of an unknown field", lambda tmp: ["--config_overrides", "depth=3"], ValueError, "unknown config field 'depth'"),
    ("config override out of range", lambda tmp: ["--config_overrides", "hidden_dropout=1.5"], ValueError, r"hidden_dropout must be in \[0, 1\)"),
    ("recipe missing", lambda tmp: ["--recipe", str(tmp / "none.json")], ValueError, "none.json: no such file"),
    ("recipe not JSON", lambda tmp: (tmp / "r.json").write_text("preset: mini") and ["--recipe", str(tmp / "r.json")], ValueError,
     "is not valid JSON"),
    ("recipe a list", lambda tmp: (tmp / "r.json").write_text("[1]") and ["--recipe", str(tmp / "r.json")], ValueError, "must hold a JSON object"),
    ("eval_metrics unknown", lambda tmp: ["--eval_metrics", "bleu"], ValueError, "--eval_metrics must be grounding or cider"),
    ("grounding on photos", lambda tmp: coco_args(*write_coco(tmp), "--eval_metrics", "grounding"), ValueError, "needs --dataset scenes"),
    ("output folder of an earlier run", _output_folder_of_an_earlier_run, ValueError, "already holds files .*--overwrite_output_dir"),
    ("resume with no checkpoint", _resume_without_checkpoint, ValueError, "no complete checkpoint in .*--overwrite_output_dir"),
    ("resume from a missing folder", lambda tmp: ["--resume_from_checkpoint", str(tmp / "checkpoint-9")], ValueError, "no such checkpoint folder"),
    ("words loss with too rare words", lambda tmp: coco_args(*write_coco(tmp), "--aux_words_weight", "1", "--aux_words_min_count", "99"),
     ValueError, "no content word is used 99\\+ times"),
    ("scene grounding loss on photos", lambda tmp: coco_args(*write_coco(tmp), "--aux_grounding_weight", "1"), ValueError, "needs --dataset scenes"),
    ("scene places loss on photos", lambda tmp: coco_args(*write_coco(tmp), "--aux_places_weight", "1"), ValueError, "needs --dataset scenes"),
    ("masked-image modelling masking every patch", lambda tmp: ["--aux_mim_weight", "1", "--aux_mim_mask_ratio", "1"], ValueError,
     "--aux_mim_mask_ratio must be between 0 and 1"),
]


@pytest.mark.parametrize("make, error, pattern", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_bad_input(tmp_path, make, error, pattern):
    extra = make(tmp_path)
    with pytest.raises(error, match=pattern):
        train.main([*TINY, "--output_dir", str(tmp_path / "out"), *extra])


def test_train_skips_and_counts_empty_captions_and_outside_paths(tmp_path, caplog):
    captions = [["a red ball", ""], ["a blue box", None], ["a green tree"], ["a cat"]]
    caption_file, images = write_coco(tmp_path, 4, captions=captions, file_names=["0.png", "1.png", "2.png", "/etc/passwd"])
    with caplog.at_level(logging.WARNING):
        train.main([*TINY, "--output_dir", str(tmp_path / "out"), *coco_args(caption_file, images, "--skip_bad_images", "true",
                                                                                "--validation_fraction", "0.34")])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    skipped = metrics["data.skipped_bad_images"]
    assert skipped["count"] == 1 and "outside the image folder" in skipped["examples"][0]["reason"]
    assert "skipped 2 empty or null caption(s)" in caplog.text


# --- processor, model, from_pretrained, generate ----------------------------------------------------------


def _fifo(tmp):
    os.mkfifo(tmp / "pipe.jpg")
    return [str(tmp / "pipe.jpg")]


def _bomb(tmp):
    Image.new("RGB", (64, 64)).save(tmp / "big.png")
    return [str(tmp / "big.png")]


PROCESSOR_CASES = [
    ("nothing", lambda tmp: None, "needs images, text or both"),
    ("empty image list", lambda tmp: [], "empty list; pass at least one image"),
    ("missing file", lambda tmp: [str(tmp / "none.jpg")], "none.jpg: no such image file"),
    ("text file as image", lambda tmp: (tmp / "a.jpg").write_text("hello") and [str(tmp / "a.jpg")], "a.jpg could not be decoded as an image"),
    ("folder as image", lambda tmp: [str(tmp)], "is not a regular file"),
    ("FIFO as image (would hang)", _fifo, "pipe.jpg is not a regular file"),
    ("decompression bomb", _bomb, "big.png is too large to decode safely"),
    ("number as image", lambda tmp: [3], "image 0 must be a PIL image or a path"),
    ("None in the list", lambda tmp: [toy_image(0), None], "image 1 must be a PIL image or a path"),
]


@pytest.mark.parametrize("make, pattern", [c[1:] for c in PROCESSOR_CASES], ids=[c[0] for c in PROCESSOR_CASES])
def test_processor_refuses_bad_images(tmp_path, processor, monkeypatch, make, pattern):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4,096 pixels: past twice the limit, a "bomb"
    images = make(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        processor(images=images) if images is not None else processor()


def test_processor_refuses_images_and_texts_of_different_counts(processor):
    with pytest.raises(ValueError, match="got 2 images but 1 texts"):
        processor(images=[toy_image(0), toy_image(1)], text=["a"])


def test_from_pretrained_names_a_truncated_weights_file(saved, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in saved.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match="broken: the weights .*damaged or incomplete"):
        NanoVLMForConditionalGeneration.from_pretrained(broken)


def test_from_pretrained_names_a_missing_folder(tmp_path):
    with pytest.raises(OSError, match="nothing-here: no such folder"):
        NanoVLMForConditionalGeneration.from_pretrained(str(tmp_path / "nothing-here"))


class _Payload:  # a pickle that would run code when loaded unsafely
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _copy_without_weights(saved, target):
    target.mkdir()
    (target / "config.json").write_text((saved / "config.json").read_text())
    return target


def test_from_pretrained_refuses_pickled_code(saved, tmp_path):
    pickled = _copy_without_weights(saved, tmp_path / "pickled")
    torch.save({"weight": _Payload()}, pickled / "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        NanoVLMForConditionalGeneration.from_pretrained(pickled)


def test_from_pretrained_refuses_a_checkpoint_missing_weights(saved, tmp_path):
    empty = _copy_without_weights(saved, tmp_path / "empty")
    torch.save({}, empty / "pytorch_model.bin")  # loads, but holds none of the model's weights
    with pytest.raises(OSError, match="empty: .* weight\\(s\\) are missing from the checkpoint"):
        NanoVLMForConditionalGeneration.from_pretrained(empty)


def test_generate_stops_at_the_position_table_and_keeps_the_text(tester, processor, caplog):
    model = tester.get_model()
    inputs = processor(images=[toy_image(0), toy_image(1)])
    with caplog.at_level(logging.WARNING):
        out = model.generate(**inputs, max_new_tokens=5000, do_sample=False, eos_token_id=None)
    assert out.shape == (2, model.config.max_position_embeddings) and "generating at most" in caplog.text  # every position used


def test_generate_refuses_a_prompt_that_fills_the_positions(tester, processor):
    model = tester.get_model()
    with pytest.raises(ValueError, match="fills the decoder's 64 positions: shorten the prompt"):
        model.generate(**processor(images=[toy_image(0)], text=["I see " * 40]), max_new_tokens=5)


def test_forward_names_wrong_pixel_values_and_token_ids(tester, processor):
    model = tester.get_model()
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 32, 32\)"):
        model(input_ids=processor(images=[toy_image(0)])["input_ids"], pixel_values=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="input_ids must be in"):
        model(input_ids=torch.tensor([[10**6]]))


# --- python -m evaluation ----------------------------------------------------------------------------


EVALUATION_CASES = [
    ("num_examples 0", lambda tmp, model: ["--model", model, "--dataset", "scenes", "--num_examples", "0"], "--num_examples must be at least 1"),
    ("coco without files", lambda tmp, model: ["--model", model, "--dataset", "coco"], "needs --caption_file"),
    ("unknown part", lambda tmp, model: ["--model", model, "--dataset", "scenes", "--parts", "bleu"], "unknown \\['bleu'\\]"),
    ("judge without a model", lambda tmp, model: ["--model", model, "--dataset", "scenes", "--parts", "judge"], "needs --judge_model"),
]


@pytest.mark.parametrize("make, pattern", [c[1:] for c in EVALUATION_CASES], ids=[c[0] for c in EVALUATION_CASES])
def test_evaluation_refuses_bad_arguments(tmp_path, saved, capsys, make, pattern):
    with pytest.raises(SystemExit) as stop:
        evaluation_cli.main([*make(tmp_path, str(saved)), "--output", str(tmp_path / "eval")])
    assert stop.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_evaluation_names_a_missing_model_folder(tmp_path):
    with pytest.raises(OSError, match="no-model: no such folder"):
        evaluation_cli.main(["--model", str(tmp_path / "no-model"), "--dataset", "scenes", "--output", str(tmp_path / "eval")])


def test_evaluation_refuses_grounding_on_photos(tmp_path, saved):
    caption_file, images = write_coco(tmp_path)
    with pytest.raises(ValueError, match="grounding needs --dataset scenes"):
        evaluation_cli.main(["--model", str(saved), "--dataset", "coco", "--caption_file", caption_file, "--image_dir", images,
                             "--parts", "grounding", "--output", str(tmp_path / "eval")])


# --- the description builder -------------------------------------------------------------------------


FAST = ["--model", "fake", "--timeout", "5", "--backoff_base", "0.01", "--backoff_max", "0.05"]


def run_builder(tmp, base_url, *extra):
    caption_file, images = str(tmp / "captions.json"), str(tmp / "images")
    return build_descriptions.main(["--caption_file", caption_file, "--image_dir", images, "--base_url", base_url,
                                    "--output", str(tmp / "out"), "--style", "short", *FAST, *extra])


def test_builder_never_copies_a_file_outside_the_image_folder_or_not_an_image(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-BYTES")
    write_coco(tmp_path, 4, file_names=[str(secret), "../secret.txt", "2.png", "notes.png"])
    (tmp_path / "images" / "notes.png").write_text("TOP-SECRET-BYTES")  # inside the folder, but not an image
    with FakeOpenAIServer() as server:
        assert run_builder(tmp_path, server.url) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    reasons = {m["image"]: m["reason"] for m in report["missing_images"]}
    assert len(reasons) == 3 and report["done"] == 1
    assert sum("outside the image folder" in r for r in reasons.values()) == 2
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"TOP-SECRET-BYTES" not in path.read_bytes(), path


def test_builder_stops_when_the_server_is_unreachable_and_marks_nothing_failed(tmp_path, caplog):
    write_coco(tmp_path, 6)
    port = free_port()  # nothing listens on it
    with caplog.at_level(logging.ERROR):
        status = run_builder(tmp_path, f"http://127.0.0.1:{port}/v1", "--max_attempts", "3")
    assert status != 0 and f"server unreachable at http://127.0.0.1:{port}/v1" in caplog.text
    cache = tmp_path / "out" / "cache.jsonl"
    assert not cache.exists() or not [line for line in cache.read_text().splitlines() if '"failed"' in line]
    with FakeOpenAIServer() as server:  # the rerun asks every item, no --retry_failed needed
        assert run_builder(tmp_path, server.url) == 0
        assert len(server.log) == 6


def test_builder_redacts_a_key_the_server_echoes(tmp_path, monkeypatch):
    key = "sk-test-abcdefghijklmnop"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    write_coco(tmp_path, 2)
    words = child_text(22).split()
    echoed = " ".join(words[:10] + [key] + words[10:])
    with FakeOpenAIServer(script={"0": [f"raw:{echoed}"], "1": [f"raw:{key} is your key"]}) as server:
        run_builder(tmp_path, server.url, "--max_attempts", "1", "--max_reasks", "0")
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_builder_names_a_csv_caption_file(tmp_path):
    write_coco(tmp_path)
    (tmp_path / "captions.json").write_text("image,caption\n0.png,a dog\n")
    with FakeOpenAIServer() as server, pytest.raises(ValueError, match="captions.json is not JSON"):
        run_builder(tmp_path, server.url)


def test_python_m_train_prints_the_message_not_a_traceback(tmp_path):
    """From the command line a refusal is one line naming the fix, and exit status 1."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--max_length", "0", "--output_dir", str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "--max_length must be at least 2" in done.stderr and "Traceback" not in done.stderr
