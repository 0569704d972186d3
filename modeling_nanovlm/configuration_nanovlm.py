"""NanoVLM configuration: one class, three presets from the paper (arXiv 2502.07838, Table 1).

The text side uses transformers' standard names (`hidden_size`, `num_hidden_layers`, ...) so that
`DynamicCache(config=...)`, `generate()` and tooling find them; the vision side carries a `vision_`
prefix. This file is shipped to the Hub as remote code: it imports only transformers and stdlib.
"""

from transformers import PreTrainedConfig

# The paper's Table 1. Decoder heads x head size = text dim. The paper leaves the tokenizer, the
# MLP ratio (we use 4), the vision heads (we use 8) and the conv stem open. With the default
# vocabulary of 25,000 BPE tokens (tied input/output embedding) the totals land near the paper's;
# `python -m benchmarks.sizes` prints the table and tests/test_modeling.py checks it.
PRESETS = {
    # 5.04M: vision 2.12M, projector 0.04M, decoder 2.88M (2.40M of it the embedding)
    "mini": dict(
        vision_hidden_size=400, vision_num_hidden_layers=1, vision_num_attention_heads=8,
        hidden_size=96, num_hidden_layers=4, num_attention_heads=8,
    ),
    # 14.59M: vision 9.69M, projector 0.07M, decoder 4.83M (3.20M of it the embedding)
    "base": dict(
        vision_hidden_size=512, vision_num_hidden_layers=3, vision_num_attention_heads=8,
        hidden_size=128, num_hidden_layers=8, num_attention_heads=8,
    ),
    # 25.41M: vision 16.00M, projector 0.10M, decoder 9.31M (4.80M of it the embedding)
    "large": dict(
        vision_hidden_size=512, vision_num_hidden_layers=5, vision_num_attention_heads=8,
        hidden_size=192, num_hidden_layers=10, num_attention_heads=16,
    ),
}

# Ours, on top of the paper's: its presets made to see (docs/experiments.md, "What makes it see"). 112x112 pixels
# (4x fewer patches), the decoder reads every patch token (49 + [CLS]) instead of [CLS] alone, no
# dropout. train.py trains mini-112 by default, with a per-token auxiliary loss on the built-in scenes.
SEEING_PRESETS = {
    f"{name}-112": dict(PRESETS[name], image_size=112, vision_feature_select="all", hidden_dropout=0.0)
    for name in ("mini", "base", "large")
}
# The same totals with ~30% of the parameters in the vision tower instead of 78-85% (the widths moved, the
# depths kept; shares with a ~500-token scene tokenizer: 30.5% of 2.64M and of 11.3M). Per parameter and per
# training sample they learn more: lower validation loss at both budgets, higher object recall at ~11M, more
# image use on photos (`python -m experiments.allocation`, docs/experiments/allocation.md "Where should the parameters
# go?"). Per second they cost more: a training step takes ~1.35x as long, and in equal training time both
# name fewer objects than mini-112 / base-112, which stay the defaults. For when parameters, not time, are the budget.
SEEING_PRESETS |= {
    "mini-112-dec": dict(SEEING_PRESETS["mini-112"], vision_hidden_size=240, hidden_size=184),
    "base-112-dec": dict(SEEING_PRESETS["base-112"], vision_hidden_size=304, hidden_size=280),
}

# A residual convolutional image tower in place of the ViT, at about the same totals (`vision_tower_type="conv"`,
# docs/architecture.md "The convolutional tower"): mini-112's 112x112 images and decoder, four stages from 28x28
# to 4x4, the decoder reading the 4x4 grid of visual tokens and their mean.
SEEING_PRESETS |= {
    # 5.00M: vision 2.10M, projector 0.02M, decoder 2.88M (2.40M of it the embedding); mini-112: 4.98M
    "mini-112-conv": dict(
        SEEING_PRESETS["mini-112"], vision_tower_type="conv", vision_conv_channels=[32, 64, 128, 240],
        vision_conv_blocks=[1, 1, 2, 1], vision_conv_grid=4,
    ),
}

VISION_FEATURE_SELECTS = ("cls", "pooled", "all")
VISION_TOWER_TYPES = ("vit", "conv")
VISION_STEMS = ("patch", "conv")

AUTO_MAP = {  # AutoModel gives the model people use (the captioner), as remote-code VLMs on the Hub do
    "AutoConfig": "configuration_nanovlm.NanoVLMConfig",
    "AutoModel": "modeling_nanovlm.NanoVLMForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_nanovlm.NanoVLMForConditionalGeneration",
}
CUSTOM_PIPELINES = {
    "image-to-text": {
        "impl": "processing_nanovlm.NanoVLMImageToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    }
}


class NanoVLMConfig(PreTrainedConfig):
    r"""
    Configuration of a NanoVLM: an image encoder (a ViT-style one with a conv stem, or a residual
    convolutional network), a Linear+GELU projector and a small causal decoder. The processor writes `num_image_tokens` `<image>` tokens
    (`image_token_id`) before the text; the model puts the projected image features in their place,
    as LLaVA does.

    Build one from a preset with `NanoVLMConfig.from_preset("base", vocab_size=...)`.

    vision_tower_type:
        `"vit"` (the paper's: a conv stem, then transformer blocks over 16x16 patches and a [CLS] token; the
        `vision_hidden_size`, `vision_num_*`, `patch_size` and `vision_stem*` fields) or `"conv"`: a residual
        convolutional network (the `vision_conv_*` fields) whose last feature map is average-pooled to a
        `vision_conv_grid` x `vision_conv_grid` grid of visual tokens, after one token that is the mean of the
        whole map: the same layout as the ViT's [CLS] and patch tokens, so `vision_feature_select` reads it
        the same way (`"cls"`: the mean, `"pooled"`: the grid pooled to `vision_pool_size`, `"all"`: both).
    vision_conv_channels, vision_conv_blocks:
        The conv tower's stages: widths and residual blocks (two 3x3 convs each) per stage, as lists of the same
        length. A stem of two 3x3 stride-2 convs takes the image to 1/4 of its side at the first stage's width;
        each later stage starts with a 3x3 stride-2 conv that halves the side (112 -> 28 -> 14 -> 7 -> 4 for four
        stages). Normalisation is GroupNorm (`vision_conv_groups` groups): per image, so batch 1, any batch
        and DDP give the same features, and there are no running statistics.
    vision_conv_groups:
        GroupNorm's groups; every width in `vision_conv_channels` must be a multiple of it.
    vision_conv_grid:
        Side of the conv tower's grid of visual tokens (at most the last feature map's side).
    vision_feature_select:
        Which encoder outputs the decoder sees: `"cls"` (the paper: one token from [CLS]),
        `"pooled"` (a `vision_pool_size` x `vision_pool_size` average-pooled grid of patch tokens) or
        `"all"` ([CLS] and every patch token).
    vision_stem_channels:
        Width of the conv stem's last conv. The stem is conv(3 -> c/4, k=4, s=4) -> GELU ->
        conv(c/4 -> c, k=p/4, s=p/4) -> LayerNorm -> ReLU -> Linear(c -> vision_hidden_size):
        a 16x16 patch becomes a token through two small non-overlapping convolutions instead of
        one big linear map, which gives the encoder a local, translation-equivariant first step.
    vision_stem:
        `"patch"` (the stem above) or `"conv"`: log2(patch_size) overlapping 3x3 stride-2 convs with
        BatchNorm and GELU, widths doubling up to `vision_stem_channels` (c/8, c/4, c/2, c for 16x16
        patches), then the same LayerNorm -> ReLU -> Linear; a small CNN in front of the encoder.
    max_position_embeddings:
        Size of the decoder's learned position table; it covers the image tokens and the text.
    hidden_dropout, attention_dropout:
        The paper's dropout 0.1 is applied to embeddings and both residual branches
        (`hidden_dropout`). Dropout on attention probabilities (`attention_dropout`, default 0)
        forces PyTorch's unfused attention kernel on CPU and cost 1.5x in training speed here
        (mini, batch 32: 27 vs 40 samples/s).
    """

    model_type = "nanovlm"

    def __init__(
        self,
        # text decoder (standard names)
        vocab_size=25000,
        hidden_size=128,
        num_hidden_layers=8,
        num_attention_heads=8,
        intermediate_size=None,
        max_position_embeddings=320,
        hidden_act="gelu",
        hidden_dropout=0.1,
        attention_dropout=0.0,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        image_token_id=3,
        # vision encoder
        image_size=224,
        patch_size=16,
        num_channels=3,
        vision_hidden_size=512,
        vision_num_hidden_layers=3,
        vision_num_attention_heads=8,
        vision_intermediate_size=None,
        vision_stem_channels=128,
        vision_stem="patch",
        vision_feature_select="cls",
        vision_pool_size=7,
        vision_tower_type="vit",
        vision_conv_channels=(32, 64, 128, 256),
        vision_conv_blocks=(1, 1, 2, 1),
        vision_conv_groups=8,
        vision_conv_grid=4,
        preset=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.image_token_id = image_token_id
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.vision_hidden_size = vision_hidden_size
        self.vision_num_hidden_layers = vision_num_hidden_layers
        self.vision_num_attention_heads = vision_num_attention_heads
        self.vision_intermediate_size = vision_intermediate_size or 4 * vision_hidden_size
        self.vision_stem_channels = vision_stem_channels
        self.vision_stem = vision_stem
        self.vision_feature_select = vision_feature_select
        self.vision_pool_size = vision_pool_size
        self.vision_tower_type = vision_tower_type
        # lists, as config.json gives them back
        self.vision_conv_channels = list(vision_conv_channels) if isinstance(vision_conv_channels, (list, tuple)) else vision_conv_channels
        self.vision_conv_blocks = list(vision_conv_blocks) if isinstance(vision_conv_blocks, (list, tuple)) else vision_conv_blocks
        self.vision_conv_groups = vision_conv_groups
        self.vision_conv_grid = vision_conv_grid
        self.preset = preset
        # What `trust_remote_code=True` loads from a saved folder or Hub repo: the Auto classes and
        # the "image-to-text" pipeline (transformers 5.2x otherwise redirects that task to
        # "image-text-to-text", which requires a text prompt).
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        kwargs.setdefault("custom_pipelines", dict(CUSTOM_PIPELINES))
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self._validate()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "NanoVLMConfig":
        """A config for one of the paper's presets (`mini`, `base`, `large`) or ours (`mini-112`,
        `base-112`, `large-112`, the decoder-heavy `mini-112-dec`, `base-112-dec`, and `mini-112-conv` with the
        convolutional image tower), with field overrides."""
        presets = {**PRESETS, **SEEING_PRESETS}
        if name not in presets:
            raise ValueError(f"preset must be one of {sorted(presets)}, got {name!r}")
        return cls(**{**presets[name], "preset": name, **overrides})

    @property
    def vision_grid(self) -> int:
        """Side of the vision tower's square map of tokens (after its [CLS] or mean token): the patch grid of the
        ViT, `vision_conv_grid` for the conv tower."""
        return self.vision_conv_grid if self.vision_tower_type == "conv" else self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens in the vision tower's map (the ViT's patches; the conv tower's grid cells)."""
        return self.vision_grid**2

    @property
    def vision_feature_size(self) -> int:
        """Width of the vision tower's output tokens, the projector's input: `vision_hidden_size` for the ViT,
        the last stage's channels for the conv tower."""
        return self.vision_conv_channels[-1] if self.vision_tower_type == "conv" else self.vision_hidden_size

    def conv_feature_map_size(self, image_size: int | None = None) -> int:
        """Side of the conv tower's last feature map for a square image (`image_size` by default): the stem's two
        stride-2 convs, then one per stage after the first, each giving ceil(side / 2)."""
        side = image_size or self.image_size
        for _ in range(1 + len(self.vision_conv_channels)):
            side = (side + 1) // 2
        return side

    @property
    def num_image_tokens(self) -> int:
        """How many `<image>` tokens (visual tokens) the decoder reads per image."""
        return {"cls": 1, "pooled": self.vision_pool_size**2, "all": self.num_patches + 1}[self.vision_feature_select]

    def _validate(self):
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "image_size", "patch_size", "num_channels", "vision_hidden_size",
            "vision_num_hidden_layers", "vision_num_attention_heads", "vision_intermediate_size",
            "vision_stem_channels", "vision_pool_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for dim, heads in (("hidden_size", "num_attention_heads"), ("vision_hidden_size", "vision_num_attention_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"{dim} ({getattr(self, dim)}) must be divisible by {heads} ({getattr(self, heads)})")
        if self.vision_stem not in VISION_STEMS:
            raise ValueError(f"vision_stem must be one of {VISION_STEMS}, got {self.vision_stem!r}")
        if self.vision_stem == "patch" and self.patch_size % 4:
            raise ValueError(f"patch_size must be a multiple of 4 (the conv stem's first stride), got {self.patch_size}")
        if self.vision_stem == "conv":
            depth = self.patch_size.bit_length() - 1
            if self.patch_size != 2**depth or depth < 2:
                raise ValueError(f"vision_stem='conv' halves the image per conv: patch_size must be a power of 2, >= 4, got {self.patch_size}")
            if self.vision_stem_channels % 2 ** (depth - 1):
                raise ValueError(f"vision_stem='conv' halves the widths from vision_stem_channels down {depth - 1} times: "
                                 f"vision_stem_channels ({self.vision_stem_channels}) must be a multiple of {2 ** (depth - 1)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.vision_stem_channels % 4:
            raise ValueError(f"vision_stem_channels must be a multiple of 4, got {self.vision_stem_channels}")
        if self.vision_feature_select not in VISION_FEATURE_SELECTS:
            raise ValueError(
                f"vision_feature_select must be one of {VISION_FEATURE_SELECTS}, got {self.vision_feature_select!r}"
            )
        if self.vision_tower_type not in VISION_TOWER_TYPES:
            raise ValueError(f"vision_tower_type must be one of {VISION_TOWER_TYPES}, got {self.vision_tower_type!r}")
        self._validate_conv_tower()
        grid = self.vision_grid
        # (the conv tower's default grid is smaller than the default pool size: checked there only when it pools)
        if self.vision_pool_size > grid and (self.vision_tower_type == "vit" or self.vision_feature_select == "pooled"):
            what = "vision_conv_grid" if self.vision_tower_type == "conv" else "patch grid"
            raise ValueError(f"vision_pool_size ({self.vision_pool_size}) must be at most the {what} ({grid})")
        if not isinstance(self.image_token_id, int) or not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id must be a token id below vocab_size ({self.vocab_size}), got {self.image_token_id!r}")
        if self.num_image_tokens >= self.max_position_embeddings:
            raise ValueError(
                f"max_position_embeddings ({self.max_position_embeddings}) must exceed the "
                f"{self.num_image_tokens} image tokens of vision_feature_select={self.vision_feature_select!r}"
            )

    def _validate_conv_tower(self):
        """The `vision_conv_*` fields (checked whichever tower is chosen, so a saved config stays loadable as either)."""
        for name in ("vision_conv_channels", "vision_conv_blocks"):
            value = getattr(self, name)
            low = 1 if name == "vision_conv_channels" else 0
            if (not isinstance(value, list) or not value
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)):
                kind = "positive" if low else "non-negative"
                raise ValueError(f"{name} must be a non-empty list of {kind} integers (one per stage), got {value!r}")
        if len(self.vision_conv_channels) != len(self.vision_conv_blocks):
            raise ValueError(f"vision_conv_blocks ({self.vision_conv_blocks}) must give one block count per stage of "
                             f"vision_conv_channels ({self.vision_conv_channels})")
        for name in ("vision_conv_groups", "vision_conv_grid"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        uneven = [c for c in self.vision_conv_channels if c % self.vision_conv_groups]
        if uneven:
            raise ValueError(f"vision_conv_channels ({self.vision_conv_channels}) must be multiples of vision_conv_groups "
                             f"({self.vision_conv_groups}), GroupNorm's groups: {uneven} are not")
        side = self.conv_feature_map_size()
        if self.vision_tower_type == "conv" and self.vision_conv_grid > side:
            raise ValueError(
                f"vision_conv_grid ({self.vision_conv_grid}) must be at most the conv tower's last feature map side ({side} "
                f"for {self.image_size}x{self.image_size} images and {len(self.vision_conv_channels)} stages): lower it, "
                "or use fewer stages"
            )
