"""Rendering a scene to a 64×64 RGB image and encoding it (docs/shapes.md).

Each image draws its own ``RenderStyle``: hard edges (each pixel takes the
colour under its centre) or anti-aliased edges (coverage averaged over a
supersampled grid), noise on the background only or on the whole image,
and JPEG quality 90–95 with or without chroma subsampling. The mixture is
meant to keep models trained on it from learning one way of drawing; how
far they carry over to another renderer is measured, not assumed
(``rerender.py``, docs/demo.md "Changed rendering").
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from capfilt.shapes.geometry import coverage
from capfilt.shapes.scene import Scene
from capfilt.shapes.world import IMAGE_SIZE, JPEG_QUALITY_RANGE

IMAGE_FORMATS = ("jpg", "png")
SUPERSAMPLE = 4  # anti-aliasing: 4×4 points per pixel
# PIL's JPEG ``subsampling``: 0 is 4:4:4 (full colour), 2 is 4:2:0 (PIL's default).
CHROMA_SUBSAMPLING = (0, 2)


@dataclass(frozen=True)
class RenderStyle:
    """How one image is drawn and encoded."""

    antialias: bool
    noise_on_objects: bool  # False: only the background is noisy
    image_format: str = "jpg"  # "jpg" | "png"
    jpeg_quality: int = 95
    chroma_subsampling: int = 2


@dataclass(frozen=True)
class RenderConfig:
    """Knobs of ``sample_style``; by default every style the contract allows is drawn."""

    antialias: float = 0.5  # probability of anti-aliased edges
    noise_on_objects: float = 0.5  # probability that noise covers the objects too
    image_formats: tuple[str, ...] = ("jpg",)  # one drawn per image
    supersample: int = SUPERSAMPLE


def sample_style(rng: np.random.Generator, config: RenderConfig = RenderConfig()) -> RenderStyle:
    """A random ``RenderStyle`` for one image."""
    unknown = set(config.image_formats) - set(IMAGE_FORMATS)
    if unknown or not config.image_formats:
        raise ValueError(f"image formats must be among {IMAGE_FORMATS}, got {config.image_formats}")
    return RenderStyle(
        antialias=bool(rng.random() < config.antialias),
        noise_on_objects=bool(rng.random() < config.noise_on_objects),
        image_format=config.image_formats[rng.integers(len(config.image_formats))],
        jpeg_quality=int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1)),
        chroma_subsampling=int(CHROMA_SUBSAMPLING[rng.integers(len(CHROMA_SUBSAMPLING))]),
    )


def render_array(
    scene: Scene, style: RenderStyle, rng: np.random.Generator, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 array; ``rng`` draws the noise."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float64)
    image[:] = scene.background
    noise = rng.normal(0.0, scene.noise_sigma, image.shape) if scene.noise_sigma > 0 else np.zeros(image.shape)
    if not style.noise_on_objects:
        image += noise
    for obj in scene.objects:
        alpha = coverage(obj.shape, obj.cx, obj.cy, obj.radius, IMAGE_SIZE, supersample if style.antialias else 1)
        image = image * (1.0 - alpha[..., None]) + np.asarray(obj.rgb, dtype=np.float64) * alpha[..., None]
    if style.noise_on_objects:
        image += noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(scene: Scene, style: RenderStyle, rng: np.random.Generator, supersample: int = SUPERSAMPLE) -> Image.Image:
    """The scene as an RGB PIL image."""
    return Image.fromarray(render_array(scene, style, rng, supersample))


def encode(image: Image.Image, style: RenderStyle) -> bytes:
    """The image's file bytes: JPEG (quality and subsampling from the style) or PNG."""
    buffer = io.BytesIO()
    if style.image_format == "jpg":
        image.save(buffer, format="JPEG", quality=style.jpeg_quality, subsampling=style.chroma_subsampling)
    elif style.image_format == "png":
        image.save(buffer, format="PNG")
    else:
        raise ValueError(f"unknown image format {style.image_format!r}")
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """Image bytes back to an RGB PIL image."""
    return Image.open(io.BytesIO(data)).convert("RGB")
