"""Which points each shape covers (docs/shapes.md).

Coordinates are in pixels with y growing downwards; pixel (i, j) has its
centre at x = i, y = j, as in PIL's drawing. Every shape lies in the square
[cx − r, cx + r] × [cy − r, cy + r]:

- circle: the disc of radius r;
- square: axis-aligned, half side r;
- triangle: upward, apex (cx, cy − r), base corners (cx − r, cy + r), (cx + r, cy + r).
"""

from __future__ import annotations

import numpy as np


def covers(shape: str, cx: float, cy: float, r: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A boolean array: which of the points (x, y) lie in the shape (edges included)."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":
        # The half width grows from 0 at the apex (dy = −r) to r at the base (dy = r).
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 1) -> np.ndarray:
    """A (size, size) float array: the fraction of each pixel the shape covers.

    ``supersample=1`` tests the pixel centre only (hard edges); ``s > 1``
    averages an s×s grid of points spread over each pixel (anti-aliased).
    """
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    axis = (np.arange(size)[:, None] + offsets[None, :]).reshape(-1)  # size * s points
    inside = covers(shape, cx, cy, r, axis[None, :], axis[:, None])  # rows are y
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


Placed = tuple[str, float, float, float]  # (shape, cx, cy, r)


def shapes_intersect(a: Placed, b: Placed, step: float = 0.25) -> bool:
    """Whether two shapes ``(shape, cx, cy, r)`` share a point, tested on a grid of ``step`` px."""
    (sa, xa, ya, ra), (sb, xb, yb, rb) = a, b
    x0, x1 = max(xa - ra, xb - rb), min(xa + ra, xb + rb)
    y0, y1 = max(ya - ra, yb - rb), min(ya + ra, yb + rb)
    if x0 > x1 or y0 > y1:  # the bounding squares are apart
        return False
    xs = np.arange(x0, x1 + step, step)[None, :]
    ys = np.arange(y0, y1 + step, step)[:, None]
    return bool((covers(sa, xa, ya, ra, xs, ys) & covers(sb, xb, yb, rb, xs, ys)).any())
