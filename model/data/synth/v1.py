"""World v1: the first synthetic world, kept exactly reproducible (`mad data synth --world v1`).

Each image holds 1-8 shapes and stick-figure persons in eight saturated colours on a
pastel/grey background: one drawing style, no distractors, no empty images. Do not change
what this module draws: tests pin its output byte for byte, so earlier model-card rows can
be re-run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from model.data.synth.captions_v1 import make_captions
from model.data.synth.common import (
    CATEGORIES,
    KEYPOINT_NAMES,
    MIN_VISIBLE_PIXELS,
    regular_polygon,
)

# Saturated colours, far from the pastel/grey backgrounds.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
    "cyan": (20, 200, 215),
    "black": (20, 20, 20),
}
COLOUR_NAMES = list(COLOURS)


# --------------------------------------------------------------------------- background


def _background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """Pastel or grey background: plain, gradient or mottled (low-frequency) noise."""

    def pale() -> np.ndarray:
        if rng.random() < 0.4:  # grey
            return np.full(3, rng.uniform(150, 215))
        return rng.uniform(175, 235, size=3)  # pastel: every channel high

    kind = str(rng.choice(["plain", "gradient", "noisy"]))
    if kind == "plain":
        img: np.ndarray = np.broadcast_to(pale(), (h, w, 3)).astype(np.float32)
    elif kind == "gradient":
        a, b = pale(), pale()
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    else:
        # Coarse random grid upsampled bilinearly, plus faint pixel noise: textured but
        # still compresses reasonably as PNG.
        base = pale()
        grid = rng.normal(0, 12, size=(6, 6, 3)).astype(np.float32)
        coarse = Image.fromarray(np.clip(grid + 128, 0, 255).astype(np.uint8))
        blot = np.asarray(coarse.resize((w, h), Image.Resampling.BILINEAR), np.float32) - 128
        img = base[None, None] + blot + rng.normal(0, 2.5, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), kind


# --------------------------------------------------------------------------- shapes
# Each shape function draws a filled shape (value 1) on an "L" canvas for its mask.


def draw_circle(
    d: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float, size: float
) -> None:
    r = size / 2
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)


def draw_square(
    d: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float, size: float
) -> None:
    # Mild rotation only: at 45 degrees a square reads as a diamond.
    rot = math.pi / 4 + rng.uniform(-0.35, 0.35)
    d.polygon(regular_polygon(cx, cy, size / math.sqrt(2), 4, rot), fill=1)


def draw_triangle(
    d: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float, size: float
) -> None:
    rot = -math.pi / 2 + rng.uniform(-0.5, 0.5)
    d.polygon(regular_polygon(cx, cy, size / 2, 3, rot), fill=1)


def draw_star(
    d: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float, size: float
) -> None:
    rot = -math.pi / 2 + rng.uniform(-0.6, 0.6)
    outer = regular_polygon(cx, cy, size / 2, 5, rot)
    inner = regular_polygon(cx, cy, size / 2 * 0.45, 5, rot + math.pi / 5)
    d.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=1)


def draw_hexagon(
    d: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float, size: float
) -> None:
    d.polygon(regular_polygon(cx, cy, size / 2, 6, rng.uniform(0, math.pi / 3)), fill=1)


SHAPE_DRAWERS = {
    "circle": draw_circle,
    "square": draw_square,
    "triangle": draw_triangle,
    "star": draw_star,
    "hexagon": draw_hexagon,
}


def person_joints(rng: np.random.Generator, cx: float, top: float, h: float) -> np.ndarray:
    """17 COCO keypoints [17, 2] of a stick figure facing the viewer.

    The person's left side is on the image right, as in COCO. Arm and leg angles vary.
    """
    r = 0.1 * h  # head radius
    hy = top + r
    sy, hip_y = top + 0.27 * h, top + 0.55 * h
    sw, hw = 0.14 * h, 0.08 * h
    pts = {
        "nose": (cx, hy + 0.25 * r),
        "left_eye": (cx + 0.4 * r, hy - 0.2 * r),
        "right_eye": (cx - 0.4 * r, hy - 0.2 * r),
        "left_ear": (cx + 0.9 * r, hy),  # just inside the head outline
        "right_ear": (cx - 0.9 * r, hy),
        "left_shoulder": (cx + sw, sy),
        "right_shoulder": (cx - sw, sy),
        "left_hip": (cx + hw, hip_y),
        "right_hip": (cx - hw, hip_y),
    }

    def limb(start: tuple, sign: float, angle: float, length: float) -> tuple:
        # Angle from "straight down", positive = away from the body.
        return start[0] + sign * length * math.sin(angle), start[1] + length * math.cos(angle)

    for side, sign in (("left", 1.0), ("right", -1.0)):
        upper, thigh = rng.uniform(0.15, 1.9), rng.uniform(0.05, 0.5)
        fore, shin = upper + rng.uniform(-0.9, 0.9), thigh + rng.uniform(-0.35, 0.25)
        pts[f"{side}_elbow"] = limb(pts[f"{side}_shoulder"], sign, upper, 0.17 * h)
        pts[f"{side}_wrist"] = limb(pts[f"{side}_elbow"], sign, fore, 0.16 * h)
        pts[f"{side}_knee"] = limb(pts[f"{side}_hip"], sign, thigh, 0.22 * h)
        pts[f"{side}_ankle"] = limb(pts[f"{side}_knee"], sign, shin, 0.22 * h)
    return np.array([pts[name] for name in KEYPOINT_NAMES], dtype=np.float64).round()


def draw_person(d: ImageDraw.ImageDraw, joints: np.ndarray, h: float) -> None:
    k = {name: tuple(joints[i]) for i, name in enumerate(KEYPOINT_NAMES)}
    # Limbs about a twelfth of the height and a torso twice that: a body-like area, so that
    # a 16x16 box-relative mask can hold a person and keypoint OKS (scaled by the mask area)
    # tolerates what it tolerates on COCO persons. Hair-thin lines scored segm AP 0.
    width = int(np.clip(round(h / 12), 3, 12))
    torso_width = round(1.8 * width)
    r = 0.1 * h
    hx, hy = (k["left_ear"][0] + k["right_ear"][0]) / 2, k["left_ear"][1]
    d.ellipse([hx - r, hy - r, hx + r, hy + r], fill=1)
    mid_sh = ((k["left_shoulder"][0] + k["right_shoulder"][0]) / 2, k["left_shoulder"][1])
    mid_hip = ((k["left_hip"][0] + k["right_hip"][0]) / 2, k["left_hip"][1])
    d.line([(hx, hy + r), mid_sh], fill=1, width=width)  # neck
    d.line([mid_sh, mid_hip], fill=1, width=torso_width)  # torso
    lines = [
        [k["left_shoulder"], k["right_shoulder"]],
        [k["left_hip"], k["right_hip"]],
    ]
    for side in ("left", "right"):
        lines.append([k[f"{side}_shoulder"], k[f"{side}_elbow"], k[f"{side}_wrist"]])
        lines.append([k[f"{side}_hip"], k[f"{side}_knee"], k[f"{side}_ankle"]])
    for line in lines:
        d.line(line, fill=1, width=width, joint="curve")
    # Round joints so every keypoint pixel is on the figure.
    jr = width / 2 + 0.5
    for x, y in joints[5:]:
        d.ellipse([x - jr, y - jr, x + jr, y + jr], fill=1)


# --------------------------------------------------------------------------- image


def render_image(rng: np.random.Generator) -> tuple[np.ndarray, list[dict], list[str]]:
    """Render one image. Returns (HxWx3 uint8, visible objects, five captions).

    Object dicts: category, colour, mask (bool HxW, visible pixels), bbox (xywh), area,
    and for persons keypoints [17, 3] (x, y, v) in COCO visibility convention.
    """
    while True:  # re-roll the rare image whose objects all ended up (nearly) invisible
        img, objects, bg_kind = _render_objects(rng)
        if objects:
            h, w = img.shape[:2]
            return img, objects, make_captions(rng, objects, w, h, bg_kind)


class _Drawn(NamedTuple):
    """An object drawn into the image (joints [17, 2] only for persons)."""

    category: str
    colour: str
    joints: np.ndarray | None


def _render_objects(rng: np.random.Generator) -> tuple[np.ndarray, list[dict], str]:
    w, h = (int(v) for v in rng.integers(192, 385, size=2))
    img, bg_kind = _background(rng, w, h)
    img = img.copy()
    owner = np.full((h, w), -1, dtype=np.int16)  # index of the object drawn last per pixel
    drawn: list[_Drawn] = []
    max_size = 0.5 * min(w, h)
    for i in range(int(rng.integers(1, 9))):
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        # Log-uniform sizes: many small objects, some large.
        lo = 32.0 if category == "person" else 16.0
        size = float(math.exp(rng.uniform(math.log(lo), math.log(max(max_size, lo + 1)))))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)  # centre in image; may stick out
        canvas = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(canvas)
        joints: np.ndarray | None = None
        if category == "person":
            size = min(size * 1.6, 0.8 * h)  # persons are tall and thin
            joints = person_joints(rng, cx, cy - size / 2, size)
            draw_person(d, joints, size)
        else:
            SHAPE_DRAWERS[category](d, rng, cx, cy, size)
        full = np.asarray(canvas, dtype=bool)
        img[full] = COLOURS[colour]
        if joints is not None and size >= 60:
            _draw_eyes(img, joints, colour)
        owner[full] = i
        drawn.append(_Drawn(category, colour, joints))

    objects = []
    for i, obj in enumerate(drawn):
        visible = owner == i
        area = int(visible.sum())
        if area < MIN_VISIBLE_PIXELS:
            continue  # (almost) fully occluded or off-image
        ys, xs = np.nonzero(visible)
        x0, y0 = int(xs.min()), int(ys.min())
        bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
        out = {"category": obj.category, "colour": obj.colour, "mask": visible}
        out |= {"bbox": bbox, "area": area}
        if obj.joints is not None:
            out["keypoints"] = _keypoint_visibility(obj.joints, owner, i)
        objects.append(out)
    return img, objects, bg_kind


def _draw_eyes(img: np.ndarray, joints: np.ndarray, colour: str) -> None:
    dot = (255, 255, 255) if colour == "black" else (10, 10, 10)
    h, w = img.shape[:2]
    for x, y in joints[1:3].astype(int):
        if 0 <= x < w - 1 and 0 <= y < h - 1:
            img[y : y + 2, x : x + 2] = dot


def _keypoint_visibility(joints: np.ndarray, owner: np.ndarray, index: int) -> np.ndarray:
    """v=0 (and x=y=0) off-image, v=1 under a later-drawn object, v=2 otherwise."""
    h, w = owner.shape
    kps = np.zeros((len(joints), 3), dtype=np.int64)
    for k, (x, y) in enumerate(joints.astype(int)):
        if not (0 <= x < w and 0 <= y < h):
            continue
        kps[k] = (x, y, 1 if owner[y, x] > index else 2)
    return kps
