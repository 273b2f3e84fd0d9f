"""``ImagePreprocessor`` against transformers' BLIP processor; ``decode_for_model`` against the full decode."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from capfilt.images import (ImagePreprocessor, decode_for_model, decode_image, exif_transpose_method,
                            recorded_orientation, to_rgb)

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
    assert len(decoded.pixels) == 2
    assert torch.equal(decoded.for_model(small), full_decode(data, small))
    assert torch.equal(decoded.for_model(large), full_decode(data, large))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_are_shrunk_while_decoding_within_a_grey_level_or_two(fmt):
    data = encoded((1600, 1200), fmt)  # JPEG: DCT scaling to 1/4; PNG: reduce(4); both >= 3 x 96 px
    preprocessor = ImagePreprocessor(96)
    decoded = decode_for_model(data, [preprocessor])
    assert (decoded.width, decoded.height) == (1600, 1200)  # the stored size, not the decoded one
    difference = (decoded.for_model(preprocessor) - full_decode(data, preprocessor)).abs()
    assert difference.mean() < 0.5 * GREY_LEVEL
    assert difference.max() < 3 * GREY_LEVEL
    assert difference.max() > 0  # it did take the shorter way


def test_two_preprocessings_of_one_size_each_get_their_own_pixels():
    """BLIP-2's squashed 32 px input and CLIP's centre-cropped 32 px input of a wide image differ: each model gets
    what its own preprocessing makes of the full decode, and equal preprocessors share one input."""
    from capfilt.clip_ranker import CenterCropPreprocessor

    data = encoded((90, 40), "PNG")
    squash, crop = ImagePreprocessor(32), CenterCropPreprocessor(32)
    decoded = decode_for_model(data, [squash, crop, ImagePreprocessor(32)])
    assert len(decoded.pixels) == 2
    assert torch.equal(decoded.for_model(squash), full_decode(data, squash))
    assert torch.equal(decoded.for_model(crop), full_decode(data, crop))
    assert not torch.equal(decoded.for_model(squash), decoded.for_model(crop))


def test_bytes_that_are_not_an_image_are_a_clear_error():
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_for_model(b"<html>not an image</html>", [ImagePreprocessor(32)])
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_for_model(encoded((200, 200), "JPEG")[:300], [ImagePreprocessor(32)])  # truncated


# --- modes, transparency, EXIF orientation, animation ---------------------------------------------------------


def png_bytes(samples: np.ndarray, colour_type: int, bit_depth: int = 16, chunks: dict[bytes, bytes] | None = None
              ) -> bytes:
    """A PNG written by hand from the specification (not by Pillow): ``samples`` is [H, W] or [H, W, C]."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width = samples.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\x00" + samples[y].astype(dtype).tobytes() for y in range(height))  # filter type 0
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    extra = b"".join(chunk(kind, body) for kind, body in (chunks or {}).items())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def rgb_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int32)


def matte(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Colour over white, in exact arithmetic: c * a/255 + 255 * (1 - a/255), rounded."""
    colour, alpha = colour.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.rint(colour * alpha / 255 + 255 - alpha).astype(np.int32)


WIDE = np.array([0, 32768, 65535, 32767, 257, 65280, 1000, 40000], dtype=np.uint16)  # 16-bit samples
WIDE_8 = np.array([0, 128, 255, 128, 1, 255, 4, 156])  # the same, scaled to 8 bits (+-1)


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped():
    data = png_bytes(np.tile(WIDE, (6, 1)), colour_type=0)  # 16-bit greyscale: Pillow opens it as I;16 (or I)
    decoded = rgb_array(decode_image(data))
    assert decoded.shape == (6, 8, 3)
    assert np.abs(decoded - WIDE_8[None, :, None]).max() <= 1  # before: everything above 255 became 255
    pgm = b"P5 8 1 65535\n" + WIDE.astype(">u2").tobytes()  # 16-bit PGM: Pillow opens it as I
    assert np.abs(rgb_array(decode_image(pgm))[0, :, 0] - WIDE_8).max() <= 1


def test_48_and_64_bit_rgb_pngs_are_scaled_to_8_bits():
    colour = np.stack([WIDE, WIDE[::-1], np.full(8, 32768, np.uint16)], axis=-1)[None]
    decoded = rgb_array(decode_image(png_bytes(colour, colour_type=2)))
    expected = np.stack([WIDE_8, WIDE_8[::-1], np.full(8, 128)], axis=-1)[None]
    assert np.abs(decoded - expected).max() <= 1
    alpha = np.array([65535, 0, 32768, 65535, 65535, 0, 65535, 65535], np.uint16)[None, :, None]
    decoded = rgb_array(decode_image(png_bytes(np.concatenate([colour, alpha], axis=-1), colour_type=6)))
    assert np.abs(decoded - matte(expected, alpha[..., 0] // 257)).max() <= 1


def test_16_bit_greyscale_colour_key_is_transparent():
    samples = np.tile(WIDE, (2, 1))
    data = png_bytes(samples, colour_type=0, chunks={b"tRNS": struct.pack(">H", 1000)})  # 1000: transparent
    decoded = rgb_array(decode_image(data))
    expected = np.where(samples == 1000, 255, WIDE_8)[..., None]
    assert np.abs(decoded - expected).max() <= 1


def transparent_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """Images with transparency, as PNG/GIF bytes, each with its pixels matted onto white by hand."""
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    alpha[0, :3] = (0, 255, 128)
    grey = colour[..., 0]
    cases = {}

    def add(name, image, expected, fmt="PNG", **options):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        cases[name] = (buffer.getvalue(), expected)

    add("RGBA", Image.fromarray(np.dstack([colour, alpha])), matte(colour, alpha))
    add("LA", Image.fromarray(np.dstack([grey, alpha])), matte(np.dstack([grey] * 3), alpha))
    palette = np.array([[200, 30, 40], [10, 220, 50], [0, 0, 255], [90, 90, 90]], np.uint8)
    indices = rng.integers(0, 4, (6, 8), dtype=np.uint8)
    indexed = Image.frombytes("P", (8, 6), indices.tobytes())
    indexed.putpalette(palette.ravel().tolist())
    opaque = palette[indices].astype(np.int32)
    add("P, one transparent index", indexed, np.where((indices == 1)[..., None], 255, opaque), transparency=1)
    palette_alpha = np.array([255, 0, 100, 255], np.uint8)
    add("P, alpha per index", indexed, matte(palette[indices], palette_alpha[indices]),
        transparency=palette_alpha.tobytes())
    add("GIF, one transparent index", indexed, np.where((indices == 2)[..., None], 255, opaque), fmt="GIF",
        transparency=2)
    key = tuple(int(v) for v in colour[2, 3])
    add("RGB, colour key", Image.fromarray(colour), np.where((colour == key).all(-1)[..., None], 255, colour),
        transparency=key)
    add("L, grey key", Image.fromarray(grey), np.where((grey == grey[1, 1])[..., None], 255, np.dstack([grey] * 3)),
        transparency=int(grey[1, 1]))
    return cases


TRANSPARENT = transparent_images()


@pytest.mark.parametrize("name", list(TRANSPARENT))
def test_transparency_is_composited_onto_white(name):
    data, expected = TRANSPARENT[name]
    assert np.abs(rgb_array(decode_image(data)) - expected).max() <= 1  # before: alpha dropped
    preprocessor = ImagePreprocessor(16)
    assert torch.equal(decode_for_model(data, [preprocessor]).for_model(preprocessor), full_decode(data, preprocessor))


@pytest.mark.parametrize("name", [name for name in TRANSPARENT if name != "L, grey key"])  # OpenCV ignores that key
def test_transparency_is_what_img2dataset_writes(name):
    resizer = pytest.importorskip("img2dataset.resizer")
    data, _ = TRANSPARENT[name]
    lossless = resizer.Resizer(image_size=384, resize_mode="no", resize_only_if_bigger=True, encode_format="png",
                               encode_quality=1)
    written, *_, error = lossless(io.BytesIO(data))
    assert error is None
    assert np.array_equal(rgb_array(decode_image(data)), rgb_array(decode_image(written)))


@pytest.mark.parametrize("name", ["RGBA", "P, one transparent index", "LA"])
def test_transparency_as_transformers_blip_processor(name):
    data, _ = TRANSPARENT[name]
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        expected = BlipImageProcessorPil(size={"height": 16, "width": 16})(images=[image], return_tensors="pt")
        assert torch.allclose(ImagePreprocessor(16)([image]), expected["pixel_values"], atol=1e-6, rtol=0)


def smooth_rgb(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)


def test_cmyk_jpeg_decodes_to_its_rgb_source():
    source = smooth_rgb((640, 480))
    buffer = io.BytesIO()
    source.convert("CMYK").save(buffer, format="JPEG", quality=95)
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        assert opened.mode == "CMYK" and "adobe" in opened.info  # Adobe's inverted CMYK
    difference = np.abs(rgb_array(decode_image(buffer.getvalue())) - rgb_array(source))
    assert difference.mean() < 1.5 and difference.max() <= 12
    preprocessor = ImagePreprocessor(96)  # 480 px > 3 x 96: DCT scaling on a CMYK JPEG
    reduced = decode_for_model(buffer.getvalue(), [preprocessor]).for_model(preprocessor)
    assert (reduced - preprocessor([source])[0]).abs().mean() < 2 * GREY_LEVEL


@pytest.mark.parametrize("mode,tolerance", [("L", None), ("1", None), ("P", None), ("YCbCr", 3), ("HSV", 5),
                                            ("LAB", 30), ("CMYK", 0), ("RGBX", 0), ("RGBa", 0), ("I", None),
                                            ("I;16", None), ("I;16B", None), ("F", None), ("PA", None)])
def test_every_mode_becomes_rgb(mode, tolerance):
    source = smooth_rgb()
    image = source.convert(mode) if not mode.startswith("I;16") else source.convert("L").convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == source.size
    if tolerance is not None:
        assert np.abs(rgb_array(rgb) - rgb_array(source)).max() <= tolerance
    assert to_rgb(source) is source  # the common case costs nothing


def exif_bytes(image: Image.Image, orientation: int, fmt: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif, quality=95)
    return buffer.getvalue()


# The stored image -> what it shows, from the TIFF/EXIF definition of the tag: where the stored
# 0th row and 0th column lie in the picture as seen.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # row 0 at the top, column 0 on the right
    3: lambda a: a[::-1, ::-1],  # bottom, right
    4: lambda a: a[::-1],  # bottom, left
    5: lambda a: a.transpose(1, 0, 2),  # left, top
    6: lambda a: np.rot90(a, -1),  # right, top: turned a quarter clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # right, bottom
    8: lambda a: np.rot90(a, 1),  # left, bottom: a quarter anticlockwise
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    data = exif_bytes(Image.fromarray(stored), orientation)  # PNG: lossless
    assert np.array_equal(rgb_array(decode_image(data)), UPRIGHT[orientation](stored))
    preprocessor = ImagePreprocessor(16)
    decoded = decode_for_model(data, [preprocessor])
    assert (decoded.width, decoded.height) == (10, 6)  # as stored
    assert torch.equal(decoded.for_model(preprocessor), full_decode(data, preprocessor))


def halves(size: tuple[int, int]) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = (255, 0, 0)
    pixels[:, size[0] // 2:] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("orientation,top,bottom", [(6, (255, 0, 0), (0, 0, 255)), (8, (0, 0, 255), (255, 0, 0))])
@pytest.mark.parametrize("size", [(64, 48), (1600, 1200)])  # the large one is reduced while decoding
def test_exif_rotated_jpeg_is_judged_upright(orientation, top, bottom, size):
    data = exif_bytes(halves(size), orientation, "JPEG")
    preprocessor = ImagePreprocessor(32)
    decoded = decode_for_model(data, [preprocessor])
    assert (decoded.width, decoded.height) == size  # the size as stored
    upright = preprocessor([halves(size).rotate(90 if orientation == 8 else -90, expand=True)])[0]
    assert (decoded.for_model(preprocessor) - upright).abs().mean() < 2 * GREY_LEVEL  # before: judged lying on its side
    image = decode_image(data)
    assert image.size == size[::-1]
    assert np.abs(rgb_array(image)[2, size[1] // 2] - top).max() < 8
    assert np.abs(rgb_array(image)[-3, size[1] // 2] - bottom).max() < 8


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("exif", [b"Exif\x00\x00not a TIFF header", b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"])
def test_damaged_exif_still_decodes_as_stored(exif):
    buffer = io.BytesIO()
    halves((40, 20)).save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (40, 20)
    assert decode_image(exif_bytes(halves((40, 20)), 9)).size == (40, 20)  # 9: not an orientation


@pytest.mark.parametrize("fmt,options", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_images_are_judged_on_their_first_frame(fmt, options):
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        assert getattr(opened, "n_frames", 1) == 3
    assert np.abs(rgb_array(decode_image(buffer.getvalue())) - np.array([255, 0, 0])).max() <= 1
    preprocessor = ImagePreprocessor(16)
    red = preprocessor([frames[0]])[0]
    decoded = decode_for_model(buffer.getvalue(), [preprocessor])
    assert torch.allclose(decoded.for_model(preprocessor), red, atol=2 * GREY_LEVEL)


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_the_orientation_img2dataset_recorded_turns_its_shards_images_upright(orientation):
    """img2dataset drops the tag when it re-encodes; the orientation it read into its ``exif`` column (exifread's
    names, as its downloader writes them) turns the stored pixels upright, as the original bytes decode."""
    exifread = pytest.importorskip("exifread")
    resizer = pytest.importorskip("img2dataset.resizer")
    stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    original = exif_bytes(Image.fromarray(stored), orientation, "JPEG")
    tags = exifread.process_file(io.BytesIO(original), details=False)
    exif_column = json.dumps({k: str(v).strip() for k, v in tags.items() if v is not None})
    lossless = resizer.Resizer(image_size=384, resize_mode="no", resize_only_if_bigger=True, encode_format="png",
                               encode_quality=1)
    written, *_, error = lossless(io.BytesIO(original))
    assert error is None and exif_transpose_method(Image.open(io.BytesIO(written))) is None  # the tag is gone
    assert recorded_orientation(exif_column) == orientation
    preprocessor = ImagePreprocessor(16)
    from_shard = decode_for_model(written, [preprocessor], orientation=recorded_orientation(exif_column))
    assert torch.equal(from_shard.for_model(preprocessor), decode_for_model(original, [preprocessor]).for_model(preprocessor))
    # The tag of the bytes themselves wins over a recorded one (bytes img2dataset kept as downloaded).
    assert torch.equal(decode_for_model(original, [preprocessor], orientation=3).for_model(preprocessor),
                       decode_for_model(original, [preprocessor]).for_model(preprocessor))


@pytest.mark.parametrize("column", [None, "", "not json", "[1, 2]", '{"Image Orientation": "Sideways"}',
                                    '{"EXIF ExifVersion": "0230"}'])
def test_no_recorded_orientation_is_none(column):
    assert recorded_orientation(column) is None
