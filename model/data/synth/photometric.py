"""World v2 camera effects on finished pixels: brightness/contrast, blur, noise, JPEG.
Labels are untouched: masks stay what was drawn."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter


def apply_photometric(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """[H, W, 3] float32 in any range -> [H, W, 3] uint8 with random camera effects."""
    if rng.random() < 0.5:
        contrast, brightness = rng.uniform(0.7, 1.25), rng.uniform(-30, 30)
        img = (img - 128) * contrast + 128 + brightness
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if rng.random() < 0.25:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.4)))
    if rng.random() < 0.3:
        noisy = np.asarray(out, np.float32) + rng.normal(
            0, rng.uniform(2, 10), (out.height, out.width, 3)
        )
        out = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        out.save(buffer, format="JPEG", quality=int(rng.integers(25, 86)))
        out = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return np.asarray(out, dtype=np.uint8)
