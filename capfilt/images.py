"""Image preprocessing as BLIP's evaluation transform does it.

The original code converts to RGB with PIL, resizes to a square
``image_size`` with bicubic interpolation, scales to [0, 1] and normalises
with the OpenAI CLIP mean and std (``transform_test`` in BLIP's
``data/__init__.py``). ``ImagePreprocessor`` does the same in PIL and numpy.
transformers' ``BlipImageProcessorPil`` computes the same values (within 1e-6,
``tests/test_images.py``) but takes 8.5-10.9 ms for a 512x384 image where
this takes 3.5-3.8 ms (2 cores, 2026-12-04): at the hundreds of images a second a
GPU takes, preprocessing must not be what the GPU waits for. (For images
with transparency transformers composites onto white; BLIP's loader, and
capfilt, drop the alpha channel.)

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

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

CLIP_MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)  # BLIP's normalisation (transform_test)
CLIP_STD = np.array(OPENAI_CLIP_STD, dtype=np.float32)


class ImagePreprocessor:
    """PIL images (any mode, any size) -> a float tensor ``[B, 3, S, S]``."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def one(self, image: Image.Image) -> torch.Tensor:
        """One image -> ``[3, S, S]``: RGB, bicubic to S x S, [0, 1], CLIP mean and std."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = np.asarray(rgb.resize((self.image_size, self.image_size), Image.BICUBIC), dtype=np.float32)
        pixels = (pixels * np.float32(1 / 255) - CLIP_MEAN) / CLIP_STD
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self.one(image) for image in images])


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
