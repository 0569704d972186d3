"""Launch checks: processes that a launcher started train together, or the run is refused."""

import logging
import os

import torch

logger = logging.getLogger(__name__)


def launch_defaults() -> dict:
    """On a machine without a GPU train.py trains on the CPU as if given --use_cpu true: TrainingArguments refuses
    --bf16 there otherwise, and processes started by a launcher (WORLD_SIZE > 1) would each run alone (no gloo
    world) and all write one output folder. A use_cpu in a recipe or on the command line wins."""
    if not torch.accelerator.is_available():
        return {"use_cpu": True}
    return {}


def check_launch(training_args) -> None:
    """Refuse a launch whose processes would not train together, or that started one process of several asked for."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and (training_args.use_cpu or not torch.accelerator.is_available()):
        raise ValueError(
            "an FSDP launch on the CPU: accelerate trains it as plain DDP (every rank holds the whole model), not sharded. "
            "FSDP needs GPUs; on a CPU use --config_file configuration/accelerate/cpu_2proc.yaml"
        )
    if launched > 1 and training_args.world_size != launched:
        raise ValueError(
            f"the launcher started {launched} processes but each sees a world of {training_args.world_size}: they would train "
            "alone and overwrite one output folder. On a machine without GPUs pass --use_cpu true (or drop --use_cpu false); "
            "with GPUs, check the accelerate config's num_processes against the GPUs present"
        )
    if training_args.use_cpu and not torch.accelerator.is_available():
        logger.info("no GPU here: training on the CPU (use_cpu)")
    if "ACCELERATE_USE_CPU" in os.environ and "WORLD_SIZE" not in os.environ and not torch.accelerator.is_available():
        # accelerate's one-process launcher: it sets MASTER_ADDR only when more processes (or machines) were asked for
        if "MASTER_ADDR" in os.environ:
            raise ValueError(
                "`accelerate launch` was asked for several processes but started one, which would train alone: without "
                "GPUs it starts several only with --multi_gpu. For N CPU ranks run `accelerate launch --multi_gpu "
                "--num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no train.py ...` (two: "
                "`accelerate launch --config_file configuration/accelerate/cpu_2proc.yaml train.py ...`); for one process "
                "drop --num_processes (and unset MASTER_ADDR if your shell exports it)"
            )
        logger.info("one process: on a machine without GPUs `accelerate launch` starts several only with --multi_gpu "
                    "(e.g. --config_file configuration/accelerate/cpu_2proc.yaml)")
