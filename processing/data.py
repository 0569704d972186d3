"""Training data sources: built-in scenes, MS-COCO-layout captions, and Hugging Face datasets.

Every loader returns `datasets.Dataset`s with an `image` column (datasets `Image` feature) and a
`text` column. `check_images` decodes every image once before training starts, so a missing or
broken file, or one that is not a regular file (a FIFO would block its reader for ever), stops the
run at once with its name, or, when asked, is skipped and counted.
"""

import glob
import io
import json
import logging
import os
import random
import stat
from dataclasses import dataclass, field

import datasets
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CAPTION_POLICIES = ("all", "first", "random")


@dataclass
class BadImages:
    """Rows whose image could not be read: (split, row, name, reason)."""

    rows: list[tuple[str, int, str, str]] = field(default_factory=list)

    def summary(self) -> dict:
        return {"count": len(self.rows), "examples": [dict(zip(("split", "row", "image", "reason"), r)) for r in self.rows[:20]]}


def load_coco_captions(
    caption_file: str, image_dir: str, caption_policy: str = "all", seed: int = 0, bad: "BadImages | None" = None
) -> datasets.Dataset:
    """An MS-COCO captions JSON (`images`: id, file_name; `annotations`: image_id, caption).

    `caption_policy`: "all" gives one example per caption, "first" one per image with its first
    caption, "random" one per image with a caption drawn with `seed`. Columns: image, text,
    image_id, references (all captions of the image, for evaluation).
    Every `file_name` must resolve inside `image_dir`: one that does not (an absolute path, `../`)
    stops the load naming it, or with `bad` given is skipped and recorded there. Empty or null
    captions are skipped and counted in a warning, and so are annotations of an image id that
    `images` does not list and images without a caption (their first ids named). Two `images`
    entries with one id are refused: the captions could not tell which picture they describe.
    """
    if caption_policy not in CAPTION_POLICIES:
        raise ValueError(f"caption_policy must be one of {CAPTION_POLICIES}, got {caption_policy!r}")
    for path, what in ((caption_file, "caption file"), (image_dir, "image directory")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} {path} does not exist")
    with open(caption_file, "rb") as f:
        try:
            coco = json.loads(f.read())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{caption_file} is not JSON ({err}); pass an MS-COCO captions JSON (images + annotations)") from None
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise ValueError(f"{caption_file} is not in the MS-COCO captions layout (needs 'images' and 'annotations')")
    captions: dict[int, list[str]] = {}
    empty = 0
    for n, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{caption_file}: annotation {n} ({str(ann)[:80]}) needs 'image_id' and 'caption'")
        if not isinstance(ann["caption"], str) or not ann["caption"].strip():
            empty += 1
            continue
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    if empty:
        logger.warning("%s: skipped %d empty or null caption(s)", caption_file, empty)
    first_of: dict = {}  # image id -> its first entry
    for n, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ValueError(f"{caption_file}: image {n} ({str(image)[:80]}) needs 'id' and a 'file_name' string")
        if (earlier := first_of.setdefault(image["id"], image)) is not image:
            raise ValueError(f"{caption_file}: image id {image['id']!r} is listed twice, as {earlier['file_name']!r} and "
                             f"{image['file_name']!r}; its captions cannot tell which picture they describe. Give each "
                             "image its own id")
    _warn_dropped(caption_file, "annotation(s) whose image id 'images' does not list", sorted(set(captions) - set(first_of), key=str),
                  sum(len(refs) for key, refs in captions.items() if key not in first_of))
    _warn_dropped(caption_file, "image(s) without a caption", [i for i in first_of if i not in captions])
    root = os.path.realpath(image_dir)
    rng = random.Random(seed)
    rows = {"image": [], "text": [], "image_id": [], "references": []}
    for image in sorted(coco["images"], key=lambda im: (isinstance(im["id"], str), im["id"])):
        refs = captions.get(image["id"], [])
        if not refs:
            continue
        path = os.path.join(image_dir, image["file_name"])
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            reason = f"file_name {image['file_name']!r} resolves outside the image folder {image_dir}"
            if bad is None:
                raise ValueError(f"{caption_file}: image {image['id']}: {reason}; file names must be relative paths inside it")
            bad.rows.append(("captions", image["id"], image["file_name"], reason))
            continue
        chosen = {"all": refs, "first": refs[:1], "random": [rng.choice(refs)]}[caption_policy]
        for text in chosen:
            rows["image"].append(path)
            rows["text"].append(text)
            rows["image_id"].append(image["id"])
            rows["references"].append(refs)
    if not rows["image"]:
        raise ValueError(f"{caption_file}: no image with a caption (and a file inside {image_dir}); nothing to load "
                         f"({len(first_of)} image(s), {len(captions)} image id(s) with captions: see the warnings above)")
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


def _warn_dropped(caption_file: str, what: str, ids: list, count: int | None = None) -> None:
    """Log the ids dropped from a caption file for `what`, the first few of them and how many."""
    if ids:
        shown = ", ".join(repr(i) for i in ids[:5]) + (f", ... ({len(ids)} ids)" if len(ids) > 5 else "")
        logger.warning("%s: dropped %d %s: image id(s) %s", caption_file, len(ids) if count is None else count, what, shown)


def load_hf(data_path: str, image_column: str = "image", text_column: str = "text", split: str | None = None):
    """A `DatasetDict` from a Hub name, a `save_to_disk` folder, parquet file(s) or an imagefolder.

    The image and text columns are renamed to `image` and `text`.
    """
    if os.path.isdir(data_path) and (
        os.path.exists(os.path.join(data_path, "dataset_dict.json")) or os.path.exists(os.path.join(data_path, "state.json"))
    ):
        loaded = datasets.load_from_disk(data_path)
    elif data_path.endswith(".parquet") or (os.path.isdir(data_path) and glob.glob(os.path.join(data_path, "**/*.parquet"), recursive=True)):
        files = data_path if data_path.endswith(".parquet") else sorted(glob.glob(os.path.join(data_path, "**/*.parquet"), recursive=True))
        loaded = datasets.load_dataset("parquet", data_files=files)
    elif os.path.isdir(data_path):
        loaded = datasets.load_dataset("imagefolder", data_dir=data_path)
    else:
        loaded = datasets.load_dataset(data_path)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if split is not None:
        loaded = datasets.DatasetDict({"train": loaded[split]})
    renamed = {}
    for name, ds in loaded.items():
        for column in (image_column, text_column):
            if column not in ds.column_names:
                raise ValueError(
                    f"{data_path} (split {name}) has no column {column!r}; its columns are {ds.column_names}. "
                    "Name the right ones with --image_column / --text_column"
                )
        ds = ds.rename_columns({c: n for c, n in ((image_column, "image"), (text_column, "text")) if c != n})
        if not isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image())
        renamed[name] = ds
    return datasets.DatasetDict(renamed)


def drop_empty_texts(dataset: datasets.Dataset, split: str) -> datasets.Dataset:
    """Drop (and count in a warning) rows whose text is missing, not a string or blank: a model must
    not learn to say nothing."""
    empty = [i for i, text in enumerate(dataset["text"]) if not isinstance(text, str) or not text.strip()]
    if not empty:
        return dataset
    logger.warning("skipping %d row(s) of the %s data with an empty or missing text (e.g. row %d)", len(empty), split, empty[0])
    drop = set(empty)
    return dataset.select([i for i in range(len(dataset)) if i not in drop])


def decode_error(value) -> str | None:
    """None if the image decodes, else the reason it does not. Only a regular file is opened: a FIFO
    (named pipe) would block the open for ever, a device never end."""
    try:
        if value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        else:
            if not stat.S_ISREG(os.stat(value["path"]).st_mode):
                return "not a regular file (a folder, FIFO or device); name an image file"
            image = Image.open(value["path"])
        image.draft("RGB", (64, 64))  # JPEGs decode at reduced scale: a full check, 4-8x faster
        image.load()
        return None
    except FileNotFoundError:
        return "file not found"
    except Exception as err:  # PIL raises many types for broken data
        return f"{type(err).__name__}: {err}"


def check_images(dataset: datasets.Dataset, split: str, skip_bad_images: bool, bad: BadImages) -> datasets.Dataset:
    """Decode every image once (a file that several rows share, e.g. one row per caption, once for all of them);
    raise naming the broken ones, or drop and record every row that has one."""
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    found, by_path = [], {}  # by_path: file -> None or why it does not decode
    for row, value in enumerate(tqdm(raw["image"], desc=f"checking {split} images", mininterval=2)):
        if value is None:
            found.append((split, row, "<none>", "empty image cell"))
            continue
        if value.get("bytes") is not None:
            reason = decode_error(value)
        elif value["path"] in by_path:
            reason = by_path[value["path"]]
        else:
            reason = by_path[value["path"]] = decode_error(value)
        if reason is not None:
            found.append((split, row, value.get("path") or f"row {row}", reason))
    if not found:
        return dataset
    if not skip_bad_images:
        listed = "; ".join(f"{name} ({reason})" for _, _, name, reason in found[:5])
        raise ValueError(
            f"{len(found)} image(s) in the {split} data could not be read: {listed}"
            f"{' ...' if len(found) > 5 else ''}. Fix or remove them, or pass --skip_bad_images to skip such rows"
        )
    bad.rows.extend(found)
    logger.warning("skipping %d unreadable image(s) in the %s data, e.g. %s", len(found), split, found[0][2])
    drop = {row for _, row, _, _ in found}
    return dataset.select([i for i in range(len(dataset)) if i not in drop])
