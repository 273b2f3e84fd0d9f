"""``ImagePreprocessor`` against transformers' BLIP processor; ``decode_for_model`` against the full decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from capfilt.images import ImagePreprocessor, decode_for_model, decode_image

GREY_LEVEL = 1 / 255 / 0.26862954  # one step of 8-bit colour after BLIP's normalisation (smallest std)


def encoded(size: tuple[int, int], fmt: str, mode: str = "RGB", seed: int = 0) -> bytes:
    """A smooth colour field with a little noise, like a photo, as ``fmt`` bytes."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (size[1], size[0], 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).convert(mode).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("size,mode", [((512, 384), "RGB"), ((40, 30), "RGB"), ((384, 384), "RGB"), ((90, 70), "L")])
def test_preprocessing_is_transformers_blip_processor(size, mode):
    image = Image.open(io.BytesIO(encoded(size, "PNG", mode)))
    for side in (384, 32):
        reference = BlipImageProcessorPil(size={"height": side, "width": side})
        expected = reference(images=[image], return_tensors="pt")["pixel_values"]
        ours = ImagePreprocessor(side)([image])
        assert ours.shape == expected.shape == (1, 3, side, side) and ours.dtype == torch.float32
        assert torch.allclose(ours, expected, atol=1e-6, rtol=0)


def full_decode(data: bytes, preprocessor: ImagePreprocessor) -> torch.Tensor:
    return preprocessor([decode_image(data)])[0]


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "P"), ("PNG", "RGBA")])
def test_images_up_to_three_times_the_model_size_decode_exactly_as_before(fmt, mode):
    data = encoded((90, 70), fmt, mode)  # 70 px < 3 x 32
    small, large = ImagePreprocessor(32), ImagePreprocessor(24)
    decoded = decode_for_model(data, [small, large])
    assert (decoded.width, decoded.height) == (90, 70)
    assert set(decoded.pixels) == {32, 24}
    assert torch.equal(decoded.pixels[32], full_decode(data, small))
    assert torch.equal(decoded.pixels[24], full_decode(data, large))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_are_shrunk_while_decoding_within_a_grey_level_or_two(fmt):
    data = encoded((1600, 1200), fmt)  # JPEG: DCT scaling to 1/4; PNG: reduce(4); both >= 3 x 96 px
    preprocessor = ImagePreprocessor(96)
    decoded = decode_for_model(data, [preprocessor])
    assert (decoded.width, decoded.height) == (1600, 1200)  # the stored size, not the decoded one
    difference = (decoded.pixels[96] - full_decode(data, preprocessor)).abs()
    assert difference.mean() < 0.5 * GREY_LEVEL
    assert difference.max() < 3 * GREY_LEVEL
    assert difference.max() > 0  # it did take the shorter way


def test_bytes_that_are_not_an_image_are_a_clear_error():
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_for_model(b"<html>not an image</html>", [ImagePreprocessor(32)])
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_for_model(encoded((200, 200), "JPEG")[:300], [ImagePreprocessor(32)])  # truncated
