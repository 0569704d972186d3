"""Does the model read the image? Two diagnostics for captioners that may have collapsed.

- `image_gap`: the caption loss (nats per token) with each image against the same captions with
  the images shuffled across the set. A decoder that ignores the picture scores the same on both
  (gap near 0); one that reads it finds another photo's caption far less likely.
- `unique_caption_share`: the share of images whose generated caption no other image got. A model
  that writes one sentence for every photo scores near 0.
"""

from collections import Counter

import torch
import torch.nn.functional as F


@torch.no_grad()
def caption_loss(model, processor, images, texts, batch_size: int = 32) -> float:
    """Mean negative log-likelihood per caption token (end token included) of `texts` given `images`;
    texts longer than the decoder's positions after the image tokens are cut, as in training."""
    from processing.collator import NanoVLMCollator  # the training collator: identical preprocessing

    collator = NanoVLMCollator(processor, model.config.max_position_embeddings - model.config.num_image_tokens)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        batch = collator([{"image": i, "text": t} for i, t in zip(images[start:start + batch_size], texts[start:start + batch_size])])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits.float()
        # logits[:, t] predicts token t + 1; labels are -100 on pads
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def image_gap(model, processor, images, texts, batch_size: int = 32) -> dict:
    """Loss with each image's own caption, with the images rolled by half the set (every caption
    gets another image), and the gap between them in nats per token."""
    if len(images) < 2:
        raise ValueError(f"image_gap needs at least 2 images to shuffle, got {len(images)}")
    shift = len(images) // 2
    shuffled = list(images[shift:]) + list(images[:shift])
    own = caption_loss(model, processor, images, texts, batch_size)
    other = caption_loss(model, processor, shuffled, texts, batch_size)
    return {"loss_own_image": own, "loss_shuffled_image": other, "image_gap": other - own}


def unique_caption_share(captions: list[str]) -> float:
    """Share of captions that no other item got (compared after lower-casing and stripping)."""
    if not captions:
        raise ValueError("no captions to compare")
    counts = Counter(c.strip().lower() for c in captions)
    return sum(counts[c.strip().lower()] == 1 for c in captions) / len(captions)
