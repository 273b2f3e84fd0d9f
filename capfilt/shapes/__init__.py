"""The shapes world: capfilt's offline image–text world (docs/shapes.md).

Procedurally rendered 64×64 images of one or two coloured shapes, captions
under a small grammar whose correctness is decidable, noisy web texts of
known kind, and the ``human`` / ``web`` / ``test`` splits written as
img2dataset-style Parquet shards. See docs/shapes.md.
"""

from capfilt.shapes.captions import (
    VOCABULARY,
    Parse,
    Phrase,
    caption,
    caption_errors,
    correct_captions,
    describe,
    is_correct,
    parse,
)
from capfilt.shapes.render import RenderConfig, RenderStyle, decode, encode, render, render_array, sample_style
from capfilt.shapes.scene import (
    Scene,
    SceneConfig,
    ShapeObject,
    relation_of,
    sample_scene,
    scene_from_json,
    scene_to_json,
)
from capfilt.shapes.writer import read_split, write_split
from capfilt.shapes.splits import SPLITS, Sample, WorldConfig, iter_split, make_sample
from capfilt.shapes.web import DEFAULT_MIXTURE, KINDS, alt_text, draw_kind, web_text

__all__ = [
    "DEFAULT_MIXTURE",
    "KINDS",
    "SPLITS",
    "VOCABULARY",
    "Parse",
    "Phrase",
    "RenderConfig",
    "RenderStyle",
    "Sample",
    "Scene",
    "SceneConfig",
    "ShapeObject",
    "WorldConfig",
    "alt_text",
    "caption",
    "caption_errors",
    "correct_captions",
    "decode",
    "describe",
    "draw_kind",
    "encode",
    "is_correct",
    "iter_split",
    "make_sample",
    "parse",
    "read_split",
    "write_split",
    "relation_of",
    "render",
    "render_array",
    "sample_scene",
    "sample_style",
    "scene_from_json",
    "scene_to_json",
    "web_text",
]
