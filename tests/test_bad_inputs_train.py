"""Bad input to train.py, the data loaders, `python -m evaluation`'s data and output files and the benchmark
tables: a refusal that names the input and what to do, or a logged count of what was dropped; never a hang,
a quietly different run, an overwritten file or a raw traceback.

What the command line does (exit status, one-line message) is checked on the command line, as a subprocess.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer
from test_bad_inputs import TINY, coco_args, run_builder, write_coco

import train
from evaluation import cli as evaluation_cli
from processing import data

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def command(*args, timeout=300):
    """Run `python ARGS` from the repository root: (exit status, stderr)."""
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


def refused(status, stderr, pattern, program):
    """A one-line refusal from `program`: exit status 1, the pattern in its message, no traceback."""
    assert status == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"{program}: error:") and re.search(pattern, last), last


# --- train.py's flags --------------------------------------------------------------------------------


def _output_dir_a_file(tmp):
    (tmp / "out").write_text("notes")
    return []


COMMAND_LINE_CASES = [  # each was a raw traceback
    ("output_dir a file (FileExistsError)", _output_dir_a_file, r"--output_dir .*out is a file, not a folder"),
    ("vocab_size past any integer (OverflowError)", lambda tmp: ["--vocab_size", "100000000000000000000"],
     r"--vocab_size must be between 260 and 2,147,483,647"),
]


@pytest.mark.parametrize("make, pattern", [c[1:] for c in COMMAND_LINE_CASES], ids=[c[0] for c in COMMAND_LINE_CASES])
def test_train_refuses_bad_flags_on_the_command_line(tmp_path, make, pattern):
    extra = make(tmp_path)
    status, stderr = command("train.py", *TINY, "--output_dir", tmp_path / "out", *extra)
    refused(status, stderr, pattern, "train.py")


FLAG_CASES = [
    ("max_steps 0 (trained a step and saved a model)", ["--max_steps", "0"], r"--max_steps must be at least 1 \(or -1"),
    ("max_steps -2", ["--max_steps", "-2"], r"--max_steps must be at least 1 \(or -1"),
    ("validation_fraction 1.5", ["--validation_fraction", "1.5"], r"--validation_fraction .* between 0 and 1 .*got 1.5"),
    ("validation_fraction 0", ["--validation_fraction", "0"], r"--validation_fraction .* between 0 and 1 .*got 0"),
    ("scenes_version 5", ["--scenes_version", "5"], r"--scenes_version must be one of \[1, 2, 3, 4\] .*got 5"),
]


@pytest.mark.parametrize("flags, pattern", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_train_refuses_bad_flags(tmp_path, flags, pattern):
    with pytest.raises(ValueError, match=pattern):
        train.main([*TINY, "--output_dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("notes")
    with pytest.raises(ValueError, match="lies under .*file, which is a file, not a folder"):
        train.main([*TINY, "--output_dir", str(tmp_path / "file" / "run")])


# --- resuming ----------------------------------------------------------------------------------------

RESUMABLE = ["--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "8"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run with checkpoint-2 and checkpoint-4, each whole."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main([*TINY, *RESUMABLE, "--output_dir", str(out), "--max_steps", "4"])
    for step in (2, 4):
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in (out / f"checkpoint-{step}").iterdir()}
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    """A copy of the finished run to resume (and damage)."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def logged_steps(checkpoint: Path) -> list[int]:
    return [h["step"] for h in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_resume_latest_passes_over_a_checkpoint_without_its_training_state(run, caplog):
    """checkpoint-4 lost its scheduler.pt: resuming from it would restart the learning-rate schedule (warm-up again)
    without a word. `latest` takes checkpoint-2 and says which it skipped and why."""
    (run / "checkpoint-4" / "scheduler.pt").unlink()
    with caplog.at_level(logging.WARNING):
        train.main([*TINY, *RESUMABLE, "--output_dir", str(run), "--max_steps", "6", "--resume_from_checkpoint", "latest"])
    assert f"skipping incomplete checkpoint {run / 'checkpoint-4'}: it lacks scheduler.pt" in caplog.text
    assert (run / "checkpoint-4" / "scheduler.pt").exists()  # written again: steps 3-4 trained again from checkpoint-2
    assert logged_steps(run / "checkpoint-6") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("lost", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_from_a_named_checkpoint_without_its_training_state_is_refused(run, lost):
    (run / "checkpoint-4" / lost).unlink()
    with pytest.raises(ValueError, match=f"--resume_from_checkpoint .*checkpoint-4 lacks {lost} .*--resume_with_fresh_state true"):
        train.main([*TINY, *RESUMABLE, "--output_dir", str(run), "--max_steps", "6", "--resume_from_checkpoint", str(run / "checkpoint-4")])


def test_resume_with_fresh_state_accepts_it_and_says_so(run, caplog):
    (run / "checkpoint-4" / "optimizer.pt").unlink()
    with caplog.at_level(logging.WARNING):
        train.main([*TINY, *RESUMABLE, "--output_dir", str(run), "--max_steps", "6", "--resume_from_checkpoint",
                    str(run / "checkpoint-4"), "--resume_with_fresh_state", "true"])
    assert "with fresh optimizer.pt (the optimizer's moments)" in caplog.text
    assert not (run / "checkpoint-4" / "optimizer.pt").exists()  # not written again: it went on from step 4
    assert logged_steps(run / "checkpoint-6") == [1, 2, 3, 4, 5, 6]


def test_resume_after_the_model_shape_changed_names_the_checkpoint_and_the_setting(run):
    """--config_overrides hidden_size=48 against a run trained with 32: not the Trainer's state_dict size-mismatch
    traceback, and the run's own arguments.json is left as it was."""
    arguments = (run / "arguments.json").read_text()
    overrides = TINY[TINY.index("--config_overrides") + 1].replace("hidden_size=32,num", "hidden_size=48,num")
    with pytest.raises(ValueError, match=r"checkpoint-4 holds a model of another shape .*: hidden_size=32 there, 48 now"):
        train.main([*TINY, *RESUMABLE, "--output_dir", str(run), "--max_steps", "6", "--resume_from_checkpoint", "latest",
                    "--config_overrides", overrides])
    assert (run / "arguments.json").read_text() == arguments


def test_resume_after_the_model_shape_changed_on_the_command_line(run):
    status, stderr = command("train.py", *TINY, *RESUMABLE, "--output_dir", run, "--max_steps", "6", "--resume_from_checkpoint",
                             "latest", "--image_size", "64")
    refused(status, stderr, r"checkpoint-4 holds a model of another shape .*image_size=32 there, 64 now", "train.py")


# --- COCO-layout caption files -------------------------------------------------------------------------


def _edit(caption_file, edit):
    coco = json.loads(Path(caption_file).read_text())
    edit(coco)
    Path(caption_file).write_text(json.dumps(coco))


def test_duplicate_image_ids_are_refused_with_both_file_names(tmp_path):
    """Two `images` entries with id 1: today the second picture trains under the first's captions, or is dropped."""
    caption_file, images = write_coco(tmp_path, 3)
    _edit(caption_file, lambda coco: coco["images"].append({"id": 1, "file_name": "2.png"}))
    with pytest.raises(ValueError, match=r"image id 1 is listed twice, as '1.png' and '2.png'"):
        train.main([*TINY, "--output_dir", str(tmp_path / "out"), *coco_args(caption_file, images)])


def _orphans_and_uncaptioned(coco):
    coco["annotations"] += [{"image_id": 77, "caption": "a cat sleeps."}, {"image_id": 78, "caption": "a cat eats."}]
    coco["images"] += [{"id": 9, "file_name": "0.png"}]  # no caption names it
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2]  # nor image 2


def test_train_logs_annotations_without_an_image_and_images_without_a_caption(tmp_path, caplog):
    caption_file, images = write_coco(tmp_path, 4)
    _edit(caption_file, _orphans_and_uncaptioned)
    with caplog.at_level(logging.WARNING):
        train.main([*TINY, "--output_dir", str(tmp_path / "out"), *coco_args(caption_file, images, "--validation_fraction", "0.34")])
    assert "dropped 2 annotation(s) whose image id 'images' does not list: image id(s) 77, 78" in caplog.text
    assert "dropped 2 image(s) without a caption: image id(s) 2, 9" in caplog.text


def test_evaluation_logs_what_its_caption_file_drops(tmp_path, caplog):
    caption_file, images = write_coco(tmp_path, 4)
    _edit(caption_file, _orphans_and_uncaptioned)
    args = evaluation_cli.parse_args(["--model", "m", "--dataset", "coco", "--caption_file", caption_file, "--image_dir", images,
                                      "--output", str(tmp_path / "eval")])
    with caplog.at_level(logging.WARNING):
        loaded = evaluation_cli.load_data(args, 32)
    assert len(loaded.images) == 3  # images 0, 1 and 3
    assert "image id(s) 77, 78" in caplog.text and "dropped 2 image(s) without a caption: image id(s) 2, 9" in caplog.text


def test_many_dropped_ids_are_shown_first_few_and_counted(tmp_path, caplog):
    caption_file, images = write_coco(tmp_path, 2)
    _edit(caption_file, lambda coco: coco["annotations"].extend({"image_id": 100 + k, "caption": "a dog."} for k in range(12)))
    with caplog.at_level(logging.WARNING):
        data.load_coco_captions(caption_file, images)
    assert "dropped 12 annotation(s) whose image id 'images' does not list: image id(s) 100, 101, 102, 103, 104, ... (12 ids)" in caplog.text


def test_captions_that_name_no_listed_image_are_refused(tmp_path, caplog):
    caption_file, images = write_coco(tmp_path, 3)
    _edit(caption_file, lambda coco: [a.update(image_id=a["image_id"] + 50) for a in coco["annotations"]])
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="no image with a caption .*3 image\\(s\\)"):
        train.main([*TINY, "--output_dir", str(tmp_path / "out"), *coco_args(caption_file, images)])
    assert "image id(s) 50, 51, 52" in caplog.text


# --- images that are not regular files (a FIFO blocks its open for ever) ----------------------------------


def coco_with_a_fifo(tmp):
    """Three images, the second a FIFO named pipe.png in the caption file."""
    caption_file, images = write_coco(tmp, 3, file_names=["0.png", "pipe.png", "2.png"])
    os.mkfifo(Path(images) / "pipe.png")
    return caption_file, images


@pytest.mark.timeout(120)
def test_train_refuses_a_fifo_named_in_the_caption_file(tmp_path):
    caption_file, images = coco_with_a_fifo(tmp_path)
    status, stderr = command("train.py", *TINY, "--output_dir", tmp_path / "out", *coco_args(caption_file, images), timeout=100)
    refused(status, stderr, r"pipe.png \(not a regular file", "train.py")


@pytest.mark.timeout(120)
def test_evaluation_refuses_a_fifo_named_in_the_caption_file(tmp_path, saved):
    caption_file, images = coco_with_a_fifo(tmp_path)
    status, stderr = command("-m", "evaluation", "--model", saved, "--dataset", "coco", "--caption_file", caption_file,
                             "--image_dir", images, "--output", tmp_path / "eval", timeout=100)
    refused(status, stderr, r"pipe.png \(not a regular file", "python -m evaluation")


@pytest.mark.timeout(60)
def test_builder_skips_a_fifo_named_in_the_caption_file(tmp_path):
    coco_with_a_fifo(tmp_path)
    with FakeOpenAIServer() as server:
        assert run_builder(tmp_path, server.url) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(Path(m["image"]).name, m["reason"].split(" (")[0]) for m in report["missing_images"]] == [("pipe.png", "not a regular file")]
    assert report["done"] == 2


# --- python -m evaluation's output folder ----------------------------------------------------------------


EVALUATE = ["--dataset", "scenes", "--num_examples", "2", "--parts", "grounding", "--max_new_tokens", "4", "--train_examples", "0"]


def test_evaluation_into_a_run_folder_keeps_the_runs_samples(saved, tmp_path):
    """--output RUN (the model's own folder, as for a model card with the report): the run's samples.png was replaced
    by the evaluation's. Its pictures go to evaluation_samples.png, which report.md shows; a rerun keeps to it."""
    run = Path(shutil.copytree(saved, tmp_path / "run"))
    (run / "samples.png").write_bytes(b"the run's own grid")
    for _ in range(2):
        assert evaluation_cli.main(["--model", str(run), "--output", str(run), *EVALUATE]) == 0
        assert (run / "samples.png").read_bytes() == b"the run's own grid"
        assert (run / "evaluation_samples.png").stat().st_size > 0
        assert "(evaluation_samples.png)" in (run / "report.md").read_text()


@pytest.mark.parametrize("name", ["report.md", "predictions.jsonl"])
def test_evaluation_refuses_a_report_it_did_not_write(saved, tmp_path, name):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / name).write_text("my notes")
    status, stderr = command("-m", "evaluation", "--model", saved, "--output", tmp_path / "eval", *EVALUATE)
    refused(status, stderr, rf"--output .*eval already holds {name}, which no evaluation wrote.*: pass another --output", "python -m evaluation")
    assert (tmp_path / "eval" / name).read_text() == "my notes" and not (tmp_path / "eval" / "report.json").exists()


def test_evaluation_writes_over_its_own_earlier_report(saved, tmp_path):
    for _ in range(2):
        assert evaluation_cli.main(["--model", str(saved), "--output", str(tmp_path / "eval"), *EVALUATE]) == 0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["settings"]["grid"] == "samples.png"
    assert (tmp_path / "eval" / "samples.png").exists() and not (tmp_path / "eval" / "evaluation_samples.png").exists()


# --- benchmark tables -------------------------------------------------------------------------------------


def test_benchmark_table_of_a_missing_or_non_json_file(tmp_path):
    refused(*command("-m", "benchmarks.table", tmp_path / "none.json"), r"none.json: no such file", "python -m benchmarks.table")
    (tmp_path / "bench.json").write_text("preset,samples/s\nmini,3\n")
    refused(*command("-m", "benchmarks.table", tmp_path / "bench.json"), r"bench.json is not a JSON file", "python -m benchmarks.table")


def test_progress_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes").mkdir()
    refused(*command("-m", "experiments.progress", tmp_path / "notes", "--output", tmp_path / "p.json"),
            r"notes/samples.jsonl does not exist", "python -m experiments.progress")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "samples.jsonl").write_text('{"step": 10}\nnot json\n')
    with pytest.raises(ValueError, match="samples.jsonl, line 2: not JSON"):
        from experiments import progress

        progress.main([str(tmp_path / "run"), "--output", str(tmp_path / "p.json")])


def test_a_second_stage_that_cannot_run_is_refused_before_the_first_trains(tmp_path):
    recipe = tmp_path / "two_stages.json"
    recipe.write_text(json.dumps({"max_steps": 1, "then": {"self_critical_samples": 3, "max_steps": 0}}))
    with pytest.raises(ValueError, match="--max_steps must be at least 1"):
        train.main([*TINY, "--recipe", str(recipe), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "stage-1").exists()
