"""The coordinate frame follows the image's orientation: on a landscape canvas a portrait image
runs on the transposed canvas, in preprocessing, the pipeline, the service and training
batches (ONNX: tests/test_export.py; TensorRT profiles: tests/test_tensorrt_plan.py). A square
canvas serves every image as before."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from mad.bench.workload import BUNDLED_CHECKPOINT, prepare_checkpoint
from model.checkpoint import load_checkpoint
from model.config import get_preset
from model.data.batching import (
    CanvasCollate,
    SeededDataset,
    StepBatchSampler,
    batch_canvas,
    transposed_images,
)
from model.data.coco import CocoMultiTaskDataset
from model.data.transforms import training_transforms
from model.inference_io import Request, Result
from model.pipeline import Pipeline
from model.preprocess import canvas_groups, image_canvas, prepare_batch
from runtime.torch_runner import TorchRunner
from service.settings import Settings
from tests.helpers import encode, running_server

R50 = (800, 1333)
CANVAS = (256, 320)  # the bundled model's weights on a landscape canvas
CIRCLE = [70.0, 200.0, 130.0, 260.0]
SQUARE = [30.0, 40.0, 80.0, 90.0]
needs_bundled = pytest.mark.skipif(
    not (BUNDLED_CHECKPOINT / "config.json").is_file(), reason="no bundled checkpoint"
)


def portrait_scene() -> Image.Image:
    """200 wide, 300 tall: a red circle low down, a blue square near the top."""
    image = Image.new("RGB", (200, 300), (214, 226, 204))
    draw = ImageDraw.Draw(image)
    draw.ellipse(CIRCLE, fill=(220, 30, 30))
    draw.rectangle(SQUARE, fill=(30, 60, 220))
    return image


def test_the_canvas_follows_the_image():
    assert image_canvas((600, 400), R50) == (1333, 800)  # portrait: transposed
    assert image_canvas((400, 600), R50) == R50
    assert image_canvas((500, 500), R50) == R50  # square images keep the model's
    assert image_canvas((400, 600), (1333, 800)) == (800, 1333)  # and a portrait canvas flips
    assert image_canvas((600, 400), (256, 256)) == (256, 256)  # a square canvas never does
    groups = canvas_groups([(600, 400), (400, 600), (700, 300)], R50)
    assert groups == {(1333, 800): [0, 2], R50: [1]}


def test_a_portrait_image_fills_the_transposed_canvas():
    image = Image.new("RGB", (400, 600))
    batch = prepare_batch([image], R50)
    assert batch.images.shape == (1, 3, 1333, 800)  # 800x1200 of it image, not 533x800
    context = batch.contexts[0]
    assert context.canvas == (1333, 800) and context.scale == 2.0
    assert not batch.pad_mask[0, :1200].any() and batch.pad_mask[0, 1200:].all()
    # Bins span the canvas it ran on: the image's far corner is (800/800, 1200/1333).
    corner = context.to_pixels(torch.tensor([1.0, 1200 / 1333]))
    assert corner.tolist() == pytest.approx([400.0, 600.0])
    with pytest.raises(ValueError, match="share a canvas"):
        prepare_batch([image, Image.new("RGB", (600, 400))], R50)


@pytest.fixture(scope="module")
def landscape_checkpoint(tmp_path_factory) -> Path:
    """The bundled model with a 256x320 canvas (its layers accept any size)."""
    if not (BUNDLED_CHECKPOINT / "config.json").is_file():
        pytest.skip("no bundled checkpoint")
    out, _ = prepare_checkpoint(None, BUNDLED_CHECKPOINT, CANVAS, tmp_path_factory.mktemp("c"))
    return out


def boxes_of(result: Result, label: str, class_names: list[str]) -> torch.Tensor:
    detections = result.detections
    assert detections is not None
    return detections.boxes[detections.labels == class_names.index(label)]


@needs_bundled
def test_portrait_boxes_land_on_the_objects(landscape_checkpoint, tmp_path):
    mad, _ = load_checkpoint(landscape_checkpoint)
    pipeline = Pipeline(mad, TorchRunner(mad.required_network()))
    request = Request(portrait_scene(), ("detection", "segmentation"))
    assert pipeline.canvas(request) == (320, 256)
    [result] = pipeline([request])
    names = mad.config.class_names
    assert box_iou(boxes_of(result, "circle", names), torch.tensor([CIRCLE])).max() > 0.7
    assert box_iou(boxes_of(result, "square", names), torch.tensor([SQUARE])).max() > 0.5
    assert result.masks is not None and all(m is not None for m in result.masks)
    # The same as a model whose canvas is 320x256: the portrait image ran on the transposed one.
    portrait, _ = prepare_checkpoint(None, BUNDLED_CHECKPOINT, (320, 256), tmp_path)
    mad, _ = load_checkpoint(portrait)
    [same] = Pipeline(mad, TorchRunner(mad.required_network()))([request])
    assert result.detections is not None and same.detections is not None
    torch.testing.assert_close(result.detections.boxes, same.detections.boxes)


@needs_bundled
def test_a_mixed_batch_gives_each_image_its_own_answer(landscape_checkpoint):
    mad, _ = load_checkpoint(landscape_checkpoint)
    pipeline = Pipeline(mad, TorchRunner(mad.required_network()))
    portrait = portrait_scene()
    landscape = portrait.transpose(Image.Transpose.ROTATE_90)
    requests = [Request(image, ("detection",)) for image in (portrait, landscape, portrait)]
    together = pipeline(requests)
    for request, result in zip(requests, together, strict=True):
        [alone] = pipeline([request])
        assert result.image_size == alone.image_size == (request.image.height, request.image.width)
        assert result.detections is not None and alone.detections is not None
        torch.testing.assert_close(result.detections.boxes, alone.detections.boxes)


@needs_bundled
def test_portrait_image_through_the_service(landscape_checkpoint):
    settings = Settings(checkpoint=landscape_checkpoint, batch_delay_ms=2)
    with (
        running_server(settings) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        assert client.get("/v1/model").json()["input_size"] == list(CANVAS)
        response = client.post(
            "/predict",
            files={"image": ("portrait.png", encode(portrait_scene()), "image/png")},
            data={"tasks": "detection"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == {"width": 200, "height": 300}
    circles = [d["box"] for d in body["detections"] if d["label"] == "circle"]
    assert circles and box_iou(torch.tensor(circles), torch.tensor([CIRCLE])).max() > 0.7


# --- training batches -----------------------------------------------------------------------
def test_a_training_batch_runs_on_the_canvas_of_most_of_its_images():
    assert batch_canvas([(90, 60), (90, 60), (60, 90)], (64, 96)) == (96, 64)
    assert batch_canvas([(90, 60), (60, 90)], (64, 96)) == (64, 96)  # a tie: the model's
    uint8 = torch.zeros(3, 48, 32, dtype=torch.uint8)
    target = {
        "boxes": torch.tensor([[8.0, 12.0, 24.0, 36.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, 48, 32, dtype=torch.uint8),
        "keypoints": torch.zeros(1, 17, 3),
    }
    images, pads, targets = CanvasCollate((64, 96), upscale=False)([(uint8, target)] * 2)
    assert images.shape == (2, 3, 96, 64)  # portrait images: the transposed canvas
    assert not pads[0, :48, :32].any() and pads[0, 48:].all()  # kept at its size
    assert targets[0]["boxes"].tolist() == [[8 / 64, 12 / 96, 24 / 64, 36 / 96]]
    images, _, targets = CanvasCollate((64, 96))([(uint8, target)])  # fitted: scale 2
    assert targets[0]["boxes"].tolist() == [[16 / 64, 24 / 96, 48 / 64, 72 / 96]]


def test_the_sampler_draws_each_batch_from_one_orientation():
    flags = [i in (1, 4, 7) for i in range(10)]  # 3 portrait images of 10
    sampler = StepBatchSampler(10, 2, seed=3, total_steps=20, transposed=flags)
    batches = list(sampler)
    groups = [{flags[i] for i, _ in batch} for batch in batches]
    assert all(len(group) == 1 for group in groups)
    assert sum(True in group for group in groups) == 6  # 3/10 of 20 batches, spread evenly
    assert all(True in groups[n] for n in (3, 6, 9, 13, 16, 19))
    # Each group's images come round once per its epoch.
    portrait = [
        i for batch, group in zip(batches, groups, strict=True) if True in group for i, _ in batch
    ]
    assert sorted(portrait[:3]) == [1, 4, 7] and sorted(portrait[3:6]) == [1, 4, 7]
    # Ranks split the same sequence of batches, and a restart picks it up exactly.
    ranks = [StepBatchSampler(10, 2, 3, 0, 10, rank, 2, flags) for rank in (0, 1)]
    assert [b for pair in zip(*ranks, strict=True) for b in pair] == batches
    assert list(StepBatchSampler(10, 2, 3, 7, 20, transposed=flags)) == batches[7:]


def test_without_orientation_groups_the_batches_are_unchanged():
    """No image transposed (a square canvas): the sampler's batches are what they were."""
    sampler = StepBatchSampler(10, 3, seed=5, total_steps=6, rank=1, world=2)
    expected = []
    for step in range(6):
        batch = []
        for j in range(3):
            g = (step * 2 + 1) * 3 + j
            order = torch.randperm(10, generator=torch.Generator().manual_seed(5 * 7919 + g // 10))
            batch.append((int(order[g % 10]), 5 * 1_000_003 + g))
        expected.append(batch)
    assert list(sampler) == expected
    assert transposed_images([(90, 60), (60, 90)], (64, 64)) is None


def test_training_batches_follow_the_orientation(synth_data):
    """The training data path of an r50-style config (multiscale augmentation) on a
    non-square canvas: each batch is on the canvas of most of its images."""
    config = get_preset("r50", image_size=(96, 160))
    dataset = CocoMultiTaskDataset(synth_data, "train2017", training_transforms(config))
    flags = transposed_images(dataset.image_sizes(), config.image_size)
    assert flags is not None and 0 < sum(flags) < len(flags)  # synthetic sizes vary
    sampler = StepBatchSampler(len(dataset), 2, 0, total_steps=6, transposed=flags)
    collate, samples = CanvasCollate.for_config(config), SeededDataset(dataset)
    for batch in sampler:
        images, pads, targets = collate([samples[key] for key in batch])
        sizes = [tuple(t["image_size"]) for t in targets]  # after augmentation
        canvas = batch_canvas(sizes, config.image_size)
        assert tuple(images.shape[-2:]) == canvas
        for pad, size in zip(pads, sizes, strict=True):  # not scaled up (multiscale)
            if image_canvas(size, config.image_size) == canvas:
                assert int((~pad).sum()) == size[0] * size[1]
