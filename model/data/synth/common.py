"""What every synthetic world shares: categories, keypoint layout and per-image seeding."""

from __future__ import annotations

import math
import zlib

import numpy as np

from model.config import COCO_KEYPOINT_NAMES, COCO_SKELETON, SYNTH_CLASS_NAMES

CATEGORIES = list(SYNTH_CLASS_NAMES)  # COCO ids 1..6
SHAPES = CATEGORIES[1:]
KEYPOINT_NAMES = list(COCO_KEYPOINT_NAMES)
SKELETON = [[a + 1, b + 1] for a, b in COCO_SKELETON]  # COCO files use 1-based indices
MIN_VISIBLE_PIXELS = 20  # objects with fewer visible pixels are not labelled


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent stream per image, so generation order and worker count do not matter."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def regular_polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
        for k in range(n)
    ]


def box_of(mask: np.ndarray) -> list[int]:
    """Tight [x, y, w, h] of a non-empty boolean mask, in whole pixels."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
