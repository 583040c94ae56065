"""Detection on an image and its mirror image, the two views' boxes fused (`detection_flip`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from model.checkpoint import MAD
from model.codecs.base import DecodeContext
from model.codecs.detection import FLIP_ALONE, DetectionCodec, Detections
from model.feature_cache import FeatureCache
from model.inference_io import Request
from model.pipeline import Pipeline
from tests.helpers import synthetic_images
from tests.test_refinement import CountingRunner

CONTEXT = DecodeContext(canvas=(100, 200), scale=1.0, image_size=(100, 200))


def detections(codec: DetectionCodec, boxes, scores, labels) -> Detections:
    boxes = torch.tensor(boxes, dtype=torch.float)
    normalised = CONTEXT.to_canvas(boxes)
    labels = torch.tensor(labels)
    tokens = torch.cat(
        [codec.vocab.quantize(normalised), codec.vocab.class_token(labels)[:, None]], 1
    )
    return Detections(boxes, normalised, torch.tensor(scores), labels, tokens)


def test_two_views_of_one_object_become_one_box(micro_model):
    codec = micro_model.codecs["detection"]
    original = detections(codec, [[10, 10, 50, 60], [120, 20, 160, 40]], [0.9, 0.6], [1, 2])
    # The mirror image (200 px wide): the first box seen again, a little off, scored 0.7;
    # a box of another class where the second one is; one more box only it found.
    flipped = detections(
        codec,
        [[148, 12, 192, 58], [40, 20, 80, 40], [0, 70, 20, 90]],
        [0.7, 0.8, 0.4],
        [1, 3, 1],
    )
    fused = codec.fuse_flipped(original, flipped, CONTEXT)
    assert fused.labels.tolist() == [1, 3, 2, 1]  # sorted by score
    weights = torch.tensor([0.9, 0.7]) / 1.6
    mirrored = torch.tensor([8.0, 12.0, 52.0, 58.0])  # 200 - x, the corners swapped
    expected = weights[0] * torch.tensor([10.0, 10.0, 50.0, 60.0]) + weights[1] * mirrored
    torch.testing.assert_close(fused.boxes[0], expected)
    torch.testing.assert_close(
        fused.scores, torch.tensor([0.8, 0.8 * FLIP_ALONE, 0.6 * FLIP_ALONE, 0.4 * FLIP_ALONE])
    )
    # The other class is not fused with the second box, which keeps its place.
    torch.testing.assert_close(fused.boxes[1], torch.tensor([120.0, 20.0, 160.0, 40.0]))
    torch.testing.assert_close(fused.boxes[3], torch.tensor([180.0, 70.0, 200.0, 90.0]))
    # The prompts of the later tasks follow the fused boxes.
    torch.testing.assert_close(fused.boxes_norm, CONTEXT.to_canvas(fused.boxes))
    assert torch.equal(fused.tokens[:, :4], codec.vocab.quantize(fused.boxes_norm))
    assert torch.equal(fused.tokens[:, 4], codec.vocab.class_token(fused.labels))


def flip_model(micro_model) -> MAD:
    """The micro model with `detection_flip` on (its own config; the codecs read it)."""
    config = dataclasses.replace(micro_model.config, detection_flip=True)
    codecs = {name: type(c)(config, c.vocab, c.tokenizer) for name, c in micro_model.codecs.items()}
    return dataclasses.replace(micro_model, config=config, codecs=codecs)


def test_the_pipeline_fuses_what_each_view_finds_alone(micro_model):
    flipping = flip_model(micro_model)
    image = synthetic_images(1, seed=3)[0]
    tasks = ("detection", "segmentation", "keypoints")
    result = Pipeline(flipping, CountingRunner(micro_model.network))(
        [Request(image, tasks, score_threshold=0.0)]
    )[0]
    plain = Pipeline(micro_model, CountingRunner(micro_model.network))
    views = [
        plain([Request(view, ("detection",), score_threshold=0.0, nms_iou=1.0)])[0].detections
        for view in (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    ]
    codec = flipping.codecs["detection"]
    context = DecodeContext((image.height, image.width), 1.0, (image.height, image.width))
    fused = codec.fuse_flipped(views[0], views[1], context)
    expected = codec.select(fused, Request(image, tasks, score_threshold=0.0))
    assert result.detections is not None and len(result.detections) == len(expected) > 0
    torch.testing.assert_close(result.detections.boxes, expected.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(result.detections.scores, expected.scores)
    # Masks are decoded for the fused boxes; the detection ran one pass per view.
    assert len(result.masks) == len(expected) and result.passes["detection"] == 1


def test_both_views_are_encoded_at_once_and_timed_as_one_request(micro_model):
    flipping = flip_model(micro_model)
    runner = CountingRunner(micro_model.network)
    seen = []
    pipeline = Pipeline(flipping, runner, observer=lambda *call: seen.append(call[:2]))
    images = synthetic_images(2, seed=4)
    pipeline([Request(image, ("detection", "caption")) for image in images])
    assert runner.encoded == 4  # two images and their mirror images, in one batch
    assert ("encode", 4) in seen  # told of every image encoded (the planner prices views)
    start = flipping.codecs["detection"].vocab_slice()[0]
    assert [rows for first, rows in runner.decodes if first == start] == [2, 2]  # two views
    assert seen.count(("detection", 2)) == 1  # the two views' passes timed as one
    # Without detection, no mirror image is encoded; beside a request with detection, its
    # own image alone, and its caption is the one it gets alone.
    runner.encoded = 0
    alone = pipeline([Request(images[0], ("caption",))])[0]
    assert runner.encoded == 1
    runner.encoded = 0
    detect = Request(images[1], ("detection",), score_threshold=0.0)
    mixed = pipeline([Request(images[0], ("caption",)), detect])
    assert runner.encoded == 3
    assert mixed[0].caption == alone.caption
    assert mixed[1].detections is not None and len(mixed[1].detections) > 0
    single = pipeline([detect])[0]
    assert single.detections is not None
    torch.testing.assert_close(mixed[1].detections.boxes, single.detections.boxes)


def test_the_feature_cache_keeps_both_views(micro_model):
    flipping = flip_model(micro_model)
    runner = CountingRunner(micro_model.network)
    pipeline = Pipeline(flipping, runner, features=FeatureCache(64 << 20, "v"))
    image = synthetic_images(1, seed=5)[0]
    first = pipeline([Request(image, ("detection",), image_key="k")])[0]
    again = pipeline([Request(image, ("detection",), image_key="k")])[0]
    assert runner.encoded == 2  # the image and its mirror image, once
    assert first.detections is not None and again.detections is not None
    torch.testing.assert_close(first.detections.boxes, again.detections.boxes)


@pytest.mark.parametrize("flip", [False, True])
def test_a_request_answers_the_same_beside_batch_mates(micro_model, flip):
    model = flip_model(micro_model) if flip else micro_model
    pipeline = Pipeline(model, CountingRunner(micro_model.network))
    images = synthetic_images(3, seed=6)
    together = pipeline([Request(image, ("detection",)) for image in images])
    alone = pipeline([Request(images[1], ("detection",))])[0]
    assert together[1].detections is not None and alone.detections is not None
    torch.testing.assert_close(together[1].detections.boxes, alone.detections.boxes)
