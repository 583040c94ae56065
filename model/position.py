"""2D sine position encoding of the image features (as DETR)."""

from __future__ import annotations

import math

import torch


def sine_position_encoding(
    pad_mask: torch.Tensor, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """pad_mask [B, H, W] (True = padding) -> [B, dim, H, W] position encoding.

    Positions are fractions of the whole (letterboxed) canvas, not of each image's unpadded
    extent as in DETR: coordinate tokens are binned over the canvas, so a feature's code then
    says directly which bins it covers, whatever the image's aspect ratio.
    """
    B, H, W = pad_mask.shape
    scale = 2 * math.pi
    ys = (torch.arange(H, dtype=torch.float, device=pad_mask.device) + 0.5) / H * scale
    xs = (torch.arange(W, dtype=torch.float, device=pad_mask.device) + 0.5) / W * scale
    y = ys.view(1, H, 1).expand(B, H, W)
    x = xs.view(1, 1, W).expand(B, H, W)
    half = dim // 2
    freqs = torch.arange(half, dtype=torch.float, device=pad_mask.device)
    freqs = temperature ** (2 * torch.div(freqs, 2, rounding_mode="floor") / half)
    px, py = x[..., None] / freqs, y[..., None] / freqs
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], 4).flatten(3)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], 4).flatten(3)
    return torch.cat([py, px], 3).permute(0, 3, 1, 2)
