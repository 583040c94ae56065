"""World v2 colours and fill styles: how an object's pixels are coloured.

Named colours are anchors; every object samples its own colour around its anchor (hue,
saturation and value jitter), so "red" covers a family of reds. Styles only change pixels
inside the object's mask: the mask is what was drawn, whatever the style.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

# name -> anchor RGB. Achromatic anchors jitter in value only.
NAMED_COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 70, 215),
    "yellow": (240, 210, 30),
    "purple": (135, 50, 175),
    "orange": (245, 130, 25),
    "cyan": (30, 195, 210),
    "pink": (240, 120, 180),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}
COLOUR_NAMES = list(NAMED_COLOURS)
_VALUE_RANGE = {"black": (0.03, 0.16), "white": (0.88, 1.0), "grey": (0.42, 0.62)}
# Shape styles and their shares; persons are never outlined (a stroke of a stick figure
# is not a figure).
SHAPE_STYLES = {
    "solid": 0.28,
    "outlined": 0.15,
    "bordered": 0.1,
    "striped": 0.1,
    "textured": 0.1,
    "shaded": 0.17,
    "translucent": 0.1,
}
PERSON_STYLES = {
    "solid": 0.45,
    "shaded": 0.2,
    "bordered": 0.08,
    "striped": 0.1,
    "textured": 0.1,
    "translucent": 0.07,
}
MIN_CONTRAST = 80.0  # RGB distance between an object's colour and what it covers


def jitter_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    """An RGB colour (float [3]) sampled around the named anchor."""
    r, g, b = (c / 255 for c in NAMED_COLOURS[name])
    hue, sat, val = colorsys.rgb_to_hsv(r, g, b)
    if name in _VALUE_RANGE:
        sat, val = rng.uniform(0.0, 0.08), rng.uniform(*_VALUE_RANGE[name])
    else:
        hue = (hue + rng.uniform(-0.025, 0.025)) % 1.0
        sat = float(np.clip(sat * rng.uniform(0.8, 1.1), 0, 1))
        val = float(np.clip(val * rng.uniform(0.82, 1.1), 0, 1))
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255


def pick_colour(
    rng: np.random.Generator, under: np.ndarray, alpha: float = 1.0
) -> tuple[str, np.ndarray]:
    """A named colour (and its jittered RGB) that stands out from the mean colour `under`
    it: an object nobody could see would be a wrong label."""
    best: tuple[float, str, np.ndarray] | None = None
    for _ in range(8):
        name = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        rgb = jitter_colour(rng, name)
        contrast = alpha * float(np.linalg.norm(rgb - under))
        if contrast >= MIN_CONTRAST:
            return name, rgb
        if best is None or contrast > best[0]:
            best = (contrast, name, rgb)
    assert best is not None
    return best[1], best[2]


def pick_style(rng: np.random.Generator, shares: dict[str, float]) -> str:
    names = list(shares)
    p = np.array([shares[n] for n in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


@dataclass
class Canvas:
    """One image being drawn: float RGB pixels, and which layer owns each pixel."""

    img: np.ndarray  # [H, W, 3] float32
    owner: np.ndarray  # [H, W] int16: -1 background, object index, or DISTRACTOR
    light: float  # direction light comes from (radians), shared by shading and shadows

    @classmethod
    def new(cls, img: np.ndarray, light: float) -> Canvas:
        return cls(img, np.full(img.shape[:2], -1, dtype=np.int16), light)


def _shade_of(rgb: np.ndarray) -> np.ndarray:
    """A second tone of the same colour: darker for light colours, lighter for dark ones."""
    if rgb.max() > 90:
        return rgb * 0.55
    return rgb + (255 - rgb) * 0.4


def paint(
    canvas: Canvas,
    rng: np.random.Generator,
    mask: np.ndarray,
    rgb: np.ndarray,
    style: str,
    border: np.ndarray | None = None,
    alpha: float = 1.0,
) -> None:
    """Colour the pixels of `mask` in `style` ("outlined" masks are strokes: solid there)."""
    img = canvas.img
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    if style == "translucent":
        img[ys, xs] = alpha * rgb + (1 - alpha) * img[ys, xs]
        return
    colours = np.broadcast_to(rgb, (len(ys), 3)).astype(np.float32)
    if style == "shaded":
        # Lit side brighter, far side darker, along the image's light direction.
        t = xs * -math.cos(canvas.light) + ys * -math.sin(canvas.light)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        colours = colours * (1.2 - 0.55 * t)[:, None]
    elif style == "striped":
        angle, period = rng.uniform(0, math.pi), rng.uniform(3, 10)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        colours = np.where((phase % 1.0 < 0.5)[:, None], colours, _shade_of(rgb))
    elif style == "textured":
        h, w = mask.shape
        grid = rng.normal(0, 1, size=(8, 8)).astype(np.float32)
        field = np.asarray(
            Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BILINEAR)
        )[ys, xs]
        grain = rng.normal(0, 0.06, size=len(ys))
        colours = colours * (1 + 0.22 * field + grain).astype(np.float32)[:, None]
    img[ys, xs] = colours
    if border is not None:
        img[border & mask] = _shade_of(rgb) if rng.random() < 0.6 else (15, 15, 15)


def cast_shadow(canvas: Canvas, rng: np.random.Generator, mask: np.ndarray, size: float) -> None:
    """A soft shadow of `mask`, offset away from the light; darkens pixels, owns none."""
    h, w = mask.shape
    dist = max(2.0, size * rng.uniform(0.05, 0.12))
    dx, dy = -math.cos(canvas.light) * dist, -math.sin(canvas.light) * dist
    shifted = Image.fromarray(mask.astype(np.uint8) * 255).transform(
        (w, h), Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy)
    )
    soft = shifted.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 4.0)))
    strength = rng.uniform(0.25, 0.5) * np.asarray(soft, dtype=np.float32) / 255
    canvas.img *= (1 - strength)[..., None]
