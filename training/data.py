"""The run's data: its train and validation splits, and the processor (tokenizer and image processor) for them."""

import os

import transformers
from transformers import ViTImageProcessorPil

from modeling_nanovlm import NanoVLMProcessor
from processing import data, scenes
from processing.tokenizer import train_tokenizer

from .arguments import DataArguments, ModelArguments
from .model import model_config


def load_splits(args: DataArguments, image_size: int, seed: int, bad: data.BadImages):
    """(train, validation) datasets with image and text columns (scenes also carry `scene`)."""
    if args.dataset == "scenes":
        version = args.scenes_version
        train = scenes.scenes_dataset(args.num_train_examples, scenes.TRAIN_SEED, args.scenes_style, image_size, version=version)
        validation = scenes.scenes_dataset(args.num_validation_examples, scenes.VALIDATION_SEED, args.scenes_style, image_size,
                                           version=version)
        return train, validation
    if args.dataset == "coco":
        if not args.caption_file or not args.image_dir:
            raise ValueError("--dataset coco needs --caption_file X.json and --image_dir DIR")
        skipped = bad if args.skip_bad_images else None  # paths outside --image_dir: a counted skip, else a stop
        train = data.load_coco_captions(args.caption_file, args.image_dir, args.caption_policy, seed, skipped)
        if args.validation_caption_file:
            validation = data.load_coco_captions(args.validation_caption_file, args.image_dir, "first", seed, skipped)
        else:
            train, validation = hold_out(train, args.validation_fraction, seed)
    elif args.dataset == "hf":
        if not args.data_path:
            raise ValueError("--dataset hf needs --data_path (Hub name, save_to_disk folder, parquet files or imagefolder)")
        splits = data.load_hf(args.data_path, args.image_column, args.text_column)
        train = splits["train"]
        validation = splits.get("validation")
        if validation is None:
            train, validation = hold_out(train, args.validation_fraction, seed)
    else:
        raise ValueError(f"--dataset must be scenes, coco or hf, got {args.dataset!r}")
    validation = validation.select(range(min(len(validation), args.num_validation_examples)))
    train, validation = data.drop_empty_texts(train, "train"), data.drop_empty_texts(validation, "validation")
    train = data.check_images(train, "train", args.skip_bad_images, bad)
    validation = data.check_images(validation, "validation", args.skip_bad_images, bad)
    for name, split in (("train", train), ("validation", validation)):
        if len(split) == 0:
            raise ValueError(f"no {name} example is left after skipping unreadable images and empty texts; "
                             "see the warnings above and fix the data")
    return train, validation


def hold_out(dataset, fraction, seed):
    """(train, validation): `fraction` of the rows held out, at least one."""
    split = dataset.train_test_split(test_size=max(1, int(len(dataset) * fraction)), seed=seed)
    return split["train"], split["test"]


def build_processor(model_args: ModelArguments, texts, image_size: int, output_dir: str, resume_from: str | None = None) -> NanoVLMProcessor:
    """Load the tokenizer (--tokenizer, the starting model's, or, when resuming, the one the run saved in
    output_dir or in the checkpoint `resume_from`, e.g. one downloaded from the Hub) or train one on `texts`."""
    source = model_args.tokenizer or model_args.model_name_or_path
    if source is None and resume_from is not None:
        saved = [d for d in (output_dir, resume_from) if os.path.exists(os.path.join(d, "tokenizer.json"))]
        if not saved:
            raise ValueError(f"--resume_from_checkpoint: neither {output_dir} nor {resume_from} has the tokenizer.json "
                             "of the run to resume")
        source = saved[0]  # the tokenizer its checkpoints were trained with
    if source is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    else:
        tokenizer = train_tokenizer(texts, vocab_size=model_args.vocab_size)
    image_processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    return NanoVLMProcessor(image_processor, tokenizer, num_image_tokens=model_config(model_args).num_image_tokens)
