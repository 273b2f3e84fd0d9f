"""The three splits, generated in memory (docs/shapes.md).

- ``human``: clean captions only (the stand-in for COCO);
- ``web``: one noisy web text per image (the stand-in for CC12M);
- ``test``: clean captions, held out, for evaluation only.

Every sample is generated from its own random stream, seeded by
(seed, split, index): the same seed gives the same split, byte for byte,
however it is sharded or sliced, and the three splits never share a stream.
Within a sample the scene, the rendering and the text draw from separate
child streams, so changing the web mixture leaves the images as they were.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from capfilt.shapes.captions import caption
from capfilt.shapes.render import RenderConfig, RenderStyle, decode, encode, render, sample_style
from capfilt.shapes.scene import Scene, SceneConfig, sample_scene
from capfilt.shapes.web import DEFAULT_MIXTURE, draw_kind, web_text

SPLITS = ("human", "web", "test")


@dataclass(frozen=True)
class WorldConfig:
    """Every knob of a split: scenes, rendering and the web-text mixture."""

    scene: SceneConfig = field(default_factory=SceneConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    mixture: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIXTURE))


@dataclass(frozen=True)
class Sample:
    """One image–text pair and its ground truth."""

    split: str
    index: int
    scene: Scene
    style: RenderStyle
    image_bytes: bytes  # encoded as style.image_format
    text: str
    kind: str  # "clean" | "mismatch" | "partial" | "alt"

    @property
    def image(self) -> Image.Image:
        """The decoded RGB image (exactly what a reader of the encoded bytes sees)."""
        return decode(self.image_bytes)


def sample_streams(split: str, seed: int, index: int) -> tuple[np.random.Generator, ...]:
    """The scene, render and text random streams of one sample."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    root = np.random.SeedSequence([seed, zlib.crc32(split.encode()), index])
    return tuple(np.random.default_rng(child) for child in root.spawn(3))


def make_sample(split: str, seed: int, index: int, config: WorldConfig = WorldConfig()) -> Sample:
    """Sample ``index`` of a split: scene, rendered and encoded image, text and kind."""
    scene_rng, render_rng, text_rng = sample_streams(split, seed, index)
    scene = sample_scene(scene_rng, config.scene)
    style = sample_style(render_rng, config.render)
    image_bytes = encode(render(scene, style, render_rng, config.render.supersample), style)
    if split == "web":
        kind = draw_kind(text_rng, config.mixture)
        text = web_text(scene, kind, text_rng, config.scene)
    else:
        kind, text = "clean", caption(scene)
    return Sample(split, index, scene, style, image_bytes, text, kind)


def iter_split(
    split: str, n: int, seed: int, start: int = 0, config: WorldConfig = WorldConfig()
) -> Iterator[Sample]:
    """Samples ``start`` … ``start + n − 1`` of a split, in order."""
    for index in range(start, start + n):
        yield make_sample(split, seed, index, config)
