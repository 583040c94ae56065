"""Synthetic COCO writer, multi-task loader and joint transforms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors

from model.config import flip_pairs_from_names
from model.data.coco import CocoMultiTaskDataset
from model.data.synth import CATEGORIES, KEYPOINT_NAMES, write_synthetic_dataset
from model.data.transforms import (
    RandomCrop,
    RandomHorizontalFlip,
    RandomResize,
    build_transforms,
    crop,
)

# pycocotools' decode trips a numpy 2 deprecation warning on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPLITS = ("train2017", "val2017")
KINDS = ("instances", "person_keypoints", "captions")
PLURALS = {"person": "people"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, train=6, val=3, seed=7)
    return root


@pytest.fixture(scope="module")
def dataset(synth) -> CocoMultiTaskDataset:
    return CocoMultiTaskDataset(synth, "train2017")


def _load(root: Path, kind: str, split: str = "train2017") -> dict:
    return json.loads((root / "annotations" / f"{kind}_{split}.json").read_text())


def _pixels(root: Path, split: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((root / split).glob("*.png"))]


def _person_index(target: dict) -> int:
    """An object with labelled left and right wrists."""
    kps = target["keypoints"]
    left, right = KEYPOINT_NAMES.index("left_wrist"), KEYPOINT_NAMES.index("right_wrist")
    ok = target["has_keypoints"] & (kps[:, left, 2] > 0) & (kps[:, right, 2] > 0)
    assert ok.any(), "fixture has no person with both wrists labelled"
    return int(ok.nonzero()[0, 0])


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic(synth, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    write_synthetic_dataset(again, train=6, val=3, seed=7, workers=2)  # workers must not matter
    write_synthetic_dataset(other, train=6, val=3, seed=8)
    for split in SPLITS:
        for kind in KINDS:
            name = f"{kind}_{split}.json"
            assert (synth / "annotations" / name).read_bytes() == (
                again / "annotations" / name
            ).read_bytes()
        for a, b in zip(_pixels(synth, split), _pixels(again, split), strict=True):
            np.testing.assert_array_equal(a, b)
    assert _load(synth, "instances") != _load(other, "instances")
    # Train and val come from different streams.
    train0, val0 = _pixels(synth, "train2017")[0], _pixels(synth, "val2017")[0]
    assert train0.shape != val0.shape or not np.array_equal(train0, val0)


def test_empty_split_is_valid(tmp_path):
    write_synthetic_dataset(tmp_path, train=0, val=1, seed=0)
    for kind in KINDS:
        doc = _load(tmp_path, kind)
        assert doc["images"] == [] and doc["annotations"] == []
    assert len(CocoMultiTaskDataset(tmp_path, "train2017")) == 0


def test_coco_files_masks_and_boxes(synth):
    for split in SPLITS:
        coco = COCO(str(synth / "annotations" / f"instances_{split}.json"))
        COCO(str(synth / "annotations" / f"person_keypoints_{split}.json"))
        COCO(str(synth / "annotations" / f"captions_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CATEGORIES
        for ann in coco.dataset["annotations"]:
            img = coco.imgs[ann["image_id"]]
            m = mask_utils.decode(ann["segmentation"])
            assert m.shape == (img["height"], img["width"])
            assert m.sum() == ann["area"] == mask_utils.area(ann["segmentation"]) >= 20
            ys, xs = np.nonzero(m)
            x0, y0 = xs.min(), ys.min()
            assert ann["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
            assert ann["iscrowd"] == 0


def test_keypoints(synth):
    doc = _load(synth, "person_keypoints")
    cat = doc["categories"][0]
    assert cat["name"] == "person" and cat["keypoints"] == KEYPOINT_NAMES
    assert len(cat["skeleton"]) == 19
    assert doc["annotations"], "fixture should contain persons"
    found_visible = False
    for ann in doc["annotations"]:
        assert ann["category_id"] == 1
        kps = np.array(ann["keypoints"]).reshape(17, 3)
        assert ann["num_keypoints"] == int((kps[:, 2] > 0).sum())
        assert (kps[kps[:, 2] == 0, :2] == 0).all()
        x, y, w, h = ann["bbox"]
        vis = kps[kps[:, 2] == 2]
        inside = (vis[:, 0] >= x) & (vis[:, 0] < x + w) & (vis[:, 1] >= y) & (vis[:, 1] < y + h)
        assert inside.all()
        found_visible |= len(vis) > 0
        # Visible joints lie on the figure's own visible pixels.
        m = mask_utils.decode(ann["segmentation"])
        assert all(m[y, x] for x, y, _ in vis)
        # COCO sides: facing the viewer, the left shoulder is on the image right (sideways
        # figures of world v2 have both shoulders at about the same x).
        ls = kps[KEYPOINT_NAMES.index("left_shoulder")]
        rs = kps[KEYPOINT_NAMES.index("right_shoulder")]
        if ls[2] and rs[2]:
            assert ls[0] >= rs[0]
    assert found_visible
    # Instances and keypoint files share annotation ids.
    inst_ids = {a["id"] for a in _load(synth, "instances")["annotations"]}
    assert {a["id"] for a in doc["annotations"]} <= inst_ids


def test_captions(synth):
    inst = _load(synth, "instances")
    names = {c["id"]: c["name"] for c in inst["categories"]}
    present: dict[int, set[str]] = {}
    for ann in inst["annotations"]:
        present.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    caps: dict[int, list[str]] = {}
    for ann in _load(synth, "captions")["annotations"]:
        caps.setdefault(ann["image_id"], []).append(ann["caption"])
    assert set(caps) == {img["id"] for img in inst["images"]}
    for image_id, texts in caps.items():
        assert len(texts) == 5
        words = {n for cat in present[image_id] for n in (cat, PLURALS.get(cat, cat + "s"))}
        for text in texts:
            assert text == text.lower() and len(text.split()) <= 18
            assert words & set(text.split()), (text, present[image_id])


# --------------------------------------------------------------------------- loader


def test_loader_matches_annotations(synth, dataset):
    coco = COCO(str(synth / "annotations" / "instances_train2017.json"))
    assert dataset.class_names == CATEGORIES and dataset.category_ids == [1, 2, 3, 4, 5, 6]
    assert dataset.keypoint_names == KEYPOINT_NAMES and len(dataset.skeleton) == 19
    assert len(dataset) == 6
    for index in range(len(dataset)):
        image, t = dataset[index]
        anns = coco.imgToAnns[t["image_id"]]
        h, w = t["orig_size"]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert image.shape == (3, h, w)
        assert isinstance(t["boxes"], tv_tensors.BoundingBoxes) and t["boxes"].canvas_size == (h, w)
        assert isinstance(t["masks"], tv_tensors.Mask) and t["masks"].shape == (len(anns), h, w)
        assert t["keypoints"].shape == (len(anns), 17, 3) and t["keypoints"].dtype == torch.float32
        assert len(t["captions"]) == 5
        for i, ann in enumerate(anns):
            x, y, bw, bh = ann["bbox"]
            assert t["boxes"][i].tolist() == [x, y, x + bw, y + bh]
            assert dataset.category_ids[int(t["labels"][i])] == ann["category_id"]
            assert int(t["masks"][i].sum()) == ann["area"]
            assert bool(t["has_keypoints"][i]) == (ann.get("num_keypoints", 0) > 0)
            if "keypoints" in ann:
                assert t["keypoints"][i].flatten().tolist() == ann["keypoints"]
        # Pixels loaded match the PNG on disk.
        png = np.asarray(Image.open(synth / "train2017" / coco.imgs[t["image_id"]]["file_name"]))
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), png)


def test_loader_without_optional_files(synth, tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").symlink_to(synth / "train2017")
    (tmp_path / "annotations" / "instances_train2017.json").write_bytes(
        (synth / "annotations" / "instances_train2017.json").read_bytes()
    )
    ds = CocoMultiTaskDataset(tmp_path, "train2017")
    _, t = ds[0]
    assert t["captions"] == []
    # Instances file carries keypoints in the synthetic set, so they still load.
    assert t["keypoints"].shape[1:] == (17, 3)


def test_loader_on_real_coco_conventions(tmp_path):
    """Gapped category ids, polygons, crowd RLE, keypoints only in their own file,
    an image without annotations."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    images = [
        {"id": 42, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 7, "file_name": "b.jpg", "width": 20, "height": 10},
    ]
    for img in images:
        Image.new("L", (img["width"], img["height"]), 99).save(
            tmp_path / "val2017" / img["file_name"]
        )
    person = {"id": 1, "name": "person", "supercategory": "person"}
    cats = [{"id": 90, "name": "toothbrush", "supercategory": "x"}, person]
    cats.append({"id": 18, "name": "dog", "supercategory": "animal"})
    poly = {"id": 5, "image_id": 42, "category_id": 1, "iscrowd": 0, "area": 100.0}
    poly |= {"bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]}
    crowd = {"id": 6, "image_id": 42, "category_id": 18, "iscrowd": 1, "area": 4.0}
    crowd |= {"bbox": [0, 0, 2, 2], "segmentation": {"size": [30, 40], "counts": [0, 2, 28, 2]}}
    tiny = {"id": 8, "image_id": 42, "category_id": 90, "iscrowd": 0, "area": 0.0}
    tiny |= {"bbox": [3, 3, 0.5, 4], "segmentation": [[3, 3, 3.5, 3, 3.5, 7]]}
    base = {"info": {}, "licenses": [], "images": images}
    docs = {
        "instances": {**base, "annotations": [poly, crowd, tiny], "categories": cats},
        "person_keypoints": {
            **base,
            "annotations": [poly | {"keypoints": [10, 8, 2] + [0] * 48, "num_keypoints": 1}],
            "categories": [person | {"keypoints": KEYPOINT_NAMES, "skeleton": [[1, 2]]}],
        },
        "captions": {**base, "annotations": [{"id": 1, "image_id": 7, "caption": " a dog. "}]},
    }
    for kind, doc in docs.items():
        (tmp_path / "annotations" / f"{kind}_val2017.json").write_text(json.dumps(doc))
    ds = CocoMultiTaskDataset(tmp_path, "val2017")
    assert ds.category_ids == [1, 18, 90] and ds.class_names == ["person", "dog", "toothbrush"]
    assert ds.keypoint_names == KEYPOINT_NAMES and ds.ids == [7, 42]
    image, t = ds[1]
    assert image.shape == (3, 30, 40) and t["labels"].tolist() == [0]  # crowd, tiny dropped
    assert t["boxes"].tolist() == [[5.0, 5.0, 15.0, 15.0]] and t["masks"].shape == (1, 30, 40)
    assert t["keypoints"][0, 0].tolist() == [10.0, 8.0, 2.0] and t["has_keypoints"].tolist() == [
        True
    ]
    assert t["captions"] == []
    _, t = CocoMultiTaskDataset(tmp_path, "val2017", include_crowd=True)[1]
    assert t["labels"].tolist() == [0, 1] and t["iscrowd"].tolist() == [False, True]
    _, t = ds[0]
    assert t["boxes"].shape == (0, 4) and t["keypoints"].shape == (0, 17, 3)
    assert t["captions"] == ["a dog."]


# --------------------------------------------------------------------------- transforms


def test_flip_pairs():
    pairs = flip_pairs_from_names(KEYPOINT_NAMES)
    assert len(pairs) == 8
    assert (KEYPOINT_NAMES.index("left_wrist"), KEYPOINT_NAMES.index("right_wrist")) in pairs


def test_horizontal_flip_keeps_a_keypoint_on_its_pixel():
    """A keypoint on the one bright pixel (x=2 of 10) lands on that pixel after the flip
    (x=7): pixel centres mirror, as the image's pixels do."""
    image = torch.zeros(3, 4, 10, dtype=torch.uint8)
    image[:, 1, 2] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes([[2, 1, 3, 2]], format="XYXY", canvas_size=(4, 10)),
        "masks": tv_tensors.Mask(image[:1] > 0),
        "labels": torch.tensor([0]),
        "keypoints": torch.tensor([[[2.0, 1.0, 2.0]]]),
    }
    flipped, out = RandomHorizontalFlip(p=1.0)(tv_tensors.Image(image), target)
    x, y, v = out["keypoints"][0, 0].tolist()
    assert (x, y, v) == (7.0, 1.0, 2.0) and flipped[0, int(y), int(x)] == 255
    assert out["masks"][0, 1, 7] and out["boxes"].tolist() == [[7, 1, 8, 2]]


def test_horizontal_flip_swaps_sides(dataset):
    image, target = next(
        (im, t) for im, t in (dataset[i] for i in range(len(dataset))) if t["has_keypoints"].any()
    )
    i = _person_index(target)
    w = image.shape[-1]
    flip = RandomHorizontalFlip(p=1.0, flip_pairs=flip_pairs_from_names(KEYPOINT_NAMES))
    image2, t2 = flip(image, target)
    torch.testing.assert_close(image2, image.flip(-1))
    torch.testing.assert_close(t2["masks"], target["masks"].flip(-1))
    lw, rw = KEYPOINT_NAMES.index("left_wrist"), KEYPOINT_NAMES.index("right_wrist")
    ox, oy, ov = target["keypoints"][i, rw].tolist()
    assert t2["keypoints"][i, lw].tolist() == [w - 1 - ox, oy, ov]
    boxes = target["boxes"]
    expected = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    torch.testing.assert_close(t2["boxes"].as_subclass(torch.Tensor), expected)
    assert isinstance(t2["boxes"], tv_tensors.BoundingBoxes)
    # Spatial words in captions swap too.
    assert RandomHorizontalFlip(1.0)(image, {**target, "captions": ["a to the left of b"]})[1][
        "captions"
    ] == ["a to the right of b"]


def test_resize_scales_boxes_and_keypoints(dataset):
    image, target = dataset[0]
    h, w = target["orig_size"]
    image2, t2 = RandomResize(0.5, 0.5, max_size=2 * max(h, w))(image, target)
    assert image2.shape[-2:] == (h, w)  # 0.5 * 2 * longest = unchanged
    image2, t2 = RandomResize(0.5, 0.5, max_size=max(h, w))(image, target)
    nh, nw = image2.shape[-2:]
    assert max(nh, nw) == round(max(h, w) / 2) and image2.dtype == torch.uint8
    sx, sy = nw / w, nh / h
    scale = torch.tensor([sx, sy, sx, sy])
    torch.testing.assert_close(t2["boxes"].as_subclass(torch.Tensor), target["boxes"] * scale)
    assert t2["boxes"].canvas_size == (nh, nw) and t2["masks"].shape[-2:] == (nh, nw)
    assert set(t2["masks"].unique().tolist()) <= {0, 1}  # nearest, not blended
    kps, kps2 = target["keypoints"], t2["keypoints"]
    torch.testing.assert_close(kps2[..., 0], kps[..., 0] * sx)
    torch.testing.assert_close(kps2[..., 1], kps[..., 1] * sy)
    assert torch.equal(kps2[..., 2], kps[..., 2])


def test_crop_clips_and_drops():
    h, w = 100, 120
    image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 10:40, 10:50] = 1  # partly inside the crop below
    masks[1, 80:95, 90:110] = 1  # entirely outside it
    kps = torch.zeros(2, 17, 3)
    kps[0, 0] = torch.tensor([20.0, 30.0, 2.0])  # inside the crop
    kps[0, 1] = torch.tensor([12.0, 12.0, 2.0])  # outside it
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[10.0, 10, 50, 40], [90, 80, 110, 95]]), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.tensor([1, 2]),
        "masks": tv_tensors.Mask(masks),
        "keypoints": kps,
        "has_keypoints": torch.tensor([True, False]),
        "captions": ["x"],
    }
    image2, t2 = crop(image, target, top=20, left=15, height=50, width=60)
    assert image2.shape == (3, 50, 60)
    assert t2["labels"].tolist() == [1]
    assert t2["boxes"].tolist() == [[0.0, 0.0, 35.0, 20.0]] and t2["boxes"].canvas_size == (50, 60)
    assert isinstance(t2["boxes"], tv_tensors.BoundingBoxes)
    assert isinstance(t2["masks"], tv_tensors.Mask) and t2["masks"].shape == (1, 50, 60)
    assert int(t2["masks"].sum()) == 20 * 35
    assert t2["keypoints"][0, 0].tolist() == [5.0, 10.0, 2.0]
    assert t2["keypoints"][0, 1].tolist() == [0.0, 0.0, 0.0]
    assert t2["has_keypoints"].tolist() == [True]
    # p=0 is the identity.
    assert RandomCrop(p=0.0)(image, target)[1] is target


def test_build_transforms(dataset):
    pairs = flip_pairs_from_names(dataset.keypoint_names)
    image, target = dataset[1]
    image2, t2 = build_transforms(False, 160, pairs)(image, target)
    assert max(image2.shape[-2:]) == 160 and len(t2["labels"]) == len(target["labels"])
    train = build_transforms(True, 160, pairs)
    torch.manual_seed(0)
    for i in range(len(dataset)):
        image2, t2 = train(*dataset[i])
        assert 0.6 * 160 - 1 <= max(image2.shape[-2:]) <= 160 and image2.dtype == torch.uint8
        assert t2["boxes"].canvas_size == tuple(image2.shape[-2:]) == t2["masks"].shape[-2:]
        n = len(t2["labels"])
        assert t2["boxes"].shape == (n, 4) and t2["keypoints"].shape == (n, 17, 3)
