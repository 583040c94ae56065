"""`python -m mad.bench.thresholds`: precision and recall of the detections a threshold keeps."""

from __future__ import annotations

import torch

from mad.bench.thresholds import matched, threshold_report
from model.codecs.detection import Detections


def detections(boxes: list[list[float]], labels: list[int]) -> Detections:
    box = torch.tensor(boxes)
    n = len(boxes)
    return Detections(box, box / 100, torch.linspace(0.9, 0.5, n), torch.tensor(labels), box)


def test_each_object_matches_its_best_scored_detection_of_its_class_once():
    truth = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    found = detections(
        [
            [0.0, 0.0, 10.0, 10.0],  # object 0
            [0.0, 0.0, 10.0, 11.0],  # a duplicate of object 0: wrong
            [50.0, 50.0, 60.0, 60.0],  # object 1, but the wrong class
            [20.0, 20.0, 30.0, 30.0],  # nothing there
        ],
        [1, 1, 2, 3],
    )
    assert matched(found, truth, torch.tensor([1, 3])).tolist() == [True, False, False, False]
    assert (
        matched(found, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).tolist() == [False] * 4
    )


def test_the_report_counts_objects_and_is_monotone_in_the_threshold(micro_checkpoint, synth_data):
    report = threshold_report(micro_checkpoint, synth_data, "val2017", 2, (0.1, 0.5, 0.9))
    assert report["images"] == 2 and report["objects"] > 0
    kept = [r["kept"] for r in report["rows"]]
    assert kept == sorted(kept, reverse=True)
    for r in report["rows"]:
        assert 0 <= r["right"] <= min(r["kept"], report["objects"])
        assert r["recall"] == round(r["right"] / report["objects"], 4)
