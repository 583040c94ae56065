"""World v3: world v2 with natural backgrounds.

A share of the images (PHOTO_SHARE) is drawn on a crop of a natural image instead of a
procedural background: textures (brick, grass, gravel), microscopy (cells, retina, tissue)
and a portrait photo, recoloured, rescaled and flipped. Everything
else is world v2's. A model that has only seen procedural backgrounds answers a real photo
with confident boxes; these teach it that natural clutter holds none of its objects (a real
person in a crop is background too: the "person" category is a stick figure).

The sources are sample images the scikit-image and matplotlib wheels ship (nothing is
downloaded) and never the photos `python -m mad.bench.photos` evaluates on, nor a view of
the same scene (scikit-image's motorcycle_right is motorcycle_left's stereo twin).
Captions call such a background "noisy" (a word world v2 already uses, so a v2 tokenizer
reads v3 captions). The pixels depend on the sample files and on Pillow's decoding and
resizing, so a v3 dataset is reproduced exactly under the pinned versions (constraints.txt).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from model.data.synth import backgrounds, v2
from model.startup import StartupError

PHOTO_SHARE = 0.3
CAPTION_WORD = "noisy"
MIN_CROP = 96  # pixels of the source on the crop's shorter side: smaller is only blur
# (package, file in its sample data)
SOURCES = (
    ("skimage", "brick.png"),
    ("skimage", "grass.png"),
    ("skimage", "gravel.png"),
    ("skimage", "retina.jpg"),
    ("skimage", "cell.png"),
    ("skimage", "ihc.png"),
    ("matplotlib", "grace_hopper.jpg"),
)
DISTRIBUTIONS = {"skimage": "scikit-image", "matplotlib": "matplotlib"}


def source_path(package: str, name: str) -> Path:
    """Where the installed wheel keeps a sample image (scikit-image: the dev extra;
    matplotlib: the bench extra)."""
    try:
        if package == "skimage":
            import skimage

            return Path(skimage.__file__).parent / "data" / name
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / name
    except ImportError as exc:
        raise StartupError(
            f"world v3 draws on {DISTRIBUTIONS[package]}'s sample images, which is not "
            "installed: pip install -e '.[dev,bench]'"
        ) from exc


@functools.cache
def _sources() -> tuple[Image.Image, ...]:
    """The source images in RGB, read once per process."""
    images = []
    for source in SOURCES:
        path = source_path(*source)
        if not path.is_file():
            raise StartupError(f"world v3's source image {path} is missing: reinstall its package")
        images.append(Image.open(path).convert("RGB"))
    return tuple(images)


def check_sources() -> None:
    """Raise StartupError now, before anything is written, if a source image is missing."""
    _sources()


def photo_background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """A w x h view of a random source: a crop of the canvas's aspect, 25-100% of the largest
    that fits (at least MIN_CROP source pixels high and wide), flipped at random, with
    per-channel gains (a grey texture comes out tinted), contrast and brightness jitter.
    -> ([H, W, 3] float32 pixels, the caption word)."""
    source = _sources()[int(rng.integers(len(SOURCES)))]
    sw, sh = source.size
    aspect = w / h
    largest_w = min(sw, sh * aspect)  # the largest crop of this aspect inside the source
    smallest = min(1.0, MIN_CROP / min(largest_w, largest_w / aspect))
    scale = rng.uniform(max(0.25, smallest), 1.0)
    cw, ch = scale * largest_w, scale * largest_w / aspect
    x0, y0 = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
    crop = source.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    pixels = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    if rng.random() < 0.3:
        pixels = pixels[::-1]
    gains = rng.uniform(0.55, 1.25, size=3).astype(np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.6, 1.2) + mean
    pixels = pixels * gains + rng.normal(0, 15)
    return np.clip(pixels, 0, 255).astype(np.float32), CAPTION_WORD


def mixed_background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    if rng.random() < PHOTO_SHARE:
        return photo_background(rng, w, h)
    return backgrounds.render_background(rng, w, h)


def render_image(rng: np.random.Generator) -> tuple[np.ndarray, list[dict], list[str]]:
    """One v3 image: (HxWx3 uint8, visible objects, five captions)."""
    return v2.render_image(rng, background=mixed_background)
