"""Zoomed crops: each kept detection gets a crop of its image around its box, enlarged to the
model's canvas, on which the tasks that read crops decode it.

On a 256 canvas a small object or person spans one or two cells of the stride-16 memory, and
boxes, masks and keypoints are placed from features that coarse; a crop around the box,
enlarged, gives the model the view it has of large objects (as top-down pose estimators crop
each person). A task reads the crops with its zoom option (`TaskCodec.zoom_option`, e.g.
`keypoints_zoom`): detection re-reads each box on its crop (`DetectionCodec.reread`), masks
and keypoints decode each detection's sequence on it. The config's `zoom` is the most a crop
is enlarged over the whole image's own view, `zoom_context` how many times the box's size it
spans. A crop has the canvas's shape, so it fills the canvas; it is shifted to lie inside the
image and cut where the image ends. Where no crop would enlarge the box, the whole image is
read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.codecs.base import DecodeContext
from model.codecs.detection import mirror_boxes
from model.config import ModelConfig
from model.preprocess import Size, fit_scale, image_canvas

Window = tuple[int, int, int, int]  # left, top, right, bottom: pixels of the image
MIN_CROP = 2  # pixels: a crop of a tiny image is no crop


@dataclass(frozen=True)
class Zoom:
    """most: the largest enlargement over the image's own view (> 1); context: the crop's size
    over the box's (at least 1)."""

    most: float
    context: float


def crop_zoom(config: ModelConfig) -> Zoom:
    """The crops' geometry a model's config sets (`zoom`, `zoom_context`)."""
    return Zoom(config.zoom, config.zoom_context)


def zoom_window(box: torch.Tensor, image_size: Size, canvas: Size, zoom: Zoom) -> Window | None:
    """The crop of an (H, W) image that a box [4] (x0, y0, x1, y1 pixels) decodes on, the model
    canvas being `canvas` (H, W); None when the crop would be the whole image."""
    height, width = image_size
    canvas_h, canvas_w = image_canvas(image_size, canvas)  # the crop has the image's canvas
    x0, y0, x1, y1 = box.tolist()
    whole = 1 / fit_scale(image_size, (canvas_h, canvas_w))  # image pixels per canvas pixel
    # Image pixels per canvas pixel in the crop: enough for the box and its context, no
    # fewer than `most` times fewer than the whole image's.
    per_pixel = max(
        zoom.context * (x1 - x0) / canvas_w, zoom.context * (y1 - y0) / canvas_h, whole / zoom.most
    )
    if per_pixel >= whole:
        return None
    crop_w = min(width, math.ceil(per_pixel * canvas_w))
    crop_h = min(height, math.ceil(per_pixel * canvas_h))
    if min(crop_w, crop_h) < MIN_CROP:
        return None
    if crop_w == crop_h and (canvas_h - canvas_w) * (canvas[0] - canvas[1]) < 0:
        # Cut square, a crop of an image on the transposed canvas would run on the model's.
        crop_w, crop_h = (crop_w - 1, crop_h) if canvas_h > canvas_w else (crop_w, crop_h - 1)
    left = min(max(0, round((x0 + x1 - crop_w) / 2)), width - crop_w)
    top = min(max(0, round((y0 + y1 - crop_h) / 2)), height - crop_h)
    return left, top, left + crop_w, top + crop_h


def window_context(window: Window, image_size: Size, canvas: Size) -> DecodeContext:
    """How the crop `window` of an (H, W) image maps from its canvas to the image's pixels."""
    left, top, right, bottom = window
    size = (bottom - top, right - left)
    own = image_canvas(size, canvas)
    return DecodeContext(own, fit_scale(size, own), size, (left, top), image_size)


def mirror_in(context: DecodeContext, boxes: torch.Tensor) -> torch.Tensor:
    """Pixel boxes [..., 4] of the image -> where they lie on the mirror image of what
    `context` saw (a crop: mirrored within the crop), in the image's pixels."""
    shift = torch.tensor(context.origin, dtype=boxes.dtype).repeat(2)
    return (
        mirror_boxes((boxes - shift).reshape(-1, 4), context.image_size[1]).reshape(boxes.shape)
        + shift
    )
