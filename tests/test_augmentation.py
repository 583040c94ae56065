"""Training scales chosen by the preset: the reference's multi-scale augmentation for r50-style
presets (short side 480..800 step 32, long side at most 1333; half the time resized to
400/500/600 and cropped to 384..600 first), the "fit" augmentation for tiny."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from model.config import PRESETS, get_preset
from model.data.coco import CocoMultiTaskDataset
from model.data.transforms import (
    REFERENCE_SCALES,
    RandomApply,
    RandomResize,
    RandomSizeCrop,
    ResizeShortestEdge,
    multiscale_transforms,
    training_transforms,
)


def sample(height: int, width: int) -> tuple[torch.Tensor, dict]:
    """A uint8 image with one object covering its middle."""
    image = tv_tensors.Image(torch.randint(0, 255, (3, height, width), dtype=torch.uint8))
    box = [width / 4, height / 4, 3 * width / 4, 3 * height / 4]
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[:, height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([box]), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.tensor([1]),
        "masks": tv_tensors.Mask(masks),
        "keypoints": torch.zeros(1, 17, 3),
        "has_keypoints": torch.tensor([False]),
        "captions": [],
    }
    return image, target


def sizes(transform, height: int, width: int, n: int) -> list[tuple[int, int]]:
    torch.manual_seed(0)
    out = []
    for _ in range(n):
        image, target = transform(*sample(height, width))
        assert target["boxes"].canvas_size == tuple(image.shape[-2:]) == target["masks"].shape[-2:]
        out.append(tuple(image.shape[-2:]))
    return out


def test_resize_shortest_edge_caps_the_long_side():
    assert sizes(ResizeShortestEdge([600]), 480, 640, 1) == [(600, 800)]
    assert sizes(ResizeShortestEdge([800], 1333), 100, 1000, 1) == [(133, 1333)]
    seen = set(sizes(ResizeShortestEdge([480, 800]), 300, 400, 40))
    assert seen == {(480, 640), (800, 1067)}


def test_random_size_crop_stays_in_range():
    for h, w in sizes(RandomSizeCrop(384, 600), 700, 900, 40):
        assert 384 <= h <= 600 and 384 <= w <= 600
    for h, w in sizes(RandomSizeCrop(384, 600), 300, 500, 20):  # smaller than the minimum
        assert h == 300 and 384 <= w <= 500


def test_random_apply_applies_half_the_time():
    resized = [s == (20, 20) for s in sizes(RandomApply([ResizeShortestEdge([20])]), 40, 40, 200)]
    assert 70 <= sum(resized) <= 130


def test_reference_scales_on_the_r50_canvas():
    """Every training image ends with its short side one of 480, 512, ..., 800, or its long
    side at 1333, whatever the input and whether it was cropped first."""
    transform = training_transforms(get_preset("r50"))
    assert tuple(range(480, 801, 32)) == REFERENCE_SCALES  # the reference config's list
    seen = sizes(transform, 480, 640, 60) + sizes(transform, 375, 1000, 30)
    for h, w in seen:
        assert min(h, w) in REFERENCE_SCALES or max(h, w) == 1333, (h, w)
        assert max(h, w) <= 1333
    assert len({min(h, w) for h, w in seen}) >= 6  # scales spread, not piled up at 800
    assert any(max(h, w) == 1333 for h, w in seen)  # the 375x1000 image at large scales


def test_other_canvases_scale_the_reference_sizes():
    transform = multiscale_transforms((400, 667))
    for h, w in sizes(transform, 480, 640, 30):
        assert min(h, w) in {round(s / 2) for s in REFERENCE_SCALES} or max(h, w) == 667


def test_the_preset_chooses_the_augmentation():
    for name in PRESETS:
        config = get_preset(name)
        expected = "fit" if name == "tiny" else "multiscale"
        assert config.train_augmentation == expected
        steps = training_transforms(config).transforms
        assert any(isinstance(t, RandomResize) for t in steps) == (expected == "fit")
        assert any(isinstance(t, ResizeShortestEdge) for t in steps) == (expected == "multiscale")
    with pytest.raises(ValueError, match="train_augmentation"):
        get_preset("tiny", train_augmentation="bigger")


def test_multiscale_on_real_samples(synth_data):
    """Targets stay consistent with the image through flips, crops and resizes."""
    config = get_preset("r50", image_size=(96, 160))
    dataset = CocoMultiTaskDataset(synth_data, "train2017", training_transforms(config))
    torch.manual_seed(1)
    for i in range(len(dataset)):
        image, target = dataset[i]
        h, w = image.shape[-2:]
        assert min(h, w) in {round(s * 96 / 800) for s in REFERENCE_SCALES} or max(h, w) == 160
        n = len(target["labels"])
        assert target["boxes"].shape == (n, 4) and target["masks"].shape == (n, h, w)
        boxes = target["boxes"]
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2] <= w).all()
