"""Training data throughput of one loader worker: loading and augmenting a batch, putting it
on the canvas and building its tasks' training sequences (what `mad train`'s DataLoader
workers do), and so how many workers keep a training step of a given length fed.

    python -m mad.bench.train_data --data data/mix [--checkpoint checkpoints/mad-tiny] \
        [--batch-size 64] [--batches 8] [--step-s 0.075]

Runs the batches of `mad train`'s first steps (its sampler, augmentation and collate, seed 0)
in this process on one thread, as a worker runs. Prints each part's median and range per
batch and one worker's images per second; with --step-s (a step's time on the target device,
e.g. from mad.bench.train_step) also the workers that keep such steps fed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from mad.bench.stats import summarize
from model.checkpoint import load_checkpoint
from model.config import flip_pairs_from_names
from model.data.batching import (
    CanvasCollate,
    SeededDataset,
    StepBatchSampler,
    TrainingCollate,
    transposed_images,
)
from model.data.coco import CocoMultiTaskDataset
from model.data.transforms import training_transforms
from model.stopwatch import Stopwatch

PARTS = ("load", "canvas", "sequences")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a COCO-layout training set")
    parser.add_argument("--split", default="train2017")
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/mad-tiny"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="timed (one more warms up)")
    parser.add_argument("--step-s", type=float, default=None, help="a training step's seconds")
    args = parser.parse_args()
    if args.batch_size < 1 or args.batches < 1:
        parser.error("--batch-size and --batches must be at least 1")

    torch.set_num_threads(1)  # a DataLoader worker's setting
    mad = load_checkpoint(args.checkpoint)[0]
    config = mad.config
    transforms = training_transforms(config, flip_pairs_from_names(config.keypoint_names))
    dataset = CocoMultiTaskDataset(args.data, args.split, transforms)
    samples = SeededDataset(dataset)
    collate = TrainingCollate(CanvasCollate.for_config(config), mad.codecs)
    flags = transposed_images(dataset.image_sizes(), config.image_size)
    sampler = StepBatchSampler(
        len(dataset), args.batch_size, 0, total_steps=args.batches + 1, transposed=flags
    )
    times: dict[str, list[float]] = {part: [] for part in PARTS}
    for i, keys in enumerate(sampler):
        watch = Stopwatch()
        batch = [samples[key] for key in keys]
        watch.lap("load")
        _, _, targets = collate.canvas(batch)
        watch.lap("canvas")
        collate.sequences(targets)
        watch.lap("sequences")
        if i > 0:  # the first batch warms up (imports, caches)
            for part in PARTS:
                times[part].append(watch.times[part])

    totals = [sum(t) for t in zip(*times.values(), strict=True)]
    print(
        f"{args.data.name}, batch {args.batch_size} x {args.batches}, "
        f"{config.image_size[0]}x{config.image_size[1]} canvas, one thread:"
    )
    stats = {part: summarize(seconds) for part, seconds in {**times, "per batch": totals}.items()}
    for part, row in stats.items():
        print(
            f"  {part:<10} median {row['median_ms']:7.1f} ms"
            f"  (min {row['min_ms']:.1f}, max {row['max_ms']:.1f})"
        )
    per_batch = stats["per batch"]["median_ms"] / 1000
    rate = args.batch_size / per_batch
    print(f"  one worker: {rate:.1f} images/s")
    if args.step_s:
        needed = math.ceil(per_batch / args.step_s)
        print(
            f"  steps of {args.step_s:.3f} s ({args.batch_size / args.step_s:.0f} images/s) "
            f"need {needed} worker{'s' if needed != 1 else ''}"
        )


if __name__ == "__main__":
    main()
