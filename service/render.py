"""Draw a prediction onto its image: masks, boxes, labels, skeletons, caption.

Works from the API response (PredictResponse), so `mad predict --render` shows exactly what a
client of POST /predict gets. The demo page (service/static/index.html) draws the same way
in JavaScript: text scaled to the image, labels kept inside it and off each other, the
caption wrapped on a band below the image.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from service.schemas import Detection, PredictResponse, RLEMask

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive

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
LABEL_TEXT = (0, 0, 0)
BAND = (24, 24, 24)  # the caption band below the image
BAND_TEXT = (255, 255, 255)
# DejaVu Sans where the OS has it (Debian: fonts-dejavu-core); else Pillow's own TrueType
# font, else its bitmap one.
FONT_FILES = ("DejaVuSans.ttf", "dejavu/DejaVuSans.ttf")


def colour(category_id: int) -> tuple[int, int, int]:
    return PALETTE[category_id % len(PALETTE)]


def text_size(width: int, height: int) -> int:
    """Label and caption font size in pixels: about 1/45 of the longer side (40 px on an
    1800 px image, which a screen shows at ~20 px), never under 11 px (a 215 px image)."""
    return max(11, min(72, round(max(width, height) / 45)))


@functools.lru_cache(maxsize=16)
def font(size: int) -> Font:
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)  # Pillow's bundled font (bitmap without FreeType)


def mask_array(mask: RLEMask | list[list[float]], height: int, width: int) -> np.ndarray:
    """RLE or polygons -> bool [H, W]."""
    if isinstance(mask, RLEMask):
        return mask_utils.decode({"size": mask.size, "counts": mask.counts}).astype(bool)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in mask:
        draw.polygon(list(zip(polygon[0::2], polygon[1::2], strict=True)), fill=1)
    return np.asarray(canvas, dtype=bool)


@dataclass(frozen=True)
class Label:
    text: str
    box: Box  # where it was drawn
    rgb: tuple[int, int, int]


def label_text(det: Detection) -> str:
    """A detection's label: its class and score, and its mask's score where it has one (the
    demo page writes the same)."""
    text = f"{det.label} {det.score:.2f}"
    return text if det.mask_score is None else f"{text}, mask {det.mask_score:.2f}"


@dataclass
class Drawing:
    image: Image.Image  # the drawn image; with a caption, taller than the input
    labels: list[Label]  # the detection labels, where they were put
    caption_band: Box | None  # the band added below the input image


def render(
    image: Image.Image, response: PredictResponse, skeleton: list[tuple[int, int]]
) -> Image.Image:
    return draw_prediction(image, response, skeleton).image


def draw_prediction(
    image: Image.Image, response: PredictResponse, skeleton: list[tuple[int, int]]
) -> Drawing:
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
    line = max(1, round(min(width, height) / 250))
    label_font = font(text_size(width, height))
    for det in detections:
        draw.rectangle(det.box, outline=colour(det.category_id), width=line)
        if det.keypoints:
            draw_skeleton(draw, det.keypoints, skeleton, colour(det.category_id), line)
    # Labels last, so nothing covers them; the best-scored are placed first.
    labels: list[Label] = []
    placed: list[Box] = []
    for det in sorted(detections, key=lambda d: -d.score):
        text = label_text(det)
        size = label_extent(draw, text, label_font)
        box = place(size, det.box, (width, height), placed)
        placed.append(box)
        labels.append(Label(text, box, colour(det.category_id)))
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=labels[-1].rgb)
        pad = padding(label_font)
        draw.text((box[0] + pad, box[1] + pad), text, fill=LABEL_TEXT, font=label_font)
    band = None
    if response.caption is not None:
        out, band = add_caption_band(out, response.caption, label_font)
    return Drawing(out, labels, band)


def padding(text_font: Font) -> int:
    return max(2, round(getattr(text_font, "size", 10) / 5))


def label_extent(draw: ImageDraw.ImageDraw, text: str, text_font: Font) -> tuple[int, int]:
    """(width, height) of a label: its text's ink plus padding on every side."""
    _, _, right, bottom = draw.textbbox((0, 0), text, font=text_font)
    pad = padding(text_font)
    return int(np.ceil(right)) + 2 * pad, int(np.ceil(bottom)) + 2 * pad


def overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place(
    size: tuple[int, int],
    anchor: Sequence[float],
    image_size: tuple[int, int],
    taken: list[Box],
) -> Box:
    """Where a label of `size` goes for the detection box `anchor`: above the box, else
    inside its top, below it, inside its bottom; else the free spot nearest the box's
    top-left corner. Always inside the image; over another label only when no free spot
    is left (or the label is wider or taller than the image)."""
    (w, h), (width, height) = size, image_size
    x0, y0, _, y1 = (round(v) for v in anchor)

    def inside(x: int, y: int) -> Box:
        x = min(max(x, 0), max(width - w, 0))
        y = min(max(y, 0), max(height - h, 0))
        return (x, y, x + w, y + h)

    preferred = [inside(x0, y0 - h), inside(x0, y0), inside(x0, y1), inside(x0, y1 - h)]
    for box in preferred:
        if not any(overlaps(box, other) for other in taken):
            return box
    ys = range(0, max(height - h, 0) + 1, max(1, h // 2))
    xs = range(0, max(width - w, 0) + 1, max(1, w // 4))
    near = sorted(itertools.product(xs, ys), key=lambda p: (p[0] - x0) ** 2 + (p[1] - y0) ** 2)
    for x, y in near:
        box = (x, y, x + w, y + h)
        if not any(overlaps(box, other) for other in taken):
            return box
    return preferred[0]


def wrap(text: str, text_font: Font, width: float) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than a line stands alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def add_caption_band(image: Image.Image, caption: str, text_font: Font) -> tuple[Image.Image, Box]:
    """The image with a band added below it holding the caption, wrapped to its width."""
    width, height = image.size
    pad = padding(text_font)
    lines = wrap(caption, text_font, width - 2 * pad)
    ascent, descent = text_font.getmetrics() if hasattr(text_font, "getmetrics") else (10, 2)
    line_height = ascent + descent + pad // 2
    band = (0, height, width, height + len(lines) * line_height + 2 * pad)
    out = Image.new("RGB", (width, band[3]), BAND)
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(lines):
        draw.text((pad, height + pad + i * line_height), text, fill=BAND_TEXT, font=text_font)
    return out, band


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
