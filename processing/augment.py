"""Training-time image augmentation that keeps captions true.

A random resized crop (most of the photo stays in view), a horizontal flip that swaps "left" and
"right" in the caption (and its references), and brightness / contrast / saturation jitter with no
hue shift: captions name colours, so a red shirt must stay red. Pure PIL, applied per example in
the collator; evaluation never augments, so train and evaluation preprocessing are otherwise the
same processor call.
"""

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps

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

    def crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        for _ in range(10):  # torchvision's RandomResizedCrop: try a few draws, else keep the whole photo
            area = width * height * self.rng.uniform(*self.scale)
            aspect = self.rng.uniform(*self.ratio)
            w, h = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
            if 0 < w <= width and 0 < h <= height:
                left, top = self.rng.randint(0, width - w), self.rng.randint(0, height - h)
                return image.crop((left, top, left + w, top + h))
        return image

    def __call__(self, image: Image.Image, texts: list[str]) -> tuple[Image.Image, list[str]]:
        image = self.crop(image.convert("RGB"))
        if self.rng.random() < self.flip:
            image = ImageOps.mirror(image)
            texts = [swap_left_right(t) for t in texts]
        jitters = [(ImageEnhance.Brightness, self.brightness), (ImageEnhance.Contrast, self.contrast),
                   (ImageEnhance.Color, self.saturation)]
        self.rng.shuffle(jitters)
        for enhancer, strength in jitters:
            if strength:
                image = enhancer(image).enhance(self.rng.uniform(1 - strength, 1 + strength))
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
