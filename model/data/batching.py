"""Training batches: letterbox images into the model canvas and normalise targets to it.

Also a deterministic sampler: the (image, augmentation seed) of every sample is a function of
(seed, global step, rank), so training resumes exactly and any worker count gives the same
batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from model.preprocess import letterbox

# One training sample: uint8 image [3, h, w] and its target (tensors, captions, ids).
Target = dict[str, Any]
Sample = tuple[torch.Tensor, Target]
Batch = tuple[torch.Tensor, torch.Tensor, list[Target]]


class Samples(Protocol):
    """A data set of samples with a length (CocoMultiTaskDataset)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


def to_canvas(
    image: torch.Tensor, target: Target, canvas: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, Target]:
    """One (uint8 image [3, h, w], pixel target) -> (canvas image, pad mask, normalised
    target: boxes [N, 4] and keypoints [N, K, 3] in [0, 1] of the canvas, masks [N, H, W])."""
    pixels, pad, scale = letterbox(image, canvas)
    H, W = canvas
    h, w = image.shape[-2:]
    nh, nw = int((~pad).any(1).sum()), int((~pad).any(0).sum())
    size = torch.tensor([W, H, W, H], dtype=torch.float)
    masks = target["masks"].float()
    if len(masks):
        masks = F.interpolate(masks[:, None], size=(nh, nw), mode="nearest")[:, 0]
    else:
        masks = masks.new_zeros(0, nh, nw)
    keypoints = target["keypoints"].float().clone()
    keypoints[..., :2] = keypoints[..., :2] * scale / size[:2]
    normalised = {
        "boxes": (target["boxes"].float() * scale / size).clamp(0, 1),
        "labels": target["labels"].long(),
        "masks": F.pad(masks, (0, W - nw, 0, H - nh)) > 0.5,
        "keypoints": keypoints,
        "captions": list(target.get("captions", [])),
        "image_id": target.get("image_id", -1),
        "image_size": (h, w),
    }
    return pixels, pad, normalised


class CanvasCollate:
    def __init__(self, canvas: tuple[int, int]):
        height, width = canvas
        self.canvas = (height, width)

    def __call__(self, batch: list[Sample]) -> Batch:
        """[(image, target)] -> (images [B, 3, H, W], pad masks [B, H, W], list of targets)"""
        items = [to_canvas(image, target, self.canvas) for image, target in batch]
        images, pads, targets = zip(*items, strict=True)
        return torch.stack(images), torch.stack(pads), list(targets)


class SeededDataset(Dataset[Sample]):
    """Wraps a dataset so item (index, seed) is augmented with its own seeded randomness."""

    def __init__(self, dataset: Samples):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, seed = key
        torch.manual_seed(seed)
        random.seed(seed)
        return self.dataset[index]


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields the batches of steps start_step.. as lists of (index, seed).

    Global sample g of rank r at step s is g = (s * world + r) * batch + j; its image is the
    (g mod N)-th of epoch g // N's permutation, and its augmentation seed is derived from g.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        total_steps: int | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world = rank, world
        self._epoch, self._perm = -1, torch.zeros(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
        return self._perm

    def batch(self, step: int) -> list[tuple[int, int]]:
        out = []
        for j in range(self.batch_size):
            g = (step * self.world + self.rank) * self.batch_size + j
            out.append(
                (int(self.permutation(g // self.size)[g % self.size]), self.seed * 1_000_003 + g)
            )
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        return (self.total_steps or 0) - self.start_step
