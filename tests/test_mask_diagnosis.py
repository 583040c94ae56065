"""The mask diagnosis bench (mad.bench.masks): prompting the mask decoder with given boxes
reproduces the served masks of the same detections, and the ground truth through the
training targets' grid is near perfect, but not exactly, and far above an untrained decoder."""

from __future__ import annotations

import pytest
import torch

from mad.bench.masks import STATS, diagnose, gridded_truth, iou, prompted_masks
from model.checkpoint import load_checkpoint
from model.evaluate import GroundTruth, coco_ap
from model.inference_io import Request
from model.pipeline import Pipeline
from model.runner import EagerRunner


def test_given_boxes_prompt_masks_as_served_detections_do(micro_model, synth_data):
    truth = GroundTruth.load(synth_data, "val2017")
    pipeline = Pipeline(micro_model, EagerRunner(micro_model.required_network()))
    compared = 0
    for image_id in truth.image_ids:
        image = truth.image(image_id).convert("RGB")
        request = Request(image, ("detection", "segmentation"), score_threshold=0.0)
        [served] = pipeline([request])
        dets, masks = served.required_detections(), served.masks
        if not len(dets):
            continue
        again, confidence = prompted_masks(pipeline, image, dets.boxes, dets.labels)
        assert masks is not None and len(again) == len(masks) == len(confidence)
        for mask, other in zip(masks, again, strict=True):
            assert mask is not None and torch.equal(mask.full(), other.full())
        assert ((confidence >= 0.5) & (confidence <= 1)).all()
        compared += len(dets)
    assert compared > 0


def test_ground_truth_through_the_grid_keeps_most_of_its_ap(micro_checkpoint, synth_data):
    mad, _ = load_checkpoint(micro_checkpoint)
    truth = GroundTruth.load(synth_data, "val2017")
    results = gridded_truth(mad, truth)
    assert len(results) == sum(1 for a in truth.instances.dataset["annotations"] if a["area"])
    ap = coco_ap(truth.instances, results, "segm", truth.image_ids)[0]
    # The micro model's 96 px canvas shrinks these ~256 px images 2.7x before the 16x16 grid:
    # small shapes lose much, large ones little, and nothing comes back exact.
    assert 0.3 < ap < 1.0


def test_iou():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[1:3] = True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0


def test_diagnosis_reports_every_source_of_error(micro_checkpoint, synth_data):
    report = diagnose(micro_checkpoint, synth_data, "val2017", images=4)
    assert report["images"] == 4 and report["instances"] > 0
    assert set(report["oracle"]) == set(report["gridded_truth"]) == set(STATS)
    # random decoder weights: the ground truth through the grid is far above their masks
    assert report["gridded_truth"]["AP"] > report["oracle"]["AP"] + 0.3
    assert 0.0 <= report["served_AP"] <= 1.0
    assert 0.0 <= report["oracle_median_iou"] <= 1.0
