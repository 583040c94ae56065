"""A pipeline Result -> the JSON-ready response (masks as COCO RLE or polygons)."""

from __future__ import annotations

from model.mask_formats import encode_rle, mask_to_polygons
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
                detection.mask = mask_to_polygons(mask)
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
