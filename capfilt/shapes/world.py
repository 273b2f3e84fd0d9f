"""The shapes world's numbers, as the contract states them (docs/shapes.md).

Every other module of ``capfilt.shapes`` takes its sizes, colours, shapes,
relations and ranges from here, so the contract lives in one place.
"""

from __future__ import annotations

# Images
IMAGE_SIZE = 64  # RGB, 64×64 pixels
JPEG_QUALITY_RANGE = (90, 95)  # inclusive
BACKGROUND_RANGE = (90, 170)  # each channel an integer, inclusive
NOISE_SIGMA_RANGE = (0.0, 8.0)  # per-pixel Gaussian noise, then clipped to [0, 255]

# Objects: (size, colour, shape)
SIZE_RADII = {"small": 5, "large": 9}
RADIUS_JITTER = 1  # a renderer may jitter each radius by ±1 px
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_JITTER = 10  # a renderer may jitter each channel by ±10
SHAPES = ("circle", "square", "triangle")
SIZES = tuple(SIZE_RADII)
COLOURS = tuple(COLOUR_RGB)
MAX_OBJECTS = 2

# Two objects never overlap: centre distance ≥ rA + rB + MIN_GAP.
MIN_GAP = 2

# Relations of A to B, on centres, dx = xA − xB, dy = yA − yB (y grows downwards):
# the dominant offset must be at least RELATION_MIN_OFFSET and strictly larger
# in magnitude than the other one.
RELATIONS = ("left of", "right of", "above", "below")
RELATION_MIN_OFFSET = 16
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
