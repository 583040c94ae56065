"""World v2 (the default): domain-randomised shapes and stick figures.

A scene is a background, 0-8 objects and 0-4 distractors in random depth order, then
camera effects. Objects vary in style (filled, outlined, bordered, striped, textured,
shaded, translucent, with soft shadows), rotation, deformation (label rule in `shapes.py`)
and colour (jittered around twelve named colours, always standing out from what they
cover); persons in proportions, limb widths, poses, facing and size (from 24 px tall), and
some are partly hidden behind a bar. About 7% of images hold no object; their captions say so.

Labels: an object's mask is the pixels it owns after everything is drawn (the last layer
drawn on a pixel owns it; a translucent object owns what it covers; shadows and camera
effects own nothing). Keypoints: v=2 on the person's own visible pixels, v=1 when hidden
(by another layer, or behind its own head when sideways), v=0 (at 0, 0) outside the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from model.data.synth import backgrounds, distractors, paint, persons, shapes
from model.data.synth.captions import make_captions
from model.data.synth.common import MIN_VISIBLE_PIXELS, SHAPES, box_of
from model.data.synth.photometric import apply_photometric

EMPTY_SHARE = 0.07
PERSON_SHARE = 0.3  # the other categories share the rest equally
DISTRACTOR_COUNTS, DISTRACTOR_SHARES = (0, 1, 2, 3, 4), (0.3, 0.25, 0.2, 0.15, 0.1)
OCCLUDED_PERSON_SHARE = 0.2
SHADOW_SHARE = 0.2
DISTRACTOR = np.int16(32000)  # owner id of distractor pixels


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo + 1)))))


def _draw_distractor(canvas: paint.Canvas, mask: np.ndarray, rgb: np.ndarray) -> None:
    canvas.img[mask] = rgb
    canvas.owner[mask] = DISTRACTOR


def _draw_shape(canvas: paint.Canvas, rng: np.random.Generator, index: int, category: str) -> dict:
    h, w = canvas.owner.shape
    size = _log_uniform(rng, 12.0, 0.5 * min(w, h))
    outline = shapes.shape_outline(rng, category, rng.uniform(0, w), rng.uniform(0, h), size)
    style = paint.pick_style(rng, paint.SHAPE_STYLES)
    if style == "outlined":
        stroke = max(2, round(size * rng.uniform(0.05, 0.15)))
        mask = shapes.stroke_mask(outline, w, h, stroke)
    else:
        mask = shapes.fill_mask(outline, w, h)
    border = None
    if style == "bordered":
        border = shapes.stroke_mask(outline, w, h, max(2, round(size * rng.uniform(0.05, 0.12))))
    alpha = rng.uniform(0.5, 0.8) if style == "translucent" else 1.0
    under = canvas.img[mask].mean(0) if mask.any() else np.zeros(3, np.float32)
    colour, rgb = paint.pick_colour(rng, under, alpha)
    if style not in ("outlined", "translucent") and rng.random() < SHADOW_SHARE:
        paint.cast_shadow(canvas, rng, mask, size)
    paint.paint(canvas, rng, mask, rgb, style, border, alpha)
    canvas.owner[mask] = index
    return {"category": category, "colour": colour, "style": style}


def _draw_person(canvas: paint.Canvas, rng: np.random.Generator, index: int) -> dict:
    h, w = canvas.owner.shape
    height = _log_uniform(rng, 24.0, 0.85 * h)
    fig = persons.make_figure(rng, rng.uniform(0, w), rng.uniform(0, h) - height / 2, height)
    near, far = persons.draw_figure(fig, w, h)
    mask = near | far
    style = paint.pick_style(rng, paint.PERSON_STYLES)
    alpha = rng.uniform(0.55, 0.8) if style == "translucent" else 1.0
    under = canvas.img[mask].mean(0) if mask.any() else np.zeros(3, np.float32)
    colour, rgb = paint.pick_colour(rng, under, alpha)
    if style != "translucent" and rng.random() < SHADOW_SHARE:
        paint.cast_shadow(canvas, rng, mask, height / 3)
    border = None
    if style == "bordered":  # a dark rim: the figure's own pixels next to the background
        border = mask & ~_eroded(mask)
    paint.paint(canvas, rng, mask, rgb, style, border, alpha)
    canvas.img[far] *= 0.72  # the side away from the viewer, in shadow
    if height >= 50 and rng.random() < 0.6:
        _draw_eyes(canvas, fig, mask, rgb)
    canvas.owner[mask] = index
    return {"category": "person", "colour": colour, "style": style, "figure": fig}


def _eroded(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _draw_eyes(
    canvas: paint.Canvas, fig: persons.Figure, mask: np.ndarray, rgb: np.ndarray
) -> None:
    dot = (250, 250, 250) if rgb.mean() < 90 else (12, 12, 12)
    h, w = mask.shape
    for k in (1, 2):  # left_eye, right_eye
        x, y = fig.joints[k].astype(int)
        if not fig.self_occluded[k] and 0 <= x < w - 1 and 0 <= y < h - 1:
            spot = np.zeros_like(mask)
            spot[y : y + 2, x : x + 2] = True
            canvas.img[spot & mask] = dot


def _keypoints(fig: persons.Figure, owner: np.ndarray, index: int) -> np.ndarray:
    h, w = owner.shape
    kps = np.zeros((len(fig.joints), 3), dtype=np.int64)
    for k, (x, y) in enumerate(fig.joints.astype(int)):
        if 0 <= x < w and 0 <= y < h:
            hidden = fig.self_occluded[k] or owner[y, x] != index
            kps[k] = (x, y, 1 if hidden else 2)
    return kps


Background = Callable[[np.random.Generator, int, int], tuple[np.ndarray, str]]


def render_image(
    rng: np.random.Generator, background: Background = backgrounds.render_background
) -> tuple[np.ndarray, list[dict], list[str]]:
    """One v2 image: (HxWx3 uint8, visible objects, five captions); see the module docstring.
    `background` draws the canvas: ([H, W, 3] float32 pixels, its caption word)."""
    while True:  # re-roll the rare image whose objects all ended up (nearly) invisible
        w, h = (int(v) for v in rng.integers(192, 385, size=2))
        pixels, kind = background(rng, w, h)
        canvas = paint.Canvas.new(pixels.astype(np.float32), rng.uniform(0, 2 * math.pi))
        count = 0 if rng.random() < EMPTY_SHARE else int(rng.integers(1, 9))
        extra = int(rng.choice(DISTRACTOR_COUNTS, p=DISTRACTOR_SHARES))
        depth = sorted(int(d) for d in rng.integers(0, count + 1, size=extra))
        drawn: list[dict] = []
        for i in range(count + 1):
            while depth and depth[0] == i:  # distractors drawn before object i
                depth.pop(0)
                mask = distractors.distractor_mask(rng, w, h)
                _draw_distractor(canvas, mask, distractors.distractor_colour(rng))
            if i == count:
                break
            if rng.random() < PERSON_SHARE:
                drawn.append(_draw_person(canvas, rng, i))
                if rng.random() < OCCLUDED_PERSON_SHARE:
                    bar = distractors.occluder_mask(rng, drawn[-1]["figure"].joints, w, h)
                    _draw_distractor(canvas, bar, distractors.distractor_colour(rng))
            else:
                category = SHAPES[int(rng.integers(len(SHAPES)))]
                drawn.append(_draw_shape(canvas, rng, i, category))
        objects = _visible_objects(drawn, canvas.owner)
        if count and not objects:
            continue
        img = apply_photometric(rng, canvas.img)
        return img, objects, make_captions(rng, objects, w, h, kind)


def _visible_objects(drawn: list[dict], owner: np.ndarray) -> list[dict]:
    objects = []
    for i, obj in enumerate(drawn):
        visible = owner == i
        area = int(visible.sum())
        if area < MIN_VISIBLE_PIXELS:
            continue  # (almost) fully hidden or off-image
        out = {k: v for k, v in obj.items() if k != "figure"}
        out |= {"mask": visible, "bbox": box_of(visible), "area": area}
        if "figure" in obj:
            fig = obj["figure"]
            out |= {"keypoints": _keypoints(fig, owner, i), "pose": fig.pose, "facing": fig.facing}
        objects.append(out)
    return objects
