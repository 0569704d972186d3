"""Training-time image augmentation that keeps captions true.

A random resized crop (most of the photo stays in view), a horizontal flip that swaps "left" and
"right" in the caption (and its references), and brightness / contrast / saturation jitter with no
hue shift: captions name colours, so a red shirt must stay red. Pure PIL, applied per example in
the collator; evaluation never augments, so train and evaluation preprocessing are otherwise the
same processor call. In DataLoader workers each worker draws from its own generator (seeded by
torch's per-worker seed), not from a copy of the main process's.
"""

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import get_worker_info

_SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """"the dog on the Left" -> "the dog on the Right" (case kept); other words untouched."""

    def swap(match):
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.capitalize() if word[0].isupper() else other

    return _SIDES.sub(swap, text)


@dataclass
class CaptionAugment:
    """`(image, texts) -> (image, texts)` with a random crop, flip and colour jitter.

    `scale`: the crop's share of the photo's area; `ratio`: its aspect-ratio range;
    `flip`: probability of a mirror image (left/right swapped in every text);
    `brightness`, `contrast`, `saturation`: jitter strength (a factor drawn in [1 - s, 1 + s]).
    """

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    seed: int | None = None

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self._worker_seed = None

    def _generator(self) -> random.Random:
        """The main process's generator, or in a DataLoader worker one of its own: a forked copy of
        the main one would give every worker the same crops, flips and jitter."""
        worker = get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            self._worker_seed, self.rng = worker.seed, random.Random(worker.seed)
        return self.rng

    def crop(self, image: Image.Image) -> Image.Image:
        width, height, rng = *image.size, self._generator()
        for _ in range(10):  # torchvision's RandomResizedCrop: try a few draws, else keep the whole photo
            area = width * height * rng.uniform(*self.scale)
            aspect = rng.uniform(*self.ratio)
            w, h = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return image.crop((left, top, left + w, top + h))
        return image

    def __call__(self, image: Image.Image, texts: list[str]) -> tuple[Image.Image, list[str]]:
        image, rng = self.crop(image.convert("RGB")), self._generator()
        if rng.random() < self.flip:
            image = ImageOps.mirror(image)
            texts = [swap_left_right(t) for t in texts]
        jitters = [(ImageEnhance.Brightness, self.brightness), (ImageEnhance.Contrast, self.contrast),
                   (ImageEnhance.Color, self.saturation)]
        rng.shuffle(jitters)
        for enhancer, strength in jitters:
            if strength:
                image = enhancer(image).enhance(rng.uniform(1 - strength, 1 + strength))
        return image, texts

    def transform_batch(self, batch: dict) -> dict:
        """For `datasets.Dataset.with_transform` on the training split only: augments each row's image
        and flips its `text` and `references` (when present) with it."""
        batch = dict(batch)
        has_refs = "references" in batch
        images, texts, references = [], [], []
        for i, image in enumerate(batch["image"]):
            refs = list(batch["references"][i]) if has_refs else []
            image, (text, *refs) = self(image, [batch["text"][i], *refs])
            images.append(image)
            texts.append(text)
            references.append(refs)
        batch["image"], batch["text"] = images, texts
        if has_refs:
            batch["references"] = references
        return batch
