"""Letterboxing: the one way images enter the network, in training and in serving.

An image is resized to fit the canvas (aspect kept), placed at the top-left and padded;
the pad mask tells the encoder which features are padding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from model.codecs import DecodeContext


def fit_scale(size: tuple[int, int], canvas: tuple[int, int]) -> float:
    """Scale that fits an (h, w) image into an (H, W) canvas."""
    return min(canvas[0] / size[0], canvas[1] / size[1])


def letterbox(
    image: torch.Tensor, canvas: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """image uint8 [3, h, w] -> (float [3, H, W] in [0, 1], pad mask [H, W], scale)."""
    h, w = image.shape[-2:]
    scale = fit_scale((h, w), canvas)
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


def decode_context(image: Image.Image, canvas: tuple[int, int]) -> DecodeContext:
    """How `image`'s canvas coordinates map back to its pixels once letterboxed."""
    size = (image.height, image.width)
    return DecodeContext(canvas, fit_scale(size, canvas), size)


def prepare_batch(
    images: list[Image.Image], canvas: tuple[int, int], device: torch.device | str = "cpu"
) -> ImageBatch:
    """PIL images (at least one) -> one letterboxed batch. For a CUDA device the batch is
    written into pinned host memory, so the runner's copy to the device does not block the
    host."""
    canvases, pads = [], []
    for image in images:
        canvas_pixels, pad, _ = letterbox(pil_to_tensor(image), canvas)
        canvases.append(canvas_pixels)
        pads.append(pad)
    contexts = [decode_context(image, canvas) for image in images]
    pin = torch.device(device).type == "cuda"
    return ImageBatch(stack(canvases, pin), stack(pads, pin), contexts)


def stack(tensors: list[torch.Tensor], pin: bool) -> torch.Tensor:
    if not pin:
        return torch.stack(tensors)
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
    return torch.stack(tensors, out=out)
