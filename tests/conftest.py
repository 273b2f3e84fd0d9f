"""Shared fixtures: tiny random-weight BLIP models built with transformers' own classes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.configs import preset_config
from capfilt.vocab import compact_tokenizer

# Words of the test vocabulary: BLIP's prompt and a few caption words.
TEST_WORDS = ("a picture of the small large red green blue circle square triangle left right above below dog cat on"
              .split())


def pytest_configure(config):
    # `make test` leaves these out to stay fast; `make test-slow` runs them, and CI runs both (.ci/run).
    config.addinivalue_line("markers", "slow: whole recipes, clusters and multi-process runs (make test-slow)")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning threads cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return compact_tokenizer(TEST_WORDS, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    return preset_config("tiny", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def hf_captioner(tiny_config):
    torch.manual_seed(0)
    return BlipForConditionalGeneration(tiny_config).eval()


@pytest.fixture(scope="session")
def hf_retrieval(tiny_config):
    torch.manual_seed(1)
    return BlipForImageTextRetrieval(tiny_config).eval()


@pytest.fixture
def pixel_values(tiny_config):
    size = tiny_config.vision_config.image_size
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))


def _model_folder(folder, model, tokenizer):
    """An HF-format model folder: weights, config and tokenizer."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def captioner_folder(tmp_path_factory, hf_captioner, tokenizer):
    return _model_folder(tmp_path_factory.mktemp("captioner"), hf_captioner, tokenizer)


@pytest.fixture(scope="session")
def filter_folder(tmp_path_factory, hf_retrieval, tokenizer):
    return _model_folder(tmp_path_factory.mktemp("filter"), hf_retrieval, tokenizer)


@pytest.fixture
def images():
    """Three small PIL images of different colours and sizes."""
    from PIL import Image

    return [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 160, 60)),
            Image.new("L", (50, 64), 128)]
