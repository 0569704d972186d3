"""NanoVLMProcessor: every PIL mode, EXIF, odd sizes, bad files, padding, decoding, chat template."""

import numpy as np
import pytest
import torch
from PIL import Image


def normalized(value_0_255):
    return (value_0_255 / 255 - 0.5) / 0.5  # ViT mean/std 0.5


@pytest.mark.parametrize(
    "make, rgb",
    [
        (lambda: Image.new("1", (20, 10), 1), (255, 255, 255)),
        (lambda: Image.new("L", (20, 10), 0), (0, 0, 0)),
        (lambda: Image.new("LA", (20, 10), (0, 255)), (0, 0, 0)),
        (lambda: Image.new("LA", (20, 10), (0, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGB", (20, 10), (255, 0, 0)), (255, 0, 0)),
        (lambda: Image.new("RGBA", (20, 10), (0, 0, 255, 255)), (0, 0, 255)),
        (lambda: Image.new("RGBA", (20, 10), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.new("CMYK", (20, 10), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.new("RGB", (20, 10), (0, 255, 0)).convert("P"), (0, 255, 0)),
        (lambda: Image.new("I;16", (20, 10), 65535), (255, 255, 255)),
        (lambda: Image.new("I;16", (20, 10), 0), (0, 0, 0)),
    ],
    ids=["1", "L", "LA", "LA-clear", "RGB", "RGBA", "RGBA-clear", "CMYK", "P", "I;16-white", "I;16-black"],
)
def test_every_pil_mode_gives_the_right_colour(processor, make, rgb):
    pixel_values = processor(images=make())["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32) and pixel_values.dtype == torch.float32
    expected = torch.tensor([normalized(c) for c in rgb]).view(1, 3, 1, 1).expand_as(pixel_values)
    torch.testing.assert_close(pixel_values, expected, atol=1e-3, rtol=0)


def test_mid_gray_sixteen_bit_is_not_clipped(processor):
    pixel_values = processor(images=Image.new("I;16", (8, 8), 128 * 257))["pixel_values"]
    torch.testing.assert_close(pixel_values, torch.full_like(pixel_values, normalized(128)), atol=1e-3, rtol=0)


def test_exif_rotation_is_applied(processor, tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half becomes the top
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    red = processor(images=str(path))["pixel_values"][0, 0]  # (32, 32) red channel
    assert red[:12].mean() > 0.8 and red[-12:].mean() < -0.8


@pytest.mark.parametrize("size", [(1, 1), (8000, 100), (100, 8000)])
def test_extreme_sizes(processor, size):
    image = Image.new("RGB", size, (255, 128, 0))
    pixel_values = processor(images=image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixel_values[0, :, 5, 5], torch.tensor([1.0, normalized(128), -1.0]), atol=1e-2, rtol=0)


def test_non_image_file_names_the_file(processor, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture")
    with pytest.raises(ValueError, match="notes.jpg"):
        processor(images=str(path))


def test_truncated_image_names_the_file(processor, tmp_path):
    path = tmp_path / "broken.png"
    Image.new("RGB", (64, 64), "red").save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match="broken.png"):
        processor(images=[str(path)])


def test_missing_file_and_wrong_type(processor, tmp_path):
    with pytest.raises(ValueError, match="nowhere.png"):
        processor(images=str(tmp_path / "nowhere.png"))
    with pytest.raises(ValueError, match="image 0"):
        processor(images=[12345])


def test_numpy_free_path_accepts_paths_and_pil_together(processor, tmp_path, images):
    path = tmp_path / "a.png"
    images[0].save(path)
    out = processor(images=[str(path), images[0]])
    torch.testing.assert_close(out["pixel_values"][0], out["pixel_values"][1])


def test_text_is_left_padded_with_bos(processor, tokenizer):
    out = processor(text=["I see a big red ball.", "I see"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # left padding
    assert ids[1, mask[1].argmax()] == tokenizer.bos_token_id
    assert ids[0, 0] == tokenizer.bos_token_id and (ids[mask == 0] == tokenizer.pad_token_id).all()


def test_image_only_input_gets_image_tokens_then_bos(processor, tokenizer, images):
    out = processor(images=images[:3])
    image = tokenizer.convert_tokens_to_ids("<image>")
    assert processor.image_token_id == image and processor.num_image_tokens == 4
    assert out["input_ids"].tolist() == [[image] * 4 + [tokenizer.bos_token_id]] * 3
    assert out["attention_mask"].tolist() == [[1] * 5] * 3


def test_image_tokens_come_before_the_prompt_and_padding_before_them(processor, tokenizer, images):
    out = processor(images=images[:2], text=["I see a red ball", "A"])
    image, bos, pad = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.bos_token_id, tokenizer.pad_token_id
    long, short = out["input_ids"].tolist()
    assert long[:5] == [image] * 4 + [bos] and long[5:] == tokenizer("I see a red ball")["input_ids"][1:]
    pads = len(long) - 6
    assert short == [pad] * pads + [image] * 4 + [bos] + tokenizer("A")["input_ids"][1:]  # left padding
    assert out["attention_mask"][1].tolist() == [0] * pads + [1] * 6
    assert processor.batch_decode(out["input_ids"]) == ["I see a red ball", "A"]  # <image> is a special token


def test_batch_decode_drops_special_tokens(processor, tokenizer):
    ids = processor(text=["I see a red ball.", "A"])["input_ids"]
    ids = torch.cat([ids, torch.full((2, 1), tokenizer.eos_token_id)], dim=1)
    assert processor.batch_decode(ids) == ["I see a red ball.", "A"]


def test_byte_level_round_trip(processor):
    text = "Un café, 3 chiens et un 🐱!"
    assert processor.decode(processor(text=[text])["input_ids"][0]) == text


def test_chat_template_renders_text_and_images(processor, images):
    chat = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "I see"}]}]
    assert processor.apply_chat_template(chat, tokenize=False) == "I see"
    out = processor.apply_chat_template(chat, tokenize=True, return_dict=True)
    direct = processor(images=images[0], text=["I see"])
    assert torch.equal(out["input_ids"], direct["input_ids"])
    torch.testing.assert_close(out["pixel_values"], direct["pixel_values"])


def test_processor_needs_something(processor):
    with pytest.raises(ValueError, match="images, text or both"):
        processor()


def test_image_and_text_counts_must_match(processor, images):
    with pytest.raises(ValueError, match="one text per image"):
        processor(images=images[:2], text=["a", "b", "c"])


def test_processor_round_trip(processor, tmp_path, images):
    from modeling_nanovlm import NanoVLMProcessor

    processor.save_pretrained(tmp_path)
    loaded = NanoVLMProcessor.from_pretrained(tmp_path)
    a, b = processor(images=images[:2], text=["I see", "A"]), loaded(images=images[:2], text=["I see", "A"])
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "pixel_values"))
    assert loaded.tokenizer.padding_side == "left"
    assert np.array_equal(loaded.image_processor.image_mean, processor.image_processor.image_mean)


def test_jpeg_files_decode_at_reduced_scale_with_the_same_pixels(processor, tmp_path):
    """A JPEG file is decoded at the smallest 1/2^k scale that keeps both sides >= the processor's
    size (libjpeg's DCT scaling), which gives what a full decode and resize gives, near enough."""
    from modeling_nanovlm.processing_nanovlm import to_rgb

    y, x = np.mgrid[0:300, 0:400]
    array = np.stack([x * 255 // 399, y * 255 // 299, (x + y) * 255 // 698], axis=-1).astype(np.uint8)
    image = Image.fromarray(array)
    image.paste((250, 20, 20), (100, 80, 220, 200))  # a red square on the gradient
    path = tmp_path / "photo.jpg"
    image.save(path, quality=95)

    small = to_rgb(str(path), min_size=32)
    assert small.size == (50, 38) and to_rgb(str(path)).size == (400, 300)  # 1/8 scale; full without min_size
    from_file = processor(images=str(path))["pixel_values"]
    with Image.open(path) as opened:
        full = processor(images=opened.convert("RGB"))["pixel_values"]  # decoded at full scale
    difference = (from_file - full).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.5, (difference.mean(), difference.max())  # edges differ most
