"""Checks of train.py's flags that the argument parser cannot make, run before anything is loaded or written:
each refusal names the flag, the value and what would work."""

import os

MAX_VOCAB = 2**31 - 1  # the tokenizer library takes a machine-sized integer; a tokenizer never holds more tokens than its texts give


def check_arguments(model_args, data_args, training_args) -> None:
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(f"--max_steps must be at least 1 (or -1: train --num_train_epochs epochs), got {training_args.max_steps}")
    if not 0 < data_args.validation_fraction < 1:
        raise ValueError(f"--validation_fraction is the share of the data held out for validation: it must be between 0 and 1 "
                         f"(both excluded), got {data_args.validation_fraction}")
    if not 260 <= model_args.vocab_size <= MAX_VOCAB:  # 256 bytes + 4 special tokens (processing.tokenizer)
        raise ValueError(f"--vocab_size must be between 260 and {MAX_VOCAB:,} (the tokenizer stops at the tokens its training "
                         f"texts give), got {model_args.vocab_size}")
    check_output_dir(training_args.output_dir)


def check_output_dir(path: str) -> None:
    """--output_dir must be a folder or a path where one can be made: refuse one that is (or lies under) a file."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is" if existing == os.path.abspath(path) else f"lies under {existing}, which is"
        raise ValueError(f"--output_dir {path} {what} a file, not a folder: name a folder (new or one of a run) for the model")
