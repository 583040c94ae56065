"""World v2 shape geometry: rotated, slightly deformed polygons, filled or outlined.

Label rule (what makes a shape its category, whatever its style or rotation):
- circle: a smooth closed curve, an ellipse with axis ratio 0.8-1.25;
- square: four corners, any rotation (a diamond is a square), sides within about ±15%;
- triangle: three corners, each angle within about ±10 degrees of 60;
- star: five points, inner radius 0.38-0.55 of the outer;
- hexagon: six corners, any rotation, sides within about ±15%.
Every shape is a polygon (circles with 40 vertices); `size` is its circumscribed diameter.
An outlined shape's mask is its stroke: what shows through the hole belongs to whatever is
behind it.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[float, float]
CIRCLE_VERTICES = 40


def _polygon(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radii: np.ndarray,
    angles: np.ndarray,
    aspect: float,
) -> list[Point]:
    """Vertices at (angle, radius), stretched by `aspect` along a random axis, around (cx, cy)."""
    x, y = radii * np.cos(angles), radii * np.sin(angles)
    axis = rng.uniform(0, math.pi)
    c, s = math.cos(axis), math.sin(axis)
    u, v = (x * c + y * s) * math.sqrt(aspect), (-x * s + y * c) / math.sqrt(aspect)
    return [(cx + a * c - b * s, cy + a * s + b * c) for a, b in zip(u, v, strict=True)]


def shape_outline(
    rng: np.random.Generator, category: str, cx: float, cy: float, size: float
) -> list[Point]:
    """The closed polygon of one shape of `category` (see the label rule above)."""
    r = size / 2
    rot = rng.uniform(0, 2 * math.pi)
    if category == "circle":
        angles = np.linspace(0, 2 * math.pi, CIRCLE_VERTICES, endpoint=False)
        return _polygon(rng, cx, cy, np.full(CIRCLE_VERTICES, r), angles, rng.uniform(0.8, 1.25))
    if category == "star":
        k = np.arange(10)
        radii = np.where(k % 2 == 0, r, r * rng.uniform(0.38, 0.55))
        radii = radii * rng.uniform(0.92, 1.08, size=10)
        return _polygon(rng, cx, cy, radii, rot + k * math.pi / 5, 1.0)
    corners = {"triangle": 3, "square": 4, "hexagon": 6}[category]
    k = np.arange(corners)
    angle_jitter = 0.17 if category == "triangle" else 0.06
    angles = rot + 2 * math.pi * k / corners + rng.uniform(-angle_jitter, angle_jitter, corners)
    radii = r * rng.uniform(0.93, 1.07, size=corners)
    aspect = 1.0 if category == "triangle" else rng.uniform(0.87, 1.15)
    return _polygon(rng, cx, cy, radii, angles, aspect)


def fill_mask(points: list[Point], w: int, h: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def stroke_mask(points: list[Point], w: int, h: int, width: int) -> np.ndarray:
    """The closed outline of `points`, `width` pixels wide, with round joins."""
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([*points, points[0], points[1]], fill=1, width=width, joint="curve")
    return np.asarray(canvas, dtype=bool)
