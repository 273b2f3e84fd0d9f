"""Image preprocessing as BLIP's evaluation transform does it.

The original code resizes to a square ``image_size`` with bicubic
interpolation, scales to [0, 1] and normalises with the OpenAI CLIP mean and
std (``transform_test`` in BLIP's ``data/__init__.py``). transformers'
``BlipImageProcessorPil`` does exactly that on PIL images, so capfilt uses it
with the model's own image size.

Images far larger than the model's input are first shrunk by an integer factor while decoding
(``decode_for_model``: JPEG's DCT scaling through ``Image.draft``, ``Image.reduce`` for other formats),
never below ``REDUCING_GAP`` times the model's size: PIL's own two-step resize (``reducing_gap``), which its
documentation calls indistinguishable from fair resampling at 3. A 6000x6000 photo then costs a 1/4 or 1/8
scale decode instead of 108 MB of pixels held for a batch; images up to 3x the model's size (what
img2dataset writes at its default 384 px) decode exactly as before.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil


class ImagePreprocessor:
    """PIL images (any mode, any size) -> a float tensor ``[B, 3, S, S]``."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self._processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})

    def one(self, image: Image.Image) -> torch.Tensor:
        """One image -> ``[3, S, S]``, the same values as a row of ``self([image])``."""
        return self([image])[0]

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


REDUCING_GAP = 3.0  # PIL's reducing_gap: shrink by whole factors down to 3x the target size, no further


@dataclass(frozen=True)
class DecodedImage:
    """What the models and the output need of an image: its size as stored, and its model inputs."""

    width: int  # of the image as stored (before any reduction)
    height: int
    pixels: dict[int, torch.Tensor]  # model input size S -> [3, S, S]


def decode_for_model(data: bytes, preprocessors: Sequence[ImagePreprocessor]) -> DecodedImage:
    """Decode ``data`` straight to each preprocessor's input; the full-size image is never kept.

    A clear ``ValueError`` when the bytes are not an image.
    """
    sizes = {p.image_size: p for p in preprocessors}
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            floor = int(REDUCING_GAP * max(sizes))
            if image.format == "JPEG":
                image.draft("RGB", (floor, floor))  # DCT scaling: keeps each side >= floor
            image.load()
            rgb = image if image.mode == "RGB" else image.convert("RGB")  # as decode_image, before any resampling
            factor = min(rgb.size) // floor
            if factor > 1:
                rgb = rgb.reduce(factor)  # box average over factor x factor blocks
    except Exception as error:
        raise ValueError(f"cannot decode image: {type(error).__name__}: {error}") from None
    return DecodedImage(width, height, {size: p.one(rgb) for size, p in sizes.items()})
