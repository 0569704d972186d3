"""The output folder and its checkpoints: what may be trained into, and which checkpoint a run resumes from."""

import json
import logging
import os
import shutil

logger = logging.getLogger(__name__)


def prepare_output_dir(training_args) -> None:
    """Refuse to train into a folder an earlier run left files in, unless asked to overwrite or resume.

    Overwriting removes the earlier run's checkpoints and evaluations (samples.jsonl), which would
    otherwise pass for this run's: `--resume_from_checkpoint latest` and the checkpoint rotation take
    the highest step, and samples.jsonl is appended to. Other files are replaced as they are written.
    """
    out = training_args.output_dir
    if not os.path.isdir(out) or not os.listdir(out) or asks_to_resume(training_args.resume_from_checkpoint):
        return
    if not training_args.overwrite_output_dir:
        raise ValueError(
            f"output folder {out} already holds files (an earlier run's?): pass --resume_from_checkpoint latest to continue "
            "that run, --overwrite_output_dir true to replace it, or another --output_dir"
        )
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name.startswith("checkpoint-") and os.path.isdir(path):
            shutil.rmtree(path)
        elif name == "samples.jsonl":
            os.remove(path)


def is_complete_checkpoint(path: str) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint whose state parses and whose weights are
    there was written whole."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return any(os.path.exists(os.path.join(path, name)) for name in ("model.safetensors", "model.safetensors.index.json"))


def asks_to_resume(resume) -> bool:
    return resume not in (None, False, "false", "False", "")


def resolve_resume(resume, output_dir: str):
    """--resume_from_checkpoint: "latest" (or true) = the newest complete checkpoint in output_dir, skipping
    (and naming) one a kill left half-written; a path is used as given; None/false = start afresh."""
    if not asks_to_resume(resume):
        return None
    if resume not in (True, "latest", "true", "True"):
        if not os.path.isdir(resume):
            raise ValueError(f"--resume_from_checkpoint {resume}: no such checkpoint folder; pass latest or a checkpoint-N folder")
        return resume
    steps = {}
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
                steps[int(name[len("checkpoint-"):])] = os.path.join(output_dir, name)
    for step in sorted(steps, reverse=True):
        if is_complete_checkpoint(steps[step]):
            return steps[step]
        logger.warning("skipping incomplete checkpoint %s (a run stopped while writing it)", steps[step])
    raise ValueError(
        f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}; start afresh with --overwrite_output_dir true"
    )
