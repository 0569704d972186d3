"""The peer: the tiny captioner a user would configure from transformers' own parts today.

A `VisionEncoderDecoderModel` of a `ViTModel` encoder and a `GPT2LMHeadModel` decoder with
cross-attention, sized like a NanoVLM config: same image and patch size, vision width, depth,
heads and MLP, decoder width, depth, heads and MLP, vocabulary and position table. Everything
else is the configs' defaults (GPT-2: dropout 0.1 on embeddings, residuals and attention).
"""

from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

from modeling_nanovlm import NanoVLMConfig


def peer_config(config: NanoVLMConfig) -> VisionEncoderDecoderConfig:
    encoder = ViTConfig(
        image_size=config.image_size, patch_size=config.patch_size, num_channels=config.num_channels,
        hidden_size=config.vision_hidden_size, num_hidden_layers=config.vision_num_hidden_layers,
        num_attention_heads=config.vision_num_attention_heads, intermediate_size=config.vision_intermediate_size,
    )
    decoder = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_position_embeddings, n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers, n_head=config.num_attention_heads, n_inner=config.intermediate_size,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    peer = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)  # sets add_cross_attention
    # The decoder starts from <bos>, as NanoVLM's captioning prompt does.
    peer.decoder_start_token_id, peer.pad_token_id, peer.eos_token_id = config.bos_token_id, config.pad_token_id, config.eos_token_id
    return peer


def build_peer(config: NanoVLMConfig) -> VisionEncoderDecoderModel:
    model = VisionEncoderDecoderModel(config=peer_config(config))
    generation = model.generation_config
    generation.decoder_start_token_id, generation.pad_token_id = config.bos_token_id, config.pad_token_id
    generation.eos_token_id, generation.bos_token_id = config.eos_token_id, config.bos_token_id
    return model


def peer_inputs(batch: dict) -> dict:
    """NanoVLM's training batch (`<image>... <bos> text <eos>`, labels = ids with -100 on the image tokens,
    `<bos>` and pads) for the peer: the labels from the first text token on.

    The peer shifts `labels` right behind `decoder_start_token_id` (= `<bos>`), so it gets the same
    decoder inputs and the same targets as NanoVLM.
    """
    start = int((batch["labels"] != -100).any(0).nonzero()[0])  # right padding: every caption starts there
    return {"pixel_values": batch["pixel_values"], "labels": batch["labels"][:, start:].contiguous()}
