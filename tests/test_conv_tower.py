"""The convolutional image tower (`vision_tower_type="conv"`): config, features, the captioner's round trips
(save / load, remote code, export), kernels, gradient checkpointing, train.py, and the sizes of the presets."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CAPTIONS, COLORS, toy_image
from PIL import Image, ImageDraw
from test_hub_code import TRANSFORMERS_VERSIONS, assert_remote_code_gives_the_same_tokens, captions_of, overfit
from test_hub_code import oldest_transformers_python  # noqa: F401  (a fixture the remote-code test asks for)

import train
from training.arguments import DataArguments, parse_config_overrides
from training.objectives import token_grid, with_objectives
from experiments import allocation
from benchmarks.sizes import part_sizes, preset_sizes
from modeling_nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration
from modeling_nanovlm.modeling_nanovlm import NanoVLMConvBlock, NanoVLMConvVisionModel, NanoVLMVisionModel
from publishing.model_card import model_card

# A tiny conv tower on the testers' 32x32 images: stem 32 -> 8, stages 8 -> 4 -> 2; a 2x2 grid of tokens.
CONV = dict(vision_tower_type="conv", vision_conv_channels=[8, 16, 16], vision_conv_blocks=[1, 1, 1], vision_conv_groups=4,
            vision_conv_grid=2)


def conv_model(tester, **overrides):
    return tester.get_model(**{**CONV, **overrides})


def test_config_picks_the_tower_and_counts_its_tokens(tester):
    config = tester.get_config(**CONV)
    assert (config.vision_grid, config.num_patches, config.vision_feature_size) == (2, 4, 16)
    for select, tokens in (("cls", 1), ("pooled", 4), ("all", 5)):  # the mean; the 2x2 grid pooled to 2x2; both
        assert tester.get_config(**CONV, vision_feature_select=select).num_image_tokens == tokens
    assert isinstance(conv_model(tester).model.vision_tower, NanoVLMConvVisionModel)
    assert isinstance(tester.get_model().model.vision_tower, NanoVLMVisionModel)  # "vit", the default
    assert NanoVLMConfig().vision_tower_type == "vit"


@pytest.mark.parametrize("overrides, field", [
    (dict(vision_tower_type="resnet"), "vision_tower_type"),
    (dict(vision_conv_channels=[]), "vision_conv_channels"),
    (dict(vision_conv_channels=[8, 0, 16]), "vision_conv_channels"),
    (dict(vision_conv_blocks=[1, 1]), "vision_conv_blocks"),
    (dict(vision_conv_blocks=[1, -1, 1]), "vision_conv_blocks"),
    (dict(vision_conv_channels=[8, 16, 18]), "vision_conv_groups"),
    (dict(vision_conv_groups=0), "vision_conv_groups"),
    (dict(vision_conv_grid=3), "vision_conv_grid"),  # the last map of a 32x32 image is 2x2
    (dict(vision_pool_size=3), "vision_pool_size"),
])
def test_invalid_conv_config_names_the_field(tester, overrides, field):
    with pytest.raises(ValueError, match=field):
        tester.get_config(**{**CONV, **overrides})


def test_conv_config_round_trips_with_lists(tester, tmp_path):
    tester.get_config(**CONV).save_pretrained(tmp_path)
    loaded = NanoVLMConfig.from_pretrained(tmp_path)
    assert (loaded.vision_tower_type, loaded.vision_conv_channels, loaded.vision_conv_blocks) == ("conv", [8, 16, 16], [1, 1, 1])


def test_tower_gives_its_grid_for_any_input_size_and_has_no_batch_statistics(tester):
    tower = conv_model(tester).model.vision_tower
    assert not list(tower.buffers())  # GroupNorm: no running statistics to sync under DDP or to save
    for side in (32, 48, 61):
        assert tower(torch.randn(2, 3, side, side)).shape == (2, 1 + 2 * 2, 16)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_one_image_alone_gets_the_features_it_gets_in_a_batch(tester, processor, images, mode):
    model = conv_model(tester, hidden_dropout=0.0)
    getattr(model, mode)()
    pixels = processor(images=images)["pixel_values"]
    batched = model.get_image_features(pixels)
    for i in (0, 5):
        torch.testing.assert_close(model.get_image_features(pixels[i:i + 1]), batched[i:i + 1], rtol=1e-5, atol=1e-6)


def test_loss_backpropagates_to_every_conv_parameter(tester, processor, images):
    model = conv_model(tester).train()
    inputs = processor(images=images[:4], text=CAPTIONS[:4])
    out = model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
    out.loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert out.image_hidden_states.shape == (4, model.config.num_image_tokens, model.config.hidden_size)


def test_init_scales_the_convs_by_fan_in_and_residual_depth(tester):
    tower = conv_model(tester).model.vision_tower
    stem = tower.stem[0].weight  # 3x3x3 inputs: He std sqrt(2/27), far from the 0.02 of the Linears
    assert stem.std().item() == pytest.approx((2 / 27) ** 0.5, rel=0.3)
    block = next(m for m in tower.modules() if isinstance(m, NanoVLMConvBlock))
    ratio = block.conv2.weight.std() / block.conv1.weight.std()
    assert ratio.item() == pytest.approx(3 ** -0.5, rel=0.3)  # three blocks in all


@pytest.fixture(scope="module")
def conv_dir(tmp_path_factory, tester, processor):
    """A tiny conv-tower captioner trained a little on the toy captions (its loss falls), saved with its processor."""
    torch.manual_seed(0)
    model = conv_model(tester, hidden_dropout=0.0)
    losses = overfit(model, processor, [toy_image(i) for i in range(8)], CAPTIONS, steps=30, lr=3e-3)
    path = tmp_path_factory.mktemp("conv")
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, losses


def test_conv_captioner_learns_and_survives_save_and_load(conv_dir, processor, images):
    path, model, losses = conv_dir
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert json.loads((path / "config.json").read_text())["vision_tower_type"] == "conv"
    loaded = NanoVLMForConditionalGeneration.from_pretrained(path).eval()
    assert isinstance(loaded.model.vision_tower, NanoVLMConvVisionModel)
    inputs = processor(images=images[:3], text=CAPTIONS[:3])
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    assert captions_of(loaded, processor, images[:3]) == captions_of(model, processor, images[:3])
    cached = model.generate(**processor(images=images[:3]), max_new_tokens=8, do_sample=False)
    uncached = model.generate(**processor(images=images[:3]), max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("transformers_version", TRANSFORMERS_VERSIONS)
def test_conv_captioner_runs_from_its_remote_code_in_a_fresh_process(conv_dir, processor, tmp_path, transformers_version,
                                                                     request):
    path, model, _ = conv_dir
    inputs = processor(images=[toy_image(0)])  # what the pipeline writes: the image and an empty prompt
    out = model.generate(**inputs, max_new_tokens=96, do_sample=False)
    caption = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0]
    assert_remote_code_gives_the_same_tokens(path, model, processor, tmp_path, transformers_version, request, caption)


def test_eager_and_sdpa_give_the_same_logits_with_the_conv_tower(tester, processor, images):
    model = conv_model(tester).eval().requires_grad_(False)
    padded = processor(images=images[:3], text=["I see", "", "I see a red"])
    real = padded["attention_mask"].bool()
    outputs = {}
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        outputs[implementation] = (model(**padded).logits[real], model.generate(**padded, max_new_tokens=6, do_sample=False))
    torch.testing.assert_close(outputs["eager"][0], outputs["sdpa"][0], rtol=1e-4, atol=1e-5)
    assert torch.equal(outputs["eager"][1], outputs["sdpa"][1])


def test_gradient_checkpointing_recomputes_the_conv_blocks_with_the_same_gradients(tester, processor, images, monkeypatch):
    inputs = processor(images=images[:4], text=CAPTIONS[:4])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model = conv_model(tester, hidden_dropout=0.0).train()
    first_norms = {id(m.norm1) for m in model.modules() if isinstance(m, NanoVLMConvBlock)}
    calls, forward = [], torch.nn.GroupNorm.forward  # (the block's own forward is the checkpointing wrapper: count inside it)
    monkeypatch.setattr(torch.nn.GroupNorm, "forward", lambda self, x: (id(self) in first_norms and calls.append(1)) or forward(self, x))

    def loss_and_grads():
        model.zero_grad()
        calls.clear()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain_loss, plain_grads, plain_calls = loss_and_grads()
    model.gradient_checkpointing_enable()
    loss, grads, checkpointed_calls = loss_and_grads()
    assert plain_calls == 3 and checkpointed_calls == 2 * plain_calls  # each block ran again in the backward pass
    torch.testing.assert_close(loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_torch_export_of_the_conv_captioner_with_a_dynamic_batch(tester, processor, images):
    from test_modeling import Captioner

    model = conv_model(tester).eval()
    traced = processor(images=images[:3], text=CAPTIONS[:3], padding_side="right")
    batch, text = torch.export.Dim("batch"), torch.export.Dim("text", max=32)
    program = torch.export.export(Captioner(model).eval(), (traced["input_ids"], traced["pixel_values"]),
                                  dynamic_shapes={"input_ids": {0: batch, 1: text}, "pixel_values": {0: batch}}).module()
    inputs = processor(images=images[4:6], text=CAPTIONS[4:6], padding_side="right")
    expected = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(program(inputs["input_ids"], inputs["pixel_values"]), expected)


# --- presets, sizes, the allocation sweep, the model card ---------------------------------------


def test_paper_and_vit_presets_keep_their_parameter_counts():
    """The conv tower changes no ViT preset: each total is the one counted before it came (default vocabulary)."""
    totals = {name: s["total"] for name, s in preset_sizes(["mini", "base", "large", "mini-112", "base-112", "mini-112-dec"]).items()}
    assert totals == {"mini": 5041056, "base": 14586144, "large": 25406816, "mini-112": 4982256, "base-112": 14510880,
                      "mini-112-dec": 7143736}
    for name, paper in (("mini", 5e6), ("base", 16e6), ("large", 25e6)):
        assert abs(totals[name] / paper - 1) <= 0.10


def test_mini_112_conv_is_mini_112_with_a_conv_tower_of_about_its_size():
    sizes = preset_sizes(["mini-112", "mini-112-conv"])
    assert abs(sizes["mini-112-conv"]["total"] / sizes["mini-112"]["total"] - 1) <= 0.02
    assert sizes["mini-112-conv"]["decoder"] == sizes["mini-112"]["decoder"]
    config = NanoVLMConfig.from_preset("mini-112-conv")
    with torch.device("meta"):
        tower = NanoVLMForConditionalGeneration(config).model.vision_tower
    assert sizes["mini-112-conv"]["vision"] == sum(p.numel() for p in tower.parameters())
    assert (config.image_size, config.conv_feature_map_size(), config.num_image_tokens) == (112, 4, 17)


def test_allocation_sweep_scales_the_conv_towers_channels():
    budget, splits = allocation.allocate("mini-112-conv", 511, (0.3, 0.7))
    for split in splits:
        assert abs(split["share"] - split["target_share"]) < 0.06 and abs(split["total"] / budget - 1) <= 0.02
        assert "vision_hidden_size" not in split and len(split["vision_conv_channels"]) == 4
        # its recipe's overrides give train.py this very model
        overrides = parse_config_overrides(allocation.overrides_text(allocation.split_overrides(split)))
        config = NanoVLMConfig.from_preset("mini-112-conv", vocab_size=511, **overrides)
        assert part_sizes(config)["total"] == split["total"]
    assert splits[0]["vision_conv_channels"][-1] < splits[1]["vision_conv_channels"][-1]


def test_model_card_says_which_tower(conv_dir, tester, processor, tmp_path):
    path, _, _ = conv_dir
    card = model_card(path)
    assert "vision encoder: convolutional" in card and "2x2 grid" in card and "patches" not in card
    tester.get_model().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    card = model_card(tmp_path)
    assert "vision encoder: ViT" in card and "8x8 patches" in card and "convolutional" not in card


# --- train.py ---------------------------------------------------------------------------------


def photo_like_folder(folder: Path, n: int = 24) -> tuple[Path, Path]:
    """A COCO-captions folder of textured toy photos (noise, a colored shape, a sky band), two captions each."""
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        noise = (torch.rand(48, 64, 3, generator=generator) * 60 + 70).to(torch.uint8).numpy()
        image = Image.fromarray(noise)
        draw = ImageDraw.Draw(image)
        color = COLORS[i % len(COLORS)]
        x = (i // len(COLORS)) * 18
        draw.ellipse([x + 4, 14, x + 24, 40], fill=color)
        image.save(folder / "images" / f"{i}.jpg", quality=90)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48})
        side = ("left", "middle", "right")[i // len(COLORS)]
        annotations += [{"image_id": i, "id": 2 * i, "caption": f"a {color} ball on the {side} ."},
                        {"image_id": i, "id": 2 * i + 1, "caption": f"I see a {color} ball ."}]
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return folder / "captions.json", folder / "images"


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about a minute on a shared CPU: most of it train.py's setup and final evaluation
def test_train_py_trains_the_conv_preset_with_the_words_loss_and_augmentation(tmp_path):
    captions, image_dir = photo_like_folder(tmp_path / "photos")
    out = tmp_path / "run"
    train.main([
        "--preset", "mini-112-conv", "--image_size", "32", "--vocab_size", "300", "--config_overrides",
        "hidden_size=32,num_hidden_layers=2,num_attention_heads=4,max_position_embeddings=64,"
        "vision_conv_channels=8/16/16,vision_conv_blocks=1/1/1,vision_conv_groups=4,vision_conv_grid=2",
        "--dataset", "coco", "--caption_file", str(captions), "--image_dir", str(image_dir), "--caption_policy", "all",
        "--validation_caption_file", str(captions), "--num_validation_examples", "8",
        "--aux_words_weight", "1.0", "--aux_words_min_count", "2", "--augment", "true",
        "--output_dir", str(out), "--max_steps", "40", "--per_device_train_batch_size", "12", "--learning_rate", "3e-3",
        "--warmup_steps", "5", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "5",
        "--num_sample_captions", "0", "--max_new_tokens", "8", "--disable_tqdm", "true", "--use_cpu",
    ])
    result = json.loads((out / "metrics.json").read_text())
    assert result["last_logged_caption_loss"] < 0.6 * result["first_logged_caption_loss"], result
    assert result["last_logged_aux_words"] < result["first_logged_aux_words"], result
    saved = NanoVLMForConditionalGeneration.from_pretrained(out)
    assert saved.config.vision_tower_type == "conv" and saved.config.vision_conv_channels == [8, 16, 16]
    assert not hasattr(saved, "aux_words_head")


def test_masked_image_modelling_is_refused_for_the_conv_tower(tester):
    args = DataArguments(aux_mim_weight=0.5, aux_grounding_weight=0.0)
    with pytest.raises(ValueError, match="--aux_mim_weight"):
        with_objectives(conv_model(tester), args, collator=None)


def test_grounding_reads_the_conv_towers_grid(tester):
    assert token_grid(tester.get_config(**CONV, vision_feature_select="all")) == 2
    assert token_grid(tester.get_config(**CONV, vision_pool_size=1)) == 1
