"""One image pass for several captions of a photo (`train.py --captions_per_image K`).

With one training example per caption (`--caption_policy all`), every caption decodes, augments and encodes its
photo again. Here a batch of B captions holds B/K photos with K of their captions each, next to each other:
`PhotoGroupSampler` orders the caption rows so, `PhotoGroupTransform` decodes and augments each photo once for its
K captions (the same view, a flip swapping left and right in all of them and in their references), and
`NanoVLMCollator(share_images=True)` makes one row of `pixel_values` of it, with `image_index` telling the model
which row each caption reads: the vision tower runs once per photo, as classic captioners do (neuraltalk2's and
xmodaler's `seq_per_img`).
"""

import logging
import random

import datasets
from torch.utils.data import Sampler

from .augment import CaptionAugment

logger = logging.getLogger(__name__)


class PhotoGroupSampler(Sampler):
    """Row indices of a one-row-per-caption dataset, K of one photo at a time: each epoch the photos in a random
    order, each with K of its captions drawn without repeats (a photo with fewer than K captions repeats some).
    One epoch is one pass over the photos; with K = the captions of every photo, one over the captions. A batch of
    a multiple of K consecutive indices then holds whole groups. The order depends only on `seed` and the epoch
    (`set_epoch`, called by accelerate's data loader), so every rank draws the same and a resumed run the same again."""

    def __init__(self, image_ids: list, captions_per_image: int, seed: int = 0):
        rows_of: dict = {}
        for row, image_id in enumerate(image_ids):
            rows_of.setdefault(image_id, []).append(row)
        self.groups = list(rows_of.values())
        self.captions_per_image, self.seed, self.epoch = captions_per_image, seed, 0
        short = sum(len(rows) < captions_per_image for rows in self.groups)
        if short:
            logger.warning("%d of %d photos have fewer than %d captions (--captions_per_image): some of theirs repeat",
                           short, len(self.groups), captions_per_image)

    def __len__(self) -> int:
        return len(self.groups) * self.captions_per_image

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng, k = random.Random(f"{self.seed}-{self.epoch}"), self.captions_per_image
        for group in rng.sample(self.groups, len(self.groups)):
            yield from rng.sample(group, k) if len(group) >= k else group + rng.choices(group, k=k - len(group))
        self.epoch += 1  # a plain DataLoader's next epoch (accelerate's sets it itself)


class PhotoGroupTransform:
    """For `datasets.Dataset.with_transform` on training rows whose `image` column is not decoded
    (`datasets.Image(decode=False)`): each run of consecutive rows of one `image_id` gets one decoded (and, with
    `augment`, augmented) image, the same object for all of them (what `NanoVLMCollator(share_images=True)` merges),
    and a flip swaps left and right in all of their texts and references."""

    def __init__(self, augment: CaptionAugment | None = None):
        self.augment, self.decoder = augment, datasets.Image()

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        ids, n = batch["image_id"], len(batch["image_id"])
        images, texts, references = [None] * n, list(batch["text"]), [list(r) for r in batch["references"]]
        start = 0
        while start < n:
            end = start + 1
            while end < n and ids[end] == ids[start]:
                end += 1
            image = self.decoder.decode_example(batch["image"][start])
            if self.augment is not None:  # one view, its flip in every caption and in the references
                refs = references[start]
                image, flipped = self.augment(image, texts[start:end] + refs)
                texts[start:end], refs = flipped[: end - start], flipped[end - start:]
                references[start:end] = [refs] * (end - start)
            images[start:end] = [image] * (end - start)
            start = end
        batch.update(image=images, text=texts, references=references)
        return batch


def group_by_photo(train: datasets.Dataset, captions_per_image: int, seed: int, augment: bool):
    """(the training rows, decoded and augmented once per photo, and their `PhotoGroupSampler`)."""
    if "image_id" not in train.column_names or "references" not in train.column_names:
        raise ValueError("--captions_per_image groups the captions of a photo: it needs --dataset coco with "
                         "--caption_policy all (rows with image_id and references)")
    sampler = PhotoGroupSampler(train["image_id"], captions_per_image, seed)
    transform = PhotoGroupTransform(CaptionAugment(seed=seed) if augment else None)
    return train.cast_column("image", datasets.Image(decode=False)).with_transform(transform), sampler
