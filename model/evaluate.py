"""Evaluation with the real evaluators: pycocotools COCOeval (bbox, segm, keypoints) and
sacrebleu BLEU-4 against all reference captions."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import sacrebleu
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.checkpoint import MAD
from model.mask_formats import encode_rle
from model.pipeline import Pipeline, Request
from model.runner import EagerRunner

METRICS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "keypoints_AP", "caption_BLEU4")


def quiet_coco(path: Path) -> COCO | None:
    if not path.is_file():
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def coco_results(result, image_id: int, category_ids: list[int]):
    """One pipeline Result -> COCO result lists (bbox, segm, keypoints)."""
    boxes, segms, kpts = [], [], []
    dets = result.detections
    for j in range(len(dets) if dets is not None else 0):
        x0, y0, x1, y1 = dets.boxes[j].tolist()
        common = {"image_id": image_id, "category_id": category_ids[int(dets.labels[j])],
                  "score": float(dets.scores[j])}
        boxes.append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
        if result.masks is not None:
            segms.append({**common, "segmentation": encode_rle(result.masks[j])})
        if result.keypoints is not None and result.keypoints[j] is not None:
            kp = result.keypoints[j]
            kpts.append({**common, "keypoints": kp.flatten().tolist()})
    return boxes, segms, kpts


def coco_ap(gt: COCO | None, results: list[dict], iou_type: str, image_ids: list[int]
            ) -> list[float]:
    """COCOeval stats (AP, AP50, AP75, ...) or zeros when there is nothing to compare."""
    if gt is None or not results:
        return [0.0] * 3
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [max(0.0, float(s)) for s in evaluator.stats[:3]]


def caption_bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] against every reference of each image."""
    if not hypotheses:
        return 0.0
    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references]
               for i in range(width)]
    return sacrebleu.corpus_bleu(hypotheses, streams).score / 100.0


def evaluate(mad: MAD, data: Path, split: str = "val2017", device: str = "cpu",
             refine_steps: dict[str, int] | None = None, limit: int | None = None,
             batch_size: int = 8, score_threshold: float = 0.05,
             tasks: tuple[str, ...] | None = None) -> dict[str, float]:
    """Metrics of the asked `tasks` (default: all the model's) on the first `limit` images.
    bbox AP is reported whenever detection runs, i.e. also for segmentation and keypoints."""
    data = Path(data)
    instances = quiet_coco(data / "annotations" / f"instances_{split}.json")
    if instances is None:
        raise FileNotFoundError(data / "annotations" / f"instances_{split}.json")
    keypoint_gt = quiet_coco(data / "annotations" / f"person_keypoints_{split}.json")
    captions: dict[int, list[str]] = {}
    caption_file = data / "annotations" / f"captions_{split}.json"
    if caption_file.is_file():
        for ann in json.loads(caption_file.read_text())["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    category_ids = [c["id"] for c in sorted(instances.loadCats(instances.getCatIds()),
                                            key=lambda c: c["id"])]
    image_ids = sorted(instances.imgs)[:limit]
    pipeline = Pipeline(mad, EagerRunner(mad.network, device))
    tasks = pipeline.tasks_to_run(tuple(tasks or mad.config.tasks))
    boxes, segms, kpts, hyps, refs = [], [], [], [], []
    for start in range(0, len(image_ids), batch_size):
        chunk = image_ids[start : start + batch_size]
        requests = []
        for image_id in chunk:
            info = instances.imgs[image_id]
            image = Image.open(data / split / info["file_name"]).convert("RGB")
            requests.append(Request(image, tasks, dict(refine_steps or {}), score_threshold,
                                    mad.config.num_slots))
        for image_id, result in zip(chunk, pipeline(requests), strict=True):
            b, s, k = coco_results(result, image_id, category_ids)
            boxes += b
            segms += s
            kpts += k
            if result.caption is not None and captions.get(image_id):
                hyps.append(result.caption)
                refs.append(captions[image_id])
    metrics = {}
    if "detection" in tasks:
        bbox = coco_ap(instances, boxes, "bbox", image_ids)
        metrics |= {"bbox_AP": bbox[0], "bbox_AP50": bbox[1], "bbox_AP75": bbox[2]}
    if "segmentation" in tasks:
        metrics["segm_AP"] = coco_ap(instances, segms, "segm", image_ids)[0]
    if "keypoints" in tasks:
        metrics["keypoints_AP"] = coco_ap(keypoint_gt, kpts, "keypoints", image_ids)[0]
    if "caption" in tasks:
        metrics["caption_BLEU4"] = caption_bleu4(hyps, refs)
    return metrics


def format_table(metrics: dict[str, float]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {value:.3f} |" for name, value in metrics.items()]
    return "\n".join(lines)
