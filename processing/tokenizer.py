"""Train NanoVLM's byte-level BPE tokenizer with the `tokenizers` library.

Special tokens have fixed ids that match `NanoVLMConfig`'s defaults: <pad>=0, <bos>=1, <eos>=2,
<image>=3 (the processor writes one per visual token before the text; the model puts the image
features in their place). The post-processor prepends <bos>, so tokenizing "" gives [<bos>].
Byte-level means every string round-trips: no unknown tokens, ever.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<image>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 25000, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A BPE tokenizer of at most `vocab_size` tokens learned from `texts`.

    On a small corpus (the built-in scenes use ~100 words) BPE runs out of merges long before
    `vocab_size`: the result is smaller, and `len(tokenizer)` is the size the model should use.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
