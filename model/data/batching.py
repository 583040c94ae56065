"""Training batches: letterbox images into the model canvas and normalise targets to it.

A batch runs on one canvas: the model's, or its transpose for portrait images on a landscape
canvas (model.preprocess.image_canvas). The sampler therefore draws each batch from one
orientation group (as detectron2's aspect-ratio grouping does for the reference), and the
collate puts the rare image whose augmentation changed its orientation on its batch's canvas.

The sampler is deterministic: the (image, augmentation seed) of every sample is a function of
(seed, global step, rank), so training resumes exactly and any worker count gives the same
batches. `TrainingCollate` also builds each task's masked training sequences, in the loader's
workers, seeded by the batch's first sample so that they too are the same in any process.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from model.config import ModelConfig
from model.preprocess import Size, canvas_groups, image_canvas, letterbox

if TYPE_CHECKING:
    from model.codecs.base import TrainSequences

# One training sample: uint8 image [3, h, w] and its target (tensors, captions, ids).
Target = dict[str, Any]
Sample = tuple[torch.Tensor, Target]
Batch = tuple[torch.Tensor, torch.Tensor, list[Target]]


class Samples(Protocol):
    """A data set of samples with a length (CocoMultiTaskDataset)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


def to_canvas(
    image: torch.Tensor, target: Target, canvas: Size, upscale: bool = True
) -> tuple[torch.Tensor, torch.Tensor, Target]:
    """One (uint8 image [3, h, w], pixel target) -> (canvas image, pad mask, normalised
    target: boxes [N, 4] and keypoints [N, K, 3] in [0, 1] of the canvas, masks [N, H, W]).
    upscale=False keeps an image that fits at its size (`letterbox`)."""
    pixels, pad, scale = letterbox(image, canvas, upscale)
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
    if "seed" in target:  # a training sample's augmentation seed (SeededDataset)
        normalised["seed"] = target["seed"]
    return pixels, pad, normalised


def batch_canvas(sizes: list[Size], canvas: Size) -> Size:
    """The canvas of a batch of (h, w) images: the one most of them run on (the model's
    `canvas` on a tie)."""
    groups = canvas_groups(sizes, canvas)
    return max(groups, key=lambda c: (len(groups[c]), c == canvas), default=canvas)


class CanvasCollate:
    """[(image, target)] -> one batch on the canvas most of its images run on. upscale: fit
    every image to the canvas (the "fit" augmentation), else keep the size the augmentation
    chose ("multiscale")."""

    def __init__(self, canvas: Size, upscale: bool = True):
        height, width = canvas
        self.canvas, self.upscale = (height, width), upscale

    @classmethod
    def for_config(cls, config: ModelConfig) -> CanvasCollate:
        return cls(config.image_size, upscale=config.train_augmentation == "fit")

    def __call__(self, batch: list[Sample]) -> Batch:
        """[(image, target)] -> (images [B, 3, H, W], pad masks [B, H, W], list of targets)"""
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image, _ in batch]
        canvas = batch_canvas(sizes, self.canvas)
        items = [to_canvas(image, target, canvas, self.upscale) for image, target in batch]
        images, pads, targets = zip(*items, strict=True)
        return torch.stack(images), torch.stack(pads), list(targets)


class SequenceBuilder(Protocol):
    """What TrainingCollate needs of a task codec (model.codecs.base.TaskCodec)."""

    def training_sequences(
        self, targets: list[dict], generator: torch.Generator
    ) -> TrainSequences: ...


def sequence_generator(seed: int) -> torch.Generator:
    """The generator of the sequences of a batch whose first sample has augmentation seed
    `seed`. torch seeds its CPU generator from the seed's low 32 bits only, so the seed is
    mixed first (splitmix64's finaliser): seeding with `seed` itself, or any offset of it by
    a multiple of 2^32, would replay that sample's augmentation draws."""
    z = (seed + 0x9E3779B97F4A7C15) % 2**64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
    return torch.Generator().manual_seed(z ^ (z >> 31))


@dataclass
class TrainingBatch:
    """One step's input: images [B, 3, H, W] in [0, 1], pad masks [B, H, W] and each task's
    masked training sequences for them."""

    images: torch.Tensor
    pads: torch.Tensor
    sequences: dict[str, TrainSequences]

    def pin_memory(self) -> TrainingBatch:
        """Page-locked copies (DataLoader(pin_memory=True) calls this): the copies to a GPU
        can then run asynchronously."""
        return TrainingBatch(
            self.images.pin_memory(),
            self.pads.pin_memory(),
            {name: seqs.pin_memory() for name, seqs in self.sequences.items()},
        )

    def to(self, device: torch.device) -> TrainingBatch:
        """On `device` (images channels-last, as the backbone); non-blocking from pinned
        memory."""
        return TrainingBatch(
            self.images.to(device, memory_format=torch.channels_last, non_blocking=True),
            self.pads.to(device, non_blocking=True),
            {name: seqs.to(device, non_blocking=True) for name, seqs in self.sequences.items()},
        )


class TrainingCollate:
    """[(image, target)] of one step -> TrainingBatch: the canvas batch (CanvasCollate) and
    every task's masked sequences. In the DataLoader's workers this keeps the sequences' host
    work off the training loop (`python -m mad.bench.train_data` times both parts). Their
    randomness is seeded by the first sample's augmentation seed (SeededDataset), or by `seed`
    when given."""

    def __init__(self, canvas: CanvasCollate, codecs: Mapping[str, SequenceBuilder]):
        self.canvas, self.codecs = canvas, dict(codecs)

    def __call__(self, batch: list[Sample], seed: int | None = None) -> TrainingBatch:
        images, pads, targets = self.canvas(batch)
        return TrainingBatch(images, pads, self.sequences(targets, seed))

    def sequences(
        self, targets: list[Target], seed: int | None = None
    ) -> dict[str, TrainSequences]:
        """Each task's masked sequences for a canvas batch's targets."""
        if seed is None:
            if not targets or "seed" not in targets[0]:
                raise ValueError("no seed: give one, or samples from a SeededDataset")
            seed = int(targets[0]["seed"])
        generator = sequence_generator(seed)
        return {
            name: codec.training_sequences(targets, generator)
            for name, codec in self.codecs.items()
        }


def transposed_images(sizes: Sequence[Size], canvas: Size) -> list[bool] | None:
    """Which of the (h, w) images run on the transposed canvas (the sampler's orientation
    groups); None when none does (a square canvas, or one orientation only)."""
    flags = [image_canvas(size, canvas) != canvas for size in sizes]
    return flags if any(flags) else None


class SeededDataset(Dataset[Sample]):
    """Wraps a dataset so item (index, seed) is augmented with its own seeded randomness; its
    target carries the seed (TrainingCollate's sequences draw from the first one's)."""

    def __init__(self, dataset: Samples):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, seed = key
        # The CPU generator alone: where CUDA has not started, torch.manual_seed also queues
        # a seed for every GPU and records where it was called from, 7% of a worker's time.
        torch.random.default_generator.manual_seed(seed % 2**64)  # seeds below 2^64
        random.seed(seed)
        image, target = self.dataset[index]
        return image, {**target, "seed": seed}


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields the batches of steps start_step.. as lists of (index, seed).

    Rank r's batch at step s is batch n = s * world + r; its sample j is global sample
    g = n * batch + j, whose augmentation seed is derived from g. Its image is the (g mod N)-th
    of epoch g // N's permutation of the N images; or, given `transposed` (the orientation
    group of each image, `transposed_images`), each batch comes from one group: with T
    transposed images, batch n is a transposed one when floor((n + 1) T / N) > floor(n T / N)
    (such batches spread evenly at the group's share) and takes the next images of its
    group's own sequence of permutations.
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
        transposed: Sequence[bool] | None = None,
    ):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world = rank, world
        flags = list(transposed) if transposed is not None else [False] * size
        if len(flags) != size:
            raise ValueError(f"{len(flags)} orientation flags for {size} images")
        # The images of each group (0: the model's canvas, 1: transposed).
        self.members = [
            torch.tensor([i for i, flag in enumerate(flags) if flag == group], dtype=torch.long)
            for group in (False, True)
        ]
        self.grouped = 0 < len(self.members[1]) < size
        self._orders: dict[int, tuple[int, torch.Tensor]] = {}  # group -> (epoch, order)

    def permutation(self, epoch: int, group: int = 0) -> torch.Tensor:
        """Epoch `epoch`'s order of the data set, or of a group's members when grouped."""
        cached = self._orders.get(group)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch + group * 1_000_033)
            count = len(self.members[group]) if self.grouped else self.size
            cached = self._orders[group] = (epoch, torch.randperm(count, generator=g))
        return cached[1]

    def batch(self, step: int) -> list[tuple[int, int]]:
        n, size = step * self.world + self.rank, self.batch_size
        seeds = [self.seed * 1_000_003 + n * size + j for j in range(size)]
        if not self.grouped:
            samples = range(n * size, (n + 1) * size)
            return [
                (int(self.permutation(g // self.size)[g % self.size]), seed)
                for g, seed in zip(samples, seeds, strict=True)
            ]
        transposed = len(self.members[1])
        before = n * transposed // self.size  # transposed batches before batch n
        group = int((n + 1) * transposed // self.size > before)
        members = self.members[group]
        first = (before if group else n - before) * size  # the group's images drawn so far
        out = []
        for k, seed in zip(range(first, first + size), seeds, strict=True):
            order = self.permutation(k // len(members), group)
            out.append((int(members[order[k % len(members)]]), seed))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        return (self.total_steps or 0) - self.start_step
