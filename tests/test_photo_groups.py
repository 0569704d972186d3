"""One image pass for several captions of a photo (`train.py --captions_per_image K`): the same loss and gradients
as a photo pass per caption, one augmented view for a photo's captions, whole photos in every batch, refusals of
what it cannot do, and a run that learns with it."""

import json

import datasets
import pytest
import torch
from conftest import CAPTIONS, toy_image
from PIL import Image

import train
from processing.augment import CaptionAugment
from processing.collator import NanoVLMCollator
from processing.photo_groups import PhotoGroupSampler, PhotoGroupTransform, group_by_photo
from training.arguments import NanoVLMTrainingArguments
from training.objectives import ObjectiveTargets, WordsObjective
from training.trainer import NanoVLMTrainer
from test_bad_inputs import TINY, coco_args, write_coco

CONV = dict(vision_tower_type="conv", vision_conv_channels=[8, 16, 16], vision_conv_blocks=[1, 1, 1], vision_conv_groups=4,
            vision_conv_grid=2)


def photo_rows(tmp_path, captions_per_photo=(3, 2, 3)) -> datasets.Dataset:
    """Caption rows as `load_coco_captions(..., "all")` gives them: one per caption, a photo's captions in a row."""
    rows = {"image": [], "text": [], "image_id": [], "references": []}
    texts = iter(CAPTIONS * 2)
    for photo, count in enumerate(captions_per_photo):
        path = tmp_path / f"{photo}.png"
        toy_image(photo).save(path)
        refs = [next(texts) for _ in range(count)]
        for text in refs:
            rows["image"].append(str(path))
            rows["text"].append(text)
            rows["image_id"].append(photo)
            rows["references"].append(refs)
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


@pytest.mark.parametrize("tower", [{}, CONV], ids=["vit", "conv"])
def test_grouped_batch_gives_the_per_caption_loss_and_gradients(tmp_path, tester, processor, tower):
    """Without augmentation, a batch whose photos pass the tower once for their captions (`image_index`) trains
    exactly as the same captions each with their own copy of the photo: caption and words losses, every gradient."""
    rows = photo_rows(tmp_path)
    grouped_rows, sampler = group_by_photo(rows, 2, seed=0, augment=False)
    order = list(sampler)  # 3 photos x 2 captions, photo by photo
    model = tester.get_model(hidden_dropout=0.0, attention_dropout=0.0, **tower).train()
    words = WordsObjective(1.0, rows["text"], min_count=1)
    words.attach(model)
    results = []
    for dataset, share in ((rows, False), (grouped_rows, True)):  # fetched as the Trainer's DataLoader fetches them
        collator = ObjectiveTargets(NanoVLMCollator(processor, share_images=share), [words])
        (batch,) = torch.utils.data.DataLoader(dataset, batch_size=6, sampler=order, collate_fn=collator)
        targets = {"aux_words": batch.pop("aux_words")}
        model.zero_grad()
        outputs = model(**batch)
        loss = outputs.loss + words.loss(model, outputs.image_hidden_states, targets)
        loss.backward()
        results.append((batch, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (single, single_loss, single_grads), (grouped, grouped_loss, grouped_grads) = results
    assert single["pixel_values"].shape[0] == 6 and "image_index" not in single
    assert grouped["pixel_values"].shape[0] == 3 and grouped["image_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(single["input_ids"], grouped["input_ids"])
    torch.testing.assert_close(grouped_loss, single_loss)
    assert single_grads.keys() == grouped_grads.keys() and any("vision_tower" in n for n in grouped_grads)
    for name, grad in single_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_model_refuses_an_image_index_that_does_not_fit(tester, processor, images):
    inputs = processor(images=images[:3], text=CAPTIONS[:3], padding=True, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"][:2]  # three captions, two photos
    model = tester.get_model()
    with pytest.raises(ValueError, match=r"image_index must be in \[0, 2\).*\[0, 2\]"):
        model(**inputs, image_index=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"image_index must be an integer tensor of shape \(3,\)"):
        model(**inputs, image_index=torch.tensor([0, 1]))
    out = model(**inputs, image_index=torch.tensor([1, 1, 0]))
    assert out.image_hidden_states.shape[0] == 3
    torch.testing.assert_close(out.image_hidden_states[0], out.image_hidden_states[1])


def test_a_photos_captions_see_one_view_and_flip_together():
    left = Image.new("RGB", (40, 20))
    left.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left
    raw = datasets.Image().encode_example(left)
    batch = {"image": [raw] * 5, "image_id": [7, 7, 7, 8, 8],
             "text": ["dog on the left", "a dog", "Left side", "cat on the right", "a cat"],
             "references": [["dog on the left", "a dog", "Left side"]] * 3 + [["cat on the right", "a cat"]] * 2}
    out = PhotoGroupTransform(CaptionAugment(scale=(1.0, 1.0), ratio=(2.0, 2.0), flip=1.0, brightness=0, contrast=0,
                                             saturation=0))(batch)
    assert out["text"] == ["dog on the right", "a dog", "Right side", "cat on the left", "a cat"]
    assert out["references"][:3] == [["dog on the right", "a dog", "Right side"]] * 3
    assert out["references"][3:] == [["cat on the left", "a cat"]] * 2
    assert out["image"][0] is out["image"][1] is out["image"][2] and out["image"][3] is out["image"][4]
    assert out["image"][0] is not out["image"][3] and out["image"][0].getpixel((39, 10)) == (255, 0, 0)
    # a coin-flip augmentation: each photo's captions are all flipped or none, over many draws
    augment, seen = PhotoGroupTransform(CaptionAugment(flip=0.5, seed=0)), set()
    for _ in range(20):
        texts = augment(batch)["text"]
        seen.add((texts[0], texts[2], texts[3]))
    assert {(t0, t2) for t0, t2, _ in seen} == {("dog on the left", "Left side"), ("dog on the right", "Right side")}
    assert len(seen) == 4  # the two photos flip apart


def test_every_batch_holds_whole_photos_each_epoch_anew():
    image_ids = [i // 5 for i in range(5 * 6)] + [6, 6]  # six photos of 5 captions, one of 2
    sampler = PhotoGroupSampler(image_ids, 4, seed=0)
    assert len(sampler) == 28
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        groups = [order[i:i + 4] for i in range(0, len(order), 4)]
        photos = [{image_ids[row] for row in group} for group in groups]
        assert all(len(p) == 1 for p in photos) and sorted(p.pop() for p in photos) == list(range(7))
        assert all(len(set(group)) == 4 for group in groups if image_ids[group[0]] != 6)  # 4 of its 5, no repeat
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first  # a resumed epoch draws the same
    assert list(sampler) != first  # a plain DataLoader's next epoch draws anew


def test_trainer_batches_hold_whole_photos(tmp_path, tester, processor):
    rows, sampler = group_by_photo(photo_rows(tmp_path, (3, 3, 3, 3)), 3, seed=0, augment=True)
    trainer = NanoVLMTrainer(model=tester.get_model(), data_collator=NanoVLMCollator(processor, share_images=True), train_dataset=rows,
                             train_sampler=sampler, args=NanoVLMTrainingArguments(
                                 output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, use_cpu=True,
                                 remove_unused_columns=False, report_to="none"))
    batches = list(trainer.get_train_dataloader())
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 2]
    assert all(b["image_index"].tolist() == [0, 0, 0, 1, 1, 1] for b in batches)


@pytest.mark.parametrize("flags, pattern", [
    (["--per_device_train_batch_size", "8", "--captions_per_image", "3"],
     r"--per_device_train_batch_size 8 is not a multiple of --captions_per_image 3.*6 or 9"),
    (["--caption_policy", "first", "--captions_per_image", "2"], r"--captions_per_image 2 .*--caption_policy all"),
    (["--captions_per_image", "0"], r"--captions_per_image must be at least 1"),
], ids=["batch", "policy", "zero"])
def test_what_grouping_cannot_do_is_refused_naming_the_flag(tmp_path, flags, pattern):
    caption_file, image_dir = write_coco(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        train.main([*TINY, *coco_args(caption_file, image_dir), "--output_dir", str(tmp_path / "out"), *flags])
    with pytest.raises(ValueError, match=r"--captions_per_image 2 .*needs --dataset coco"):
        train.main([*TINY, "--output_dir", str(tmp_path / "out"), "--captions_per_image", "2"])  # scenes
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_run_with_one_image_pass_per_photo_learns(tmp_path):
    captions = [[f"a {c} square {k}" for k in ("here", "now", "again")] for c in ("red", "blue", "green", "yellow", "pink", "white")]
    caption_file, image_dir = write_coco(tmp_path, n=6, captions=captions)
    out = tmp_path / "run"
    train.main([*TINY, *coco_args(caption_file, image_dir, "--caption_policy", "all", "--validation_caption_file", caption_file),
                "--output_dir", str(out), "--captions_per_image", "3", "--per_device_train_batch_size", "6", "--augment", "true",
                "--aux_words_weight", "1.0", "--aux_words_min_count", "1", "--max_steps", "40", "--learning_rate", "3e-3",
                "--warmup_steps", "0", "--logging_steps", "5"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_examples_seen"] == 40 * 6  # the batch size counts captions, not photos
    assert metrics["last_logged_caption_loss"] < 0.7 * metrics["first_logged_caption_loss"], metrics
    assert metrics["last_logged_aux_words"] < metrics["first_logged_aux_words"], metrics
