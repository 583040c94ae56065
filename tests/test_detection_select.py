"""What a request keeps of the decoded detections: threshold, class-wise NMS, count, and only
boxes the asked tasks can use; decoding drops boxes without area."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from model.batch_run import usable
from model.codecs import DecodeContext
from model.codecs.detection import Detections
from model.inference_io import Request
from model.request_spec import RequestError, check_nms_iou


def detections(boxes: list[list[float]], scores: list[float], labels: list[int]) -> Detections:
    n = len(scores)
    return Detections(
        torch.tensor(boxes),
        torch.tensor(boxes) / 100,
        torch.tensor(scores),
        torch.tensor(labels),
        torch.zeros(n, 5, dtype=torch.long),
    )


# A duplicate pair of circles (IoU 0.82), a square on the same spot, a far circle.
FOUND = detections(
    [[10, 10, 50, 50], [12, 12, 52, 52], [10, 10, 50, 50], [60, 60, 90, 90]],
    [0.9, 0.8, 0.7, 0.6],
    [1, 1, 2, 1],
)
IMAGE = Image.new("RGB", (96, 96))


def keep(micro_model, **options) -> list[float]:
    codec = micro_model.codecs["detection"]
    return codec.select(FOUND, Request(IMAGE, ("detection",), **options)).scores.tolist()


def test_nms_drops_the_duplicate_of_a_class(micro_model):
    assert keep(micro_model, score_threshold=0.0, nms_iou=0.7) == pytest.approx([0.9, 0.7, 0.6])


def test_nms_iou_1_keeps_both(micro_model):
    assert keep(micro_model, score_threshold=0.0, nms_iou=1.0) == pytest.approx(
        [0.9, 0.8, 0.7, 0.6]
    )


def test_model_default_applies_without_a_request_value(micro_model, monkeypatch):
    assert len(keep(micro_model, score_threshold=0.0)) == 4  # default 1.0: off
    monkeypatch.setattr(micro_model.config, "nms_iou", 0.5)
    assert keep(micro_model, score_threshold=0.0) == pytest.approx([0.9, 0.7, 0.6])


def test_threshold_then_nms_then_count(micro_model):
    assert keep(micro_model, score_threshold=0.65, nms_iou=0.7, max_detections=1) == [
        pytest.approx(0.9)
    ]


def test_nms_iou_is_checked():
    assert check_nms_iou(None) is None and check_nms_iou(0.5) == 0.5
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(RequestError, match="nms_iou"):
            check_nms_iou(bad)


def test_max_detections_counts_what_the_asked_tasks_use(micro_model):
    """keypoints alone: the detections it prompts are persons only (class 0), so
    max_detections=1 cannot be spent on a circle."""
    codecs = micro_model.codecs
    found = detections([[0, 0, 9, 9], [5, 5, 20, 20], [1, 1, 8, 8]], [0.9, 0.8, 0.7], [1, 0, 2])
    request = Request(IMAGE, ("keypoints",), max_detections=1)
    assert usable(codecs, found, request).labels.tolist() == [0]
    both = Request(IMAGE, ("keypoints", "segmentation"))
    assert usable(codecs, found, both).labels.tolist() == [1, 0, 2]


def test_boxes_without_area_are_dropped(micro_model):
    """Decoding keeps only boxes with a width and a height in the image's pixels: not a box
    whose x0 and x1 share a bin, nor one that lies in the letterbox padding below a wide
    image (clipped to the image, it has no height)."""
    codec, vocab = micro_model.codecs["detection"], micro_model.vocab
    slots = micro_model.config.num_slots
    body = torch.full((slots, 5), vocab.coord_start)  # unused slots: every coordinate in bin 0
    body[:, 4] = vocab.no_object
    kept, thin, below = [10, 10, 40, 30], [20, 10, 20, 30], [10, 70, 40, 90]  # bins
    for slot, box in enumerate((kept, thin, below)):
        body[slot, :4] = vocab.coord_start + torch.tensor(box)
        body[slot, 4] = vocab.class_token(torch.tensor(1))
    start, stop = codec.vocab_slice()
    logits = torch.full((1, slots * 5, stop - start), -10.0)
    logits[0].scatter_(-1, codec.to_local(body.flatten()).unsqueeze(-1), 10.0)
    canvas = micro_model.config.image_size  # 96x96, a bin per pixel
    wide = DecodeContext(canvas, 1.0, (48, 96))  # a 96x48 image fills the canvas's top half
    [found] = codec.decode(logits + codec.constraint(), None, [wide])
    assert len(found) == 1 and found.labels.tolist() == [1]
    assert found.boxes.tolist() == [[10.5, 10.5, 40.5, 30.5]]  # bin centres
