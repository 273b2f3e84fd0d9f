"""The same scenes drawn by a second renderer, with other rendering details (docs/demo.md, "Changed rendering").

The shapes world's contract (docs/shapes.md) fixes scenes, words and ranges,
not how a renderer draws. A model that learned ``render.py``'s habits (its
rasteriser, its JPEG settings, its exact colours) fails on another renderer
that follows the contract as well. This one keeps each scene, caption and web
text of a split and draws the image again, written apart from ``render.py``:

- shapes drawn with PIL's ``ImageDraw`` at 8× and reduced with a Lanczos
  filter, then a Gaussian blur: smoother edges; coordinates are continuous,
  pixel i covering [i, i+1) (``render.py`` centres pixel i on i), so every
  shape sits half a pixel up and left of where ``render.py`` draws it;
- each object's colour shifted per channel and its radius changed by a
  fraction of a pixel (both drawn per object), and a gamma curve over the
  whole image: small shifts of colour and size;
- JPEG encoded twice (the second time at another quality), as an image that
  was saved, uploaded and re-compressed.

These go a little past the contract's ranges, on purpose: a radius ends up
within ±1.5 px of its nominal size (the contract: ±1), a colour within ±16
per channel before the gamma curve (±10), and the second JPEG save may go
down to quality 85 (90–95). A re-drawn sample keeps its ``style``: the record
of how ``render.py`` drew the plain image, not of this drawing.

It is for evaluation only (``capfilt evaluate --rendering changed``). The
demo models train on ``render.py``'s images with
``AugmentConfig.render_jitter``, which blurs, shifts, scales, changes the
colour curve and re-encodes a whole image; its ranges cover much of this
renderer's. What the models never saw in training is this renderer's
rasteriser (8× ``ImageDraw`` and Lanczos), its per-object colour and size
shifts and its double compression: the changed split measures how far the
models carry over to those.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from capfilt.shapes.scene import Scene
from capfilt.shapes.splits import Sample
from capfilt.shapes.world import IMAGE_SIZE

RERENDER_STREAM = 7  # the changed rendering's random stream, apart from a sample's scene, render and text streams


@dataclass(frozen=True)
class RerenderConfig:
    """How far the second renderer departs from ``render.py``; each value is drawn uniformly per image."""

    scale: int = 8  # shapes drawn at 8× and reduced (Lanczos) to 64 px
    blur: tuple[float, float] = (0.3, 0.8)  # Gaussian blur radius, pixels, after the reduction
    colour_shift: int = 6  # each object's channels shifted by up to ± this (on top of the scene's own jitter)
    radius_shift: float = 0.5  # each radius changed by up to ± this, pixels
    gamma: tuple[float, float] = (0.9, 1.1)  # one curve over the whole image
    first_quality: tuple[int, int] = (90, 95)  # JPEG quality of the first save (the contract's range)
    second_quality: tuple[int, int] = (85, 95)  # and of the re-compression, 4:2:0


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, scale: int,
                 fill: tuple[int, int, int]) -> None:
    # Continuous coordinates, pixel i covering [i, i+1): the point (cx, cy) lies on pixels' corners where
    # render.py (pixel i centred on i) puts it in a pixel's middle, so every shape moves by half a pixel.
    x, y, s = cx * scale, cy * scale, r * scale
    if shape == "circle":
        draw.ellipse((x - s, y - s, x + s, y + s), fill=fill)
    elif shape == "square":
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - s), (x - s, y + s), (x + s, y + s)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def rerender_array(scene: Scene, rng: np.random.Generator, config: RerenderConfig = RerenderConfig()) -> np.ndarray:
    """The scene drawn by this renderer, before compression: a (64, 64, 3) uint8 array."""
    big = IMAGE_SIZE * config.scale
    canvas = Image.new("RGB", (big, big), tuple(int(c) for c in scene.background))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        shift = rng.integers(-config.colour_shift, config.colour_shift + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.asarray(obj.rgb) + shift, 0, 255))
        radius = obj.radius + rng.uniform(-config.radius_shift, config.radius_shift)
        _draw_object(draw, obj.shape, obj.cx, obj.cy, radius, config.scale, fill)
    image = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*config.blur)))
    pixels = np.asarray(image, dtype=np.float64)
    if scene.noise_sigma > 0:
        pixels = pixels + rng.normal(0.0, scene.noise_sigma, pixels.shape)
    pixels = np.clip(pixels, 0, 255)
    pixels = 255.0 * (pixels / 255.0) ** rng.uniform(*config.gamma)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def rerender_bytes(scene: Scene, rng: np.random.Generator, config: RerenderConfig = RerenderConfig()) -> bytes:
    """The scene drawn by this renderer as JPEG bytes, compressed twice."""
    image = Image.fromarray(rerender_array(scene, rng, config))
    for low, high in (config.first_quality, config.second_quality):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(low, high + 1)), subsampling=2)
        image = Image.open(io.BytesIO(buffer.getvalue()))
    return buffer.getvalue()


def rerender(sample: Sample, seed: int, config: RerenderConfig = RerenderConfig()) -> Sample:
    """``sample`` (of the split drawn with ``seed``) with its image drawn again by this renderer; scene, text and
    kind unchanged. The drawing's random stream comes from the split, seed and index: a changed split is the same
    on every run."""
    stream = np.random.SeedSequence([seed, zlib.crc32(sample.split.encode()), sample.index, RERENDER_STREAM])
    return replace(sample, image_bytes=rerender_bytes(sample.scene, np.random.default_rng(stream), config))
