"""The keypoint diagnosis bench (mad.bench.keypoints): its AP by person height and the
oracle-box path, on the synthetic data and the micro model."""

from __future__ import annotations

import pytest

from mad.bench.keypoints import HEIGHT_BUCKETS, diagnose, keypoint_ap
from model.evaluate import GroundTruth


@pytest.fixture(scope="module")
def truth(synth_data):
    return GroundTruth.load(synth_data, "val2017")


def labelled_persons(truth):
    gt = truth.keypoints
    return [a for a in gt.dataset["annotations"] if a.get("num_keypoints", 0) > 0]


def as_result(ann, shift=0.0):
    points = list(ann["keypoints"])
    for k in range(0, len(points), 3):
        points[k] += shift
    return {
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        "keypoints": points,
        "score": 1.0,
    }


def test_perfect_keypoints_score_one_in_every_height_bucket(truth):
    persons = labelled_persons(truth)
    assert persons, "the synthetic val split should hold labelled persons"
    exact = [as_result(a) for a in persons]
    assert keypoint_ap(truth.keypoints, exact, truth.image_ids) == pytest.approx(1.0)
    for lo, hi in HEIGHT_BUCKETS:
        inside = [as_result(a) for a in persons if lo <= a["bbox"][3] < hi]
        if inside:  # the other persons are ignored, so this bucket alone scores 1
            ap = keypoint_ap(truth.keypoints, inside, truth.image_ids, (lo, hi))
            assert ap == pytest.approx(1.0)
    shifted = [as_result(a, shift=0.25 * a["bbox"][3]) for a in persons]
    assert keypoint_ap(truth.keypoints, shifted, truth.image_ids) < 0.5


def test_diagnosis_reports_every_source_of_error(micro_checkpoint, synth_data):
    report = diagnose(micro_checkpoint, synth_data, "val2017", images=4)
    assert report["images"] == 4
    # The micro canvas is 96 px with 96 bins (~2.7 px of a 256 px image each): the truth
    # through them keeps a good share of AP, far above the untrained decoder's.
    assert 0.3 < report["quantised_truth"] <= 1.0
    assert report["quantised_truth"] > report["oracle_K0"] + 0.2
    for key in ("served_K0", "oracle_K0", "oracle_by_height", "median_error_per_joint"):
        assert key in report
    assert 0.0 <= report["oracle_K0"] <= 1.0
    assert set(report["persons_by_height"]) == set(report["oracle_by_height"])
    assert sum(report["persons_by_height"].values()) > 0
    errors = [e for e in report["median_error_per_joint"].values() if e is not None]
    assert errors and all(e >= 0 for e in errors)
