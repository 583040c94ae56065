"""Training step time on the same batches in one run: fp32 against bf16 autocast, or (with
--set) the model as it is against the model changed by config overrides.

    python -m mad.bench.train_step [--checkpoint checkpoints/mad-tiny] [--batch-size 16]
    python -m mad.bench.train_step --set fine_memory=true [--base-set 'tasks=["detection"]']

Builds a batch of generated images at the model's canvas, then alternates the two arms'
steps (forward, backward, optimizer) so that both see the same machine load; prints the
median step time of each and their ratio. With --set, both arms train under bf16 autocast
(as `mad train` does) and --base-set applies overrides to both (e.g. the same tasks); the
changed model carries the checkpoint's weights as `mad train --init C --set ...` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from model.checkpoint import MAD, load_checkpoint
from model.config import parse_overrides
from model.data.batching import CanvasCollate
from model.data.coco import CocoMultiTaskDataset
from model.data.synth import write_synthetic_dataset
from model.data.transforms import build_transforms
from model.losses import masked_training_losses, weighted_total
from model.transfer import carry_weights


def changed(mad: MAD, items: list[str]) -> MAD:
    """`mad` changed by --set style overrides, its weights carried (mad train --init --set)."""
    if not items:
        return mad
    try:
        values = parse_overrides(items)
    except ValueError as exc:
        raise SystemExit(f"train_step: {exc}") from None
    other = MAD.build(dataclasses.replace(mad.config, **values), mad.tokenizer)
    carry_weights(mad, other)
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/mad-tiny"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="variant", action="append", default=[], metavar="K=V")
    parser.add_argument("--base-set", action="append", default=[], metavar="K=V")
    args = parser.parse_args()

    base = changed(load_checkpoint(args.checkpoint)[0], args.base_set)
    base_name = " ".join(args.base_set) or "as is"
    arms: dict[str, tuple[MAD, bool]]  # name -> (model, bf16)
    if args.variant:
        arms = {
            base_name: (base, True),
            " ".join(args.variant): (changed(base, args.variant), True),
        }
    else:
        arms = {"fp32": (base, False), "bf16": (base, True)}
    size = max(base.config.image_size)
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_dataset(Path(root), train=args.batch_size, val=0, seed=0)
        dataset = CocoMultiTaskDataset(Path(root), "train2017", build_transforms(True, size))
        images, pads, targets = CanvasCollate(base.config.image_size)(
            [dataset[i] for i in range(args.batch_size)]
        )
    images = images.to(args.device, memory_format=torch.channels_last)
    pads = pads.to(args.device)
    device_type = torch.device(args.device).type
    optimizers = {}
    for mad, _ in arms.values():
        network = mad.required_network().to(args.device).train()
        network.backbone.to(memory_format=torch.channels_last)
        optimizers[id(mad)] = torch.optim.AdamW(network.parameters(), lr=1e-6)

    def step(mad: MAD, bf16: bool) -> float:
        generator = torch.Generator().manual_seed(0)  # the same sequences for both arms
        sequences = {
            n: c.training_sequences(targets, generator).to(args.device)
            for n, c in mad.codecs.items()
        }
        network, optimizer = mad.required_network(), optimizers[id(mad)]
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

    times: dict[str, list[float]] = {name: [] for name in arms}
    for mad, bf16 in arms.values():  # warm-up
        step(mad, bf16)
    for _ in range(args.steps):
        for name, (mad, bf16) in arms.items():
            times[name].append(step(mad, bf16))
    (first, first_s), (second, second_s) = ((n, statistics.median(t)) for n, t in times.items())
    ratio = (
        f"{second} takes {second_s / first_s:.2f}x as long"
        if args.variant
        else f"bf16 speed-up {first_s / second_s:.2f}x"
    )
    print(
        f"{args.checkpoint.name}, batch {args.batch_size}, {size}px, {args.device}, "
        f"{torch.get_num_threads()} threads: {first} {first_s:.3f} s/step, "
        f"{second} {second_s:.3f} s/step, {ratio}"
    )


if __name__ == "__main__":
    main()
