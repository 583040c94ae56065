"""The mask diagnosis bench (mad.bench.masks): the ground truth through the mask grid is
near perfect and far above an untrained decoder prompted by the same boxes."""

from __future__ import annotations

import pytest
import torch

from mad.bench.masks import STATS, diagnose, gridded_truth, iou
from model.checkpoint import load_checkpoint
from model.evaluate import GroundTruth, coco_ap


def test_ground_truth_through_the_grid_keeps_most_of_its_ap(micro_checkpoint, synth_data):
    mad, _ = load_checkpoint(micro_checkpoint)
    truth = GroundTruth.load(synth_data, "val2017")
    results = gridded_truth(mad, truth)
    assert len(results) == sum(1 for a in truth.instances.dataset["annotations"] if a["area"])
    ap = coco_ap(truth.instances, results, "segm", truth.image_ids)[0]
    assert 0.7 < ap <= 1.0  # a 16x16 grid blurs the edges of small shapes only


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
