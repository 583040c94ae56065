"""Multi-task COCO 2017 dataset: detection, instance masks, person keypoints and captions.

Reads the standard files (instances, person_keypoints, captions) and merges them per image.
Works on real COCO (ids 1..90 with gaps, crowd, polygon/RLE) and on the synthetic set.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from model.data.transforms import Transform
from model.startup import StartupError


def load_coco(path: Path) -> COCO | None:
    """A COCO annotation file (None when there is none); a StartupError naming it when it is
    not one."""
    if not path.is_file():
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            return COCO(str(path))
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as exc:
        # (JSON errors are ValueErrors; pycocotools asserts the top level is an object)
        problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise StartupError(f"{path} is not a COCO annotation file ({problem})") from None


class CocoMultiTaskDataset(torch.utils.data.Dataset):
    """`(image, target)` pairs for COCO-layout data under `root`.

    Only `annotations/instances_<split>.json` is required; without person_keypoints or
    captions files those tasks simply have no labels. Crowd annotations are skipped unless
    `include_crowd` (then `target["iscrowd"]` marks them, for evaluation-style uses).
    """

    def __init__(
        self,
        root: Path,
        split: str = "train2017",
        transforms: Transform | None = None,
        include_crowd: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_dir = self.root / split
        self.transforms = transforms
        self.include_crowd = include_crowd
        ann_dir = self.root / "annotations"
        coco = load_coco(ann_dir / f"instances_{split}.json")
        if coco is None:
            raise FileNotFoundError(ann_dir / f"instances_{split}.json")
        self.coco: COCO = coco
        # Read for its keypoints and schema only, then dropped: on COCO it is hundreds of MB
        # that every training rank and loader worker would otherwise keep.
        keypoints_coco = load_coco(ann_dir / f"person_keypoints_{split}.json")
        # Captions via plain json: pycocotools' index chokes on caption files that list
        # categories, and all we need is image_id -> texts.
        self._captions: dict[int, list[str]] = {}
        caps_path = ann_dir / f"captions_{split}.json"
        if caps_path.is_file():
            for ann in json.loads(caps_path.read_text()).get("annotations", []):
                self._captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())

        # Contiguous class indices, in category id order (COCO ids have gaps).
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in cats]
        self.class_names: list[str] = [c["name"] for c in cats]
        self.cat_to_label = {cid: i for i, cid in enumerate(self.category_ids)}

        # Keypoint schema from the person category (keypoints file first, instances fallback).
        self.keypoint_names: list[str] = []
        self.skeleton: list[list[int]] = []
        for source in (keypoints_coco, self.coco):
            kp_cats = [
                c
                for c in (source.dataset.get("categories", []) if source else [])
                if c.get("keypoints")
            ]
            if kp_cats:
                self.keypoint_names = list(kp_cats[0]["keypoints"])
                self.skeleton = [list(p) for p in kp_cats[0].get("skeleton", [])]
                break

        # Keypoints by annotation id; real COCO keeps them only in person_keypoints_*.json.
        self._keypoints: dict[int, list[float]] = {}
        for source in (self.coco, keypoints_coco):
            if source is not None:
                for ann in source.dataset.get("annotations", []):
                    if ann.get("keypoints"):
                        self._keypoints[ann["id"]] = ann["keypoints"]

        # Every image, including those without annotations (they still have captions).
        self.ids: list[int] = sorted(self.coco.imgs)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_keypoints(self) -> bool:
        """Whether any annotation carries keypoints (a detection-only set has none)."""
        return bool(self._keypoints)

    def load_image(self, image_id: int) -> torch.Tensor:
        # PIL rather than torchvision.io, whose decoders are deprecated from 0.29 on.
        with Image.open(self.image_dir / self.coco.imgs[image_id]["file_name"]) as im:
            array = np.array(im.convert("RGB"))
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def load_target(self, image_id: int) -> dict:
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        k = len(self.keypoint_names)
        boxes, labels, masks, keypoints, has_kps, crowd = [], [], [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            is_crowd = bool(ann.get("iscrowd", 0))
            if is_crowd and not self.include_crowd:
                continue
            x, y, bw, bh = ann["bbox"]
            x0, y0 = max(0.0, x), max(0.0, y)  # COCO boxes sometimes poke past the edge
            x1, y1 = min(float(w), x + bw), min(float(h), y + bh)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.cat_to_label[ann["category_id"]])
            with warnings.catch_warnings():  # pycocotools vs numpy 2 copy= deprecation noise
                warnings.simplefilter("ignore", DeprecationWarning)
                masks.append(self.coco.annToMask(ann))
            kp = np.zeros((k, 3), dtype=np.float32)
            raw = self._keypoints.get(ann["id"])
            if raw is not None and k:
                kp = np.asarray(raw, dtype=np.float32).reshape(k, 3)
            keypoints.append(kp)
            # Usable keypoint labels need at least one labelled (v > 0) joint.
            has_kps.append(bool((kp[:, 2] > 0).any()))
            crowd.append(is_crowd)

        n = len(boxes)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                format="XYXY",
                canvas_size=(h, w),
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": tv_tensors.Mask(
                torch.from_numpy(np.stack(masks)) if n else torch.zeros(0, h, w, dtype=torch.uint8)
            ),
            "keypoints": torch.from_numpy(np.stack(keypoints)) if n else torch.zeros(0, k, 3),
            "has_keypoints": torch.tensor(has_kps, dtype=torch.bool),
            "iscrowd": torch.tensor(crowd, dtype=torch.bool),
            "captions": self.captions(image_id),
            "image_id": int(image_id),
            "orig_size": (h, w),
        }

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image, in index order, from the annotation file."""
        return [
            (int(self.coco.imgs[i]["height"]), int(self.coco.imgs[i]["width"])) for i in self.ids
        ]

    def captions(self, image_id: int) -> list[str]:
        return list(self._captions.get(image_id, []))

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict]:
        image_id = self.ids[index]
        image = tv_tensors.Image(self.load_image(image_id))
        target = self.load_target(image_id)
        if tuple(image.shape[-2:]) != target["orig_size"]:
            raise ValueError(f"image {image_id}: size {tuple(image.shape[-2:])} != annotation")
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
