"""A contact sheet of generated images with their labels drawn on (`mad data sheet`): the
quickest way to see what a world looks like and whether its labels sit on its pixels."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.data.synth.common import CATEGORIES, SKELETON, image_rng
from model.data.synth.writer import DEFAULT_WORLD, render_synthetic_image

CELL = 256
CAPTION_HEIGHT = 30
# One outline colour per category, distinct from each other on most backgrounds.
CATEGORY_COLOURS = [
    (255, 0, 255),
    (0, 255, 0),
    (255, 255, 0),
    (0, 255, 255),
    (255, 128, 0),
    (255, 255, 255),
]


def _labelled(world: str, seed: int, index: int) -> Image.Image:
    img, objects, captions = render_synthetic_image(image_rng(seed, "sheet", index), world)
    h, w = img.shape[:2]
    scale = CELL / max(h, w)
    tinted = img.astype(np.float32)
    for obj in objects:  # masks as a light tint of the category colour
        tint = np.array(CATEGORY_COLOURS[CATEGORIES.index(obj["category"])], np.float32)
        tinted[obj["mask"]] = 0.7 * tinted[obj["mask"]] + 0.3 * tint
    picture = Image.fromarray(tinted.astype(np.uint8)).resize(
        (round(w * scale), round(h * scale)), Image.Resampling.NEAREST
    )
    d = ImageDraw.Draw(picture)
    for obj in objects:
        colour = CATEGORY_COLOURS[CATEGORIES.index(obj["category"])]
        x, y, bw, bh = (v * scale for v in obj["bbox"])
        d.rectangle([x, y, x + bw - 1, y + bh - 1], outline=colour)
        d.text((x + 1, y + 1), obj["category"][:3], fill=colour)
        if "keypoints" in obj:
            kps = obj["keypoints"].astype(np.float32)
            pts = (kps[:, :2] + 0.5) * scale
            for a, b in SKELETON:
                if kps[a - 1, 2] > 0 and kps[b - 1, 2] > 0:
                    d.line([tuple(pts[a - 1]), tuple(pts[b - 1])], fill=(255, 0, 0), width=1)
            for (px, py), v in zip(pts, kps[:, 2], strict=True):
                if v > 0:  # filled: visible, hollow: hidden
                    fill = (255, 0, 0) if v == 2 else None
                    d.ellipse([px - 2, py - 2, px + 2, py + 2], outline=(255, 0, 0), fill=fill)
    cell = Image.new("RGB", (CELL, CELL + CAPTION_HEIGHT), (32, 32, 32))
    cell.paste(picture, (0, 0))
    text = "\n".join(textwrap.wrap(captions[0], 42)[:2])
    ImageDraw.Draw(cell).multiline_text((2, CELL + 2), text, fill=(230, 230, 230), spacing=1)
    return cell


def contact_sheet(world: str = DEFAULT_WORLD, seed: int = 0, count: int = 16) -> Image.Image:
    """`count` images of `world` in a grid, with boxes, keypoints (filled: visible, hollow:
    hidden), tinted masks and each image's first caption."""
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    sheet = Image.new("RGB", (columns * CELL, rows * (CELL + CAPTION_HEIGHT)), (0, 0, 0))
    for i in range(count):
        r, c = divmod(i, columns)
        sheet.paste(_labelled(world, seed, i), (c * CELL, r * (CELL + CAPTION_HEIGHT)))
    return sheet


def main(out: Path, world: str = DEFAULT_WORLD, seed: int = 0, count: int = 16) -> None:
    """CLI entry (`mad data sheet`)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(world, seed, count).save(out)
    print(f"wrote a contact sheet of {count} world {world} images to {out}")
