"""Folders saved before image tokens went into input_ids: refused with the way out, and converted exactly.

`tests/fixtures/nanovlm_prefix_format` was written by the earlier code (its decoder read the visual prefix
outside input_ids): a tiny NanoVLM with perturbed random weights, its processor, and `expected.json`, the
logits of three captioning prompts and the greedy tokens that code gave.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import toy_image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, ViTImageProcessorPil

from modeling_nanovlm import NanoVLMProcessor
from modeling_nanovlm.convert_nanovlm_checkpoint import convert
from modeling_nanovlm.convert_nanovlm_checkpoint import main as convert_main

OLD = Path(__file__).parent / "fixtures" / "nanovlm_prefix_format"


def test_an_old_folder_is_refused_with_the_command_that_converts_it():
    tokenizer = AutoTokenizer.from_pretrained(OLD)
    with pytest.raises(ValueError, match="no <image> token.*python -m modeling_nanovlm.convert_nanovlm_checkpoint"):
        NanoVLMProcessor(ViTImageProcessorPil(), tokenizer, num_image_tokens=4)
    with pytest.raises(ValueError, match="no <image> token"):
        AutoProcessor.from_pretrained(OLD)


def test_converted_folder_gives_the_old_logits_and_tokens(tmp_path):
    convert_main([str(OLD), str(tmp_path / "new")])
    expected = json.loads((OLD / "expected.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "new").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "new")
    old_vocab = len(expected["text_logits"][0][0])
    assert model.config.vocab_size == old_vocab + 1 and model.config.image_token_id == old_vocab  # <image>: the next free id
    assert model.generation_config.suppress_tokens == [old_vocab]
    inputs = processor(images=[toy_image(i) for i in expected["images"]], text=expected["prompts"])
    with torch.no_grad():
        logits = model(**inputs).logits
    old = torch.tensor(expected["text_logits"])
    real = torch.tensor(expected["text_attention_mask"]).bool()  # the text positions (left padding aside)
    torch.testing.assert_close(logits[:, -old.shape[1]:, :old_vocab][real], old[real], rtol=1e-5, atol=1e-5)
    generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert generated.tolist() == expected["generated"]
    assert processor.batch_decode(inputs["input_ids"]) == expected["prompts"]
    with pytest.raises(ValueError, match="already has an <image> token"):
        convert(tmp_path / "new", tmp_path / "again")
