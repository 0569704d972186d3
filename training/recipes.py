"""Two-stage recipes: a recipe's "then" object holds a second stage's flags (e.g. self-critical fine-tuning),
trained from the first stage's model."""

import json
import logging
import os

from .checkpoints import asks_to_resume, is_complete_checkpoint, prepare_output_dir

logger = logging.getLogger(__name__)

FIRST_STAGE = "stage-1"  # a two-stage recipe's first model: OUTPUT_DIR/stage-1


def second_stage(argv: list[str]) -> dict | None:
    """The flags of the --recipe's "then" object: a second stage (e.g. self-critical fine-tuning) that starts
    from the first stage's model; None for a one-stage run."""
    from .arguments import recipe_of  # arguments reads recipes' flags: imported here, not at the top

    then = recipe_of(argv)[1].get("then")
    if then:
        flag_list(then)  # refuses a value no flag can carry before the first stage starts
    return then


def flag_list(flags: dict) -> list[str]:
    """Command-line words for a recipe's {flag: value} (booleans as true/false, a list as several values)."""
    words = []
    for key, value in flags.items():
        if value is None:
            raise ValueError(f"--recipe: \"then\": {{\"{key}\": null}} cannot be passed as a flag; leave {key} out to keep "
                             "the first stage's value, or give a value")
        values = value if isinstance(value, list) else [value]
        words += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return words


def train_in_stages(argv: list[str], then: dict, train_once) -> None:
    """A two-stage recipe: the first stage (the recipe and the command line) trains into OUTPUT_DIR/stage-1,
    the second (those flags, then the recipe's "then" flags) starts from its model and trains into OUTPUT_DIR,
    so OUTPUT_DIR holds the final model as after a one-stage run. With --resume_from_checkpoint latest a
    finished first stage (its metrics.json written) is not run again and each stage resumes from its own
    newest checkpoint; metrics.json sums both stages' wall time and samples. `train_once(model_args, data_args,
    training_args)` trains one stage."""
    from .arguments import check_arguments, parse_args  # arguments reads recipes' flags: imported here, not at the top

    training_args = parse_args(argv)[2]
    check_arguments(*parse_args([*argv, *flag_list(then)]))  # the second stage's flags, before the first stage trains
    out = training_args.output_dir
    first = os.path.join(out, FIRST_STAGE)
    resuming = asks_to_resume(training_args.resume_from_checkpoint)
    if training_args.process_index == 0:
        prepare_output_dir(training_args)  # refuses a used OUTPUT_DIR unless resuming or overwriting
    if resuming and os.path.exists(os.path.join(first, "metrics.json")):
        logger.info("stage 1 of 2 finished before: %s", first)
    else:
        logger.info("stage 1 of 2: training into %s", first)
        train_once(*parse_args([*argv, "--output_dir", first, "--push_to_hub", "false"]))
    resume = resuming and any(
        name.startswith("checkpoint-") and is_complete_checkpoint(os.path.join(out, name)) for name in os.listdir(out))
    stage_two = flag_list(then) + ["--model_name_or_path", first, "--output_dir", out]
    stage_two += ["--resume_from_checkpoint", "latest"] if resume else ["--resume_from_checkpoint", "false", "--overwrite_output_dir", "true"]
    logger.info("stage 2 of 2: %s", " ".join(stage_two))
    train_once(*parse_args([*argv, *stage_two]))
    if training_args.process_index == 0:
        with open(os.path.join(first, "metrics.json")) as f:
            before = json.load(f)
        with open(os.path.join(out, "metrics.json")) as f:
            after = json.load(f)
        after["stages"] = [{k: m.get(k) for k in ("wall_seconds", "global_step", "train_examples_seen", "final.eval_loss")}
                           for m in (before, after)]
        for key in ("wall_seconds", "train_examples_seen"):
            after[key] = sum(stage[key] for stage in after["stages"])
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(after, f, indent=2)
