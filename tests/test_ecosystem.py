"""Where NanoVLM meets the rest of the stack: the pipeline registry shared with other models, `--bf16` on a machine
without a GPU, and `accelerate launch` asked for more processes than it starts. (Pipelines built from a loaded
model and processor, under the installed and the oldest declared transformers: tests/test_hub_code.py.)"""

import json

import pytest
import torch
from conftest import toy_image
from test_train import ACCELERATE, metrics, run_train
from transformers import (
    CLIPVisionConfig,
    ImageTextToTextPipeline,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    pipeline,
)

import train
from modeling_nanovlm import NanoVLMImageTextToTextPipeline

no_gpu = pytest.mark.skipif(torch.accelerator.is_available(), reason="about machines without a GPU")
TINY_RUN = ["--num_train_examples", "32", "--num_validation_examples", "8", "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no"]


def tiny_llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=100)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=5)).eval()


@pytest.mark.parametrize("task", ["image-to-text", "image-text-to-text"])
def test_other_models_keep_transformers_own_pipeline(processor, task):
    """Registering NanoVLM's pipeline (on `import modeling_nanovlm`) leaves every other model transformers' class."""
    captioner = pipeline(task, model=tiny_llava(), processor=processor)
    assert type(captioner) is ImageTextToTextPipeline
    with pytest.raises(ValueError, match="pass processor="):
        pipeline(task, model=tiny_llava())


def test_nanovlm_pipeline_from_objects_is_ours_and_names_what_is_missing(tester, processor):
    model = tester.get_model()
    captioner = pipeline("image-to-text", model=model, processor=processor)
    assert isinstance(captioner, NanoVLMImageTextToTextPipeline)
    assert isinstance(captioner(toy_image(0), max_new_tokens=3)[0]["generated_text"], str)
    with pytest.raises(ValueError, match="image_processor= and tokenizer="):
        pipeline("image-to-text", model=model, tokenizer=processor.tokenizer)


@no_gpu
def test_without_a_gpu_training_is_on_the_cpu_unless_use_cpu_false_is_given(tmp_path):
    training_args = train.parse_args(["--bf16", "true"])[2]  # TrainingArguments refuses bf16 here without use_cpu
    assert training_args.use_cpu and training_args.bf16
    assert not train.parse_args(["--use_cpu", "false"])[2].use_cpu  # the command line wins
    (tmp_path / "recipe.json").write_text(json.dumps({"use_cpu": False}))
    assert not train.parse_args(["--recipe", str(tmp_path / "recipe.json")])[2].use_cpu  # and so does a recipe


@no_gpu
def test_bf16_trains_on_a_machine_without_gpu(tmp_path):
    """docs/training.md's `python train.py ... --bf16 true`, with no --use_cpu."""
    result = run_train("--output_dir", str(tmp_path / "run"), "--bf16", "true", *TINY_RUN)
    assert metrics(tmp_path / "run")["world_size"] == 1
    assert "training on the CPU" in result.stderr


@no_gpu
@pytest.mark.parametrize("cpu", [(), ("--cpu",)], ids=["plain", "cpu"])
def test_accelerate_launch_of_two_processes_that_starts_one_is_refused(tmp_path, cpu):
    """Without GPUs `accelerate launch --num_processes 2` (with or without --cpu) starts ONE process: refused, with
    the launch that gives two ranks (tests/test_train.py runs it)."""
    result = run_train("--output_dir", str(tmp_path / "run"), *TINY_RUN,
                       launcher=(*ACCELERATE, *cpu, "--num_processes", "2"), check=False)
    assert result.returncode != 0
    assert "asked for several processes but started one" in result.stderr
    assert "--multi_gpu --num_processes N --num_machines 1" in result.stderr and "cpu_2proc.yaml" in result.stderr
    assert not (tmp_path / "run").exists()


@no_gpu
def test_accelerate_launch_of_one_process_trains(tmp_path):
    run_train("--output_dir", str(tmp_path / "run"), *TINY_RUN, launcher=(*ACCELERATE, "--num_processes", "1"))
    assert metrics(tmp_path / "run")["world_size"] == 1
