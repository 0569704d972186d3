"""Batches (image, text) examples into model inputs with labels for training."""

from dataclasses import dataclass

import torch

from modeling_nanovlm import NanoVLMProcessor


@dataclass
class NanoVLMCollator:
    """`[{"image": PIL, "text": str}, ...]` -> pixel_values, input_ids, attention_mask, labels.

    A sample becomes `<image>... <bos> text <eos>` (the processor's image tokens), right-padded (the
    model then runs plain causal attention, with no mask); labels are the input ids with -100 on the
    image tokens, `<bos>` and pads, so the loss covers the caption and its end. Texts longer than
    `max_length` tokens (with `<bos>` and `<eos>`) are cut, keeping `<eos>`.

    `share_images`: consecutive examples holding the same image object (a photo's captions from
    `processing.photo_groups.PhotoGroupTransform`, decoded and augmented once for them) share one row of
    `pixel_values`, and `image_index` says which row each caption reads: the vision tower runs once per photo.

    `language_only`: the texts alone, `<bos> text <eos>` with no image tokens and no `pixel_values` (the image
    tower does not run), at the positions they hold behind the image tokens (`position_ids` from
    `num_image_tokens` on), so a decoder trained on them goes on with images where it left off.
    """

    processor: NanoVLMProcessor
    max_length: int | None = None
    image_column: str = "image"
    text_column: str = "text"
    share_images: bool = False
    language_only: bool = False

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        tokenizer, prefix = self.processor.tokenizer, self.processor.num_image_tokens
        ids = self.processor.image_prompt_ids([ex[self.text_column] for ex in examples])
        if self.max_length is not None:
            ids = [row[: prefix + self.max_length - 1] for row in ids]
        ids = [row + [tokenizer.eos_token_id] for row in ids]
        batch = tokenizer.pad({"input_ids": ids}, padding_side="right", return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        labels[:, : prefix + 1] = -100  # the image tokens and <bos>: inputs, never targets
        batch["labels"] = labels
        if self.language_only:  # no image tokens; the text keeps the positions it has behind them
            batch = {k: v[:, prefix:] for k, v in batch.items()}
            length = batch["input_ids"].shape[1]
            batch["position_ids"] = torch.arange(prefix, prefix + length).expand(len(examples), length)
            return batch
        images = [ex[self.image_column] for ex in examples]
        if self.share_images:
            new = [i == 0 or image is not images[i - 1] for i, image in enumerate(images)]
            if not all(new):
                batch["image_index"] = torch.tensor(new).long().cumsum(0) - 1  # (B,): each caption's row
                images = [image for image, first in zip(images, new) if first]
        batch["pixel_values"] = self.processor(images=images)["pixel_values"]
        return dict(batch)
