"""train.py end to end: learning, two-process DDP, kill-and-resume, and every data source."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from conftest import free_port
from safetensors.torch import load_file

import train
import training
from experiments import gpu_screen
from evaluation.captioning import generate_captions
from evaluation.grounding import grounding_scores
from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMProcessor
from processing import data, scenes

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
TINY_MODEL = [
    "--preset", "mini", "--vision_feature_select", "pooled", "--image_size", "32", "--vocab_size", "300", "--config_overrides",
    "hidden_size=32,num_hidden_layers=2,num_attention_heads=4,vision_hidden_size=32,vision_num_attention_heads=4,"
    "patch_size=8,vision_stem_channels=16,vision_pool_size=2,max_position_embeddings=128",
]
QUIET = ["--num_sample_captions", "0", "--max_new_tokens", "8", "--disable_tqdm", "true"]


def run_train(*args, launcher=(sys.executable,), check=True, timeout=450, **popen):
    if "accelerate.commands.launch" in launcher:  # a rendezvous port of its own: launches on parallel workers never meet
        launcher = (*launcher, "--main_process_port", str(free_port()))
        timeout = min(timeout, 300)  # the tests' launches train a few steps in well under a minute
    cmd = [*launcher, str(ROOT / "train.py"), *TINY_MODEL, *QUIET, *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # A session of its own, so a launch that hangs is killed with every rank it started, and its stderr is shown
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"train.py ran past {timeout} s and was killed with its ranks: {' '.join(cmd)}\n{stderr[-4000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def test_tiny_model_learns_scenes(tmp_path):
    out = tmp_path / "run"
    train.main([
        *TINY_MODEL, *QUIET, "--output_dir", str(out), "--num_train_examples", "384", "--num_validation_examples", "32",
        "--max_steps", "200", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--warmup_steps", "10",
        "--eval_strategy", "steps", "--eval_steps", "100", "--eval_on_start", "true", "--save_strategy", "no",
        "--logging_steps", "10", "--use_cpu", "--generation_num_beams", "2", "--generation_no_repeat_ngram_size", "2",
    ])
    result = metrics(out)
    start = result["first_eval_loss"]  # evaluated before the first step (--eval_on_start)
    assert result["final.eval_loss"] < 0.45 * start, (start, result["final.eval_loss"])
    assert 0.0 <= result["grounding.object_recall"] <= 1.0 and 0.0 <= result["grounding.chair_i"] <= 1.0
    for name in ("model.safetensors", "tokenizer.json", "modeling_nanovlm.py", "loss_curve.png", "samples.png"):
        assert (out / name).exists(), name
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.vocab_size == len(processor.tokenizer) <= 300
    saved = model.generation_config  # generate(), the pipeline and every evaluation decode with it
    assert (saved.num_beams, saved.no_repeat_ngram_size) == (2, 2)

    from huggingface_hub import ModelCard  # the model card, in the output folder with the Hub's metadata

    card = ModelCard.load(out / "README.md")
    assert (card.data.pipeline_tag, card.data.library_name) == ("image-to-text", "transformers")
    assert {"loss", "recall", "chair_i"} <= set(card.data.metrics)
    index = {r.metric_type: r.metric_value for r in card.data.eval_results}  # model-index: this run's own evaluation
    assert index["recall"] == round(result["grounding.object_recall"], 4) and index["loss"] == round(result["final.eval_loss"], 4)
    assert card.data.eval_results[0].dataset_type == "nanovlm-scenes" and card.data.eval_results[0].dataset_split == "validation"

    from experiments import convergence  # the run's log history, kept in the output folder, drawn and summarised

    report = convergence.main([str(out), "--output", str(tmp_path / "curves.json"), "--plot", str(tmp_path / "curves.png")])["run"]
    assert report["steps"] == 200 and report["eval_loss"] == result["final.eval_loss"]
    assert report["gap"] == report["eval_loss"] - report["train_caption_loss"] and report["roughness"] > 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_two_process_ddp_matches_single_process(tmp_path):
    common = ["--num_train_examples", "128", "--num_validation_examples", "16", "--max_steps", "2", "--logging_steps", "1",
              "--eval_strategy", "no", "--save_strategy", "no", "--use_cpu",
              "--config_overrides", TINY_MODEL[-1] + ",hidden_dropout=0.0,attention_dropout=0.0"]
    accelerate = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    run_train("--output_dir", str(tmp_path / "ddp"), "--per_device_train_batch_size", "4", *common, launcher=accelerate)
    run_train("--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8", *common)
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert ddp["parameter_bytes_on_rank_0"] == ddp["parameter_bytes"] == one["parameter_bytes"]  # DDP: a whole copy per rank
    assert abs(ddp["first_logged_loss"] - one["first_logged_loss"]) <= 1e-4
    assert ddp["train_examples_seen"] == one["train_examples_seen"] == 16


ACCELERATE = (sys.executable, "-m", "accelerate.commands.launch")


@pytest.mark.parametrize("launch", [
    ("--config_file", str(ROOT / "configuration" / "accelerate" / "cpu_2proc.yaml")),
    ("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
], ids=["config_file", "flags"])
def test_two_ranks_without_use_cpu_train_together_and_rank_0_writes(tmp_path, launch):
    """No --use_cpu on a machine without GPUs: the two launched processes still form one world of 2 (they
    would otherwise be two runs of world 1 racing on one folder)."""
    out = tmp_path / "run"
    result = run_train("--output_dir", str(out), "--num_train_examples", "64", "--num_validation_examples", "8",
                       "--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_strategy", "no",
                       "--save_strategy", "no", launcher=(*ACCELERATE, *launch))
    assert metrics(out)["world_size"] == 2
    assert result.stdout.count('"output_dir"') == 1  # the summary: rank 0 alone reports


def test_a_launch_whose_ranks_would_train_alone_is_refused(tmp_path):
    launch = ("--config_file", str(ROOT / "configuration" / "accelerate" / "cpu_2proc.yaml"))
    result = run_train("--output_dir", str(tmp_path / "run"), "--num_train_examples", "64", "--max_steps", "2",
                       "--use_cpu", "false", launcher=(*ACCELERATE, *launch), check=False)
    assert result.returncode != 0
    assert "the launcher started 2 processes but each sees a world of 1" in result.stderr and "--use_cpu true" in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_an_fsdp_launch_on_the_cpu_is_refused_not_run_as_ddp(tmp_path):
    """accelerate turns an FSDP config with use_cpu into MULTI_CPU (DDP, every rank the whole model): refused."""
    config = (ROOT / "configuration" / "accelerate" / "fsdp.yaml").read_text()
    config = config.replace("num_processes: 8", "num_processes: 2").replace("use_cpu: false", "use_cpu: true")
    (tmp_path / "fsdp_cpu.yaml").write_text(config.replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    result = run_train("--output_dir", str(tmp_path / "run"), "--num_train_examples", "64", "--max_steps", "2",
                       launcher=(*ACCELERATE, "--config_file", str(tmp_path / "fsdp_cpu.yaml")), check=False)
    assert result.returncode != 0 and "FSDP needs GPUs" in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    common = ["--num_train_examples", "256", "--num_validation_examples", "8", "--max_steps", "60",
              "--per_device_train_batch_size", "8", "--save_steps", "10", "--eval_strategy", "no", "--logging_steps", "5",
              "--use_cpu", "--dataloader_num_workers", "0"]
    run_train("--output_dir", str(tmp_path / "straight"), *common)

    killed = tmp_path / "killed"
    proc = run_train("--output_dir", str(killed), *common, popen=True)
    deadline = time.time() + 300
    while not (killed / "checkpoint-20" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"

    run_train("--output_dir", str(killed), *common, "--resume_from_checkpoint", "latest")
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_overwrite_removes_the_earlier_runs_checkpoints_and_evaluations(tmp_path):
    """Left in place, the earlier run's checkpoint-6 would be `latest` for the new run, and its evaluations
    would share samples.jsonl with the new run's."""
    out = tmp_path / "run"
    common = ["--num_train_examples", "64", "--num_validation_examples", "8", "--per_device_train_batch_size", "8",
              "--eval_strategy", "steps", "--eval_steps", "3", "--save_steps", "3", "--num_sample_captions", "2",
              "--use_cpu", "--output_dir", str(out)]
    run_train(*common, "--max_steps", "6")
    assert (out / "checkpoint-6").is_dir()
    (out / "notes.txt").write_text("mine")
    run_train(*common, "--max_steps", "3", "--overwrite_output_dir", "true")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert {json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()} == {3}
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_latest_skips_a_checkpoint_left_half_written(tmp_path):
    """A kill while checkpoint-4 was being written (its trainer_state.json torn): `latest` resumes from
    checkpoint-2, the newest complete one, and says which it skipped."""
    out = tmp_path / "run"
    common = ["--num_train_examples", "64", "--num_validation_examples", "8", "--per_device_train_batch_size", "8",
              "--save_steps", "2", "--eval_strategy", "no", "--logging_steps", "1", "--use_cpu", "--output_dir", str(out)]
    run_train(*common, "--max_steps", "4")
    state = out / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # torn mid-write
    result = run_train(*common, "--max_steps", "6", "--resume_from_checkpoint", "latest")
    assert f"skipping incomplete checkpoint {out / 'checkpoint-4'}" in result.stderr
    assert metrics(out)["global_step"] == 6
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h][:2] == [1, 2]  # steps 3-4 retrained from checkpoint-2


# --- data sources -------------------------------------------------------------------------------


def write_coco(folder: Path, n: int = 6, broken=(), missing=()):
    """A COCO-captions folder with `n` images (two captions each); some broken or missing on request."""
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        name = f"{i}.jpg"
        if i not in missing:
            Image.new("RGB", (40, 30), (30 * i, 100, 200)).save(folder / "images" / name)
        if i in broken:
            (folder / "images" / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        images.append({"id": 100 + i, "file_name": name, "width": 40, "height": 30})
        annotations += [{"image_id": 100 + i, "id": 2 * i + k, "caption": f"picture {i} caption {k} ."} for k in range(2)]
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return folder / "captions.json", folder / "images"


def test_coco_caption_policies(tmp_path):
    captions, images = write_coco(tmp_path)
    every = data.load_coco_captions(str(captions), str(images), "all")
    first = data.load_coco_captions(str(captions), str(images), "first")
    assert len(every) == 12 and len(first) == 6
    assert first[0]["text"] == "picture 0 caption 0 ." and first[0]["references"] == ["picture 0 caption 0 .", "picture 0 caption 1 ."]
    assert first[0]["image"].size == (40, 30)
    with pytest.raises(ValueError, match="caption_policy"):
        data.load_coco_captions(str(captions), str(images), "longest")


def test_bad_images_stop_the_run_unless_skipped(tmp_path):
    captions, images = write_coco(tmp_path / "coco", n=8, broken=[2], missing=[5])
    args = ["--dataset", "coco", "--caption_file", str(captions), "--image_dir", str(images), "--validation_fraction", "0.25",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no", "--use_cpu"]
    failed = run_train("--output_dir", str(tmp_path / "strict"), *args, check=False)
    assert failed.returncode != 0
    assert "--skip_bad_images" in failed.stderr and ("2.jpg" in failed.stderr or "5.jpg" in failed.stderr)

    run_train("--output_dir", str(tmp_path / "lenient"), *args, "--skip_bad_images", "true")
    skipped = metrics(tmp_path / "lenient")["data.skipped_bad_images"]
    assert skipped["count"] == 4  # two captions for each of the two bad images
    assert {Path(e["image"]).name for e in skipped["examples"]} == {"2.jpg", "5.jpg"}
    reasons = {Path(e["image"]).name: e["reason"] for e in skipped["examples"]}
    assert reasons["5.jpg"] == "file not found"


def test_image_check_decodes_a_shared_file_once_and_reports_every_row(tmp_path, monkeypatch):
    captions, images = write_coco(tmp_path / "coco", n=4, broken=[1], missing=[3])
    every = data.load_coco_captions(str(captions), str(images), "all")  # two rows (captions) per image
    decoded = []
    monkeypatch.setattr(data, "decode_error", lambda value, real=data.decode_error: decoded.append(value["path"]) or real(value))
    bad = data.BadImages()
    kept = data.check_images(every, "train", True, bad)
    assert sorted(Path(p).name for p in decoded) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert sorted(kept["text"]) == [f"picture {i} caption {k} ." for i in (0, 2) for k in (0, 1)]
    assert [(row, Path(name).name) for _, row, name, _ in bad.rows] == [(2, "1.jpg"), (3, "1.jpg"), (6, "3.jpg"), (7, "3.jpg")]
    assert bad.rows[-1][3] == "file not found"


def test_self_critical_fine_tuning_of_a_saved_captioner(tmp_path):
    """--self_critical_samples fine-tunes the model of --model_name_or_path on its own sampled captions, logging
    their mean CIDEr-D; without a starting model it is refused."""
    captions, images = write_coco(tmp_path / "coco", n=8)
    args = [*TINY_MODEL, *QUIET, "--dataset", "coco", "--caption_file", str(captions), "--image_dir", str(images),
            "--validation_fraction", "0.25", "--per_device_train_batch_size", "4", "--eval_strategy", "no",
            "--save_strategy", "no", "--logging_steps", "1", "--use_cpu"]
    train.main([*args, "--output_dir", str(tmp_path / "base"), "--max_steps", "4", "--learning_rate", "1e-2"])
    with pytest.raises(ValueError, match="--model_name_or_path"):
        train.main([*args, "--output_dir", str(tmp_path / "alone"), "--max_steps", "1", "--self_critical_samples", "3"])
    with pytest.raises(ValueError, match="pass --self_critical_samples too"):
        train.main([*args, "--output_dir", str(tmp_path / "alone"), "--self_critical_distinct_weight", "0.5"])
    train.main([*args, "--output_dir", str(tmp_path / "scst"), "--max_steps", "3", "--self_critical_samples", "3",
                "--model_name_or_path", str(tmp_path / "base"), "--aux_words_weight", "1.0", "--self_critical_caption_weight", "0.5",
                "--self_critical_distinct_weight", "0.5"])
    result = metrics(tmp_path / "scst")
    assert result["global_step"] == 3 and "first_logged_sample_cider_d" in result and "first_logged_aux_words" not in result
    assert result["last_logged_sample_cider_d"] >= 0
    before = NanoVLMForConditionalGeneration.from_pretrained(tmp_path / "base").state_dict()
    after = NanoVLMForConditionalGeneration.from_pretrained(tmp_path / "scst").state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_two_stage_recipe_fine_tunes_its_first_model_and_resumes_each_stage(tmp_path):
    """A recipe with a "then" object trains its first stage into OUTPUT/stage-1, then the second (here
    self-critical) from that model into OUTPUT. Resumed with a longer second stage, the finished first
    stage is not run again and the second goes on from its own checkpoint."""
    captions, images = write_coco(tmp_path / "coco", n=8)
    stage_one = {"dataset": "coco", "caption_file": str(captions), "image_dir": str(images), "validation_fraction": 0.25,
                 "per_device_train_batch_size": 4, "eval_strategy": "no", "save_steps": 2, "logging_steps": 1,
                 "use_cpu": True, "max_steps": 4, "learning_rate": 1e-2, "aux_words_weight": 1.0}
    then = {"self_critical_samples": 3, "self_critical_caption_weight": 0.5, "learning_rate": 1e-3, "max_steps": 2}
    recipe = tmp_path / "two_stages.json"
    recipe.write_text(json.dumps({**stage_one, "then": then}))
    out = tmp_path / "run"
    train.main([*TINY_MODEL, *QUIET, "--recipe", str(recipe), "--output_dir", str(out)])
    first, final = metrics(out / "stage-1"), metrics(out)
    assert first["global_step"] == 4 and "first_logged_aux_words" in first and "first_logged_sample_cider_d" not in first
    assert final["global_step"] == 2 and "first_logged_sample_cider_d" in final
    assert [stage["global_step"] for stage in final["stages"]] == [4, 2]
    assert final["wall_seconds"] == pytest.approx(first["wall_seconds"] + final["stages"][1]["wall_seconds"])
    before = NanoVLMForConditionalGeneration.from_pretrained(out / "stage-1").state_dict()
    after = NanoVLMForConditionalGeneration.from_pretrained(out).state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    with pytest.raises(ValueError, match="already holds files"):  # a used folder is refused, as for one stage
        train.main([*TINY_MODEL, *QUIET, "--recipe", str(recipe), "--output_dir", str(out)])
    first_weights = (out / "stage-1" / "model.safetensors").stat().st_mtime_ns
    second_checkpoint = (out / "checkpoint-2" / "model.safetensors").stat().st_mtime_ns
    recipe.write_text(json.dumps({**stage_one, "then": {**then, "max_steps": 3}}))
    train.main([*TINY_MODEL, *QUIET, "--recipe", str(recipe), "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert (out / "stage-1" / "model.safetensors").stat().st_mtime_ns == first_weights
    assert (out / "checkpoint-2" / "model.safetensors").stat().st_mtime_ns == second_checkpoint  # resumed, not redone
    resumed = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in resumed if "loss" in h] == [1, 2, 3] and metrics(out)["global_step"] == 3

    recipe.write_text(json.dumps({**stage_one, "then": {"self_critical_sample": 3}}))
    with pytest.raises(ValueError, match="then.self_critical_sample"):
        train.main([*TINY_MODEL, *QUIET, "--recipe", str(recipe), "--output_dir", str(tmp_path / "misspelt")])
    recipe.write_text(json.dumps({**stage_one, "then": {"max_length": None}}))
    with pytest.raises(ValueError, match="leave max_length out"):
        train.main([*TINY_MODEL, *QUIET, "--recipe", str(recipe), "--output_dir", str(tmp_path / "null")])
    assert not (tmp_path / "null").exists()  # refused before the first stage trained


def test_language_first_recipe_trains_the_decoder_alone_then_the_whole_model(tmp_path):
    """--language_only: a first stage on the captions alone (no image tokens, no pixel_values: the image tower
    never runs, so its weights stay as initialised) whose loss falls; the recipe's "then" stage trains the
    whole model on the images from it. Objectives on the image are refused with the flag."""
    from processing.collator import NanoVLMCollator

    captions, images = write_coco(tmp_path / "coco", n=8)
    stage_one = {"dataset": "coco", "caption_file": str(captions), "image_dir": str(images), "validation_fraction": 0.25,
                 "per_device_train_batch_size": 4, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 5,
                 "use_cpu": True, "max_steps": 40, "learning_rate": 1e-2, "language_only": True, "augment": True}
    then = {"language_only": False, "max_steps": 3, "aux_words_weight": 1.0}
    recipe = tmp_path / "language_first.json"
    recipe.write_text(json.dumps({**stage_one, "then": then}))
    out = tmp_path / "language_first"  # where make_it_see looks for this recipe's run under tmp_path
    train.main([*TINY_MODEL, *QUIET, "--recipe", str(recipe), "--output_dir", str(out)])

    history = json.loads((out / "stage-1" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < 0.6 * losses[0], losses
    first = NanoVLMForConditionalGeneration.from_pretrained(out / "stage-1").state_dict()
    final = NanoVLMForConditionalGeneration.from_pretrained(out).state_dict()
    norms = [k for k in first if k.startswith("model.vision_tower.") and "norm" in k]
    assert norms and all(torch.equal(first[k], torch.ones_like(first[k]) if k.endswith("weight") else torch.zeros_like(first[k]))
                         for k in norms)  # as initialised: the image tower did not run
    assert any(not torch.equal(first[k], final[k]) for k in norms)  # the stage with images trains it
    assert metrics(out)["stages"][0]["global_step"] == 40
    from experiments import make_it_see  # the study table keeps each stage's steps and time

    row = make_it_see.run_recipe(str(recipe), str(tmp_path), [])
    assert [stage["global_step"] for stage in row["stages"]] == [40, 3] and row["wall_seconds"] > row["stages"][0]["wall_seconds"]

    processor = NanoVLMProcessor.from_pretrained(out)  # a language-only batch: the image batch's text, same positions
    rows = [{"image": Image.new("RGB", (32, 32)), "text": text} for text in ("a red ball .", "two small blue boxes on the grass .")]
    with_images, alone = NanoVLMCollator(processor)(rows), NanoVLMCollator(processor, language_only=True)(rows)
    prefix = processor.num_image_tokens
    assert "pixel_values" not in alone and alone["position_ids"][0, 0] == prefix
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(alone[key], with_images[key][:, prefix:]), key

    recipe.write_text(json.dumps({**stage_one, "aux_words_weight": 1.0}))
    with pytest.raises(ValueError, match="language_only trains the decoder on captions alone"):
        train.main([*TINY_MODEL, *QUIET, "--recipe", str(recipe), "--output_dir", str(tmp_path / "refused")])


def write_imagefolder(folder: Path, n: int, text_column: str) -> Path:
    """An `imagefolder` dataset: n PNGs and a metadata.jsonl captioning them."""
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.new("RGB", (20, 20), (20 * i, 0, 0)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", text_column: f"a red square number {i}"}) + "\n")
    return folder


def test_hf_loader_reads_imagefolder_disk_and_parquet(tmp_path):
    folder = write_imagefolder(tmp_path / "imagefolder", 5, "caption")
    from_folder = data.load_hf(str(folder), text_column="caption")["train"]
    assert len(from_folder) == 5 and set(from_folder.column_names) >= {"image", "text"}
    assert sorted(from_folder["text"])[0] == "a red square number 0"
    assert from_folder[0]["image"].size == (20, 20)

    from_folder.save_to_disk(tmp_path / "disk")
    assert data.load_hf(str(tmp_path / "disk"))["train"]["text"] == from_folder["text"]
    from_folder.to_parquet(tmp_path / "rows.parquet")
    assert data.load_hf(str(tmp_path / "rows.parquet"))["train"]["text"] == from_folder["text"]
    with pytest.raises(ValueError, match="--text_column"):
        data.load_hf(str(tmp_path / "disk"), text_column="description")


def test_train_on_hf_imagefolder(tmp_path):
    folder = write_imagefolder(tmp_path / "imagefolder", 12, "text")
    run_train("--dataset", "hf", "--data_path", str(folder), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no", "--use_cpu")
    assert metrics(tmp_path / "out")["global_step"] == 2


def test_flickr8k_in_coco_layout():
    if not FLICKR8K.exists():
        pytest.skip(f"{FLICKR8K} is absent (it ships beside the project as ../shared); nothing to load")
    validation = data.load_coco_captions(str(FLICKR8K / "captions_val.json"), str(FLICKR8K / "images"), "first")
    every = data.load_coco_captions(str(FLICKR8K / "captions_val.json"), str(FLICKR8K / "images"), "all")
    assert len(validation) == 1000 and len(every) == 5000
    assert all(len(r) == 5 for r in validation.select(range(50))["references"])
    checked = data.check_images(validation.select(range(100)), "validation", False, data.BadImages())
    assert len(checked) == 100
    assert min(validation[0]["image"].size) == 224


def test_missing_shared_data_is_said_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="caption file .*does not exist"):
        data.load_coco_captions(str(tmp_path / "nope.json"), str(tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 5 minutes on one thread (the suite's workers); more when the CPU is shared
def test_default_recipe_names_what_is_in_the_picture(tmp_path):
    """A short version of the default run (mini-112, per-token auxiliary loss, lr 5e-4, batch 16): 16,000 scenes,
    about 4.5 minutes on 2 threads, 5 on the one thread of a suite worker, then its greedy captions of 100 validation
    scenes scored against their own scenes and against other scenes (the list rolled by half: what a blind captioner
    would score). Recall is on its steep rise here and depends on the initialisation and the CPU's arithmetic (0.077
    and 0.160 with seeds 0 and 1 on 2 threads, 0.116 with seed 0 on one thread of a CPU without AVX-512); the same
    captions against other scenes recall 0.006-0.022. CHAIR-i is not asserted: at this stage it is about the same
    against other scenes (0.81 own, 0.82-0.84 rolled by 1, 37 or 50). The full default names over 80% of the objects
    with CHAIR-i 0.02-0.04 (docs/experiments.md)."""
    out = tmp_path / "see"
    train.main(["--output_dir", str(out), "--num_train_examples", "16000", "--num_validation_examples", "100",
                "--eval_strategy", "no", "--save_strategy", "no", "--num_sample_captions", "0",
                "--disable_tqdm", "true", "--use_cpu"])
    result = metrics(out)
    assert result["train_examples_seen"] == 16000
    assert result["image_use.image_gap"] >= 0.25, result  # a blind decoder scores 0; 0.34-0.35 measured

    model = NanoVLMForConditionalGeneration.from_pretrained(out).eval()
    processor = NanoVLMProcessor.from_pretrained(out)
    validation = scenes.scenes_dataset(100, scenes.VALIDATION_SEED, image_size=model.config.image_size)
    captions = generate_captions(model, processor, validation["image"], max_new_tokens=48)  # train.py: short style
    truth = [scenes.scene_from_row(row) for row in validation]
    own = grounding_scores(captions, truth)["object_recall"]
    blind = grounding_scores(captions, truth[50:] + truth[:50])["object_recall"]
    assert own == pytest.approx(result["grounding.object_recall"])  # the run's own report scored these captions
    assert own >= 0.05 and own >= blind + 0.04, (own, blind)


def test_masked_image_modelling_loss_falls_and_its_head_is_not_released(tmp_path):
    """--aux_mim_weight: the vision tower learns to fill in masked patches (its loss, logged as aux_mim, falls on
    the scenes); the head and its mask token live in checkpoints, not in the released model."""
    out = tmp_path / "mim"
    train.main([*TINY_MODEL, *QUIET, "--output_dir", str(out), "--num_train_examples", "128", "--num_validation_examples", "8",
                "--max_steps", "40", "--save_steps", "40", "--logging_steps", "5", "--eval_strategy", "no", "--learning_rate", "3e-3",
                "--per_device_train_batch_size", "8", "--aux_grounding_weight", "0", "--aux_mim_weight", "1.0", "--use_cpu"])
    result = metrics(out)
    assert result["last_logged_aux_mim"] < 0.8 * result["first_logged_aux_mim"], result  # measured 1.29 -> 0.83
    assert any("aux_mim_head.mask_token" in k for k in load_file(out / "checkpoint-40" / "model.safetensors"))
    assert not any("aux_mim" in k for k in load_file(out / "model.safetensors"))


@pytest.mark.parametrize("recipe", sorted((ROOT / "configuration" / "recipes").rglob("*.json")), ids=lambda p: p.name)
def test_every_shipped_recipe_names_only_train_flags(recipe):
    model_args, data_args, training_args = training.parse_args(["--recipe", str(recipe)])
    assert training_args.max_steps > 0 or training_args.num_train_epochs > 0
    training.second_stage(["--recipe", str(recipe)])  # a "then" object holds flags too


def test_vision_tower_masks_exactly_the_patches_asked():
    model = NanoVLMForConditionalGeneration(training.model_config(training.parse_args(TINY_MODEL)[0], 300)).eval()
    tower, config = model.model.vision_tower, model.config
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    token = torch.randn(config.vision_hidden_size)
    mask = torch.zeros(2, config.num_patches, dtype=torch.bool)
    with torch.no_grad():
        plain = tower.embeddings(pixels)
        assert torch.equal(tower.embeddings(pixels, mask, token), plain)
        mask[0, 3] = True
        masked = tower.embeddings(pixels, mask, token)
        other = tower.embeddings(torch.randn_like(pixels), mask, token)  # a masked patch shows nothing of the image
    changed = (masked != plain).any(-1)
    assert changed[0].nonzero().flatten().tolist() == [4] and not changed[1].any()  # patch 3 sits after [CLS]
    assert torch.equal(masked[0, 4], other[0, 4])
    with pytest.raises(ValueError, match="both bool_masked_pos and mask_token"):
        tower(pixels, bool_masked_pos=mask)


def test_aux_grounding_head_trains_but_is_not_released(tmp_path):
    out = tmp_path / "aux"
    run_train("--output_dir", str(out), "--num_train_examples", "64", "--num_validation_examples", "8", "--max_steps", "4",
              "--save_steps", "2", "--eval_strategy", "no", "--aux_grounding_weight", "1.0", "--aux_places_weight", "1.0",
              "--aux_mention_places_weight", "1.0", "--aux_mention_relations_weight", "1.0", "--aux_mention_layer", "1", "--logging_steps", "2",
              "--use_cpu")
    for head in ("aux_grounding_head", "aux_places_head", "aux_mention_places_head", "aux_mention_relations_head"):
        assert any(head in k for k in load_file(out / "checkpoint-4" / "model.safetensors"))
        assert not any(head in k for k in load_file(out / "model.safetensors"))
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any(0 < entry.get("aux_places", 0) for entry in logged)  # the places loss ran and was logged
    assert any(0 < entry.get("aux_mention_places", 0) for entry in logged)  # and the decoder-side ones
    assert any(0 < entry.get("aux_mention_relations", 0) for entry in logged)
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_mention_places_targets_sit_on_the_naming_words_and_the_loss_learns_them():
    """The decoder-side places loss: each target sits on a token of the word that names a group (or its It/They) and
    holds that group's cells and count; a tiny model fits a batch of them (the loss falls by half)."""
    from processing.collator import NanoVLMCollator
    from training.objectives import MentionPlacesObjective, ObjectiveTargets

    model, processor, examples = _tiny_long_model()
    tokenizer = processor.tokenizer
    objective = MentionPlacesObjective(1.0, processor)
    objective.attach(model)
    batch = ObjectiveTargets(NanoVLMCollator(processor, max_length=100), [objective])(examples)  # cut: targets past it drop
    positions, cells, counts = (batch[f"aux_mention_places_{k}"] for k in ("positions", "multi_hot", "classes"))
    assert (positions >= 0).sum() >= 5 * len(examples)  # a long description names its groups and refers back to them
    for i, ex in enumerate(examples):
        scene = json.loads(ex["scene"])
        for position, cell, count in zip(positions[i], cells[i], counts[i]):
            if not 0 <= position < batch["input_ids"].shape[1]:
                continue
            word = tokenizer.decode(batch["input_ids"][i, position]).strip().lower()  # the word's last token
            assert word and any(w.endswith(word) for w in ("it", "they", *scenes.KINDS, *scenes.PLURALS.values()))
            truth = {tuple(float(p in g["places"]) for p in scenes.PLACES): g["count"] for g in scene["objects"]}
            assert truth[tuple(cell.tolist())] == int(count) + 1
    losses = _fit_decoder_side(model, objective, batch)
    assert losses[-1] < 0.5 * losses[0], losses


def _tiny_long_model():
    """A tiny model, its processor (a tokenizer trained on long-style texts) and 12 long-style scenes rows."""
    from processing.tokenizer import train_tokenizer
    from transformers import ViTImageProcessorPil

    rows = scenes.scenes_dataset(12, scenes.TRAIN_SEED, "long", 32)
    model = NanoVLMForConditionalGeneration(training.model_config(training.parse_args(TINY_MODEL)[0], 300))
    tokenizer = train_tokenizer(scenes.scene_texts(400, style="long"), vocab_size=300)
    processor = NanoVLMProcessor(ViTImageProcessorPil(size={"height": 32, "width": 32}), tokenizer,
                                 num_image_tokens=model.config.num_image_tokens)
    return model, processor, [rows[i] for i in range(len(rows))]


def _decoder_side_loss(model, objective, batch):
    """`objective`'s loss on `batch` (model inputs and its aux_* targets), as the Trainer computes it."""
    outputs = model(**{k: v for k, v in batch.items() if not k.startswith("aux_")}, output_hidden_states=True)
    return objective.loss(model, outputs.image_hidden_states, {**batch, "decoder_hidden_states": outputs.hidden_states})


def _fit_decoder_side(model, objective, batch, steps=40):
    """The losses of `steps` AdamW steps on `objective`'s loss alone over one batch."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = _decoder_side_loss(model, objective, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def test_mention_relations_targets_say_where_each_relation_partner_stands_and_the_loss_learns_them():
    """The decoder-side relations loss: at a word naming a group, for each relation, the cells of the groups the
    named group stands in that relation to, as `scenes.relations` says (a diagonal: none); a tiny model fits them."""
    from processing.collator import NanoVLMCollator
    from training.objectives import RELATIONS, MentionRelationsObjective, ObjectiveTargets

    model, processor, examples = _tiny_long_model()
    objective = MentionRelationsObjective(1.0, processor)
    objective.attach(model)
    ball = {"kind": "ball", "color": "red", "count": 1, "places": ["top left"]}
    tree = {"kind": "tree", "color": "green", "count": 1, "places": ["bottom left"]}
    box = {"kind": "box", "color": "blue", "count": 1, "places": ["bottom right"]}  # the ball's diagonal
    scene = {"background": "grass", "objects": [ball, tree, box]}
    hot, label = objective.target(ball, scene)
    assert label == -100 and len(hot) == len(RELATIONS) * len(scenes.PLACES)

    def partners(group):  # the target read back: relation -> the cells it names
        hot, cells = objective.target(group, scene)[0], len(scenes.PLACES)
        return {r: {p for p, h in zip(scenes.PLACES, hot[i * cells:(i + 1) * cells]) if h} for i, r in enumerate(RELATIONS)}

    assert partners(ball) == {"left of": set(), "right of": set(), "above": {"bottom left"}, "below": set(), "next to": set()}
    assert partners(box) == {"left of": set(), "right of": {"bottom left"}, "above": set(), "below": set(), "next to": set()}
    example = {"scene": json.dumps(scene), "text": "The red ball is above the green tree. It is happy. The blue box is small."}
    positions, hot, _ = objective.targets([example]).values()
    words = [processor.tokenizer.decode(processor.tokenizer(example["text"])["input_ids"][p - processor.num_image_tokens])
             for p in positions[0].tolist()]
    words = [w.strip() for w in words]  # each naming word's last token
    assert len(words) == 4 and all(w and n.endswith(w) for n, w in zip(["ball", "tree", "It", "box"], words))
    assert hot[0, 0].tolist() == objective.target(ball, scene)[0]
    assert hot[0, 1].tolist() == hot[0, 2].tolist() == objective.target(tree, scene)[0]  # "It" is the tree
    batch = ObjectiveTargets(NanoVLMCollator(processor, max_length=100), [objective])(examples)
    assert batch["aux_mention_relations_multi_hot"].sum() > 0  # the built-in scenes relate some of their groups
    losses = _fit_decoder_side(model, objective, batch)
    assert losses[-1] < 0.5 * losses[0], losses


def test_mention_layer_reads_that_decoder_layer_so_only_the_layers_below_it_learn_from_the_loss():
    """--aux_mention_layer k: the decoder-side loss reads the output of decoder layer k, so its gradient reaches the
    layers up to k and none above; -1 reads the last states (every layer learns); a layer the decoder lacks is refused."""
    from processing.collator import NanoVLMCollator
    from training.objectives import MentionRelationsObjective, ObjectiveTargets, objectives_for

    model, processor, examples = _tiny_long_model()  # a decoder of 2 layers
    for layer, learning in ((1, [True, False]), (-1, [True, True])):
        objective = MentionRelationsObjective(1.0, processor, layer)
        objective.attach(model)
        batch = ObjectiveTargets(NanoVLMCollator(processor, max_length=100), [objective])(examples)
        model.zero_grad()
        _decoder_side_loss(model, objective, batch).backward()
        grads = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer_.parameters())
                 for layer_ in model.model.language_model.layers]
        assert grads == learning, (layer, grads)
    for layer in (0, 2):
        with pytest.raises(ValueError, match="--aux_mention_layer must be -1"):
            MentionRelationsObjective(1.0, processor, layer).attach(model)
    data_args = training.parse_args([*TINY_MODEL, "--scenes_style", "long", "--aux_mention_layer", "1"])[1]
    with pytest.raises(ValueError, match="neither --aux_mention_places_weight nor --aux_mention_relations_weight is on"):
        objectives_for(model, data_args, processor=processor)


def test_long_best_recipe_trains_its_model_with_the_places_loss(tmp_path):
    """configuration/recipes/long/best.json as it stands (its preset, style and losses), shrunk to a few steps."""
    out = tmp_path / "long-best"
    cmd = [sys.executable, str(ROOT / "train.py"), "--recipe", str(ROOT / "configuration/recipes/long/best.json"), *QUIET,
           "--num_train_examples", "32", "--num_validation_examples", "8", "--max_steps", "4", "--logging_steps", "2",
           "--eval_strategy", "no", "--save_strategy", "no", "--output_dir", str(out), "--use_cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "mini-112-dec" and config["hidden_size"] == 184 and config["vision_feature_select"] == "all"
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any(0 < entry.get("aux_places", 0) for entry in logged) and any(0 < entry.get("aux_grounding", 0) for entry in logged)
    assert json.loads((out / "arguments.json").read_text())["data"]["scenes_style"] == "long"


def run_make_it_see(tmp_path, recipe: dict, output: str) -> dict:
    """One tiny recipe through `python -m experiments.make_it_see`; its row of OUTPUT (in tmp_path)."""
    path = tmp_path / f"{recipe['_name']}.json"
    path.write_text(json.dumps(recipe))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "experiments.make_it_see", str(path), "--output", str(tmp_path / output),
           "--output_root", str(tmp_path / "runs"), "--", *TINY_MODEL, *QUIET, "--use_cpu"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / output).read_text())["runs"][0]


def test_make_it_see_tabulates_recipes(tmp_path):
    row = run_make_it_see(tmp_path, {"_name": "tiny", "_change": "a tiny run", "num_train_examples": 32,
                                     "num_validation_examples": 8, "max_steps": 2, "per_device_train_batch_size": 32,
                                     "eval_strategy": "no", "save_strategy": "no"}, "see.json")
    assert row["name"] == "tiny" and row["train_examples_seen"] == 64 and 0 <= row["grounding.object_recall"] <= 1
    assert "| tiny | a tiny run | 64 |" in (tmp_path / "see.md").read_text()


def test_make_it_see_tabulates_what_long_descriptions_say_about_places(tmp_path):
    row = run_make_it_see(tmp_path, {"_name": "long", "_change": "long style", "scenes_style": "long", "num_train_examples": 32,
                                     "num_validation_examples": 8, "max_steps": 2, "per_device_train_batch_size": 16,
                                     "eval_strategy": "no", "save_strategy": "no"}, "long_study.json")
    metrics = json.loads((tmp_path / "runs" / "long" / "metrics.json").read_text())
    for key in ("grounding.place_accuracy", "grounding.place_chance", "grounding.relation_accuracy",
                "repetition.repeat_description_share"):
        assert row[key] == metrics[key]
    table = (tmp_path / "long_study.md").read_text()
    assert "place acc. (chance)" in table and "repeat a sentence" in table
    assert f"{row['grounding.place_accuracy']:.3f} ({row['grounding.place_chance']:.3f})" in table


@pytest.mark.parametrize("name", sorted(gpu_screen.VARIANTS))
def test_every_gpu_screen_variant_is_a_valid_recipe(name, tmp_path):
    """experiments/gpu_screen.py's variants are recipe files plus changed flags: each must still parse as train.py flags
    and build its model config, or a 15-minute GPU lease is spent on a run that stops at its first line."""
    recipe = gpu_screen.variant_recipe(name, 3085)
    seed = recipe.pop("seed", 0)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(recipe))
    model_args, data_args, training_args = training.parse_args(["--recipe", str(path), "--seed", str(seed)])
    assert training_args.max_steps == 3085 and training_args.warmup_steps <= 308 and training_args.eval_strategy == "no"
    assert data_args.image_dir == ".gpu/flickr8k/images" and data_args.eval_metrics is None
    training.model_config(model_args, 4000)

