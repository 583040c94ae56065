"""Training step time, fp32 against bf16 autocast, on the same batches in one run.

    python -m mad.bench.train_step [--checkpoint checkpoints/mad-tiny] [--batch-size 16]

Builds a batch of generated images at the model's canvas, then alternates fp32 and bf16
steps (forward, backward, optimizer) so that both see the same machine load; prints the
median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.data.batching import CanvasCollate
from model.data.coco import CocoMultiTaskDataset
from model.data.synth import write_synthetic_dataset
from model.data.transforms import build_transforms
from model.losses import masked_training_losses, weighted_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/mad-tiny"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per precision")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    mad, _ = load_checkpoint(args.checkpoint, args.device)
    network = mad.required_network().train()
    network.backbone.to(memory_format=torch.channels_last)
    size = max(mad.config.image_size)
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_dataset(Path(root), train=args.batch_size, val=0, seed=0)
        dataset = CocoMultiTaskDataset(Path(root), "train2017", build_transforms(True, size))
        images, pads, targets = CanvasCollate(mad.config.image_size)(
            [dataset[i] for i in range(args.batch_size)]
        )
    images = images.to(args.device, memory_format=torch.channels_last)
    pads = pads.to(args.device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(0)
    device_type = torch.device(args.device).type

    def step(bf16: bool) -> float:
        sequences = {
            n: c.training_sequences(targets, generator).to(args.device)
            for n, c in mad.codecs.items()
        }
        tic = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            losses = masked_training_losses(network, images, pads, sequences, mad.codecs)
        loss = weighted_total(losses, mad.config.task_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - tic

    times: dict[bool, list[float]] = {False: [], True: []}
    for bf16 in (False, True):  # warm-up
        step(bf16)
    for _ in range(args.steps):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    fp32_s, bf16_s = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"{args.checkpoint.name}, batch {args.batch_size}, {size}px, {args.device}, "
        f"{torch.get_num_threads()} threads: fp32 {fp32_s:.3f} s/step, "
        f"bf16 {bf16_s:.3f} s/step, bf16 speed-up {fp32_s / bf16_s:.2f}x"
    )


if __name__ == "__main__":
    main()
