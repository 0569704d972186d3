"""Launch checks: processes that a launcher started train together, or the run is refused."""

import logging
import os

import torch

logger = logging.getLogger(__name__)


def launch_defaults() -> dict:
    """Processes started by a launcher (WORLD_SIZE > 1) on a machine without a GPU train together on the CPU
    (gloo), as if given --use_cpu: without it each would run alone and all would write one output folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        return {"use_cpu": True}
    return {}


def check_launch(training_args) -> None:
    """Refuse a launch whose processes would not train together; say so when accelerate started one of several."""
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
    if "ACCELERATE_USE_CPU" in os.environ and "WORLD_SIZE" not in os.environ and not torch.accelerator.is_available():
        logger.info("one process: on a machine without GPUs `accelerate launch` starts several only with --multi_gpu "
                    "(e.g. --config_file configuration/accelerate/cpu_2proc.yaml)")
