"""NanoVLMConfig and NanoVLMForConditionalGeneration: shapes, loss, caching, sizes, bad input."""

import pytest
import torch
from conftest import CAPTIONS

from benchmarks.sizes import preset_sizes
from modeling_nanovlm import PRESETS, NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMModel, NanoVLMProcessor
from modeling_nanovlm.configuration_nanovlm import VISION_FEATURE_SELECTS
from modeling_nanovlm.modeling_nanovlm import NanoVLMMLP

PAPER_TOTALS = {"mini": 5e6, "base": 16e6, "large": 25e6}


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_follow_paper_table(name):
    config = NanoVLMConfig.from_preset(name)
    paper = {  # Table 1: vision blocks, image dim, decoder layers, heads, text dim
        "mini": (1, 400, 4, 8, 96), "base": (3, 512, 8, 8, 128), "large": (5, 512, 10, 16, 192),
    }[name]
    got = (config.vision_num_hidden_layers, config.vision_hidden_size, config.num_hidden_layers,
           config.num_attention_heads, config.hidden_size)
    assert got == paper
    assert config.hidden_size // config.num_attention_heads == {"mini": 12, "base": 16, "large": 12}[name]
    assert (config.hidden_dropout, config.image_size, config.patch_size) == (0.1, 224, 16)


def test_preset_sizes_within_ten_percent_of_paper():
    sizes = preset_sizes()  # default vocabulary; the tied lm_head is counted once
    for name, paper in PAPER_TOTALS.items():
        total = sizes[name]["total"]
        assert abs(total - paper) / paper <= 0.10, f"{name}: {total:,}"
        assert total == sum(sizes[name][part] for part in ("vision", "projector", "decoder"))


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", 0), ("num_attention_heads", 5), ("vision_feature_select", "mean"), ("patch_size", 6),
     ("image_size", 100), ("hidden_dropout", 1.5), ("vocab_size", -3), ("vision_pool_size", 99), ("vision_stem", "cnn")],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        NanoVLMConfig(**{field: value})


@pytest.mark.parametrize("overrides, field", [(dict(patch_size=12), "patch_size"), (dict(vision_stem_channels=20), "vision_stem_channels")])
def test_conv_stem_needs_halvable_patches_and_widths(overrides, field):
    with pytest.raises(ValueError, match=f"vision_stem='conv'.*{field}"):
        NanoVLMConfig(vision_stem="conv", **overrides)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="mini"):
        NanoVLMConfig.from_preset("huge")


def test_config_round_trips(tmp_path):
    config = NanoVLMConfig.from_preset("mini", vision_feature_select="all", vocab_size=999)
    config.save_pretrained(tmp_path)
    loaded = NanoVLMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.num_image_tokens == 197


# --- forward ----------------------------------------------------------------------------------


def processor_of(processor, model):
    """The processor for `model`: as many <image> tokens as its config's visual tokens."""
    return NanoVLMProcessor(processor.image_processor, processor.tokenizer, num_image_tokens=model.config.num_image_tokens)


@pytest.mark.parametrize("select, tokens", [("cls", 1), ("pooled", 4), ("all", 17)])
def test_forward_shapes_cover_image_and_text_positions(tester, processor, images, select, tokens):
    model = tester.get_model(vision_feature_select=select)
    inputs = processor_of(processor, model)(images=images[:3], text=["I see", "A", "There is a green"])
    out = model(**inputs)
    B, T = inputs["input_ids"].shape
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [tokens] * 3
    assert out.logits.shape == (B, T, model.config.vocab_size)
    assert out.image_hidden_states.shape == (B, tokens, model.config.hidden_size)
    assert model.config.num_image_tokens == tokens


def test_base_model_returns_text_hidden_states(tester, processor, images):
    config = tester.get_config()
    model = NanoVLMModel(config).eval()
    inputs = processor(images=images[:2], text=["I see", "A big"])
    out = model(**inputs, use_cache=False)
    assert out.last_hidden_state.shape == (*inputs["input_ids"].shape, config.hidden_size)
    assert out.cache is None


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_loss_backpropagates_to_every_parameter(tester, processor, images, stem):
    model = tester.get_model(vision_stem=stem).train()
    inputs = processor(images=images[:4], text=CAPTIONS[:4])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_gradient_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients(tester, processor, images, monkeypatch):
    inputs = processor(images=images[:4], text=CAPTIONS[:4])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    model = tester.get_model(hidden_dropout=0.0).train()
    calls, mlp_forward = [], NanoVLMMLP.forward  # (the recompute skips module hooks: count the calls themselves)
    monkeypatch.setattr(NanoVLMMLP, "forward", lambda self, x: calls.append(1) or mlp_forward(self, x))

    def loss_and_grads():
        model.zero_grad()
        calls.clear()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain_loss, plain_grads, plain_calls = loss_and_grads()
    assert model.supports_gradient_checkpointing
    model.gradient_checkpointing_enable()
    loss, grads, checkpointed_calls = loss_and_grads()
    assert checkpointed_calls == 2 * plain_calls  # every block ran again in the backward pass
    torch.testing.assert_close(loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


class Captioner(torch.nn.Module):
    """What an exported NanoVLM runs: the vision tower and one decoder pass over image + prompt -> logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values):
        return self.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False).logits


def test_torch_export_with_a_dynamic_batch_gives_the_same_logits(tester, processor, images):
    model = tester.get_model().eval()
    traced = processor(images=images[:3], text=CAPTIONS[:3], padding_side="right")
    batch, text = torch.export.Dim("batch"), torch.export.Dim("text", max=32)
    program = torch.export.export(Captioner(model).eval(), (traced["input_ids"], traced["pixel_values"]),
                                  dynamic_shapes={"input_ids": {0: batch, 1: text}, "pixel_values": {0: batch}}).module()
    for picked in ([4], [5, 6], [0, 2, 4, 6, 7]):  # other images, prompts, batch sizes and lengths than the traced ones
        inputs = processor(images=[images[i] for i in picked], text=[CAPTIONS[i] for i in picked], padding_side="right")
        expected = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        torch.testing.assert_close(program(inputs["input_ids"], inputs["pixel_values"]), expected)


def test_onnx_export_with_a_dynamic_batch_gives_the_same_logits_in_onnxruntime(tester, processor, images, tmp_path):
    """torch.onnx's exporter (through torch.export) writes the same program to ONNX; onnxruntime runs it."""
    import onnxruntime

    model = tester.get_model().eval()
    traced = processor(images=images[:3], text=CAPTIONS[:3], padding_side="right")
    batch, text = torch.export.Dim("batch"), torch.export.Dim("text", max=32)
    program = torch.onnx.export(Captioner(model).eval(), (traced["input_ids"], traced["pixel_values"]), dynamo=True,
                                dynamic_shapes={"input_ids": {0: batch, 1: text}, "pixel_values": {0: batch}})
    program.save(str(tmp_path / "nanovlm.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "nanovlm.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "pixel_values"]
    for picked in ([4], [5, 6], [0, 2, 4, 6, 7]):
        inputs = processor(images=[images[i] for i in picked], text=[CAPTIONS[i] for i in picked], padding_side="right")
        expected = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        (logits,) = session.run(None, {"input_ids": inputs["input_ids"].numpy(), "pixel_values": inputs["pixel_values"].numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_loss_ignores_minus_100_labels(tester, processor, images):
    model = tester.get_model()
    inputs = processor(images=images[:2], text=CAPTIONS[:2], padding_side="right")
    labels = inputs["input_ids"].clone()
    labels[:, 3:] = -100
    full = model(**inputs, labels=labels).loss
    logits = model(**inputs).logits
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(full, manual)


def test_right_padding_matches_unpadded(tester, processor, images):
    model = tester.get_model()
    short = processor(images=images[:1], text=[CAPTIONS[0]])
    batch = processor(images=images[:2], text=[CAPTIONS[0], CAPTIONS[2]], padding_side="right")
    n = short["input_ids"].shape[1]
    torch.testing.assert_close(model(**batch).logits[0, :n], model(**short).logits[0], atol=1e-5, rtol=1e-4)


def test_tied_embeddings_survive_save_and_load(tester, tmp_path):
    model = tester.get_model()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = NanoVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_conv_stem_reaches_the_patch_grid_and_saves_its_batchnorm_statistics(tester, processor, images, tmp_path):
    model = tester.get_model(vision_stem="conv")
    convs = [m for m in model.model.vision_tower.embeddings.conv_stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16]  # 32 px -> 16 -> 8 -> 4 = the 4x4 grid of 8 px patches
    inputs = processor(images=images[:4], text=CAPTIONS[:4])
    model.train()(**inputs)  # one training forward moves the BatchNorm running statistics off their start
    model.eval()
    norm = model.model.vision_tower.embeddings.conv_stem[1]
    assert norm.num_batches_tracked == 1 and not torch.allclose(norm.running_mean, torch.zeros_like(norm.running_mean))
    logits = model(**inputs).logits
    alone = model(**{k: v[:1] for k, v in inputs.items()}).logits  # in evaluation a photo's caption does not depend on its batch
    torch.testing.assert_close(alone[0], logits[0], atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = NanoVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.vision_stem == "conv"
    torch.testing.assert_close(loaded(**inputs).logits, logits, atol=0, rtol=0)


# --- generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("select", VISION_FEATURE_SELECTS)
def test_cached_uncached_and_static_cache_greedy_agree(tester, processor, images, select):
    model = tester.get_model(vision_feature_select=select)
    processor = processor_of(processor, model)
    inputs = processor(images=images[:2], text=["I see", ""])  # left-padded
    kwargs = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    cached = model.generate(**inputs, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    # A static cache is sized for the visual prefix too, and its unwritten slots are never attended.
    static = model.generate(**inputs, cache_implementation="static", **kwargs)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 12
    assert torch.equal(cached, uncached) and torch.equal(cached, static)
    text_only = processor(text=["I see a"])
    assert torch.equal(model.generate(**text_only, **kwargs), model.generate(**text_only, cache_implementation="static", **kwargs))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", ["one image", "unpadded batch", "left-padded batch"])
def test_static_cache_gives_the_dynamic_caches_tokens_and_scores(tester, processor, images, implementation, batch):
    """A static cache's prefill has no mask to build when nothing is padded (transformers' sdpa skip): its unwritten
    slots and the later prompt tokens must stay unseen all the same, at every step, whatever the kernel."""
    model = tester.get_model()
    model.set_attn_implementation(implementation)
    texts = {"one image": [""], "unpadded batch": ["I see", "I see"], "left-padded batch": ["I see a big", ""]}[batch]
    inputs = processor(images=images[: len(texts)], text=texts)
    assert bool((inputs["attention_mask"] == 0).any()) == (batch == "left-padded batch")
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    dynamic = model.generate(**inputs, **kwargs)
    static = model.generate(**inputs, cache_implementation="static", **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    for step, (got, expected) in enumerate(zip(static.scores, dynamic.scores, strict=True)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_forward_in_chunks_over_a_cache_gives_the_full_forwards_logits(tester, processor, images, implementation):
    """Several new tokens after cached ones need a causal mask; one new token, or none cached, needs none."""
    model = tester.get_model()
    model.set_attn_implementation(implementation)
    inputs = processor(images=images[:1], text=[CAPTIONS[0]])
    ids, n = inputs["input_ids"], model.config.num_image_tokens
    full = model(**inputs).logits
    cache = model(input_ids=ids[:, : n + 1], pixel_values=inputs["pixel_values"], use_cache=True).past_key_values
    chunk = model(input_ids=ids[:, n + 1 : -1], past_key_values=cache, use_cache=True)
    last = model(input_ids=ids[:, -1:], past_key_values=chunk.past_key_values, use_cache=True)
    torch.testing.assert_close(chunk.logits, full[:, n + 1 : -1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(last.logits, full[:, -1:], atol=1e-5, rtol=1e-4)
    # position_ids given as a keyword are used (here: shifted by one, so the logits change)
    shifted = model(**inputs, position_ids=torch.arange(1, ids.shape[1] + 1)[None]).logits
    same = model(**inputs, position_ids=torch.arange(ids.shape[1])[None]).logits
    torch.testing.assert_close(same, full)
    assert not torch.allclose(shifted, full, atol=1e-3)


def test_too_small_static_cache_says_so(tester, processor, images):
    from transformers import StaticCache

    model = tester.get_model()
    cache = StaticCache(config=model.config, max_cache_len=4)  # fewer slots than the image tokens and <bos>
    with pytest.raises(ValueError, match="larger max_cache_len"):
        model(**processor(images=images[:1]), cache=cache, use_cache=True)


def test_left_padded_batch_matches_one_by_one(tester, processor, images):
    model = tester.get_model()
    prompts = ["I see a big", "", "A", "There is a green tree"]
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    batch = processor(images=images[:4], text=prompts)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch should be left-padded"
    batched = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
    for i, prompt in enumerate(prompts):
        single = processor(images=images[i], text=[prompt])
        alone = model.generate(**single, **kwargs)[:, single["input_ids"].shape[1]:]
        assert torch.equal(batched[i], alone[0]), f"sample {i}"


def test_vision_tower_runs_once_per_generate(tester, processor, images):
    model = tester.get_model()
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    model.generate(**processor(images=images[:3]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert len(calls) == 1


def test_generation_strategies(tester, processor, images):
    model = tester.get_model()
    inputs = processor(images=images[:2])
    T = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    sampled = model.generate(**inputs, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=6)
    beams = model.generate(**inputs, num_beams=3, max_new_tokens=6, no_repeat_ngram_size=2, repetition_penalty=1.3)
    several = model.generate(**inputs, num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert sampled.shape[0] == 2 and beams.shape[0] == 2 and several.shape[0] == 4
    assert sampled.shape[1] > T and beams.shape[1] > T
    for row in beams[:, T:].tolist():  # no bigram repeats
        bigrams = [tuple(row[i:i + 2]) for i in range(len(row) - 1) if model.config.pad_token_id not in row[i:i + 2]]
        assert len(bigrams) == len(set(bigrams))


def test_text_only_prompt_generates(tester, processor):
    model = tester.get_model()
    inputs = processor(text=["I see a"])
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


# --- bad input --------------------------------------------------------------------------------


def test_wrong_pixel_shape_says_what_is_expected(tester):
    model = tester.get_model()
    ids = torch.tensor([[1]])
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        model(input_ids=ids, pixel_values=torch.zeros(3, 32, 32))


def test_token_ids_outside_vocabulary(tester):
    model = tester.get_model()
    with pytest.raises(ValueError, match="vocabulary size"):
        model(input_ids=torch.tensor([[1, model.config.vocab_size]]), pixel_values=torch.zeros(1, 3, 32, 32))


def test_prompt_longer_than_position_table(tester):
    model = tester.get_model()
    ids = torch.ones(1, 70, dtype=torch.long)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=ids)


def test_missing_image_and_prompt(tester):
    model = tester.get_model()
    with pytest.raises(ValueError, match="needs input_ids"):
        model()
    with pytest.raises(ValueError, match="with pixel_values, pass input_ids"):
        model(inputs_embeds=torch.zeros(1, 5, model.config.hidden_size), pixel_values=torch.zeros(1, 3, 32, 32))


def test_image_and_prompt_counts_must_match(tester):
    model = tester.get_model()
    with pytest.raises(ValueError, match="input_ids hold 0 <image> tokens but 3 image"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long), pixel_values=torch.zeros(3, 3, 32, 32))


# --- attention through transformers' attention interface, and the output flags ---------------------------


def test_eager_sdpa_and_flex_attention_give_the_same_logits_and_tokens(tester, processor, images):
    """The three kernels transformers' own models offer, switched on one model: padded and plain forwards agree,
    and so does cached generation with eager and sdpa. (Flex runs through torch.compile; on the CPU, torch 2.13's
    inductor cannot build the decoding kernel that generate() with transformers' flex masks needs, and has no
    flex backward: flex is for forwards here and for GPUs.)"""
    model = tester.get_model().eval().requires_grad_(False)
    padded = processor(images=images[:3], text=["I see", "", "I see a red"])  # left padding: the masked path
    plain = processor(images=images[:3])
    outputs = {}
    for implementation in ("sdpa", "eager", "flex_attention"):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        real = padded["attention_mask"].bool()  # (pad positions hold no prediction: each kernel fills them its own way)
        outputs[implementation] = [model(**padded).logits[real], model(**plain).logits]
        if implementation != "flex_attention":
            outputs[implementation].append(model.generate(**padded, max_new_tokens=6, do_sample=False))
    for other in ("eager", "flex_attention"):
        for sdpa, got in zip(outputs["sdpa"], outputs[other]):
            torch.testing.assert_close(got, sdpa, rtol=1e-4, atol=1e-5)


def test_attention_goes_through_the_registered_function(tester, processor, images):
    from transformers import AttentionInterface

    from modeling_nanovlm.modeling_nanovlm import eager_attention_forward

    calls = []

    def counting(module, *args, **kwargs):
        calls.append(module.is_causal)
        return eager_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("counting", counting)
    model = tester.get_model().eval()
    reference = model(**processor(images=images[:2])).logits
    model.set_attn_implementation("counting")
    torch.testing.assert_close(model(**processor(images=images[:2])).logits, reference, rtol=1e-4, atol=1e-5)
    config = model.config  # every layer of both towers: vision (bidirectional), then the decoder (causal)
    assert calls == [False] * config.vision_num_hidden_layers + [True] * config.num_hidden_layers


def test_output_flags_return_what_they_name(tester, processor, images):
    model = tester.get_model().eval()
    inputs = processor(images=images[:2], text=CAPTIONS[:2], padding_side="right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels, output_hidden_states=True, output_attentions=True)
    config, length = model.config, inputs["input_ids"].shape[1]  # image tokens and text
    assert len(out.hidden_states) == config.num_hidden_layers + 1  # the embeddings, then each layer (the last normed)
    assert all(h.shape == (2, length, config.hidden_size) for h in out.hidden_states)
    base = model.model(**inputs)
    torch.testing.assert_close(out.hidden_states[-1], base.last_hidden_state)
    assert len(out.attentions) == config.num_hidden_layers
    for weights in out.attentions:  # (batch, heads, queries, keys): rows sum to 1, no query sees a later key
        assert weights.shape == (2, config.num_attention_heads, length, length)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert weights.triu(1).abs().max() == 0
    assert model(**inputs).hidden_states is None and model(**inputs).attentions is None

    as_tuple = model(**inputs, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)


def test_generate_returns_hidden_states_and_attentions_per_step(tester, processor, images):
    model = tester.get_model().eval()
    inputs = processor(images=images[:2])
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         output_hidden_states=True, output_attentions=True, output_scores=True)
    assert len(out.hidden_states) == len(out.attentions) == len(out.scores) == 4  # one entry per new token
    assert len(out.hidden_states[0]) == model.config.num_hidden_layers + 1
    plain = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, plain)
