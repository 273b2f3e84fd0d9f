"""Image decoding, and preprocessing as BLIP's evaluation transform does it.

The original code converts to RGB with PIL, resizes to a square
``image_size`` with bicubic interpolation, scales to [0, 1] and normalises
with the OpenAI CLIP mean and std (``transform_test`` in BLIP's
``data/__init__.py``). ``ImagePreprocessor`` does the same in PIL and numpy.
transformers' ``BlipImageProcessorPil`` computes the same values (within 1e-6,
``tests/test_images.py``) in more time (docs/throughput.md, "What makes the
engine fast"): at the hundreds of images a second a GPU takes, preprocessing
must not be what the GPU waits for.

Every image becomes 8-bit RGB through ``to_rgb``, whatever its mode:

- 16-bit samples are scaled, not clipped: a 16-bit greyscale PNG (``I;16``, or ``I`` in older Pillow) keeps its high
  byte (65535 -> 255, 32768 -> 128), as Pillow already does for 48- and 64-bit RGB(A) PNGs and libpng for
  ``png_set_strip_16``. ``I`` holds 16-bit samples in every format Pillow decodes that way (PNG, PGM), so values
  outside 0-65535 (signed or 32-bit TIFFs) are clipped to that range first. ``F`` has no full scale: its values
  are read on 0-255, as Pillow's and OpenCV's own conversions do.
- Transparency (an alpha channel, a palette's transparent entries, a ``tRNS`` colour key) is composited onto
  white. That is what img2dataset writes for every image with alpha (``resizer.py`` mattes onto white before it
  re-encodes, the same formula to the last bit; OpenCV ignores a greyscale PNG's colour key, capfilt does not),
  so a picture judged straight from its original bytes looks as it will in the downloaded shards; transformers'
  BLIP processor does the same. BLIP's own loader drops the alpha channel, which shows whatever colour the
  transparent pixels happen to hold (often black).
- Palette, 1-bit, CMYK (Adobe's inverted CMYK JPEGs included: Pillow's JPEG reader undoes the inversion),
  YCbCr, LAB and HSV go through Pillow's own conversion to RGB.

The EXIF orientation tag is applied, as a photo viewer or a browser shows the picture. img2dataset decodes with
OpenCV's ``IMREAD_UNCHANGED``, which ignores the tag, and its re-encoding drops it, so the images it writes carry
no tag and this changes nothing for them; it matters for bytes that still carry one. Sizes stay those of the
image as stored (``DecodedImage.width``/``height``, img2dataset's ``original_width``/``original_height``): a
portrait photo stored as 4000x3000 with orientation 6 reports 4000x3000 and is judged as 3000x4000.

Animated GIF, WebP and PNG (APNG) images are judged on their first frame: the frame Pillow (and OpenCV, so
img2dataset) decodes, and what a reader that does not animate shows.

Images far larger than the model's input are first shrunk by an integer factor while decoding
(``decode_for_model``: JPEG's DCT scaling through ``Image.draft``, ``Image.reduce`` for other formats),
never below ``REDUCING_GAP`` times the model's size: PIL's own two-step resize (``reducing_gap``), which its
documentation calls indistinguishable from fair resampling at 3. A 6000x6000 photo then costs a 1/4 or 1/8
scale decode instead of 108 MB of pixels held for a batch; images up to 3x the model's size (what
img2dataset writes at its default 384 px) decode exactly as before. Rotation comes last, on the reduced image.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

CLIP_MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)  # BLIP's normalisation (transform_test)
CLIP_STD = np.array(OPENAI_CLIP_STD, dtype=np.float32)

WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit greyscale samples (see the module docstring)
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
WHITE = (255, 255, 255)

# EXIF orientation (TIFF 6.0, tag 274: where the stored 0th row and column lie) -> what makes the image upright
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# img2dataset's ``exif`` column holds exifread's printable tags (JSON); its orientation names -> the tag's value
EXIFREAD_ORIENTATIONS = {
    "Horizontal (normal)": 1,
    "Mirrored horizontal": 2,
    "Rotated 180": 3,
    "Mirrored vertical": 4,
    "Mirrored horizontal then rotated 90 CCW": 5,
    "Rotated 90 CW": 6,
    "Mirrored horizontal then rotated 90 CW": 7,
    "Rotated 90 CCW": 8,
}


def recorded_orientation(exif_json: str | None) -> int | None:
    """The EXIF orientation img2dataset recorded in its ``exif`` column (JSON of exifread's tags), if any.

    img2dataset reads the tags from the bytes it downloaded, then re-encodes the pixels as they are stored
    and drops the tag: this is the only place the orientation survives. Anything unreadable gives None.
    """
    if not exif_json:
        return None
    try:
        tags = json.loads(exif_json)
    except (TypeError, ValueError):
        return None
    return EXIFREAD_ORIENTATIONS.get(tags.get("Image Orientation")) if isinstance(tags, dict) else None


def has_transparency(image: Image.Image) -> bool:
    """Whether any pixel of ``image`` may be (partly) transparent: alpha band, palette alpha or colour key."""
    if image.mode in ALPHA_MODES or image.info.get("transparency") is not None:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: high bit depths scaled, transparency on white (the module docstring).

    Returns ``image`` itself when it already is RGB without a colour key.
    """
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if image.mode in WIDE_GREY_MODES:
        samples = np.asarray(image)
        if image.mode == "I":
            samples = np.clip(samples, 0, 65535)
        grey = Image.fromarray((samples >> 8).astype(np.uint8))
        key = image.info.get("transparency")
        if isinstance(key, int):  # a tRNS grey level, in the 16-bit samples
            grey.putalpha(Image.fromarray(np.where(samples == key, 0, 255).astype(np.uint8)))
        image = grey
    if not has_transparency(image):
        return image.convert("RGB")
    if image.mode == "La":  # premultiplied: Pillow converts it to LA only
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    matte = Image.new("RGB", rgba.size, WHITE)
    matte.paste(rgba, mask=rgba)  # colour x alpha + white x (1 - alpha), rounded: img2dataset's matting exactly
    return matte


def exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag's value (1-8) of ``image`` as opened; None if it has none (or a broken one).

    An image made by ``convert`` or ``reduce`` has lost its EXIF.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - damaged EXIF: the pixels are still good, judge them as stored
        return None
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else None


def exif_transpose_method(image: Image.Image, recorded: int | None = None) -> Image.Transpose | None:
    """The transpose that turns ``image`` upright by its EXIF orientation; None if it needs none.

    ``recorded``: an orientation recorded beside the bytes (``recorded_orientation``), used when the image
    has no tag of its own.
    """
    own = exif_orientation(image)
    return ORIENTATION_TRANSPOSE.get(own if own is not None else recorded)


def upright_rgb(image: Image.Image, recorded: int | None = None) -> Image.Image:
    """A loaded image as 8-bit RGB, turned upright by its EXIF orientation: what the models judge."""
    method = exif_transpose_method(image, recorded)
    rgb = to_rgb(image)
    return rgb if method is None else rgb.transpose(method)


class ImagePreprocessor:
    """PIL images (any mode, any size) -> a float tensor ``[B, 3, S, S]``.

    A subclass that preprocesses otherwise (CLIP's centre crop: ``capfilt.clip_ranker``) overrides ``one``; its
    ``key`` then differs, so that a job feeds each model its own pixels (``decode_for_model``).
    """

    def __init__(self, image_size: int):
        self.image_size = image_size

    @property
    def key(self) -> tuple:
        """What makes two preprocessors' pixels differ: the class (its ``one``) and the size. Equal keys, equal
        pixels: models that share a key share one decoded input. A subclass with more parameters adds them."""
        return (type(self), self.image_size)

    def one(self, image: Image.Image) -> torch.Tensor:
        """One image -> ``[3, S, S]``: RGB (``to_rgb``), bicubic to S x S, [0, 1], CLIP mean and std."""
        pixels = np.asarray(to_rgb(image).resize((self.image_size, self.image_size), Image.BICUBIC), dtype=np.float32)
        pixels = (pixels * np.float32(1 / 255) - CLIP_MEAN) / CLIP_STD
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self.one(image) for image in images])


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an upright 8-bit RGB PIL image (``upright_rgb``; animated: the first frame).

    A clear ``ValueError`` when they are not an image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return upright_rgb(image)
    except Exception as error:
        raise ValueError(f"cannot decode image: {type(error).__name__}: {error}") from None


REDUCING_GAP = 3.0  # PIL's reducing_gap: shrink by whole factors down to 3x the target size, no further


@dataclass(frozen=True)
class DecodedImage:
    """What the models and the output need of an image: its size as stored, and its model inputs."""

    width: int  # of the image as stored: before any reduction, and before the EXIF orientation is applied
    height: int
    pixels: dict[tuple, torch.Tensor]  # a preprocessor's ``key`` -> its [3, S, S], of the upright image

    def for_model(self, preprocessor: ImagePreprocessor) -> torch.Tensor:
        """The pixels ``preprocessor`` makes of this image (one of those ``decode_for_model`` was given)."""
        return self.pixels[preprocessor.key]


def decode_for_model(data: bytes, preprocessors: Sequence[ImagePreprocessor],
                     orientation: int | None = None) -> DecodedImage:
    """Decode ``data`` straight to each preprocessor's input (once per ``key``); the full-size image is never kept.

    The same pixels as ``decode_image`` (up to the reduction): ``to_rgb``, then the EXIF orientation.
    ``orientation``: one recorded beside the bytes (``recorded_orientation``), applied when the bytes carry
    none of their own. A clear ``ValueError`` when the bytes are not an image.
    """
    wanted = {p.key: p for p in preprocessors}  # one input per kind of preprocessing and size
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            floor = int(REDUCING_GAP * max(p.image_size for p in wanted.values()))
            if image.format == "JPEG":
                image.draft("RGB", (floor, floor))  # DCT scaling: keeps each side >= floor
            image.load()
            method = exif_transpose_method(image, orientation)
            rgb = to_rgb(image)  # as decode_image, before any resampling
            factor = min(rgb.size) // floor  # the shorter side: the same whichever way up
            if factor > 1:
                rgb = rgb.reduce(factor)  # box average over factor x factor blocks
            if method is not None:
                rgb = rgb.transpose(method)  # on the reduced image: cheaper (its blocks start at the stored corner)
    except Exception as error:
        raise ValueError(f"cannot decode image: {type(error).__name__}: {error}") from None
    return DecodedImage(width, height, {key: p.one(rgb) for key, p in wanted.items()})
