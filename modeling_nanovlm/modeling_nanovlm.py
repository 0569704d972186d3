"""NanoVLM model: conv-stem ViT encoder (or a residual conv network) -> Linear+GELU projector -> causal decoder.

Reads top-down: attention, MLP and block (shared by both towers), the vision towers, the text
decoder, the base model that joins them, and the captioning head. As in LLaVA, `input_ids` hold
`num_image_tokens` `<image>` tokens before the text; their embeddings are replaced by the projected
image features, so the decoder's mask, positions and cache are the standard ones of transformers.
This file is shipped to the Hub as remote code: it imports only torch, transformers and stdlib.
"""

import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_nanovlm import NanoVLMConfig

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument of forward(), of the masking utilities and of the outputs that
# generate() reads (past_key_values -> cache). The model takes either and answers in the installed version's name.
CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@dataclass
class NanoVLMModelOutput(ModelOutput):
    """Base model output, over every position of `input_ids` (image tokens and text). `hidden_states`: the
    embeddings, then each decoder layer's output (the last one normed); `attentions`: each layer's weights."""

    last_hidden_state: torch.FloatTensor | None = None
    if CACHE_NAME == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class NanoVLMCausalLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_NAME == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


def eager_attention_forward(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Attention written out (softmax(q k^T * scaling + mask) v), which can return its weights. `attention_mask`
    is additive (0 / finfo.min) or boolean (True = may attend); a causal layer without one gets the causal mask
    here, as SDPA's is_causal would."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # an SDPA-style mask: True = may attend
        weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
    elif attention_mask is not None:
        weights = weights + attention_mask
    elif kwargs.get("is_causal"):
        q, k = query.shape[2], key.shape[2]
        allowed = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
        weights = weights.masked_fill(~allowed, torch.finfo(weights.dtype).min)
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def attention_function(config: NanoVLMConfig, output_attentions: bool = False):
    """The kernel transformers' attention-function registry holds for `config._attn_implementation` ("sdpa" by
    default, or "eager", or one registered with `AttentionInterface.register`); eager when the weights are wanted,
    the one that has them. A tower looks it up once per forward and hands it to its layers."""
    implementation = "eager" if output_attentions else config._attn_implementation
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


class NanoVLMAttention(nn.Module):
    """Multi-head attention, causal or bidirectional, with a kernel from `attention_function` (the config's by
    default)."""

    def __init__(self, hidden_size: int, num_heads: int, config: NanoVLMConfig, is_causal: bool, layer_idx=None):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = is_causal
        self.layer_idx = layer_idx
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, attention=None):
        B, T, C = hidden_states.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, past + T, hs); a static cache: (B, nh, max_cache_len, hs)
            if attention_mask is None and T > 1 and k.shape[2] > T:
                # Only the prefill of an empty static cache gets here (create_causal_mask skips its plain causal mask, as
                # for sdpa's upper-left is_causal): its first T slots are the keys, the rest are unwritten. Transformers'
                # sdpa_attention_forward drops them the same way.
                k, v = k[:, :, :T], v[:, :, :T]
        # A mask, when given, already holds causality; without one a causal layer needs is_causal when
        # queries and keys line up (no cache, or a cache that was empty). A plain bool without a cache, so that
        # torch.export with a dynamic length can trace it.
        is_causal = self.is_causal and attention_mask is None and (cache is None or k.shape[2] == T)
        dropout = self.dropout if self.training else 0.0
        attention = attention or attention_function(self.config)
        if attention is sdpa_attention_forward:  # what it does for these heads, without its ~15 us of Python a call
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=self.scaling,
                                               is_causal=is_causal and T > 1).transpose(1, 2)
            weights = None
        else:
            y, weights = attention(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, is_causal=is_causal)
        return self.o_proj(y.reshape(B, T, C)), weights


class NanoVLMMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, config: NanoVLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NanoVLMBlock(GradientCheckpointingLayer):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)), dropout on both residuals.
    Under `model.gradient_checkpointing_enable()` its activations are recomputed in the backward pass."""

    def __init__(self, hidden_size, num_heads, intermediate_size, config: NanoVLMConfig, is_causal, layer_idx=None):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.self_attn = NanoVLMAttention(hidden_size, num_heads, config, is_causal, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = NanoVLMMLP(hidden_size, intermediate_size, config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, attention_mask=None, cache=None, attention=None):
        """The new hidden states, and the attention weights when the kernel gives them (eager; else None)."""
        attended, weights = self.self_attn(self.input_layernorm(hidden_states), attention_mask, cache, attention)
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states))), weights


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


class NanoVLMVisionEmbeddings(nn.Module):
    """Conv stem -> LayerNorm -> ReLU -> Linear, then [CLS] and learned positions.

    `vision_stem="patch"`: conv1 (k=4, s=4) sees 4x4 pixel cells, conv2 (k=s=patch/4) merges 4x4
    cells into one patch: 224x224 -> 56x56 -> 14x14 = 196 tokens for 16x16 patches. Non-overlapping
    strides keep the stem cheap (a few % of the encoder's FLOPs) while adding a nonlinearity inside
    each patch.

    `vision_stem="conv"`: log2(patch) overlapping 3x3 stride-2 convs (BatchNorm + GELU between them,
    widths doubling up to `vision_stem_channels`), 112x112 -> 56 -> 28 -> 14 -> 7x7 for 16x16
    patches, as in "Early Convolutions Help Transformers See Better" (Xiao et al., 2021): a small
    CNN's view of edges and textures, for encoders trained from scratch on little data.
    """

    def __init__(self, config: NanoVLMConfig):
        super().__init__()
        c = config.vision_stem_channels
        self.conv_stem = None
        if config.vision_stem == "conv":
            depth = config.patch_size.bit_length() - 1  # stride-2 convs from the pixels to the patch grid
            widths = [config.num_channels] + [c >> (depth - 1 - i) for i in range(depth)]
            layers = []
            for c_in, c_out in zip(widths, widths[1:]):
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
            self.conv_stem = nn.Sequential(*layers[:-2])  # the last conv feeds the LayerNorm below
        else:
            self.conv1 = nn.Conv2d(config.num_channels, c // 4, kernel_size=4, stride=4)
            self.conv2 = nn.Conv2d(c // 4, c, kernel_size=config.patch_size // 4, stride=config.patch_size // 4)
        self.stem_norm = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.patch_proj = nn.Linear(c, config.vision_hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.vision_hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.vision_hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, pixel_values, bool_masked_pos=None, mask_token=None):
        if self.conv_stem is not None:
            x = self.conv_stem(pixel_values)  # (B, c, 14, 14)
        else:
            x = self.conv2(F.gelu(self.conv1(pixel_values)))
        x = x.flatten(2).transpose(1, 2)  # (B, 196, c)
        x = self.patch_proj(F.relu(self.stem_norm(x)))  # (B, 196, vision_hidden)
        if bool_masked_pos is not None:  # masked-image modelling: these patches become `mask_token`
            x = torch.where(bool_masked_pos.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.position_embedding)


class NanoVLMVisionModel(nn.Module):
    """Bidirectional pre-LN encoder; returns `(B, 1 + num_patches, vision_hidden_size)`.

    `bool_masked_pos` `(B, num_patches)` (as in transformers' ViT) replaces those patches' embeddings by
    `mask_token` `(vision_hidden_size,)` before the positions are added: the input of a masked-image-modelling
    loss. The mask token is the caller's (a training head's), so a saved model holds no training-only weights.
    """

    def __init__(self, config: NanoVLMConfig):
        super().__init__()
        self.config = config
        self.embeddings = NanoVLMVisionEmbeddings(config)
        self.layers = nn.ModuleList(
            NanoVLMBlock(
                config.vision_hidden_size, config.vision_num_attention_heads, config.vision_intermediate_size,
                config, is_causal=False,
            )
            for _ in range(config.vision_num_hidden_layers)
        )
        self.post_layernorm = nn.LayerNorm(config.vision_hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values, bool_masked_pos=None, mask_token=None):
        if (bool_masked_pos is None) != (mask_token is None):
            raise ValueError("masked-image modelling needs both bool_masked_pos and mask_token")
        hidden_states = self.embeddings(pixel_values, bool_masked_pos, mask_token)
        attention = attention_function(self.config)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention=attention)[0]
        return self.post_layernorm(hidden_states)


class NanoVLMConvBlock(GradientCheckpointingLayer):
    """Pre-activation residual block (He et al., 2016): x + conv(GELU(GN(conv(GELU(GN(x)))))), two 3x3 convs at
    one width. GroupNorm normalises each image on its own: no batch statistics, so batch 1, any batch and DDP ranks
    give the same features. Under `model.gradient_checkpointing_enable()` its activations are recomputed in the
    backward pass."""

    def __init__(self, channels: int, config: NanoVLMConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(config.vision_conv_groups, channels, eps=config.layer_norm_eps)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(config.vision_conv_groups, channels, eps=config.layer_norm_eps)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, hidden_states):
        residual = self.conv1(F.gelu(self.norm1(hidden_states)))
        return hidden_states + self.conv2(F.gelu(self.norm2(residual)))


class NanoVLMConvVisionModel(nn.Module):
    """The convolutional image tower (`vision_tower_type="conv"`); returns `(B, 1 + grid**2, channels[-1])`.

    Stem: conv3x3/2 -> GN -> GELU -> conv3x3/2, the image at 1/4 of its side (112 -> 28). Stage i: (for i > 0)
    GN -> GELU -> conv3x3/2 to the stage's width, halving the side, then its residual blocks. Then GN -> GELU,
    and the map becomes tokens: its mean (where the ViT has [CLS]), then the map average-pooled to
    `vision_conv_grid` x `vision_conv_grid` (adaptive: any input size gives that grid), a LayerNorm over
    channels on each. The layout is the ViT tower's, so `vision_feature_select` and the projector read it alike.
    """

    def __init__(self, config: NanoVLMConfig):
        super().__init__()
        self.config = config
        channels, groups, eps = config.vision_conv_channels, config.vision_conv_groups, config.layer_norm_eps
        self.stem = nn.Sequential(
            nn.Conv2d(config.num_channels, channels[0], 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(groups, channels[0], eps=eps), nn.GELU(),
            nn.Conv2d(channels[0], channels[0], 3, stride=2, padding=1, bias=False),
        )
        self.stages = nn.ModuleList()
        for i, (width, blocks) in enumerate(zip(channels, config.vision_conv_blocks)):
            stage = nn.Sequential()
            if i:  # halve the side, widen
                stage.append(nn.Sequential(nn.GroupNorm(groups, channels[i - 1], eps=eps), nn.GELU(),
                                           nn.Conv2d(channels[i - 1], width, 3, stride=2, padding=1, bias=False)))
            stage.extend(NanoVLMConvBlock(width, config) for _ in range(blocks))
            self.stages.append(stage)
        self.final_norm = nn.GroupNorm(groups, channels[-1], eps=eps)
        self.post_layernorm = nn.LayerNorm(channels[-1], eps=eps)
        for conv in self.modules():  # what `_init_weights` reads
            if isinstance(conv, nn.Conv2d):
                conv.init_gain = 1.0
        for block in self.modules():
            if isinstance(block, NanoVLMConvBlock):
                block.conv2.init_gain = max(1, sum(config.vision_conv_blocks)) ** -0.5

    def forward(self, pixel_values):
        hidden_states = self.stem(pixel_values)  # (B, c0, H/4, W/4)
        for stage in self.stages:
            hidden_states = stage(hidden_states)
        hidden_states = F.gelu(self.final_norm(hidden_states))  # (B, c, h, w)
        grid = F.adaptive_avg_pool2d(hidden_states, self.config.vision_conv_grid)  # (B, c, g, g)
        tokens = torch.cat([hidden_states.mean((2, 3)).unsqueeze(1), grid.flatten(2).transpose(1, 2)], dim=1)
        return self.post_layernorm(tokens)  # (B, 1 + g*g, c)


# ---------------------------------------------------------------------------------------------
# Text decoder
# ---------------------------------------------------------------------------------------------


class NanoVLMTextModel(nn.Module):
    """Causal pre-LN decoder over input embeddings (image features and tokens), learned positions."""

    def __init__(self, config: NanoVLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(
            NanoVLMBlock(
                config.hidden_size, config.num_attention_heads, config.intermediate_size, config,
                is_causal=True, layer_idx=i,
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, inputs_embeds, position_ids, attention_mask=None, cache=None, output_hidden_states=False,
                output_attentions=False, attention=None):
        """(final hidden states, every layer's input and the final ones when asked, every layer's attention weights
        when asked). `attention`: the kernel, from `attention_function` (looked up here when not given)."""
        attention = attention or attention_function(self.config, output_attentions)
        hidden_states = self.dropout(inputs_embeds + self.embed_positions(position_ids))
        all_hidden, all_attentions = (), ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, weights = layer(hidden_states, attention_mask, cache, attention)
            if output_attentions:
                all_attentions += (weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden or None, all_attentions or None


# ---------------------------------------------------------------------------------------------
# Pretrained models
# ---------------------------------------------------------------------------------------------


class NanoVLMPreTrainedModel(PreTrainedModel):
    config_class = NanoVLMConfig
    config: NanoVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True  # kernels registered with transformers' AttentionInterface
    supports_gradient_checkpointing = True
    _no_split_modules = ["NanoVLMBlock", "NanoVLMConvBlock"]
    # train.py's checkpoints also hold its training-only heads (aux_grounding_head, ...): a captioner loaded from one
    # leaves them out without reporting them as unexpected weights
    _keys_to_ignore_on_load_unexpected = [r"^aux_\w+_head\."]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with errors that name the folder: a local path that does not
        exist, a folder without config.json, a config.json that does not match the weights (an edited or swapped
        config; transformers' generic size-mismatch error would name neither), or damaged weights (a truncated
        model.safetensors)."""
        name = os.fspath(pretrained_model_name_or_path)
        looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not os.path.isdir(os.path.expanduser(name)):
            raise OSError(f"{name}: no such folder; pass a folder written by save_pretrained or a Hub repo id (org/name)")
        folder = os.path.join(os.path.expanduser(name), kwargs.get("subfolder") or "")
        if kwargs.get("config") is None and os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
            # transformers would build a default config and fail on (or, for a matching size, silently load) the weights
            raise OSError(
                f"{name}: the config (config.json) is missing from the folder, and the weights cannot be read without the "
                "config saved with them: copy that config.json next to the weights, or pass config=NanoVLMConfig(...)"
            )
        wants_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  ignore_mismatched_sizes=True, **kwargs)
        except Exception as err:
            if type(err).__name__ != "SafetensorError":  # safetensors' error class, not imported: Hub code imports torch/transformers only
                raise
            raise OSError(
                f"{name}: the weights (model.safetensors) could not be read ({err}); the file is damaged or incomplete: "
                "save or download the model again"
            ) from None
        mismatched = info.get("mismatched_keys") or ()  # (key, checkpoint shape, model shape) each
        if mismatched and not ignore_mismatched:
            order = {key: i for i, key in enumerate(model.state_dict())}
            key, saved, expected = min(mismatched, key=lambda item: order.get(item[0], len(order)))
            raise OSError(
                f"{name}: config.json does not match the weights: {key} is {tuple(saved)} in the checkpoint but "
                f"{tuple(expected)} under the config ({len(mismatched)} tensor(s) differ); the config was edited or comes "
                "from another model: restore the config.json saved with these weights"
            )
        missing = sorted(set(info["missing_keys"]) - set(cls._tied_weights_keys or {}))
        if missing:  # a NanoVLM save holds every weight: anything missing would run as random numbers
            raise OSError(
                f"{name}: {len(missing)} weight(s) are missing from the checkpoint (e.g. {missing[0]}); it is not a complete "
                f"{cls.__name__} save: save or download the model again"
            )
        return (model, info) if wants_info else model

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, NanoVLMVisionEmbeddings):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.position_embedding, std=std)
        elif isinstance(module, nn.Conv2d) and hasattr(module, "init_gain"):
            # The conv tower's convs (marked by it with `init_gain`; init is per module, as its parents hold no
            # weights of their own): He init for GELU as for ReLU, where the default 0.02 is far too small for a 3x3 conv
            # on a few channels, times the gain (1/sqrt(blocks) on each block's last conv, so the residual stream's
            # variance stays flat at init, as in GPT-2's scheme).
            fan_in = module.weight[0].numel()
            init.normal_(module.weight, std=module.init_gain * (2 / fan_in) ** 0.5)
        elif isinstance(module, NanoVLMBlock):
            # GPT-2's scheme: residual projections scaled by 1/sqrt(2 * depth) keep the residual
            # stream's variance flat at init.
            depth = self.config.num_hidden_layers if module.self_attn.is_causal else self.config.vision_num_hidden_layers
            for linear in (module.self_attn.o_proj, module.mlp.fc2):
                init.normal_(linear.weight, std=std / (2 * depth) ** 0.5)


class NanoVLMModel(NanoVLMPreTrainedModel):
    """Vision tower + projector + decoder, without the LM head: hidden states (`NanoVLMModel.from_pretrained(path)`,
    or the captioner's `.model`)."""

    def __init__(self, config: NanoVLMConfig):
        super().__init__(config)
        self.vision_tower = NanoVLMConvVisionModel(config) if config.vision_tower_type == "conv" else NanoVLMVisionModel(config)
        self.multi_modal_projector = nn.Sequential(nn.Linear(config.vision_feature_size, config.hidden_size), nn.GELU())
        self.language_model = NanoVLMTextModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features, `(B, config.num_image_tokens, hidden_size)`: what replaces the `<image>` tokens."""
        self._check_pixel_values(pixel_values)
        hidden = self.vision_tower(pixel_values.to(self.dtype))  # (B, 1 + N, vision_feature_size): [CLS] or mean, map
        select = self.config.vision_feature_select
        if select == "cls":
            hidden = hidden[:, :1]
        elif select == "pooled":
            B, N, C = hidden.shape
            side = int((N - 1) ** 0.5)
            grid = hidden[:, 1:].transpose(1, 2).reshape(B, C, side, side)
            hidden = F.adaptive_avg_pool2d(grid, self.config.vision_pool_size).flatten(2).transpose(1, 2)
        return self.multi_modal_projector(hidden)

    def _check_pixel_values(self, pixel_values):
        c, s = self.config.num_channels, self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            raise ValueError(
                f"pixel_values must have shape (batch, {c}, {s}, {s}), got {tuple(pixel_values.shape)}; "
                "prepare images with NanoVLMProcessor"
            )
        # A NaN or inf pixel makes every logit NaN, and generate() would return a caption of padding tokens (a blank
        # string) rather than an error. One sum per forward (at prefill only, in generate()): a NaN or inf makes it
        # non-finite, and on the CPU it is many times cheaper than isfinite(...).all(); only then are the images named.
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values.sum(dtype=torch.float32))):
            bad = (~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero().flatten().tolist()
            if bad:  # (none when only the sum overflowed: finite pixels of absurd size, left to the model)
                raise ValueError(
                    f"pixel_values of image(s) {bad} (in the batch) hold NaN or infinite values; check how they were "
                    "made (a division by a zero std, an image read as float), or prepare images with NanoVLMProcessor"
                )

    def _check_input_ids(self, input_ids):
        if torch.compiler.is_compiling():  # a data-dependent branch: torch.export / compile cannot trace it
            return
        if not input_ids.numel():
            return
        low, high = (int(value) for value in torch.aminmax(input_ids))  # one reduction (this runs every decoding step)
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"input_ids must be in [0, {self.config.vocab_size}) (the vocabulary size), got values in "
                f"[{low}, {high}]; was the text tokenized with this model's processor?"
            )

    def _check_image_index(self, image_index, num_sequences: int, num_images: int):
        """`image_index` must give each of the batch's sequences a row of `pixel_values`."""
        if image_index.ndim != 1 or image_index.shape[0] != num_sequences or image_index.dtype.is_floating_point:
            raise ValueError(
                f"image_index must be an integer tensor of shape ({num_sequences},) (one row of pixel_values per sequence), "
                f"got {image_index.dtype} {tuple(image_index.shape)}"
            )
        if not torch.compiler.is_compiling() and num_sequences:
            low, high = (int(value) for value in torch.aminmax(image_index))
            if low < 0 or high >= num_images:
                raise ValueError(f"image_index must be in [0, {num_images}) (the rows of pixel_values), got values in [{low}, {high}]")

    def get_placeholder_mask(self, input_ids, image_features):
        """Where the image features go: the `<image>` tokens of `input_ids`, `(B, T, 1)`; their count must match
        the features'."""
        mask = input_ids == self.config.image_token_id
        if not torch.compiler.is_compiling() and int(mask.sum()) != image_features.shape[0] * image_features.shape[1]:
            raise ValueError(
                f"input_ids hold {int(mask.sum())} {'<image>'} tokens but {image_features.shape[0]} image(s) give "
                f"{image_features.shape[0] * image_features.shape[1]} features ({image_features.shape[1]} each); "
                "prepare images and text together with NanoVLMProcessor"
            )
        return mask.unsqueeze(-1)

    @staticmethod
    def _plain_causal(attention, kv_length: int, past: int, T: int) -> bool:
        """Whether attention needs no mask for an unpadded batch: a kernel that applies causality itself (sdpa,
        eager), queries that are all the keys (no cache, or an empty one) or one new token after them, and a cache
        holding exactly the keys written so far (not a static cache's unwritten slots). Skips building a mask on
        every decoding step."""
        if attention not in (sdpa_attention_forward, eager_attention_forward) or (past and T > 1):  # new tokens after cached ones
            return False
        return kv_length == past + T

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        image_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> NanoVLMModelOutput:
        """`image_index` `(batch,)`, optional: the row of `pixel_values` each sequence's `<image>` tokens show, so that
        `pixel_values` may hold fewer images than there are sequences (several captions of one photo in a training
        batch: the vision tower runs once for the photo, its features go to each of them and their gradients add up).
        Default: sequence i shows image i. `image_hidden_states` hold one row per sequence either way."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "NanoVLM needs input_ids (or inputs_embeds): NanoVLMProcessor(images=..., text=...) writes the image's "
                "<image> tokens and the prompt into them"
            )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = int(cache.get_seq_length()) if cache is not None else 0
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"the decoder input has {past + T} positions (image tokens and text) but max_position_embeddings is "
                f"{self.config.max_position_embeddings}; shorten the prompt or lower max_new_tokens"
            )
        kv_length = cache.get_mask_sizes(T, 0)[0] if cache is not None else T  # a static cache: its fixed number of keys
        if kv_length < past + T:
            raise ValueError(f"the cache holds {kv_length} positions but this call needs {past + T} "
                             "(image tokens and text); pass a larger max_cache_len")
        if inputs_embeds is None:
            self._check_input_ids(input_ids)
            inputs_embeds = self.language_model.embed_tokens(input_ids)
        image_hidden_states = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("with pixel_values, pass input_ids (their <image> tokens say where the image goes)")
            image_hidden_states = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
            if image_index is not None:  # (images, V, hidden) -> (B, V, hidden): each sequence's image
                self._check_image_index(image_index, B, image_hidden_states.shape[0])
                image_hidden_states = image_hidden_states[image_index]
            mask = self.get_placeholder_mask(input_ids, image_hidden_states)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_hidden_states)

        compiling = torch.compiler.is_compiling()
        padded = attention_mask is not None and (attention_mask.ndim != 2 or compiling or not bool(attention_mask.all()))
        if position_ids is None:  # left padding: each sample's positions start at its first real token
            if padded and attention_mask.ndim == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device).expand(B, T)
        # A right-padded batch without a cache (training) needs no mask: pads come after every real token, so
        # causal attention never lets a real token see one, and the kernel runs its fast causal path.
        right_padded = (padded and attention_mask.ndim == 2 and past == 0 and not compiling
                        and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()))
        attention = attention_function(self.config, output_attentions)
        if not padded and not compiling and self._plain_causal(attention, kv_length, past, T):
            mask = None  # what create_causal_mask gives sdpa here; eager and sdpa make it causal (is_causal) themselves
        else:
            mask = create_causal_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=None if right_padded else attention_mask,
                position_ids=position_ids, **{CACHE_NAME: cache},
            )
        hidden, all_hidden, attentions = self.language_model(inputs_embeds, position_ids, mask, cache, output_hidden_states,
                                                             output_attentions, attention)
        return NanoVLMModelOutput(
            last_hidden_state=hidden,
            **{CACHE_NAME: cache if use_cache else None},
            hidden_states=all_hidden,
            attentions=attentions,
            image_hidden_states=image_hidden_states,
        )


class NanoVLMForConditionalGeneration(NanoVLMPreTrainedModel, GenerationMixin):
    """NanoVLM with a tied LM head: captions an image, or continues a prompt about it."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: NanoVLMConfig):
        super().__init__(config)
        self.model = NanoVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate`, with the caption's length capped at what the decoder's position
        table holds after the prompt (image tokens included) (a warning, not an error mid-generation that
        would lose the whole batch's text), as transformers does for `max_length`."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        prompt = 0 if input_ids is None else input_ids.shape[-1]  # the image tokens and the text
        room = self.config.max_position_embeddings - prompt
        config = generation_config or self.generation_config
        asked = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if asked is None:
            asked = kwargs.get("max_length", getattr(config, "max_length", None) or 20) - prompt
        if room <= 0:
            raise ValueError(
                f"the prompt ({prompt} tokens, image tokens included) fills the decoder's "
                f"{self.config.max_position_embeddings} positions: shorten the prompt"
            )
        if asked > room:
            logger.warning(
                "max_new_tokens=%d would run past the decoder's %d positions (%d prompt tokens, image tokens included): "
                "generating at most %d new tokens", asked, self.config.max_position_embeddings, prompt, room,
            )
            kwargs.pop("max_length", None)
            kwargs["max_new_tokens"] = room
        try:
            return super().generate(inputs, generation_config, **kwargs)
        except Exception as error:  # torch's inductor fails to build flex's CPU decoding kernel (torch 2.13)
            if self.config._attn_implementation == "flex_attention" and "Inductor" in type(error).__name__:
                raise RuntimeError(
                    f"flex attention's compiled kernel failed to build on {self.device.type} ({type(error).__name__}); "
                    "generate with model.set_attn_implementation('sdpa'), which gives the same outputs"
                ) from error
            raise

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """generate() would turn the 2D mask into a 4D one for a static cache; `forward` builds that itself
        (`create_causal_mask`) and needs the 2D mask for the positions of a left-padded batch."""
        return attention_mask

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        image_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> NanoVLMCausalLMOutput:
        """`labels` align with `input_ids` (-100 = ignored); the loss is transformers' causal-LM loss (with
        `logits_to_keep`, over the last `logits_to_keep` positions: training skips the LM head on the image tokens).
        `return_dict=False` gives the output's fields that are set, as a tuple.

        `image_index` (optional, for training): the row of `pixel_values` each sequence shows, so that a photo's
        captions can share one pass of the vision tower (`NanoVLMModel.forward`); without it, sequence i shows image i.

        `position_ids` may be passed as a keyword; by default they come from the attention mask and the cache
        (what `generate()` would compute). It is left out of the signature so that `generate()` does not build,
        grow and slice them at every step (~1.5 ms of a 41 ms caption at batch 1)."""
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        position_ids = kwargs.pop("position_ids", None)
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, cache=cache,
            inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, image_index=image_index,
        )
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # (B, T, vocab)
        loss = None
        if labels is not None:  # with logits_to_keep, over the kept positions: labels[:, -logits_to_keep:]
            loss = self.loss_function(logits, labels[:, -logits_to_keep:] if logits_to_keep else labels, self.config.vocab_size, **kwargs)
        return NanoVLMCausalLMOutput(
            loss=loss, logits=logits, **{CACHE_NAME: outputs.get(CACHE_NAME)}, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )


__all__ = ["NanoVLMPreTrainedModel", "NanoVLMModel", "NanoVLMForConditionalGeneration"]
