"""Decoding options that read more than the argmax: windowed coordinates, box confidence in
detection scores, mask thresholds and mask scores (ModelConfig's decoding fields)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model.checkpoint import MAD
from model.codecs import DecodeContext, JsonOptions
from model.codecs.detection import TOKENS_PER_SLOT, Detections
from model.evaluate import CocoAP
from model.inference_io import Result
from model.vocab import VocabLayout
from service.postprocess import outputs_json
from tests.helpers import micro_config


def coordinate_logits(probabilities: dict[int, float], bins: int) -> torch.Tensor:
    """[bins + 1] logits whose softmax puts `probabilities` on those bins (the rest ~0)."""
    probs = torch.full((bins + 1,), 1e-9)
    for b, p in probabilities.items():
        probs[b] = p
    return probs.log()


@pytest.fixture()
def vocab() -> VocabLayout:
    return VocabLayout.from_config(micro_config())


def test_window_zero_reads_the_most_likely_bins_centre(vocab):
    logits = coordinate_logits({10: 0.6, 11: 0.4}, vocab.num_bins)
    value, confidence = vocab.read_coordinates(logits, 0)
    assert value == pytest.approx(float(vocab.dequantize(torch.tensor(vocab.coord_start + 10))))
    assert confidence == pytest.approx(0.6, abs=1e-6)
    _, confidence = vocab.read_coordinates(logits, 1)  # the window's probability
    assert confidence == pytest.approx(1.0, abs=1e-6)


def test_a_window_places_a_coordinate_between_bins_by_their_probabilities(vocab):
    n = vocab.num_bins
    logits = coordinate_logits({10: 0.6, 11: 0.4, 40: 0.0}, n)
    value, _ = vocab.read_coordinates(logits, 2)
    assert value == pytest.approx((10.4 + 0.5) / n, abs=1e-5)
    far = coordinate_logits({10: 0.5, 11: 0.2, 30: 0.3}, n)  # outside the window: ignored
    value, _ = vocab.read_coordinates(far, 2)
    assert value == pytest.approx((10 + 0.2 / 0.7 + 0.5) / n, abs=1e-5)


def test_a_window_past_an_edge_counts_each_bin_once(vocab):
    n = vocab.num_bins
    value, confidence = vocab.read_coordinates(coordinate_logits({0: 0.6, 1: 0.4}, n), 4)
    assert value == pytest.approx((0.4 + 0.5) / n, abs=1e-5)
    assert confidence == pytest.approx(1.0, abs=1e-5)
    value, confidence = vocab.read_coordinates(coordinate_logits({n - 2: 0.6, n - 1: 0.4}, n), 4)
    assert value == pytest.approx((n - 2 + 0.4 + 0.5) / n, abs=1e-5)
    assert confidence == pytest.approx(1.0, abs=1e-5)
    value, _ = vocab.read_coordinates(coordinate_logits({n: 0.6, n - 1: 0.4}, n), 4)
    assert value == 1.0  # the bin past the last (n) reads as the canvas's edge


def detection_logits(mad: MAD, spread: dict[int, float], corners=(10, 12, 50, 60)) -> torch.Tensor:
    """[1, body_len, V_slice]: slot 0 a class-2 box at p(class) 0.9 whose coordinates put
    probability `spread[d]` on the bin d away from its corner's; the other slots "no object"."""
    codec, v = mad.codecs["detection"], mad.vocab
    start, stop = codec.vocab_slice()
    slots = torch.full((mad.config.num_slots, TOKENS_PER_SLOT, stop - start), -30.0)
    slots[:, 4, v.no_object - start] = 10.0
    slots[0, 4] = -30.0
    slots[0, 4, v.class_start + 2 - start] = 0.0
    slots[0, 4, v.no_object - start] = torch.log(torch.tensor(1 / 9))  # p(class) = 0.9
    for k, b in enumerate(corners):
        for offset, p in spread.items():
            slots[0, k, v.coord_start + b + offset - start] = float(torch.tensor(p).log())
    return slots.reshape(1, -1, stop - start)


@pytest.mark.parametrize(("exponent", "window"), [(0.0, 3), (0.5, 0), (1.0, 3)])
def test_box_confidence_lowers_the_score_of_an_uncertain_box(exponent, window):
    mad = MAD.build(micro_config(box_confidence_exponent=exponent, coordinate_window=window))
    codec, size = mad.codecs["detection"], mad.config.image_size
    context = [DecodeContext(size, 1.0, size)]
    sure = codec.decode(detection_logits(mad, {0: 1.0}), None, context)[0]
    unsure = codec.decode(detection_logits(mad, {0: 0.6, 30: 0.4}), None, context)[0]
    assert float(sure.scores[0]) == pytest.approx(0.9, abs=1e-3)
    assert float(unsure.scores[0]) == pytest.approx(0.9 * 0.6**exponent, abs=1e-3)
    assert torch.allclose(sure.boxes[0], unsure.boxes[0])  # the far bin is outside the window
    # Neighbours: inside a window they count toward the confidence, else not.
    near = codec.decode(detection_logits(mad, {0: 0.5, -1: 0.25, 1: 0.25}), None, context)[0]
    expected = 0.9 if window else 0.9 * 0.5**exponent
    assert float(near.scores[0]) == pytest.approx(expected, abs=1e-3)


def test_a_box_whose_corners_share_a_bin_is_dropped():
    mad = MAD.build(micro_config(coordinate_window=3))
    codec, size = mad.codecs["detection"], mad.config.image_size
    context = [DecodeContext(size, 1.0, size)]
    # x0 and x1 share their most likely bin, x1 leaning further right: 0.3 bins apart.
    logits = detection_logits(mad, {0: 0.9, 1: 0.1}, corners=(10, 12, 10, 60))
    slots = logits.view(mad.config.num_slots, TOKENS_PER_SLOT, -1)
    x1 = detection_logits(mad, {0: 0.6, 1: 0.4}, corners=(10, 12, 10, 60))
    slots[0, 2] = x1.view_as(slots)[0, 2]
    assert len(codec.decode(logits, None, context)[0]) == 0
    wide = detection_logits(mad, {0: 0.9, 1: 0.1}, corners=(10, 12, 11, 60))
    assert len(codec.decode(wide, None, context)[0]) == 1
    # Neighbouring bins leaning together read 0.2 bins apart: kept, as argmax keeps them.
    near = detection_logits(mad, {0: 0.6, 1: 0.4}, corners=(10, 12, 10, 60))
    slots = near.view(mad.config.num_slots, TOKENS_PER_SLOT, -1)
    x1 = detection_logits(mad, {0: 0.6, -1: 0.4}, corners=(10, 12, 11, 60))
    slots[0, 2] = x1.view_as(slots)[0, 2]
    [kept] = codec.decode(near, None, context)
    assert len(kept) == 1 and float(kept.boxes[0, 2] - kept.boxes[0, 0]) < 1


def mask_logits(mad: MAD, inside: float, edge: float) -> torch.Tensor:
    """[1, m*m, 2]: the left half foreground at p `inside`, the next column at p `edge`, the
    rest background at p 0.9."""
    m = mad.config.mask_size
    fg = torch.full((m, m), 0.1)
    fg[:, : m // 2] = inside
    fg[:, m // 2] = edge
    return torch.stack([fg.log(), (1 - fg).log()], -1).reshape(1, m * m, 2)


def test_mask_threshold_and_mask_score():
    mad = MAD.build(micro_config(mask_threshold=0.4, mask_scoring=True))
    codec, m = mad.codecs["segmentation"], mad.config.mask_size
    context = [DecodeContext((m, m), 1.0, (m, m))]
    box = [torch.tensor([0.0, 0.0, m, m])]
    mask = codec.decode(mask_logits(mad, 0.8, 0.45), None, context, boxes=box)[0]
    assert mask.full()[:, : m // 2 + 1].all() and not mask.full()[:, m // 2 + 1 :].any()
    expected = (0.8 * (m // 2) + 0.45) / (m // 2 + 1)  # the mean inside the mask
    assert mask.quality == pytest.approx(expected, abs=1e-5)
    assert codec.output_score(mask, 0.5) == pytest.approx(0.5 * expected, abs=1e-5)
    unscored = MAD.build(micro_config(mask_threshold=0.5, mask_scoring=False))
    plain = unscored.codecs["segmentation"].decode(
        mask_logits(unscored, 0.8, 0.45), None, context, boxes=box
    )[0]
    assert not plain.full()[:, m // 2].any()  # 0.45 is under the default threshold
    assert unscored.codecs["segmentation"].output_score(plain, 0.5) == 0.5


@pytest.mark.parametrize("mask_scoring", [True, False])
def test_an_empty_mask_scores_zero(mask_scoring):
    mad = MAD.build(micro_config(mask_scoring=mask_scoring))
    codec, m = mad.codecs["segmentation"], mad.config.mask_size
    context = [DecodeContext((m, m), 1.0, (m, m))]
    box = [torch.tensor([0.0, 0.0, m, m])]
    empty = codec.decode(mask_logits(mad, 0.2, 0.2), None, context, boxes=box)[0]
    assert not empty.full().any()
    assert codec.output_score(empty, 0.9) == 0.0
    off_image = [torch.tensor([m + 1.0, 0.0, m + 5.0, m])]  # pasted outside the image
    outside = codec.decode(mask_logits(mad, 0.8, 0.8), None, context, boxes=off_image)[0]
    assert outside.quality > 0 and codec.output_score(outside, 0.9) == 0.0


def scored_result(mad: MAD) -> Result:
    """Two detections with masks, the lower-scored detection's mask the more confident."""
    codec, m = mad.codecs["segmentation"], mad.config.mask_size
    context = [DecodeContext((m, m), 1.0, (m, m))] * 2
    boxes = [torch.tensor([0.0, 0.0, m, m])] * 2
    logits = torch.cat([mask_logits(mad, 0.55, 0.55), mask_logits(mad, 0.99, 0.99)])
    masks = codec.decode(logits, None, context, boxes=boxes)
    box = torch.tensor([[0.0, 0.0, m, m]] * 2)
    detections = Detections(box, box / m, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), box)
    return Result(
        (m, m),
        ("detection", "segmentation"),
        {"detection": detections, "segmentation": masks},
    )


def test_the_response_and_coco_evaluation_rank_masks_by_their_scores():
    mad = MAD.build(micro_config(mask_scoring=True))
    result = scored_result(mad)
    body = outputs_json(result, mad.codecs, JsonOptions())
    scores = [d["mask_score"] for d in body["detections"]]
    assert scores == pytest.approx([0.9 * 0.55, 0.8 * 0.99], abs=1e-4)
    assert [d["score"] for d in body["detections"]] == pytest.approx([0.9, 0.8])

    # what CocoAP reads of the ground truth when adding entries
    truth = SimpleNamespace(instances=None, category_ids=list(range(mad.config.num_classes)))
    evaluator = mad.codecs["segmentation"].evaluator(truth)  # type: ignore[arg-type]
    assert isinstance(evaluator, CocoAP)
    evaluator.add(1, result)
    assert [e["score"] for e in evaluator.entries] == pytest.approx(scores, abs=1e-4)
