"""Bad input to the model library (NanoVLMForConditionalGeneration, NanoVLMProcessor): an error that names the input
and what to do, never a blank caption, a generic transformers traceback or a tokenizer that loads half-made."""

import json
import os
import shutil

import pytest
import torch
from conftest import toy_image

from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMProcessor


def copy_of(saved, target):
    shutil.copytree(saved, target)
    return target


# --- pixel values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_forward_and_generate_refuse_non_finite_pixel_values(tester, processor, value):
    model = tester.get_model()
    inputs = processor(images=[toy_image(0), toy_image(1)])
    inputs["pixel_values"][1, 0, 3, 5] = value
    with pytest.raises(ValueError, match=r"pixel_values of image\(s\) \[1\] .*NaN or infinite values"):
        model(**inputs)
    with pytest.raises(ValueError, match=r"pixel_values of image\(s\) \[1\] .*NaN or infinite values"):
        model.generate(**inputs, max_new_tokens=4, do_sample=False)


# --- from_pretrained ---------------------------------------------------------------------------------


def test_from_pretrained_names_a_config_that_does_not_match_the_weights(saved, tmp_path):
    folder = copy_of(saved, tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2  # the decoder MLP's weights no longer fit
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match=r"edited: config.json does not match the weights: "
                                      r"model\.language_model\.layers\.0\.mlp\.fc1\.weight is \(128, 32\) in the checkpoint "
                                      r"but \(256, 32\) under the config \(6 tensor\(s\) differ\)"):
        NanoVLMForConditionalGeneration.from_pretrained(folder)
    # asked for, a mismatch is still allowed (transformers re-initialises those tensors)
    model = NanoVLMForConditionalGeneration.from_pretrained(folder, ignore_mismatched_sizes=True)
    assert model.config.intermediate_size == config["intermediate_size"]


def test_from_pretrained_says_the_config_is_missing(saved, tmp_path):
    folder = copy_of(saved, tmp_path / "weights-only")
    os.remove(folder / "config.json")
    with pytest.raises(OSError, match=r"weights-only: the config \(config.json\) is missing from the folder"):
        NanoVLMForConditionalGeneration.from_pretrained(folder)
    config = NanoVLMForConditionalGeneration.from_pretrained(saved).config  # a config passed in is enough
    assert NanoVLMForConditionalGeneration.from_pretrained(folder, config=config).config.hidden_size == config.hidden_size


def test_a_training_checkpoint_loads_as_a_captioner_without_unexpected_weights(tester, tmp_path):
    """train.py's checkpoints hold its training-only heads (aux_*_head): loading one for captioning mid-run gives the
    captioner's weights and reports nothing unexpected (a load report listing them reads as a broken model)."""
    from training.objectives import TRAINING_HEADS

    model = tester.get_model()
    for name in TRAINING_HEADS:  # as each objective's attach() adds its head
        setattr(model, name, torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)))
    model.save_pretrained(tmp_path / "checkpoint-500")
    loaded, info = NanoVLMForConditionalGeneration.from_pretrained(tmp_path / "checkpoint-500", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert not any(hasattr(loaded, name) for name in TRAINING_HEADS)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer_config.json", "processor_config.json"])
def test_processor_from_pretrained_names_a_missing_file(saved, tmp_path, file):
    folder = copy_of(saved, tmp_path / "partial")
    os.remove(folder / file)
    with pytest.raises(OSError, match=f"partial: {file} .* is missing from the folder"):
        NanoVLMProcessor.from_pretrained(folder)
    assert NanoVLMProcessor.from_pretrained(saved).num_image_tokens  # the complete folder loads


# --- processor text ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, got", [(123, "got int 123"), (["a", None], "got NoneType None"), ([b"a"], "got bytes b'a'")])
def test_processor_names_text_of_the_wrong_type(processor, text, got):
    with pytest.raises(ValueError, match=f"text must be a string or a list of strings .*{got}"):
        processor(text=text)
    with pytest.raises(ValueError, match=f"text must be a string or a list of strings .*{got}"):
        processor(images=[toy_image(0)] * (len(text) if isinstance(text, list) else 1), text=text)
    assert torch.is_tensor(processor(text="a")["input_ids"])
