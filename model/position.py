"""2D sine position encoding of the image features (as DETR)."""

from __future__ import annotations

import math

import torch


def sine_position_encoding(pad_mask: torch.Tensor, dim: int, temperature: float = 10000.0
                           ) -> torch.Tensor:
    """pad_mask [B, H, W] (True = padding) -> [B, dim, H, W] position encoding.

    Positions are normalised by the unpadded extent of each image, so the same pixel of the
    image content gets the same code whatever the padding.
    """
    not_pad = (~pad_mask).float()
    y = not_pad.cumsum(1)
    x = not_pad.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    half = dim // 2
    freqs = torch.arange(half, dtype=torch.float, device=pad_mask.device)
    freqs = temperature ** (2 * torch.div(freqs, 2, rounding_mode="floor") / half)
    px, py = x[..., None] / freqs, y[..., None] / freqs
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], 4).flatten(3)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], 4).flatten(3)
    return torch.cat([py, px], 3).permute(0, 3, 1, 2)
