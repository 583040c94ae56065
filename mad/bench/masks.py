"""Why mask AP is what it is: segmentation's error split into its sources.

    python -m mad.bench.masks --data DATA [--checkpoint checkpoints/mad-tiny] [--images 200]

On the first `--images` images of `--split` it reports COCO mask AP
- as served: the masks of the model's own detections (its default schedules);
- with oracle boxes: every ground-truth instance's box and class prompt a mask sequence, so
  detection errors drop out and what is left is the mask decoder's own;
- of the ground truth itself as training targets hold it (on the model's canvas, through the
  mask_size x mask_size grid of its box) and pasted back: the ceiling the representation
  leaves;
each by object area (COCO's small, medium, large), and with oracle boxes the median IoU of a
predicted mask with its ground truth. The oracle prompts decode on the whole image alone: with
the checkpoint's `segmentation_flip` or `segmentation_zoom` on, "as served" reads two views or
zoomed crops and they do not.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_convert

from mad.bench.diagnosis import run_diagnosis
from model.checkpoint import MAD, load_checkpoint
from model.codecs.base import box_tokens
from model.codecs.segmentation import SegmentationCodec, crop_masks, paste_mask
from model.data.batching import to_canvas
from model.decoding import mask_schedule, masked_decode
from model.evaluate import GroundTruth, coco_ap, evaluate
from model.inference_io import Request
from model.mask_formats import BoxMask, encode_rle
from model.pipeline import Pipeline
from model.preprocess import image_canvas
from model.runner import EagerRunner
from model.stopwatch import Stopwatch

# COCOeval's stats 0-2 and 3-5 for masks: AP, AP50, AP75, small, medium, large.
STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def instances(truth: GroundTruth, image_id: int) -> list[dict]:
    gt = truth.instances
    return [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[image_id], iscrowd=False)) if a["area"]]


def xyxy(anns: list[dict]) -> torch.Tensor:
    """[N, 4] pixel boxes (x0, y0, x1, y1) of COCO annotations (x, y, w, h)."""
    return box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32), "xywh", "xyxy")


def entry(ann: dict, mask: BoxMask, score: float) -> dict[str, Any]:
    return {
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        "segmentation": encode_rle(mask),
        "score": score,
    }


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


@torch.inference_mode()
def prompted_masks(
    pipeline: Pipeline, image: Image.Image, boxes: torch.Tensor, labels: torch.Tensor
) -> tuple[list[BoxMask], torch.Tensor]:
    """The mask decoder prompted by given detections of `image`, as the pipeline prompts it by
    its own: boxes [N, 4] in image pixels, labels [N] class indices -> (the mask of each
    box, [N] the decoder's confidence: the mean over the grid of max(p, 1 - p))."""
    codec = pipeline.mad.codecs["segmentation"]
    assert isinstance(codec, SegmentationCodec)
    memory, [context] = pipeline.encode([Request(image, ("segmentation",))], Stopwatch())
    box_ids = box_tokens(codec.vocab, context.to_canvas(boxes))
    prompts = codec.prompts(torch.cat([box_ids, codec.vocab.class_token(labels)[:, None]], 1))
    default = pipeline.mad.config.schedules.get("segmentation", [])
    index = torch.zeros(len(boxes), dtype=torch.long)
    logits = masked_decode(
        pipeline.runner, memory, codec, prompts, index, mask_schedule(len(default), default)
    ).cpu()
    masks = codec.decode(logits, prompts, [context] * len(boxes), boxes=list(boxes))
    fg = codec.mask_probabilities(logits)
    return masks, torch.maximum(fg, 1 - fg).flatten(1).mean(1)


def oracle_masks(mad: MAD, truth: GroundTruth) -> tuple[list[dict], list[float]]:
    """-> (COCO results, IoU with its ground truth of each mask) of the mask decoder prompted
    by every ground-truth instance's box and class, ranked by the decoder's confidence."""
    pipeline = Pipeline(mad, EagerRunner(mad.required_network()))
    results, ious = [], []
    for image_id in truth.image_ids:
        anns = instances(truth, image_id)
        if not anns:
            continue
        labels = torch.tensor([truth.category_ids.index(a["category_id"]) for a in anns])
        image = truth.image(image_id).convert("RGB")
        masks, confidence = prompted_masks(pipeline, image, xyxy(anns), labels)
        for ann, mask, score in zip(anns, masks, confidence.tolist(), strict=True):
            results.append(entry(ann, mask, score))
            ious.append(iou(mask.full(), torch.from_numpy(truth.instances.annToMask(ann)).bool()))
    return results, ious


def gridded_truth(mad: MAD, truth: GroundTruth) -> list[dict]:
    """Each ground-truth mask as a training target sees it (letterboxed onto the model's
    canvas, cropped to its box's mask_size x mask_size grid: model.data.batching.to_canvas,
    crop_masks) and pasted back into its box on the image, as a perfect decoder's would be."""
    size, results = mad.config.mask_size, []
    for image_id in truth.image_ids:
        anns = instances(truth, image_id)
        if not anns:
            continue
        image = truth.instances.imgs[image_id]
        height, width = int(image["height"]), int(image["width"])
        boxes = xyxy(anns)
        target = {
            "boxes": boxes,
            "labels": torch.zeros(len(anns), dtype=torch.long),
            "masks": torch.from_numpy(np.stack([truth.instances.annToMask(a) for a in anns])),
            "keypoints": torch.zeros(len(anns), 0, 3),
        }
        canvas = image_canvas((height, width), mad.config.image_size)
        blank = torch.zeros(3, height, width, dtype=torch.uint8)
        _, _, normalised = to_canvas(blank, target, canvas)
        grids = crop_masks(normalised["masks"], normalised["boxes"], size)
        for ann, grid, box in zip(anns, grids, boxes, strict=True):
            results.append(entry(ann, paste_mask(grid.float(), box, (height, width)), 1.0))
    return results


def diagnose(checkpoint: Path, data: Path, split: str, images: int) -> dict[str, Any]:
    mad, _ = load_checkpoint(checkpoint)
    if "segmentation" not in mad.codecs:
        raise SystemExit(f"masks: {checkpoint} has no segmentation task")
    truth = GroundTruth.load(data, split, images)
    served = evaluate(mad, data, split, limit=images, tasks=("detection", "segmentation"))
    oracle, ious = oracle_masks(mad, truth)
    ids = truth.image_ids
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "images": len(ids),
        "instances": len(ious),
        "mask_size": mad.config.mask_size,
        "served_AP": served["segm_AP"],
        "oracle": dict(zip(STATS, coco_ap(truth.instances, oracle, "segm", ids, 6), strict=True)),
        "oracle_median_iou": statistics.median(ious) if ious else None,
        "oracle_iou_at_least_0.75": statistics.fmean(i >= 0.75 for i in ious) if ious else None,
    }
    gridded = coco_ap(truth.instances, gridded_truth(mad, truth), "segm", ids, 6)
    report["gridded_truth"] = dict(zip(STATS, gridded, strict=True))
    return report


def print_report(report: dict[str, Any]) -> None:
    print(
        f"mask AP on {report['images']} images, {report['instances']} instances "
        f"({report['checkpoint']})"
    )
    print("| source | AP | AP50 | AP75 | small | medium | large |")
    print("|---|---|---|---|---|---|---|")
    print(f"| own detections (as served) | {report['served_AP']:.3f} | | | | | |")
    m = report["mask_size"]
    for label, key in (
        ("ground-truth boxes", "oracle"),
        (f"(ground truth as trained: on the canvas, {m}x{m} grid)", "gridded_truth"),
    ):
        print(f"| {label} | " + " | ".join(f"{report[key][s]:.3f}" for s in STATS) + " |")
    if report["oracle_median_iou"] is not None:
        print(
            f"\nwith ground-truth boxes: median mask IoU {report['oracle_median_iou']:.3f}, "
            f"{report['oracle_iou_at_least_0.75']:.1%} of masks at IoU >= 0.75"
        )


def main() -> None:
    run_diagnosis(__doc__ or "", diagnose, print_report)


if __name__ == "__main__":
    main()
