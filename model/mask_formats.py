"""Instance masks in the two formats COCO files and the service use: compressed RLE and
polygons.

Both take one bool mask [H, W] in original-image pixels (a CPU torch tensor or a numpy
array), or a `BoxMask`, which holds only its box: a model's mask is False outside the box
of the detection that prompted it, and a large photo's full-size masks would cost H x W
bytes each. RLE is exact; polygons keep only outer boundaries (COCO polygons cannot express
holes). Only numpy and pycocotools here: the data generator's worker processes and the
service import this without the evaluator.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class BoxMask:
    """The mask of an image of `size` (H, W) that is False outside rows top..top+h and columns
    left..left+w, where `crop` (bool [h, w], a CPU tensor) holds it. `quality`: a model's
    confidence in it, in 0..1 (segmentation's `mask_scoring`; 1.0 when not scored)."""

    crop: torch.Tensor
    top: int
    left: int
    size: tuple[int, int]
    quality: float = 1.0

    def full(self) -> torch.Tensor:
        """bool [H, W]: the whole image's mask."""
        import torch

        out = torch.zeros(self.size, dtype=torch.bool)
        h, w = self.crop.shape
        out[self.top : self.top + h, self.left : self.left + w] = self.crop
        return out


def encode_rle(mask: torch.Tensor | np.ndarray | BoxMask) -> dict:
    """bool [H, W] (or a BoxMask) -> COCO compressed RLE {"size": [H, W], "counts": str}.

    `counts` is decoded to an ASCII string so the dict is JSON-ready; pycocotools' decode
    accepts it as is.
    """
    if isinstance(mask, BoxMask):
        rle = box_rle(mask)
    else:
        rle = mask_utils.encode(np.asfortranarray(np.asarray(mask), dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def box_rle(mask: BoxMask) -> dict:
    """A BoxMask's compressed RLE, from the column strip of its box (H x w bytes, not H x W):
    COCO's runs go down each column, so the columns left and right of the box only lengthen
    the first and last runs of zeros."""
    height, width = mask.size
    h, w = mask.crop.shape
    strip = np.zeros((height, w), dtype=np.uint8, order="F")
    strip[mask.top : mask.top + h] = np.asarray(mask.crop)
    flat = strip.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)  # runs start with zeros
    before, after = mask.left * height, (width - mask.left - w) * height
    counts[0] += before  # counts is never empty: an empty strip gives [0]
    if len(counts) % 2:  # ends with zeros
        counts[-1] += after
    elif after:
        counts.append(after)
    return dict(mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width))


def mask_to_polygons(mask: torch.Tensor | np.ndarray | BoxMask) -> list[list[float]]:
    """bool [H, W] -> outer boundaries along pixel edges, flat [x0, y0, x1, y1, ...] each.

    Traced with the mask on the right of each step; at a vertex shared by two diagonal
    pixels the trace turns right, so regions are 4-connected. Holes (counter-clockwise
    loops) are dropped: COCO polygons cannot express them. Vertices are pixel corners, so
    a polygon of an [H, W] mask lies within [0, W] x [0, H].
    """
    if isinstance(mask, BoxMask):  # the crop's polygons, moved to the box
        return [
            [v + (mask.left if i % 2 == 0 else mask.top) for i, v in enumerate(polygon)]
            for polygon in mask_to_polygons(mask.crop)
        ]
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
