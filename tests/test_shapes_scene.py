"""The shapes-world generator against the contract (docs/shapes.md).

The contract's numbers are restated here, not imported, so the tests check
capfilt.shapes against the spec rather than against itself. Rendered images
are checked from their pixels.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from capfilt.shapes import RenderStyle, decode, encode, render, render_array, sample_scene, sample_style
from capfilt.shapes import scene_from_json, scene_to_json

SPEC_RADII = {"small": 5, "large": 9}
SPEC_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SPEC_SHAPES = {"circle", "square", "triangle"}
SPEC_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}  # times r²
SPEC_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding square
N_SCENES = 400


def spec_relation(a, b):
    """The relations of A to B that hold by the contract's dx/dy rule (a list, to count them)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    held = []
    if dx <= -16 and abs(dx) > abs(dy):
        held.append("left of")
    if dx >= 16 and abs(dx) > abs(dy):
        held.append("right of")
    if dy <= -16 and abs(dy) > abs(dx):
        held.append("above")
    if dy >= 16 and abs(dy) > abs(dx):
        held.append("below")
    return held


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(2024)
    return [sample_scene(rng) for _ in range(N_SCENES)]


def test_objects_follow_the_spec(scenes):
    objects = [o for s in scenes for o in s.objects]
    for o in objects:
        assert o.size in SPEC_RADII and o.colour in SPEC_COLOURS and o.shape in SPEC_SHAPES
        assert abs(o.radius - SPEC_RADII[o.size]) <= 1
        assert all(abs(c - s) <= 10 and 0 <= c <= 255 for c, s in zip(o.rgb, SPEC_COLOURS[o.colour]))
        # fully inside the 64×64 image
        assert o.cx - o.radius >= 0 and o.cx + o.radius <= 63
        assert o.cy - o.radius >= 0 and o.cy + o.radius <= 63
    # the whole variation is exercised
    assert {o.colour for o in objects} == set(SPEC_COLOURS)
    assert {o.shape for o in objects} == SPEC_SHAPES
    assert {o.size for o in objects} == set(SPEC_RADII)
    assert len({o.radius for o in objects}) > 50  # radii are jittered
    assert sum(o.rgb != SPEC_COLOURS[o.colour] for o in objects) > 0.9 * len(objects)  # colours too
    assert min(o.cx - o.radius for o in objects) < 1 and max(o.cx + o.radius for o in objects) > 62  # edges reached


def test_scenes_backgrounds_and_noise(scenes):
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert 0.4 < np.mean([len(s.objects) == 2 for s in scenes]) < 0.6
    backgrounds = np.array([s.background for s in scenes])
    assert backgrounds.dtype.kind == "i" and backgrounds.min() >= 90 and backgrounds.max() <= 170
    assert backgrounds.min() < 95 and backgrounds.max() > 165
    sigmas = np.array([s.noise_sigma for s in scenes])
    assert sigmas.min() == 0 and sigmas.max() <= 8 and sigmas.max() > 7


def test_two_objects_apart_and_exactly_one_relation(scenes):
    pairs = [s for s in scenes if len(s.objects) == 2]
    for s in pairs:
        a, b = s.objects
        assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + 2
        held = spec_relation(a, b)
        assert held == [s.relation]
    assert {s.relation for s in pairs} == {"left of", "right of", "above", "below"}
    for s in scenes:
        if len(s.objects) == 1:
            assert s.relation is None


def test_scene_json_round_trip(scenes):
    for s in scenes[:50]:
        assert scene_from_json(scene_to_json(s)) == s


def test_styles_vary():
    rng = np.random.default_rng(5)
    styles = [sample_style(rng) for _ in range(200)]
    assert {s.antialias for s in styles} == {True, False}
    assert {s.noise_on_objects for s in styles} == {True, False}
    assert {s.jpeg_quality for s in styles} == set(range(90, 96))


def _window_mean(pixels, x, y, half=1):
    x, y = int(round(x)), int(round(y))
    return pixels[y - half : y + half + 1, x - half : x + half + 1].reshape(-1, 3).mean(axis=0)


def test_rendered_colours_at_centres_and_background(scenes):
    rng = np.random.default_rng(11)
    for scene in scenes[:150]:
        style = replace(sample_style(rng), image_format="png")
        image = decode(encode(render(scene, style, rng), style))
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.float64)
        for o in scene.objects:
            measured = _window_mean(pixels, o.cx, o.cy)
            assert np.abs(measured - o.rgb).max() <= 12, (o, measured)
            nearest = min(SPEC_COLOURS, key=lambda c: np.abs(np.subtract(SPEC_COLOURS[c], measured)).sum())
            assert nearest == o.colour
        # pixels well away from every object are the background, with the scene's noise
        ys, xs = np.mgrid[0:64, 0:64]
        away = np.ones((64, 64), bool)
        for o in scene.objects:
            away &= np.hypot(xs - o.cx, ys - o.cy) > o.radius * math.sqrt(2) + 1.5
        background = pixels[away]
        assert np.abs(background.mean(axis=0) - scene.background).max() <= 1.5
        if scene.noise_sigma >= 2:
            assert abs(background.std(axis=0).mean() / scene.noise_sigma - 1) < 0.2
        elif scene.noise_sigma == 0:
            assert background.std(axis=0).max() == 0


def _object_mask(pixels, o):
    """Pixels of exactly the object's colour, within a window around its centre."""
    mask = np.all(pixels == np.asarray(o.rgb), axis=-1)
    ys, xs = np.mgrid[0:64, 0:64]
    near = (np.abs(xs - o.cx) <= o.radius + 2) & (np.abs(ys - o.cy) <= o.radius + 2)
    return mask & near


def test_hard_edged_shapes_from_pixels(scenes):
    """Hard edges, no noise, PNG: every object's shape, size and place read back from its pixels."""
    style = RenderStyle(antialias=False, noise_on_objects=False, image_format="png")
    rng = np.random.default_rng(0)
    checked_relations = 0
    for scene in scenes[:200]:
        if len(scene.objects) == 2 and scene.objects[0].rgb == scene.objects[1].rgb:
            continue
        pixels = render_array(replace(scene, noise_sigma=0.0), style, rng)
        centres = []
        for o in scene.objects:
            ys, xs = np.nonzero(_object_mask(pixels, o))
            width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            # pixel centres in [c − r, c + r]: 2r ± 1 of them (a triangle's apex and base rows may be cut)
            slack = 2 if o.shape == "triangle" else 1
            assert abs(width - 2 * o.radius) <= slack and abs(height - 2 * o.radius) <= slack
            area = len(xs)
            assert abs(area / (SPEC_AREA[o.shape] * o.radius**2) - 1) < 0.3, (o, area)
            fill = area / (width * height)
            shape = min(SPEC_FILL, key=lambda name: abs(SPEC_FILL[name] - fill))
            assert shape == o.shape, (o, fill)
            if o.shape == "triangle":  # upward: narrow top row, wide bottom row
                top, bottom = (xs[ys == ys.min()], xs[ys == ys.max()])
                assert len(top) <= 3 and len(bottom) >= 2 * o.radius - 2
            centres.append(((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2))
            assert abs(centres[-1][0] - o.cx) <= 1 and abs(centres[-1][1] - o.cy) <= 1
        if len(centres) == 2:
            (xa, ya), (xb, yb) = centres
            dx, dy = xa - xb, ya - yb
            if abs(abs(dx) - abs(dy)) > 2 and max(abs(dx), abs(dy)) >= 18:  # clear of the boundaries
                held = spec_relation(*(replace(o, cx=c[0], cy=c[1]) for o, c in zip(scene.objects, centres)))
                assert held == [scene.relation]
                checked_relations += 1
    assert checked_relations > 40


def test_antialiased_edges_cover_the_shape_area(scenes):
    """Anti-aliased, no noise: edge pixels blend, and the coverage sums to the shape's area."""
    style = RenderStyle(antialias=True, noise_on_objects=False, image_format="png")
    rng = np.random.default_rng(0)
    for scene in [s for s in scenes if len(s.objects) == 1][:60]:
        (o,) = scene.objects
        pixels = render_array(replace(scene, noise_sigma=0.0), style, rng).astype(np.float64)
        channel = int(np.argmax(np.abs(np.subtract(o.rgb, scene.background))))
        if abs(o.rgb[channel] - scene.background[channel]) < 40:
            continue
        alpha = (pixels[..., channel] - scene.background[channel]) / (o.rgb[channel] - scene.background[channel])
        blended = ((alpha > 0.05) & (alpha < 0.95)).sum()
        assert blended > 0
        assert abs(alpha.sum() / (SPEC_AREA[o.shape] * o.radius**2) - 1) < 0.06, (o, alpha.sum())


def _jpeg_tables(quality: int, subsampling: int) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return Image.open(buffer).quantization


def test_jpeg_encoding_quality_90_to_95(scenes):
    rng = np.random.default_rng(3)
    reference = {q: _jpeg_tables(q, 2) for q in range(90, 96)}
    for scene in scenes[:30]:
        style = sample_style(rng)
        data = encode(render(scene, style, rng), style)
        assert data[:2] == b"\xff\xd8"  # a JPEG
        tables = Image.open(io.BytesIO(data)).quantization
        assert tables in reference.values()
    png = encode(render(scenes[0], RenderStyle(False, False, "png"), rng), RenderStyle(False, False, "png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
