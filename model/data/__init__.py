"""Data: COCO-layout multi-task dataset, joint augmentations and a synthetic dataset writer."""

from model.data.coco import CocoMultiTaskDataset
from model.data.synth import write_synthetic_dataset
from model.data.transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResize,
    ResizeLongest,
    build_transforms,
)

__all__ = [
    "CocoMultiTaskDataset",
    "Compose",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResize",
    "ResizeLongest",
    "build_transforms",
    "write_synthetic_dataset",
]
