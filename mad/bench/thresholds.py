"""How a request's score threshold trades found objects against wrong boxes: precision,
recall and F1 of the detections kept at each threshold, on a split with ground truth.

    python -m mad.bench.thresholds --data D [--checkpoint C] [--split val2017] [--images N]
        [--json out.json]

A kept detection is right when it overlaps an object of its class by IoU >= 0.5 that no
higher-scored detection of the image matched (COCO's matching at AP50; crowd regions, which
COCO ignores, are left out). COCO AP ranks by score and is blind to a score's scale; the
service's `score_threshold` (0.5 by default) is not, so this says what a caller of the
default gets: e.g. after a change to how scores are computed (`box_confidence_exponent`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.ops import box_convert, box_iou

from mad.bench.diagnosis import Report, run_diagnosis
from model.checkpoint import load_checkpoint
from model.codecs.detection import Detections
from model.evaluate import GroundTruth
from model.inference_io import Request
from model.pipeline import Pipeline
from model.runner import EagerRunner

MATCH_IOU = 0.5
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def matched(detections: Detections, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool [N]: which detections (sorted by score) match a ground-truth object [M, 4] xyxy of
    their class, greedily, each object at most once."""
    hits = torch.zeros(len(detections), dtype=torch.bool)
    if not len(boxes) or not len(detections):
        return hits
    iou = box_iou(detections.boxes.float(), boxes.float())
    iou[detections.labels[:, None] != labels[None, :]] = 0.0
    free = torch.ones(len(boxes), dtype=torch.bool)
    for i in range(len(detections)):
        overlaps = torch.where(free, iou[i], torch.zeros_like(iou[i]))
        best = int(overlaps.argmax())
        if overlaps[best] >= MATCH_IOU:
            hits[i], free[best] = True, False
    return hits


def threshold_report(
    checkpoint: Path,
    data: Path,
    split: str,
    images: int | None,
    thresholds: tuple[float, ...] = THRESHOLDS,
) -> Report:
    mad, _ = load_checkpoint(checkpoint)
    truth = GroundTruth.load(data, split, images)
    pipeline = Pipeline(mad, EagerRunner(mad.required_network()))
    lowest = min(thresholds)
    scores: list[torch.Tensor] = []
    hits: list[torch.Tensor] = []
    objects = 0
    for image_id in truth.image_ids:
        request = Request(truth.image(image_id).convert("RGB"), ("detection",), {}, lowest)
        detections = pipeline([request])[0].required_detections()
        anns = truth.instances.loadAnns(truth.instances.getAnnIds(imgIds=[image_id]))
        anns = [a for a in anns if not a.get("iscrowd")]
        boxes = box_convert(torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4), "xywh", "xyxy")
        labels = torch.tensor([truth.category_ids.index(a["category_id"]) for a in anns])
        objects += len(anns)
        scores.append(detections.scores)
        hits.append(matched(detections, boxes, labels.long()))
    all_scores, all_hits = torch.cat(scores), torch.cat(hits)
    rows = []
    for threshold in thresholds:
        # Matching at the lowest threshold equals matching at each: a detection's match
        # depends only on the higher-scored detections of its image, which every higher
        # threshold keeps too.
        kept = all_scores >= threshold
        right = int((all_hits & kept).sum())
        precision = right / max(int(kept.sum()), 1)
        recall = right / max(objects, 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        rows.append(
            {
                "threshold": threshold,
                "kept": int(kept.sum()),
                "right": right,
                "precision": round(precision, 4),
                "recall": round(recall, 4),
                "f1": round(f1, 4),
            }
        )
    return {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": split,
        "images": len(truth.image_ids),
        "objects": objects,
        "rows": rows,
    }


def print_report(report: Report) -> None:
    print(
        f"{report['images']} images, {report['objects']} objects (IoU >= {MATCH_IOU}, same class)"
    )
    print("| threshold | kept | right | precision | recall | F1 |")
    print("|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(
            f"| {r['threshold']} | {r['kept']} | {r['right']} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['f1']:.3f} |"
        )


def main() -> None:
    run_diagnosis(__doc__ or "", threshold_report, print_report)


if __name__ == "__main__":
    main()
