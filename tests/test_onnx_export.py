"""`python -m modeling_nanovlm.export_onnx`: the three ONNX files of SmolVLM's layout, and greedy captions in
onnxruntime that are token for token those of `model.generate()`."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from transformers import ViTImageProcessorPil

from modeling_nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMProcessor
from modeling_nanovlm.export_onnx import OnnxCaptioner, export_onnx

from conftest import toy_image

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, image_size=32,
            patch_size=8, vision_hidden_size=32, vision_num_hidden_layers=1, vision_num_attention_heads=4,
            vision_stem_channels=16, vision_pool_size=2, initializer_range=0.2)  # wide weights: a random model's greedy tokens vary
# Every family of configs: the paper's presets (the [CLS] token), ours (every patch token), the decoder-heavy ones,
# the pooled readout, the convolutional stem and the convolutional tower; each shrunk to a few thousand parameters.
FAMILIES = {
    "mini": dict(preset="mini"),
    "base-112": dict(preset="base-112"),
    "mini-112-dec": dict(preset="mini-112-dec"),
    "pooled": dict(preset="large", vision_feature_select="pooled"),
    "conv-stem": dict(preset="mini-112", vision_stem="conv"),
    "conv-tower": dict(preset="mini-112-conv", vision_conv_channels=[8, 16, 16], vision_conv_blocks=[1, 1, 1], vision_conv_groups=4,
                       vision_conv_grid=2, vision_feature_select="all"),
}
PROMPTS = ["", "I see", "A yellow star is on"]  # one caption and two continuations: a left-padded batch


def save_tiny_model(folder, tokenizer, preset, eos_from_greedy=True, **overrides):
    """A fixed-seed tiny model and its processor saved in `folder`. With `eos_from_greedy`, the end-of-text id is a
    token the first row's greedy caption reaches after a few steps, so that rows of a batch end at different steps."""
    config = NanoVLMConfig.from_preset(preset, vocab_size=len(tokenizer), **{**TINY, **overrides})
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(config).eval()
    processor = NanoVLMProcessor(ViTImageProcessorPil(size={"height": 32, "width": 32}), tokenizer,
                                 num_image_tokens=config.num_image_tokens)
    if eos_from_greedy:
        inputs = processor(images=[toy_image(0)], text=[""])
        tokens = model.generate(**inputs, do_sample=False, max_new_tokens=8)[0, inputs["input_ids"].shape[1]:].tolist()
        model.generation_config.eos_token_id = tokens[min(3, len(tokens) - 1)]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def generate_both(model, processor, captioner, picked, prompts, max_new_tokens=12):
    inputs = processor(images=[toy_image(i) for i in picked], text=prompts)
    expected = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    got = captioner.generate(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
                             inputs["pixel_values"].numpy(), max_new_tokens=max_new_tokens)
    return expected.numpy(), got


def check_tokens(model, processor, folder, **captioner_kwargs):
    """Batch 1 and a left-padded batch of 3 (rows ending at different steps): the same tokens as generate()."""
    captioner = OnnxCaptioner(str(folder), threads=1, **captioner_kwargs)
    expected, got = generate_both(model, processor, captioner, [0], [""])
    np.testing.assert_array_equal(got, expected)
    expected, got = generate_both(model, processor, captioner, [1, 2, 3], PROMPTS)
    assert (expected == 0).any(), "the batch should be left-padded"
    np.testing.assert_array_equal(got, expected)
    assert len({tuple(row) for row in expected[:, -12:].tolist()}) == 3  # three different captions, not one loop


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_greedy_captions_are_generates_tokens(family, tokenizer, tmp_path):
    """Every config family, exported with torch.onnx's legacy (TorchScript) exporter, 5x faster to run here than the
    dynamo one that the command uses (tested below): each of the three modules is given its attention mask, so the
    model's `is_causal` shortcut, a tensor under TorchScript tracing, is never taken."""
    model, processor = save_tiny_model(tmp_path, tokenizer, **FAMILIES[family])
    export_onnx(str(tmp_path), quantize=False, dynamo=False)
    check_tokens(model, processor, tmp_path)


@pytest.mark.slow
def test_export_command_writes_smolvlm_layout_and_int8_files_caption(tokenizer, tmp_path):
    model, processor = save_tiny_model(tmp_path, tokenizer, "mini-112")
    subprocess.run([sys.executable, "-m", "modeling_nanovlm.export_onnx", str(tmp_path)], check=True,
                   capture_output=True)
    names = ["vision_encoder", "embed_tokens", "decoder_model_merged"]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(
        f"{name}{suffix}.onnx" for name in names for suffix in ("", "_quantized"))
    L = model.config.num_hidden_layers
    decoder = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "decoder_model_merged.onnx"))
    kv = [f"past_key_values.{i}.{part}" for i in range(L) for part in ("key", "value")]
    assert [i.name for i in decoder.get_inputs()] == ["inputs_embeds", "attention_mask", "position_ids", *kv]
    assert [o.name for o in decoder.get_outputs()] == ["logits", *[f"present.{i}.{p}" for i in range(L) for p in ("key", "value")]]
    assert decoder.get_inputs()[3].shape == ["batch_size", 4, "past_sequence_length", 8]
    vision = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "vision_encoder.onnx"))
    assert [(i.name, o.name) for i, o in zip(vision.get_inputs(), vision.get_outputs())] == [("pixel_values", "image_features")]
    # transformers.js reads the image settings from preprocessor_config.json
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 32, "width": 32} and saved["image_mean"] == [0.5] * 3 and saved["resample"] == 2
    check_tokens(model, processor, tmp_path)

    quantized = onnx.load(str(tmp_path / "onnx" / "decoder_model_merged_quantized.onnx"))
    assert any(init.data_type == onnx.TensorProto.INT8 for init in quantized.graph.initializer)
    fp32, int8 = OnnxCaptioner(str(tmp_path)), OnnxCaptioner(str(tmp_path), quantized=True)
    inputs = processor(images=[toy_image(i) for i in range(3)], text=PROMPTS)
    features = [c.sessions["vision_encoder"].run(None, {"pixel_values": inputs["pixel_values"].numpy()})[0] for c in (fp32, int8)]
    assert np.abs(features[0] - features[1]).max() < 0.1 * np.abs(features[0]).max()  # int8 rounding, not another model
    captions = int8.generate(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), inputs["pixel_values"].numpy(),
                             max_new_tokens=6)
    assert captions.shape[0] == 3 and 0 < captions.shape[1] - inputs["input_ids"].shape[1] <= 6
    assert ((captions >= 0) & (captions < len(tokenizer))).all()

    # benchmarks/onnx.py over these files: every side timed
    from benchmarks.onnx import main as benchmark

    benchmark(["--model_dir", str(tmp_path), "--output", str(tmp_path / "speed.json"), "--new_tokens", "3", "--images", "2",
               "--repeats", "1", "--browser", "false"])  # the browser's side: tests/test_web.py
    report = json.loads((tmp_path / "speed.json").read_text())
    assert set(report["results"]) == {"pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8"}
    assert all(side["captions_timed"] == 2 and side["tokens_per_s"] > 0 for side in report["results"].values())


def test_missing_onnx_packages_say_which_extra_installs_them(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets where it is not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[onnx\]"'):
        OnnxCaptioner(str(tmp_path))


def test_a_legacy_export_failure_names_the_dynamo_exporter(tokenizer, tmp_path, monkeypatch):
    save_tiny_model(tmp_path, tokenizer, "mini", eos_from_greedy=False)

    def legacy_fails(*args, **kwargs):  # what the legacy exporter raised on the model's full-prompt forward
        raise TypeError("scaled_dot_product_attention(): argument 'is_causal' must be bool, not Tensor")

    monkeypatch.setattr(torch.onnx, "export", legacy_fails)
    with pytest.raises(RuntimeError, match="is_causal.*dynamo exporter"):
        export_onnx(str(tmp_path), dynamo=False)


def test_export_of_a_folder_without_a_model_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_onnx(str(tmp_path))


def test_missing_onnx_files_say_how_to_export(tokenizer, tmp_path):
    save_tiny_model(tmp_path, tokenizer, "mini", eos_from_greedy=False)
    with pytest.raises(FileNotFoundError, match="modeling_nanovlm.export_onnx"):
        OnnxCaptioner(str(tmp_path))


@pytest.mark.parametrize("dataset", ["scenes", "coco"])
def test_check_command_reports_token_equality_and_int8_quality(dataset, tokenizer, tmp_path):
    """`python -m benchmarks.onnx_check` on a tiny model whose saved generation settings are not greedy (beams,
    n-gram blocking): it decodes greedily on both sides, so fp32 ONNX gives generate()'s tokens for every image at
    batch 1 and in left-padded batches, and it scores each side's captions with the evaluation's scorers."""
    from benchmarks.onnx_check import main as check

    model, processor = save_tiny_model(tmp_path, tokenizer, "mini-112")
    model.generation_config.num_beams, model.generation_config.no_repeat_ngram_size = 3, 2
    model.generation_config.save_pretrained(tmp_path)
    export_onnx(str(tmp_path), dynamo=False)
    argv = ["--model_dir", str(tmp_path), "--output", str(tmp_path / "check.json"), "--num_examples", "5",
            "--batch_size", "3", "--max_new_tokens", "8", "--dataset", dataset]
    if dataset == "coco":
        (tmp_path / "images").mkdir()
        for i in range(5):
            toy_image(i, 40).save(tmp_path / "images" / f"{i}.png")
        (tmp_path / "captions.json").write_text(json.dumps({
            "images": [{"id": i, "file_name": f"{i}.png"} for i in range(5)],
            "annotations": [{"image_id": i, "caption": text} for i in range(5) for text in ("A red box is here.", "I see a box.")]}))
        argv += ["--caption_file", str(tmp_path / "captions.json"), "--image_dir", str(tmp_path / "images"),
                 "--caption_tokenizer", "simple"]
    check(argv)
    report = json.loads((tmp_path / "check.json").read_text())
    assert set(report["token_equality"]) == {"batch_1", "batch_3_left_padded"}
    for way in report["token_equality"].values():
        assert way["onnxruntime_fp32"]["tokens_equal_fraction"] == 1.0 and way["onnxruntime_fp32"]["captions"] == 5
        assert 0.0 <= way["onnxruntime_int8"]["tokens_equal_fraction"] <= 1.0
    assert report["decoding"]["num_beams"] == 1 and report["decoding"]["model_generation_config"]["num_beams"] == 3
    metrics = {"scenes": ("object_recall", "chair_i"), "coco": ("cider_d", "bleu4")}[dataset]
    assert set(report["quality"]) == {"pytorch", "onnxruntime_fp32", "onnxruntime_int8"}
    assert report["quality"]["pytorch"] == report["quality"]["onnxruntime_fp32"]  # the same tokens, the same scores
    for metric in metrics:
        assert all(isinstance(side[metric], float) for side in report["quality"].values())
        assert report["quality_int8_minus_fp32"][metric] == pytest.approx(
            report["quality"]["onnxruntime_int8"][metric] - report["quality"]["onnxruntime_fp32"][metric])
    assert report["settings"]["onnx_files"] == "the model's onnx/"
    assert len(report["samples"]) == 5 and report["samples"][0]["pytorch"] == report["samples"][0]["onnxruntime_fp32"]
