"""World v2 distractors: marks that are not objects (lines, scribbles, text, blobs) and the
bars that partly hide persons. They are drawn among the objects, can hide them, and are
never labelled.
"""

from __future__ import annotations

import colorsys
import math
import string
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("line", "scribble", "text", "blob")
_GLYPHS = string.ascii_letters + string.digits


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size)


def distractor_colour(rng: np.random.Generator) -> np.ndarray:
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 1)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255


def distractor_mask(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """The pixels of one random distractor."""
    canvas = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(canvas)
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "line":
        for _ in range(int(rng.integers(1, 3))):
            ends = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2)]
            d.line(ends, fill=1, width=int(rng.integers(1, 5)))
    elif kind == "scribble":
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        heading, points = rng.uniform(0, 2 * math.pi), []
        for _ in range(int(rng.integers(6, 16))):
            heading += rng.normal(0, 0.9)
            step = rng.uniform(4, 16)
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            points.append((x, y))
        d.line(points, fill=1, width=int(rng.integers(1, 4)), joint="curve")
    elif kind == "text":
        text = "".join(rng.choice(list(_GLYPHS), size=int(rng.integers(1, 7))))
        d.text(
            (rng.uniform(0, w), rng.uniform(0, h)),
            text,
            fill=1,
            font=_font(int(rng.integers(9, 30))),
        )
    else:  # blob: lumpy and concave, never a circle
        r, cx, cy = rng.uniform(5, 30), rng.uniform(0, w), rng.uniform(0, h)
        theta = np.linspace(0, 2 * math.pi, 36, endpoint=False)
        radius = np.ones_like(theta)
        for k in (2, 3, 4):
            radius += rng.uniform(0.12, 0.25) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
        radius = r * np.maximum(radius, 0.2)
        d.polygon(
            list(zip(cx + radius * np.cos(theta), cy + radius * np.sin(theta), strict=True)), fill=1
        )
    return np.asarray(canvas, dtype=bool)


def occluder_mask(rng: np.random.Generator, joints: np.ndarray, w: int, h: int) -> np.ndarray:
    """A long bar (a wall, table or post) across part of a person given its joints [17, 2]:
    at least three times longer than thick, so it never reads as a square."""
    x0, y0 = joints.min(0)
    x1, y1 = joints.max(0)
    fig_w, fig_h = max(x1 - x0, 4.0), max(y1 - y0, 8.0)
    if rng.random() < 0.7:  # horizontal: hides the legs
        top = y0 + fig_h * rng.uniform(0.45, 0.75)
        bottom = y1 + rng.uniform(0, 0.15) * fig_h
        length = max(3 * (bottom - top), fig_w * rng.uniform(1.5, 3.0))
        left = (x0 + x1) / 2 - length * rng.uniform(0.3, 0.7)
        box = [left, top, left + length, bottom]
    else:  # vertical: hides one side
        thick = fig_w * rng.uniform(0.25, 0.5) + 2
        left = rng.uniform(x0 - thick / 2, x1 - thick / 2)
        length = max(3 * thick, fig_h * rng.uniform(1.2, 2.0))
        top = (y0 + y1) / 2 - length * rng.uniform(0.3, 0.7)
        box = [left, top, left + thick, top + length]
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).rectangle(box, fill=1)
    return np.asarray(canvas, dtype=bool)
