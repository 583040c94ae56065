"""Deterministic synthetic datasets in the COCO 2017 layout (`mad data synth`).

Three worlds with the same six categories and COCO layout:
- v2 (default, `v2.py`): domain-randomised shapes and stick figures (styles, colours,
  poses, backgrounds, distractors, empty images, photometric effects, varied captions);
- v3 (`v3.py`): world v2 with 30% of its backgrounds cut from natural images (sample
  images the scikit-image and matplotlib wheels ship, never the photos evaluated on);
- v1 (`v1.py`): the first world, one drawing style, kept byte-for-byte reproducible.
"""

from model.data.synth.common import CATEGORIES, KEYPOINT_NAMES, SKELETON, image_rng
from model.data.synth.writer import (
    DEFAULT_WORLD,
    WORLDS,
    main,
    render_synthetic_image,
    write_synthetic_dataset,
)

__all__ = [
    "CATEGORIES",
    "DEFAULT_WORLD",
    "KEYPOINT_NAMES",
    "SKELETON",
    "WORLDS",
    "image_rng",
    "main",
    "render_synthetic_image",
    "write_synthetic_dataset",
]
