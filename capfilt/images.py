"""Image preprocessing as BLIP's evaluation transform does it.

The original code resizes to a square ``image_size`` with bicubic
interpolation, scales to [0, 1] and normalises with the OpenAI CLIP mean and
std (``transform_test`` in BLIP's ``data/__init__.py``). transformers'
``BlipImageProcessorPil`` does exactly that on PIL images, so capfilt uses it
with the model's own image size.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil


class ImagePreprocessor:
    """PIL images (any mode, any size) -> a float tensor ``[B, 3, S, S]``."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self._processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return self._processor(images=list(images), return_tensors="pt")["pixel_values"]


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image; a clear ``ValueError`` when they are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception as error:
        raise ValueError(f"cannot decode image: {type(error).__name__}: {error}") from None
