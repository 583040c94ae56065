"""Untrusted bytes -> an upright 8-bit RGB image, or a clear client error.

Everything here treats its input as hostile: any failure inside Pillow is the client's bad
image (400), never a server error, and the pixel count is checked from the header before any
pixel is decoded (decompression bombs -> 413).
"""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
from PIL import Image, ImageOps

from service.errors import APIError

# Modes Pillow's convert("RGB") would clip or mangle: rescale to 8 bits ourselves.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def invalid(message: str) -> APIError:
    return APIError(400, "invalid_image", message)


def too_many_pixels(width: int, height: int, limit: int) -> APIError:
    return APIError(
        413,
        "image_too_large",
        f"image is {width}x{height} = {width * height} pixels; the limit is {limit}",
    )


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image: first frame, EXIF orientation applied, RGB."""
    if not data:
        raise invalid("the image file is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over Pillow's own limit, twice its default
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "more pixels than Pillow opens"
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))  # the lower holds
        raise APIError(413, "image_too_large", f"image has {size}; the limit is {limit}") from exc
    except Exception as exc:
        raise invalid("not an image Pillow can read (corrupt or unsupported format)") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise too_many_pixels(width, height, max_pixels)
    if width < 1 or height < 1:
        raise invalid(f"image has no pixels ({width}x{height})")
    try:
        image.seek(0)  # animated: the first frame
        image.load()  # decode now: truncated data fails here, not later in the model thread
        return to_rgb(ImageOps.exif_transpose(image))
    except APIError:
        raise
    except Exception as exc:
        raise invalid(f"the image could not be decoded: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in WIDE_MODES:
        image = Image.fromarray(rescale_to_uint8(np.asarray(image)))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas become white, as an image viewer would show them.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def rescale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """16-bit / 32-bit / float grayscale -> uint8, keeping relative brightness."""
    is_float = pixels.dtype.kind == "f"
    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    values = np.clip(values, 0, None)
    peak = float(values.max()) if values.size else 0.0
    full_scale = 1.0 if is_float else 65535.0  # float images are 0..1 by convention
    top = max(full_scale, peak)
    return np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def image_key(data: bytes) -> str:
    """What the feature cache knows an upload by: the SHA-256 of its bytes (~10 ms for
    20 MiB)."""
    return hashlib.sha256(data).hexdigest()
