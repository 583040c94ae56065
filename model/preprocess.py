"""Letterboxing: the one way images enter the network, in training and in serving.

An image is resized to fit the canvas (aspect kept), placed at the top-left and padded;
the pad mask tells the encoder which features are padding.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image


def fit_scale(size: tuple[int, int], canvas: tuple[int, int]) -> float:
    """Scale that fits an (h, w) image into an (H, W) canvas."""
    return min(canvas[0] / size[0], canvas[1] / size[1])


def letterbox(image: torch.Tensor, canvas: tuple[int, int]
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
