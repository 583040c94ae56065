"""World v2 backgrounds: solid, gradient, cloudy, striped, checkered or noisy, in any
colour and brightness. Procedural only: no photo patches, so no photo used to evaluate
(e.g. scikit-image's samples) can leak into training.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image

KINDS = ("plain", "gradient", "cloudy", "striped", "checkered", "noisy")
KIND_SHARES = (0.2, 0.2, 0.2, 0.13, 0.1, 0.17)


def _colour(rng: np.random.Generator) -> np.ndarray:
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0, 0.55), rng.uniform(0.15, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255


def _near(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """A second tone, 20-60 levels away: patterns stay backgrounds, not objects."""
    delta = rng.uniform(20, 60) * (1 if rgb.mean() < 128 else -1)
    return np.clip(rgb + delta + rng.normal(0, 8, size=3), 0, 255).astype(np.float32)


def _upsampled_noise(rng: np.random.Generator, cells: int, w: int, h: int) -> np.ndarray:
    grid = rng.normal(0, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def render_background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """([H, W, 3] float32 pixels, the kind's caption word)."""
    kind = KINDS[int(rng.choice(len(KINDS), p=KIND_SHARES))]
    base = _colour(rng)
    if kind == "plain":
        return np.broadcast_to(base, (h, w, 3)).copy(), kind
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "gradient":
        other = _colour(rng)
        if rng.random() < 0.7:
            angle = rng.uniform(0, 2 * math.pi)
            t = xx * math.cos(angle) + yy * math.sin(angle)
        else:  # radial
            t = np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h))
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1.0))[..., None]
        return base * (1 - t) + other * t, kind
    if kind == "cloudy":
        amplitude = rng.uniform(15, 40)
        field = np.zeros((h, w), np.float32)
        for octave, cells in enumerate((3, 6, 12), start=1):
            field += _upsampled_noise(rng, cells, w, h) / octave
        tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        return base + amplitude * field[..., None] * tint, kind
    if kind == "noisy":
        sigma = rng.uniform(6, 18)
        coarse = 10 * _upsampled_noise(rng, 5, w, h)[..., None]
        return base + coarse + rng.normal(0, sigma, size=(h, w, 3)).astype(np.float32), kind
    other = _near(rng, base)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "striped":
        period = rng.uniform(6, 30)
        if rng.random() < 0.5:  # soft stripes
            t = (0.5 + 0.5 * np.sin(2 * math.pi * u / period))[..., None]
        else:
            t = ((u / period) % 1.0 < rng.uniform(0.3, 0.7))[..., None].astype(np.float32)
    else:  # checkered: small cells, so a cell never reads as a square object
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        cell = rng.uniform(4, 12)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2)[..., None]
    return base * (1 - t) + other * t, kind
