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
TEST_WORDS = "a picture of the small large red green blue circle square triangle left right above below dog cat on".split()


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
