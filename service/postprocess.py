"""A pipeline Result -> the JSON-ready response (masks as COCO RLE or polygons)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from model.evaluate import encode_rle
from model.pipeline import Result
from service.schemas import Detection, ImageSize, ModelRef, PredictResponse, RLEMask

MODEL_STAGES = ("preprocess", "encode")


def detections_json(result: Result, class_names: list[str], mask_format: str
                    ) -> list[Detection]:
    dets = result.detections
    out = []
    for j in range(len(dets)):
        label = int(dets.labels[j])
        detection = Detection(label=class_names[label], category_id=label,
                              score=round(float(dets.scores[j]), 5),
                              box=[round(v, 2) for v in dets.boxes[j].tolist()])
        if result.masks is not None and result.masks[j] is not None:
            mask = result.masks[j]
            if mask_format == "polygon":
                detection.mask = mask_to_polygons(mask.numpy())
            else:
                detection.mask = RLEMask(**encode_rle(mask))
        if result.keypoints is not None and result.keypoints[j] is not None:
            detection.keypoints = [[round(v, 2) for v in point]
                                   for point in result.keypoints[j].tolist()]
        out.append(detection)
    return out


def build_response(result: Result, model: ModelRef, class_names: list[str],
                   mask_format: str, timings: dict[str, float]) -> PredictResponse:
    """`timings` (seconds, from the service: queue, decode) are merged with the model's."""
    return PredictResponse(
        model=model,
        image=ImageSize(width=result.image_size[1], height=result.image_size[0]),
        tasks=list(result.tasks),
        detections=(detections_json(result, class_names, mask_format)
                    if result.detections is not None else None),
        caption=result.caption,
        decoder_passes={task: result.passes.get(task, 0) for task in result.tasks},
        timings_ms={k: round(v * 1000, 3) for k, v in timings.items()},
    )


def request_stages(result: Result) -> dict[str, float]:
    """Model stages that concern this request. A batch's timings cover every task anyone in
    it asked for; the others' tasks are not this request's latency."""
    return {k: v for k, v in result.timings.items() if k in MODEL_STAGES or k in result.tasks}


# --- polygons ---------------------------------------------------------------------------
def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """bool [H, W] -> outer boundaries along pixel edges, flat [x0, y0, x1, y1, ...] each.

    Traced with the mask on the right of each step; at a vertex shared by two diagonal
    pixels the trace turns right, so regions are 4-connected. Holes (counter-clockwise
    loops) are dropped: COCO polygons cannot express them.
    """
    padded = np.pad(mask.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    successors: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    # (neighbour offset, edge start corner, edge direction) per side of a pixel at (row, col).
    sides = (((-1, 0), (0, 0), (1, 0)),   # top edge, heading +x
             ((0, 1), (1, 0), (0, 1)),    # right edge, heading +y
             ((1, 0), (1, 1), (-1, 0)),   # bottom edge, heading -x
             ((0, -1), (0, 1), (0, -1)))  # left edge, heading -y
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
    """Shoelace area; positive for loops that run clockwise on screen (y down)."""
    xy = np.asarray(points, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))

