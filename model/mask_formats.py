"""Instance masks in the two formats COCO files and the service use: compressed RLE and
polygons.

Both take one bool mask [H, W] in original-image pixels (a CPU torch tensor or a numpy
array). RLE is exact; polygons keep only outer boundaries (COCO polygons cannot express
holes). Only numpy and pycocotools here: the data generator's worker processes and the
service import this without the evaluator.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:
    import torch


def encode_rle(mask: torch.Tensor | np.ndarray) -> dict:
    """bool [H, W] -> COCO compressed RLE {"size": [H, W], "counts": str}.

    `counts` is decoded to an ASCII string so the dict is JSON-ready; pycocotools' decode
    accepts it as is.
    """
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_to_polygons(mask: torch.Tensor | np.ndarray) -> list[list[float]]:
    """bool [H, W] -> outer boundaries along pixel edges, flat [x0, y0, x1, y1, ...] each.

    Traced with the mask on the right of each step; at a vertex shared by two diagonal
    pixels the trace turns right, so regions are 4-connected. Holes (counter-clockwise
    loops) are dropped: COCO polygons cannot express them. Vertices are pixel corners, so
    a polygon of an [H, W] mask lies within [0, W] x [0, H].
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1]
    successors: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    # (neighbour offset, edge start corner, edge direction) per side of a pixel at (row, col).
    sides = (
        ((-1, 0), (0, 0), (1, 0)),  # top edge, heading +x
        ((0, 1), (1, 0), (0, 1)),  # right edge, heading +y
        ((1, 0), (1, 1), (-1, 0)),  # bottom edge, heading -x
        ((0, -1), (0, 1), (0, -1)),
    )  # left edge, heading -y
    h, w = mask.shape
    for (dr, dc), (sx, sy), (dx, dy) in sides:
        neighbour = padded[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]
        rows, cols = np.nonzero(inside & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            successors[(c + sx, r + sy)].append((dx, dy))
    polygons = []
    while successors:
        start = next(iter(successors))
        first = successors[start][0]
        loop, point, heading = [], start, None
        while True:
            options = list(successors.get(point, ()))
            closing = point == start and heading is not None
            if closing:
                options.append(first)  # taken already, but the turn rule may pick it again
            step = options[0]
            if len(options) > 1 and heading is not None:
                right = (-heading[1], heading[0])
                step = right if right in options else options[0]
            if closing and step == first:
                break
            successors[point].remove(step)
            if not successors[point]:
                del successors[point]
            if step != heading:
                loop.append(point)  # corners only: straight runs collapse
            heading = step
            point = (point[0] + step[0], point[1] + step[1])
        if len(loop) >= 3 and signed_area(loop) > 0:
            polygons.append([float(v) for xy in loop for v in xy])
    return polygons


def signed_area(points: list[tuple[int, int]]) -> float:
    """Shoelace area of [(x, y), ...]; positive for loops that run clockwise on screen
    (y down)."""
    xy = np.asarray(points, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
