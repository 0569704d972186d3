"""The output folder and its checkpoints: what a run may train into, which checkpoint it resumes from
(`--resume_from_checkpoint latest` or a path), and whether it can.

A checkpoint the Trainer wrote whole holds the weights, `trainer_state.json` (the step, written last),
the optimizer's state (`optimizer.pt`), the learning-rate schedule's (`scheduler.pt`) and the random
generators' (`rng_state.pth`, one per rank under DDP). The Trainer resumes from one without the last three
and says nothing: the optimizer restarts from zero moments, the schedule from its first step (warm-up
again), the data order and dropout from fresh seeds, and the run differs from the one it continues. So such
a checkpoint is incomplete here: `latest` passes over it, naming it, and a path to one is refused unless
`--resume_with_fresh_state true` accepts fresh state. A checkpoint whose tensors do not fit the model this
run builds (its `--preset` or `--config_overrides` changed) is refused naming the settings that differ.
"""

import json
import logging
import os
import shutil

import torch

logger = logging.getLogger(__name__)

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# What each piece of training state is, for the messages.
STATE = {"optimizer.pt": "the optimizer's moments", "scheduler.pt": "the learning-rate schedule's step",
         "rng_state.pth": "the random generators (data order, dropout)"}
# Config entries that say nothing of the model's shape or maths.
BOOKKEEPING = {"transformers_version", "architectures", "auto_map", "_name_or_path", "dtype", "torch_dtype", "custom_pipelines"}


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


def asks_to_resume(resume) -> bool:
    return resume not in (None, False, "false", "False", "")


def is_complete_checkpoint(path: str) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint whose state parses and whose weights are
    there was written whole."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHTS)


def missing_state(path: str) -> list[str]:
    """The training-state files (`STATE`) the checkpoint `path` lacks. DeepSpeed keeps optimizer and
    schedule in a global_step* folder, FSDP its optimizer in optimizer_* files; the RNG file may be one per rank."""
    names = os.listdir(path)
    missing = []
    if not any(n.startswith("global_step") for n in names):  # DeepSpeed's own layout holds optimizer and schedule
        if not any(n.startswith(("optimizer.", "optimizer_")) or n.endswith("-optimizer.pt") for n in names):
            missing.append("optimizer.pt")
        if "scheduler.pt" not in names:
            missing.append("scheduler.pt")
    if not any(n == "rng_state.pth" or (n.startswith("rng_state_") and n.endswith(".pth")) for n in names):
        missing.append("rng_state.pth")
    return missing


def _described(missing: list[str]) -> str:
    return ", ".join(f"{name} ({STATE[name]})" for name in missing)


def resolve_resume(resume, output_dir: str, fresh_state: bool = False) -> str | None:
    """--resume_from_checkpoint: "latest" (or true) = the newest complete checkpoint in output_dir, passing over
    (and naming) one a kill left half-written or one without its training state; a path is used when complete;
    None/false = start afresh. `fresh_state` (--resume_with_fresh_state) accepts a checkpoint without its
    training state, with a warning naming what restarts."""
    if not asks_to_resume(resume):
        return None
    if resume not in (True, "latest", "true", "True"):
        if not os.path.isdir(resume):
            raise ValueError(f"--resume_from_checkpoint {resume}: no such checkpoint folder; pass latest or a checkpoint-N folder")
        if not is_complete_checkpoint(resume):
            raise ValueError(f"--resume_from_checkpoint {resume}: no readable trainer_state.json and weights ({' or '.join(WEIGHTS)}): "
                             "a run stopped while writing it, or it is not a checkpoint; pass latest or another checkpoint-N folder")
        if missing := missing_state(resume):
            if not fresh_state:
                raise ValueError(
                    f"--resume_from_checkpoint {resume} lacks {_described(missing)}: resuming would restart them and train "
                    "differently from the run it continues. Pass another checkpoint, or --resume_with_fresh_state true to "
                    "resume its weights and step with fresh ones")
            logger.warning("resuming from %s with fresh %s (--resume_with_fresh_state)", resume, _described(missing))
        return resume
    steps = {}
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
                steps[int(name[len("checkpoint-"):])] = os.path.join(output_dir, name)
    for step in sorted(steps, reverse=True):
        if not is_complete_checkpoint(steps[step]):
            logger.warning("skipping incomplete checkpoint %s (a run stopped while writing it)", steps[step])
            continue
        missing = missing_state(steps[step])
        if not missing:
            return steps[step]
        if fresh_state:
            logger.warning("resuming from %s with fresh %s (--resume_with_fresh_state)", steps[step], _described(missing))
            return steps[step]
        logger.warning("skipping incomplete checkpoint %s: it lacks %s (pass it by path with --resume_with_fresh_state true "
                       "to resume from it anyway)", steps[step], _described(missing))
    raise ValueError(
        f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}; start afresh with --overwrite_output_dir true"
    )


def saved_shapes(checkpoint: str) -> dict[str, tuple[int, ...]] | None:
    """{tensor name: shape} of the checkpoint's safetensors weights, read from their headers; None when it has none."""
    from safetensors import safe_open

    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(checkpoint, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return None
    shapes = {}
    for name in files:
        with safe_open(os.path.join(checkpoint, name), "pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def check_fits(checkpoint: str, config) -> None:
    """Refuse `checkpoint` when its tensors do not fit the model `config` builds (the Trainer would stop with a
    size-mismatch traceback), naming the checkpoint and the settings of its config.json that differ."""
    from modeling_nanovlm import NanoVLMForConditionalGeneration

    saved = saved_shapes(checkpoint)
    if saved is None:
        return
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = NanoVLMForConditionalGeneration(config)
    wrong = [(k, saved[k], tuple(p.shape)) for k, p in model.state_dict().items() if k in saved and saved[k] != tuple(p.shape)]
    if not wrong:
        return
    try:
        with open(os.path.join(checkpoint, "config.json")) as f:
            before = json.load(f)
    except (OSError, ValueError):
        before = {}
    now = config.to_dict()
    differ = [f"{k}={before[k]!r} there, {now[k]!r} now" for k in sorted(set(before) & set(now) - BOOKKEEPING) if before[k] != now[k]]
    key, there, here = wrong[0]
    raise ValueError(
        f"--resume_from_checkpoint: {checkpoint} holds a model of another shape ({len(wrong)} tensor(s) differ, e.g. {key} "
        f"{list(there)} there, {list(here)} now); settings that differ from its config.json: {'; '.join(differ) or 'none found'}. "
        "Resume with the --preset and --config_overrides it was trained with (its run's arguments.json has them), or start "
        "afresh with --overwrite_output_dir true or another --output_dir")
