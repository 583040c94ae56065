"""Draw a prediction onto its image: masks, boxes, labels, skeletons, caption.

Works from the API response (PredictResponse), so `mad predict --render` shows exactly what a
client of POST /predict gets. The demo page draws the same things in JavaScript.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from service.schemas import PredictResponse, RLEMask

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
]
KEYPOINT_MIN_SCORE = 0.3  # below this a keypoint is treated as not visible
MASK_OPACITY = 0.45


def colour(category_id: int) -> tuple[int, int, int]:
    return PALETTE[category_id % len(PALETTE)]


def mask_array(mask: RLEMask | list[list[float]], height: int, width: int) -> np.ndarray:
    """RLE or polygons -> bool [H, W]."""
    if isinstance(mask, RLEMask):
        return mask_utils.decode({"size": mask.size, "counts": mask.counts}).astype(bool)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in mask:
        draw.polygon(list(zip(polygon[0::2], polygon[1::2], strict=True)), fill=1)
    return np.asarray(canvas, dtype=bool)


def render(
    image: Image.Image, response: PredictResponse, skeleton: list[tuple[int, int]]
) -> Image.Image:
    image = image.convert("RGB")
    width, height = image.size
    pixels = np.asarray(image, dtype=np.float32).copy()
    detections = response.detections or []
    for det in detections:
        if det.mask is not None:
            where = mask_array(det.mask, height, width)
            pixels[where] = pixels[where] * (1 - MASK_OPACITY) + (
                np.array(colour(det.category_id)) * MASK_OPACITY
            )
    out = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    line = max(1, round(min(width, height) / 250))
    for det in detections:
        rgb = colour(det.category_id)
        x0, y0, x1, y1 = det.box
        draw.rectangle([x0, y0, x1, y1], outline=rgb, width=line)
        text = f"{det.label} {det.score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        label_y = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        draw.rectangle([x0, label_y, x0 + right - left + 4, label_y + bottom - top + 2], fill=rgb)
        draw.text((x0 + 2, label_y), text, fill=(0, 0, 0), font=font)
        if det.keypoints:
            draw_skeleton(draw, det.keypoints, skeleton, rgb, line)
    if response.caption is not None:
        draw_caption(draw, response.caption, width, height, font)
    return out


def draw_skeleton(
    draw: ImageDraw.ImageDraw,
    keypoints: list[list[float]],
    skeleton: list[tuple[int, int]],
    rgb: tuple[int, int, int],
    line: int,
) -> None:
    visible = [kp[2] >= KEYPOINT_MIN_SCORE for kp in keypoints]
    for a, b in skeleton:
        if a < len(keypoints) and b < len(keypoints) and visible[a] and visible[b]:
            draw.line([tuple(keypoints[a][:2]), tuple(keypoints[b][:2])], fill=rgb, width=line + 1)
    radius = line + 2
    for (x, y, _), shown in zip(keypoints, visible, strict=True):
        if shown:
            draw.ellipse(
                [x - radius, y - radius, x + radius, y + radius], fill=(255, 255, 255), outline=rgb
            )


def draw_caption(
    draw: ImageDraw.ImageDraw, caption: str, width: int, height: int, font: Font
) -> None:
    _, top, _, bottom = draw.textbbox((0, 0), caption, font=font)
    band = bottom - top + 8
    draw.rectangle([0, height - band, width, height], fill=(0, 0, 0))
    draw.text((4, height - band + 3), caption, fill=(255, 255, 255), font=font)
