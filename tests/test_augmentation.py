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
    RandomHorizontalFlip,
    RandomResize,
    RandomSizeCrop,
    ResizeShortestEdge,
    ZoomCrop,
    multiscale_transforms,
    training_transforms,
)
from model.zoom import Zoom, window_context, zoom_window


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


def zoom_sample(with_small: bool = True) -> tuple[torch.Tensor, dict]:
    """A 200 x 300 (H, W) image with a small object near its right edge (a 20 x 10 box, a
    person with one labelled joint) and a large one, and a caption."""
    image = tv_tensors.Image(torch.randint(0, 255, (3, 200, 300), dtype=torch.uint8))
    masks = torch.zeros(2, 200, 300, dtype=torch.uint8)
    masks[0, 150:160, 270:290] = 1
    masks[1, 20:180, 20:120] = 1
    keypoints = torch.zeros(2, 17, 3)
    keypoints[0, 0] = torch.tensor([284.0, 152.0, 2.0])
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[270.0, 150.0, 290.0, 160.0], [20.0, 20.0, 120.0, 180.0]]),
            format="XYXY",
            canvas_size=(200, 300),
        ),
        "labels": torch.tensor([0, 1]),
        "masks": tv_tensors.Mask(masks),
        "keypoints": keypoints,
        "has_keypoints": torch.tensor([True, False]),
        "captions": ["a person to the right of a square"],
    }
    if not with_small:
        keep = torch.tensor([1])
        target = {key: value if key == "captions" else value[keep] for key, value in target.items()}
    return image, target


def untouched(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    return image, target


def test_a_zoomed_crop_is_inference_s_crop_of_an_object_enlarged_to_its_canvas():
    """The image becomes the crop inference cuts around the small object (the large one's
    crop would be the whole image), enlarged to fill the canvas: its box, mask and joint land
    where inference's crop context puts them, and its captions are dropped."""
    canvas, zoom = (64, 96), Zoom(3, 3)
    box = torch.tensor([270.0, 150.0, 290.0, 160.0])
    window = zoom_window(box, (200, 300), canvas, zoom)
    assert window is not None and window[2] == 300  # shifted inside the image at its edge
    context = window_context(window, (200, 300), canvas)
    torch.manual_seed(0)
    image, target = ZoomCrop(1.0, zoom, canvas, untouched)(*zoom_sample())
    assert tuple(image.shape[-2:]) == canvas == target["masks"].shape[-2:]
    assert target["captions"] == []
    small = target["labels"].tolist().index(0)
    pixels = torch.tensor([96.0, 64.0, 96.0, 64.0])  # to_canvas is normalised to the canvas
    want = context.to_canvas(box) * pixels
    assert target["boxes"][small].tolist() == pytest.approx(want.tolist(), abs=0.5)
    rows, cols = target["masks"][small].nonzero(as_tuple=True)
    mask_box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    # Nearest-neighbour resizing moves a mask edge by up to a pixel and a half.
    assert [float(v) for v in mask_box] == pytest.approx(want.tolist(), abs=1.5)
    nose = target["keypoints"][small, 0]
    joint = (context.to_canvas(torch.tensor([284.0, 152.0, 284.0, 152.0])) * pixels)[:2]
    assert nose[2] == 2 and nose[:2].tolist() == pytest.approx(joint.tolist(), abs=0.5)


def test_without_an_object_to_zoom_on_the_image_keeps_its_augmentation():
    zoom = ZoomCrop(1.0, Zoom(3, 3), (64, 96), lambda image, target: (image[:, :1], target))
    for image, target in (zoom_sample(with_small=False), zoom_sample()):
        if len(target["boxes"]) == 2:  # no objects at all
            target = {
                key: value if key == "captions" else value[:0] for key, value in target.items()
            }
        out, kept = zoom(image, target)
        assert out.shape[-2] == 1 and kept["captions"]
    never = ZoomCrop(0.0, Zoom(3, 3), (64, 96), lambda image, target: (image[:, :1], target))
    assert never(*zoom_sample())[0].shape[-2] == 1


@pytest.mark.parametrize("augmentation", ["fit", "multiscale"])
def test_training_flips_then_zooms_or_runs_its_own_augmentation(augmentation):
    config = get_preset(
        "tiny", image_size=[64, 96], train_augmentation=augmentation, train_zoom_crops=1.0
    )
    transforms = training_transforms(config).transforms
    assert isinstance(transforms[0], RandomHorizontalFlip) and isinstance(transforms[1], ZoomCrop)
    torch.manual_seed(0)
    for _ in range(4):  # flipped or not, the small object's crop fills the canvas
        image, target = training_transforms(config)(*zoom_sample())
        assert tuple(image.shape[-2:]) == (64, 96) and target["captions"] == []


def test_zoomed_crops_are_off_by_default_and_checked():
    config = get_preset("tiny", image_size=[96, 96])
    assert config.train_zoom_crops == 0.0
    assert not any(isinstance(t, ZoomCrop) for t in training_transforms(config).transforms)
    with pytest.raises(ValueError, match="train_zoom_crops"):
        get_preset("tiny", train_zoom_crops=1.5)
