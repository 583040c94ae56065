"""Letterboxing: the one way images enter the network, in training and in serving.

An image is resized to fit the canvas (aspect kept), placed at the top-left and padded;
the pad mask tells the encoder which features are padding. The canvas follows the image's
orientation, as the reference's resizing does (short side 800, long side at most 1333): the
model's canvas (`ModelConfig.image_size`) for landscape and square images, the transposed one
for a portrait image on a landscape canvas (and the other way round), so a portrait photo
runs at 1333x800 on the r50 canvas, not shrunk into 800x1333. A square canvas serves every
image. Coordinate bins span whichever canvas the image ran on.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from model.codecs import DecodeContext

Size = tuple[int, int]  # (height, width)


def image_canvas(size: Size, canvas: Size) -> Size:
    """The canvas an (h, w) image runs on, given the model's (H, W): transposed when the two
    are oriented differently (one taller than wide, the other wider than tall)."""
    (h, w), (H, W) = size, canvas
    return (W, H) if (h - w) * (H - W) < 0 else (H, W)


def canvas_groups(sizes: list[Size], canvas: Size) -> dict[Size, list[int]]:
    """Image (h, w) sizes -> {canvas: indices of the images that run on it}, in first-seen
    order: what one encoder batch may hold."""
    groups: dict[Size, list[int]] = defaultdict(list)
    for i, size in enumerate(sizes):
        groups[image_canvas(size, canvas)].append(i)
    return dict(groups)


def fit_scale(size: Size, canvas: Size) -> float:
    """Scale that fits an (h, w) image into an (H, W) canvas."""
    return min(canvas[0] / size[0], canvas[1] / size[1])


def letterbox(
    image: torch.Tensor, canvas: Size, upscale: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """image uint8 [3, h, w] -> (float [3, H, W] in [0, 1], pad mask [H, W], scale).

    upscale=False only shrinks images that do not fit (training at the scales the
    augmentation chose); serving always fits the image to the canvas."""
    h, w = image.shape[-2:]
    scale = fit_scale((h, w), canvas)
    if not upscale:
        scale = min(scale, 1.0)
    nh, nw = max(1, min(canvas[0], round(h * scale))), max(1, min(canvas[1], round(w * scale)))
    if (nh, nw) != (h, w):
        image = TF.resize(image, [nh, nw], antialias=True)
    out = torch.zeros(3, *canvas)
    out[:, :nh, :nw] = image.float() / 255.0
    pad = torch.ones(canvas, dtype=torch.bool)
    pad[:nh, :nw] = False
    return out, pad, scale


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 [3, h, w]."""
    return TF.pil_to_tensor(image.convert("RGB"))


class ImageBatch(NamedTuple):
    """Letterboxed images ready for the encoder.

    images [B, 3, H, W] float in [0, 1]; pad_mask [B, H, W] True on padding; contexts: how to
    map each image's canvas coordinates back to its pixels.
    """

    images: torch.Tensor
    pad_mask: torch.Tensor
    contexts: list[DecodeContext]


def decode_context(image: Image.Image, canvas: Size) -> DecodeContext:
    """How `image`'s coordinates on its canvas (`image_canvas` of the model's `canvas`) map
    back to its pixels once letterboxed."""
    size = (image.height, image.width)
    own = image_canvas(size, canvas)
    return DecodeContext(own, fit_scale(size, own), size)


def prepare_batch(
    images: list[Image.Image], canvas: Size, device: torch.device | str = "cpu"
) -> ImageBatch:
    """PIL images (at least one) that share a canvas (`canvas_groups`; `canvas` is the
    model's) -> one letterboxed batch. For a CUDA device the batch is written into pinned
    host memory, so the runner's copy to the device does not block the host."""
    groups = canvas_groups([(image.height, image.width) for image in images], canvas)
    if len(groups) > 1:
        raise ValueError(f"images of one batch must share a canvas; these need {list(groups)}")
    contexts = [decode_context(image, canvas) for image in images]
    own = next(iter(groups), canvas)
    canvases, pads = [], []
    for image in images:
        canvas_pixels, pad, _ = letterbox(pil_to_tensor(image), own)
        canvases.append(canvas_pixels)
        pads.append(pad)
    pin = torch.device(device).type == "cuda"
    return ImageBatch(stack(canvases, pin), stack(pads, pin), contexts)


def stack(tensors: list[torch.Tensor], pin: bool) -> torch.Tensor:
    if not pin:
        return torch.stack(tensors)
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
    return torch.stack(tensors, out=out)
