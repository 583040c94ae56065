"""Training step time on the same batches in one run: fp32 against bf16 autocast, or (with
--set) the model as it is against the model changed by config overrides, or (with --sdpa)
attention on every scaled-dot-product backend against a few of them.

    python -m mad.bench.train_step [--checkpoint checkpoints/mad-tiny] [--batch-size 16]
    python -m mad.bench.train_step --set fine_memory=true [--base-set 'tasks=["detection"]']
    python -m mad.bench.train_step --device cuda --batch-size 64 --batches 8 \
        --sdpa efficient,flash,math --profile runs/step-profile.txt

Builds batches of generated images at the model's canvas, then alternates the two arms'
steps (forward, backward, optimizer) so that both see the same machine load; prints the
median step time of each and their ratio, and on a GPU the share of a step the host spends
before the device has the work (`host`: near 1, the GPU waits for Python and kernel
launches, or for a per-shape set-up). --batches N cycles N different batches, so that the
shapes change from step to step as in training (sequence counts follow the objects).
With --set or --sdpa, both arms train under bf16 autocast (as `mad train` does) and
--base-set applies overrides to both (e.g. the same tasks); the changed model carries the
checkpoint's weights as `mad train --init C --set ...` does. --profile writes the second
arm's operators (torch.profiler, host and device time) to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.checkpoint import MAD, load_checkpoint
from model.config import parse_overrides
from model.data.batching import CanvasCollate, TrainingBatch, TrainingCollate
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


SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_backends(text: str) -> list[SDPBackend]:
    try:
        return [SDPA_BACKENDS[name.strip()] for name in text.split(",")]
    except KeyError as exc:
        raise SystemExit(
            f"train_step: unknown SDPA backend {exc}; choose from {', '.join(SDPA_BACKENDS)}"
        ) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/mad-tiny"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="variant", action="append", default=[], metavar="K=V")
    parser.add_argument("--base-set", action="append", default=[], metavar="K=V")
    parser.add_argument("--batches", type=int, default=1, help="distinct batches, cycled")
    parser.add_argument(
        "--sdpa",
        default=None,
        metavar="B,B",
        help="second arm's SDPA backends, of "
        + ",".join(SDPA_BACKENDS)
        + " (flash alone cannot run the masked attention; on CPU under bf16, short attention"
        " takes explicit matmuls whatever the backends)",
    )
    parser.add_argument("--profile", type=Path, default=None, help="second arm's operators")
    args = parser.parse_args()
    if args.sdpa and args.variant:
        parser.error("--sdpa and --set are two different comparisons: give one")

    base = changed(load_checkpoint(args.checkpoint)[0], args.base_set)
    base_name = " ".join(args.base_set) or "as is"
    arms: dict[str, tuple[MAD, bool, list[SDPBackend] | None]]  # name -> (model, bf16, SDPA)
    if args.variant:
        arms = {
            base_name: (base, True, None),
            " ".join(args.variant): (changed(base, args.variant), True, None),
        }
    elif args.sdpa:
        arms = {
            "every SDPA backend": (base, True, None),
            f"SDPA {args.sdpa}": (base, True, sdpa_backends(args.sdpa)),
        }
    else:
        arms = {"fp32": (base, False, None), "bf16": (base, True, None)}
    size = max(base.config.image_size)
    n, device = args.batch_size, torch.device(args.device)
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_dataset(Path(root), train=n * args.batches, val=0, seed=0)
        dataset = CocoMultiTaskDataset(Path(root), "train2017", build_transforms(True, size))
        samples = [[dataset[i] for i in range(b * n, (b + 1) * n)] for b in range(args.batches)]
    # Each arm's own sequences (--set may change them), from the same seeds and images.
    batches: dict[int, list[TrainingBatch]] = {}
    for mad, _, _ in arms.values():
        if id(mad) in batches:  # fp32 and bf16 arms share one model
            continue
        collate = TrainingCollate(CanvasCollate(mad.config.image_size), mad.codecs)
        batches[id(mad)] = [collate(s, seed=b).to(device) for b, s in enumerate(samples)]
    device_type = device.type
    optimizers = {}
    for mad, _, _ in arms.values():
        if id(mad) in optimizers:
            continue
        network = mad.required_network().to(args.device).train()
        network.backbone.to(memory_format=torch.channels_last)
        optimizers[id(mad)] = torch.optim.AdamW(network.parameters(), lr=1e-6)

    def step(
        mad: MAD, bf16: bool, backends: list[SDPBackend] | None, b: int
    ) -> tuple[float, float]:
        """One training step on batch b -> (seconds, seconds until the host was done)."""
        batch = batches[id(mad)][b % args.batches]
        network, optimizer = mad.required_network(), optimizers[id(mad)]
        tic = time.perf_counter()
        with (
            sdpa_kernel(backends) if backends else nullcontext(),  # None: PyTorch's choice
            torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16),
        ):
            losses = masked_training_losses(
                network, batch.images, batch.pads, batch.sequences, mad.codecs
            )
        loss = weighted_total(losses.terms, mad.config.task_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # backward kernels follow the forward's choice of SDPA backend
        optimizer.step()
        host = time.perf_counter() - tic
        if device_type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - tic, host

    times: dict[str, list[float]] = {name: [] for name in arms}
    hosts: dict[str, list[float]] = {name: [] for name in arms}
    for mad, bf16, backends in arms.values():  # warm-up: every batch's shapes once
        for b in range(args.batches):
            step(mad, bf16, backends, b)
    for i in range(args.steps):
        for name, (mad, bf16, backends) in arms.items():
            seconds, host = step(mad, bf16, backends, i)
            times[name].append(seconds)
            hosts[name].append(host / seconds)
    (first, first_s), (second, second_s) = ((n, statistics.median(t)) for n, t in times.items())
    ratio = (
        f"{second} takes {second_s / first_s:.2f}x as long"
        if args.variant or args.sdpa
        else f"bf16 speed-up {first_s / second_s:.2f}x"
    )
    host_share = ""
    if device_type == "cuda":
        host_share = (
            " (host "
            + ", ".join(f"{statistics.median(h):.0%}" for h in hosts.values())
            + " of a step)"
        )
    print(
        f"{args.checkpoint.name}, batch {args.batch_size} x {args.batches} batches, {size}px, "
        f"{args.device}, {torch.get_num_threads()} threads: {first} {first_s:.3f} s/step, "
        f"{second} {second_s:.3f} s/step, {ratio}{host_share}"
    )
    if args.profile:
        mad, bf16, backends = arms[second]
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device_type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            for i in range(args.batches):
                step(mad, bf16, backends, i)
        sort = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=40)
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        args.profile.write_text(f"{second}, {args.batches} steps\n{table}\n")
        print(f"wrote {args.profile}")


if __name__ == "__main__":
    main()
