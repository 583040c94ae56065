"""Why keypoint AP is what it is: the task's error split into its sources.

    python -m mad.bench.keypoints --data DATA [--checkpoint checkpoints/mad-tiny] [--images 200]

On the first `--images` images of `--split` it reports COCO keypoint AP
- as served: prompted by the model's own person detections (default schedule and K=0);
- with oracle boxes: every labelled ground-truth person box prompts a sequence, so detection
  errors drop out and what is left is the keypoint decoder's own localisation;
- of the ground truth itself passed through the coordinate vocabulary (what quantisation to
  bin centres costs; a `coordinate_window` reads points between bins);
and, with oracle boxes, AP by person height in image pixels (where an image is about the
canvas's size, as in the synthetic worlds, that says how many stride-16 feature cells a
person spans), each joint's median error in units of the person's size
(sqrt of its area, as OKS measures it) and how well the visibility tokens separate labelled
from unlabelled joints.
The oracle prompts decode on the whole image alone: with the checkpoint's `keypoints_flip` or
`keypoints_zoom` on, "as served" reads two views or zoomed crops and they do not.
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO

from mad.bench.diagnosis import run_diagnosis
from model.checkpoint import MAD, load_checkpoint
from model.codecs.base import DecodeContext, box_tokens
from model.decoding import mask_schedule, masked_decode
from model.evaluate import GroundTruth, coco_ap, evaluate
from model.inference_io import Request
from model.pipeline import Pipeline
from model.preprocess import fit_scale, image_canvas
from model.runner import EagerRunner
from model.stopwatch import Stopwatch

NO_LIMIT = 10**9
# Person height buckets on the original image, in pixels.
HEIGHT_BUCKETS = ((0, 48), (48, 96), (96, NO_LIMIT))


def keypoint_ap(
    gt: COCO, results: list[dict], image_ids: list[int], heights: tuple[int, int] = (0, NO_LIMIT)
) -> float:
    """COCOeval keypoint AP over `image_ids`, counting only persons whose box height is in
    [heights[0], heights[1]): the others are marked as having no labelled keypoints, which
    COCOeval ignores (with the predictions they match), as it ignores an area range. Give only
    the predictions of persons in range (an unmatched one counts as a false positive)."""
    lo, hi = heights
    if (lo, hi) != (0, NO_LIMIT):
        dataset = copy.deepcopy(gt.dataset)
        for ann in dataset["annotations"]:
            if not lo <= ann["bbox"][3] < hi:
                ann["num_keypoints"] = 0
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = dataset
            gt.createIndex()
    return coco_ap(gt, results, "keypoints", image_ids)[0]


class OracleBoxes:
    """The keypoint decoder prompted by ground-truth person boxes instead of detections."""

    def __init__(self, mad: MAD, truth: GroundTruth) -> None:
        if truth.keypoints is None:
            raise FileNotFoundError(f"{truth.root}: no person_keypoints_{truth.split}.json")
        self.mad, self.truth, self.gt = mad, truth, truth.keypoints
        self.pipeline = Pipeline(mad, EagerRunner(mad.required_network()))
        self.codec = mad.codecs["keypoints"]
        self.person = mad.config.class_names.index(mad.config.person_class)

    def persons(self, image_id: int) -> list[dict]:
        anns = self.gt.loadAnns(self.gt.getAnnIds(imgIds=[image_id], iscrowd=False))
        return [a for a in anns if a.get("num_keypoints", 0) > 0]

    @torch.inference_mode()
    def predict(
        self, image_id: int, schedules: list[int]
    ) -> dict[int, list[tuple[dict, torch.Tensor]]]:
        """K -> (annotation, predicted [K, 3] in pixels) for each labelled person of the
        image, for each refinement length K of `schedules` (the image encoded once)."""
        anns = self.persons(image_id)
        if not anns:
            return {steps: [] for steps in schedules}
        request = Request(self.truth.image(image_id).convert("RGB"), ("keypoints",))
        memory, [context] = self.pipeline.encode([request], Stopwatch())
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes_norm = context.to_canvas(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
        label = torch.full((len(anns), 1), self.codec.vocab.class_token(self.person))
        prompts = self.codec.prompts(
            torch.cat([box_tokens(self.codec.vocab, boxes_norm), label], 1)
        )
        index = torch.zeros(len(anns), dtype=torch.long)
        default = self.mad.config.schedules.get("keypoints", [])
        predictions = {}
        for steps in schedules:
            ratios = mask_schedule(steps, default)
            logits = masked_decode(self.pipeline.runner, memory, self.codec, prompts, index, ratios)
            outputs = self.codec.decode(logits.cpu(), prompts, [context] * len(anns))
            predictions[steps] = list(zip(anns, outputs, strict=True))
        return predictions


def result_entry(ann: dict, keypoints: torch.Tensor, score: float) -> dict[str, Any]:
    return {
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        "keypoints": keypoints.flatten().tolist(),
        "score": score,
    }


def quantised(mad: MAD, truth: GroundTruth, oracle: OracleBoxes) -> list[dict]:
    """The labelled ground truth through the vocabulary's coordinate bins and back, on the
    canvas each image runs on."""
    vocab, entries = mad.codecs["keypoints"].vocab, []
    for image_id in truth.image_ids:
        image = truth.instances.imgs[image_id]
        size = (int(image["height"]), int(image["width"]))
        canvas = image_canvas(size, mad.config.image_size)
        context = DecodeContext(canvas, fit_scale(size, canvas), size)
        for ann in oracle.persons(image_id):
            kp = torch.tensor(ann["keypoints"], dtype=torch.float32).reshape(-1, 3)
            norm = context.to_canvas(kp[:, :2].flatten()).clamp(0, 1)
            pixels = context.to_pixels(vocab.dequantize(vocab.quantize(norm))).reshape(-1, 2)
            entries.append(result_entry(ann, torch.cat([pixels, (kp[:, 2:] > 0).float()], 1), 1.0))
    return entries


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def diagnose(checkpoint: Path, data: Path, split: str, images: int) -> dict[str, Any]:
    mad, _ = load_checkpoint(checkpoint)
    truth = GroundTruth.load(data, split, images)
    oracle = OracleBoxes(mad, truth)
    gt = oracle.gt
    default_steps = len(mad.config.schedules.get("keypoints", []))
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "images": len(truth.image_ids)}
    schedules = sorted({0, default_steps})
    for steps in schedules:
        served = evaluate(
            mad, data, split, limit=images, refine_steps={"keypoints": steps}, tasks=("keypoints",)
        )
        report[f"served_K{steps}"] = served["keypoints_AP"]
    names = mad.config.keypoint_names
    per_image = [oracle.predict(i, schedules) for i in truth.image_ids]
    for steps in schedules:
        predictions = [p for image in per_image for p in image[steps]]
        # Oracle boxes have no detection score: rank each person's keypoints by their mean
        # visibility score (served results are ranked by their detection's score).
        entries = [result_entry(a, kp, float(kp[:, 2].mean())) for a, kp in predictions]
        report[f"oracle_K{steps}"] = keypoint_ap(gt, entries, truth.image_ids)
        if steps != default_steps:
            continue
        by_height: dict[str, float | None] = {}
        persons_by_height: dict[str, int] = {}
        for lo, hi in HEIGHT_BUCKETS:
            bucket = f"{lo}-{hi if hi < NO_LIMIT else ''}px"
            inside = [
                e for (a, _), e in zip(predictions, entries, strict=True) if lo <= a["bbox"][3] < hi
            ]
            persons_by_height[bucket] = len(inside)
            by_height[bucket] = (
                keypoint_ap(gt, inside, truth.image_ids, (lo, hi)) if inside else None
            )
        report["oracle_by_height"], report["persons_by_height"] = by_height, persons_by_height
        errors: list[list[float]] = [[] for _ in names]
        labelled_scores, unlabelled_scores = [], []
        for ann, kp in predictions:
            truth_kp = torch.tensor(ann["keypoints"], dtype=torch.float32).reshape(-1, 3)
            size = max(float(ann["area"]), 1.0) ** 0.5
            for k in range(len(names)):
                if truth_kp[k, 2] > 0:
                    errors[k].append(float((kp[k, :2] - truth_kp[k, :2]).norm()) / size)
                    labelled_scores.append(float(kp[k, 2]))
                else:
                    unlabelled_scores.append(float(kp[k, 2]))
        report["median_error_per_joint"] = {
            name: statistics.median(e) if e else None for name, e in zip(names, errors, strict=True)
        }
        report["visibility"] = {
            "labelled_mean_score": mean(labelled_scores),
            "unlabelled_mean_score": mean(unlabelled_scores),
            "labelled_scored_visible": mean([float(s > 0.5) for s in labelled_scores]),
            "unlabelled_scored_visible": mean([float(s > 0.5) for s in unlabelled_scores]),
        }
    report["quantised_truth"] = keypoint_ap(gt, quantised(mad, truth, oracle), truth.image_ids)
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"keypoint AP on {report['images']} images ({report['checkpoint']})")
    print("| prompted by | schedule | keypoints AP |")
    print("|---|---|---|")
    for key, value in report.items():
        if key.startswith(("served_K", "oracle_K")):
            source, steps = key.split("_K")
            label = "own detections" if source == "served" else "ground-truth boxes"
            print(f"| {label} | K={steps} | {value:.3f} |")
    print(f"| (ground truth through the coordinate bins) | - | {report['quantised_truth']:.3f} |")
    print("\nwith ground-truth boxes, by person height:")
    for bucket, ap in report["oracle_by_height"].items():
        shown = "-" if ap is None else f"{ap:.3f}"
        print(f"  {bucket:>9}: AP {shown} ({report['persons_by_height'][bucket]} persons)")
    print("\nmedian error per joint, in units of the person's size (sqrt(area)):")
    for name, error in report["median_error_per_joint"].items():
        print(f"  {name:>15}: {'-' if error is None else f'{error:.3f}'}")
    shares = {k: "-" if v is None else f"{v:.1%}" for k, v in report["visibility"].items()}
    print(
        "\nvisibility: labelled joints scored visible (>0.5) "
        f"{shares['labelled_scored_visible']}, unlabelled {shares['unlabelled_scored_visible']}"
    )


def main() -> None:
    run_diagnosis(__doc__ or "", diagnose, print_report)


if __name__ == "__main__":
    main()
