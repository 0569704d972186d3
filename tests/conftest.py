"""Shared fixtures: everything runs offline on the CPU with tiny configs."""

import itertools
import os
import socket
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N` (setup.cfg): N workers share the cores
    # One thread per worker and per process a test starts: more threads than cores slow torch several-fold.
    os.environ["OMP_NUM_THREADS"] = "1"
    # Remote code is copied into the modules cache on load; each worker gets its own so none reads a half-written file.
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"hf-modules-{os.environ['PYTEST_XDIST_WORKER']}-")

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import ViTImageProcessorPil

from modeling_nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMProcessor
from processing.tokenizer import train_tokenizer

CAPTIONS = [
    "I see a big red ball.",
    "I see a small blue box.",
    "There is a green tree on the left.",
    "A yellow star is in the sky.",
    "Two pink flowers are on the grass.",
    "I see a white car at night.",
    "The orange fish is in the water.",
    "A purple house is on the right.",
]
COLORS = ["red", "blue", "green", "yellow", "pink", "white", "orange", "purple"]


def toy_image(index: int, size: int = 32) -> Image.Image:
    """Eight easily told apart pictures: a colored shape on a gray ground, placed by index."""
    image = Image.new("RGB", (size, size), (90, 90, 90))
    draw = ImageDraw.Draw(image)
    x = (index % 4) * size // 4
    draw.rectangle([x, size // 4, x + size // 4, size // 2 + size // 4], fill=COLORS[index % 8])
    return image


_next_port = itertools.count(os.getpid() % 400)


def free_port() -> int:
    """A local TCP port nothing listens on now (for a test's own server or rendezvous).

    Drawn below the kernel's ephemeral range (32768-60999 by default) from a band of 400 ports per pytest-xdist
    worker, not with bind(0): a port the kernel hands out can be handed again, to another process's outgoing or
    listening socket, between this check and the server's own bind, and a rank that then reached a stranger's
    socket instead of its rendezvous waited forever.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    base = 20000 + 400 * (int(worker[2:] or 0) % 30)  # 20000-31999
    for _ in range(400):
        port = base + next(_next_port) % 400
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:  # in use, or in TIME_WAIT from an earlier test
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + 399}")


class NanoVLMModelTester:
    """Builds tiny NanoVLM configs and inputs (transformers' ModelTester pattern)."""

    def __init__(self, tokenizer, image_size=32):
        self.tokenizer = tokenizer
        self.image_size = image_size

    def get_config(self, **overrides) -> NanoVLMConfig:
        values = dict(
            vocab_size=len(self.tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, image_size=self.image_size, patch_size=8, vision_hidden_size=32,
            vision_num_hidden_layers=1, vision_num_attention_heads=4, vision_stem_channels=16,
            vision_feature_select="pooled", vision_pool_size=2,
        )
        values.update(overrides)
        return NanoVLMConfig(**values)

    def get_model(self, **overrides) -> NanoVLMForConditionalGeneration:
        torch.manual_seed(0)
        return NanoVLMForConditionalGeneration(self.get_config(**overrides)).eval()


def pytest_collection_modifyitems(items):
    """The longest tests (marked `slow`) go first, each followed by a short one: xdist's load scheduler with
    `--maxschedchunk 1` (setup.cfg) hands each worker its first two items, so each worker starts on its own slow test
    and the short ones are shared out after, instead of one worker starting a 5-minute test at the end."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    short = [item for item in items if not item.get_closest_marker("slow")]
    items[:] = [test for i, first in enumerate(slow) for test in (first, *short[i:i + 1])] + short[len(slow):]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CAPTIONS * 4, vocab_size=400, min_frequency=1)


@pytest.fixture(scope="session")
def processor(tokenizer):
    return NanoVLMProcessor(ViTImageProcessorPil(size={"height": 32, "width": 32}), tokenizer,
                            num_image_tokens=NanoVLMModelTester(tokenizer).get_config().num_image_tokens)


@pytest.fixture(scope="session")
def tester(tokenizer):
    return NanoVLMModelTester(tokenizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tester, processor):
    """A folder with a tiny saved model and its processor (`from_pretrained` loads it)."""
    path = tmp_path_factory.mktemp("model")
    tester.get_model().save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def images():
    return [toy_image(i) for i in range(8)]
