"""Scenes: what is in one shapes-world image (docs/shapes.md).

A scene holds one or two objects, the relation of A to B when there are two,
the background colour and the noise level. ``sample_scene`` draws one with
the full variation the contract allows (radius and colour jitter, any
position fully inside the image, any background, any noise level), so models
trained on it do not learn one renderer's quirks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from capfilt.shapes.geometry import shapes_intersect
from capfilt.shapes.world import (
    BACKGROUND_RANGE,
    COLOUR_JITTER,
    COLOUR_RGB,
    COLOURS,
    IMAGE_SIZE,
    MIN_GAP,
    NOISE_SIGMA_RANGE,
    RADIUS_JITTER,
    RELATION_MIN_OFFSET,
    SHAPES,
    SIZE_RADII,
    SIZES,
)

DECIMALS = 2  # centres and radii are rounded so that a scene's JSON is exact
MAX_PLACEMENTS = 10_000  # two-object placements tried before giving up


@dataclass(frozen=True)
class ShapeObject:
    """One object: its words (size, colour, shape) and how it is drawn."""

    size: str  # "small" | "large"
    colour: str  # a key of COLOUR_RGB
    shape: str  # "circle" | "square" | "triangle"
    cx: float  # centre, pixels; pixel (i, j) is centred at (i, j)
    cy: float
    radius: float  # SIZE_RADII[size], jittered
    rgb: tuple[int, int, int]  # COLOUR_RGB[colour], jittered


@dataclass(frozen=True)
class Scene:
    """One image's content; ``relation`` is A's relation to B (None for one object)."""

    objects: tuple[ShapeObject, ...]
    relation: str | None
    background: tuple[int, int, int]
    noise_sigma: float


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of ``sample_scene``; the defaults are the contract's full ranges."""

    two_objects: float = 0.5  # probability of two objects
    radius_jitter: float = RADIUS_JITTER  # radius drawn uniformly in r ± this
    colour_jitter: int = COLOUR_JITTER  # each channel drawn uniformly in c ± this (integers)
    noise_sigma_max: float = NOISE_SIGMA_RANGE[1]
    noise_free: float = 0.2  # probability of no noise at all (sigma 0)
    relation_margin: float = 0.0  # > 0 also rejects positions this close to an ambiguous one
    exact_separation: bool = True  # also reject shapes that touch (squares' corners), not only close centres


def relation_of(a: ShapeObject, b: ShapeObject, margin: float = 0.0) -> str | None:
    """The relation of A to B from their centres, or None where none holds (docs/shapes.md).

    With ``margin`` > 0 the dominant offset must also exceed both the other one
    and RELATION_MIN_OFFSET by ``margin`` px.
    """
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) > abs(dy) + margin and abs(dx) >= RELATION_MIN_OFFSET + margin:
        return "left of" if dx < 0 else "right of"
    if abs(dy) > abs(dx) + margin and abs(dy) >= RELATION_MIN_OFFSET + margin:
        return "above" if dy < 0 else "below"
    return None


def apart(a: ShapeObject, b: ShapeObject, exact: bool = True) -> bool:
    """Whether two objects do not overlap: centres at least rA + rB + MIN_GAP apart (docs/shapes.md)."""
    if math.hypot(a.cx - b.cx, a.cy - b.cy) < a.radius + b.radius + MIN_GAP:
        return False
    return not exact or not shapes_intersect((a.shape, a.cx, a.cy, a.radius), (b.shape, b.cx, b.cy, b.radius))


def inside_image(obj: ShapeObject) -> bool:
    """Whether the object's square [c − r, c + r] lies within the pixel centres 0 … IMAGE_SIZE − 1."""
    low, high = obj.radius, IMAGE_SIZE - 1 - obj.radius
    return low <= obj.cx <= high and low <= obj.cy <= high


def sample_object(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> ShapeObject:
    """One object with random words, jittered radius and colour, placed uniformly inside the image."""
    size = SIZES[rng.integers(len(SIZES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = round(SIZE_RADII[size] + rng.uniform(-config.radius_jitter, config.radius_jitter), DECIMALS)
    jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(COLOUR_RGB[colour]) + jitter, 0, 255))
    obj = ShapeObject(size=size, colour=colour, shape=shape, cx=0.0, cy=0.0, radius=radius, rgb=rgb)
    return place(obj, rng)


def place(obj: ShapeObject, rng: np.random.Generator) -> ShapeObject:
    """The object moved to a uniformly random centre that keeps it fully inside the image."""
    low, high = obj.radius, round(IMAGE_SIZE - 1 - obj.radius, DECIMALS)
    cx, cy = (round(float(rng.uniform(low, high)), DECIMALS) for _ in range(2))
    return replace(obj, cx=cx, cy=cy)


def sample_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    """A random scene; two-object positions are reject-sampled until exactly one relation holds.

    Only positions are redrawn on rejection, so sizes, colours and shapes stay
    uniform and independent whatever the rejection rate of each pairing.
    """
    background = tuple(int(v) for v in rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3))
    sigma = round(float(rng.uniform(0.0, config.noise_sigma_max)), DECIMALS)
    if rng.random() < config.noise_free:
        sigma = 0.0
    a = sample_object(rng, config)
    if rng.random() >= config.two_objects:
        return Scene(objects=(a,), relation=None, background=background, noise_sigma=sigma)
    b = sample_object(rng, config)
    for _ in range(MAX_PLACEMENTS):
        relation = relation_of(a, b, config.relation_margin)
        if relation is not None and apart(a, b, config.exact_separation):
            return Scene(objects=(a, b), relation=relation, background=background, noise_sigma=sigma)
        a, b = place(a, rng), place(b, rng)
    raise ValueError(f"no placement in {MAX_PLACEMENTS} tries; relation_margin={config.relation_margin} too large?")


def scene_to_json(scene: Scene) -> str:
    """The scene as a compact JSON string (the ``scene`` column of a split)."""
    return json.dumps(asdict(scene), separators=(",", ":"))


def scene_from_json(text: str) -> Scene:
    """The inverse of ``scene_to_json``."""
    data = json.loads(text)
    objects = tuple(ShapeObject(**{**o, "rgb": tuple(o["rgb"])}) for o in data["objects"])
    return Scene(
        objects=objects,
        relation=data["relation"],
        background=tuple(data["background"]),
        noise_sigma=data["noise_sigma"],
    )
