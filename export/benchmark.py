"""Eager PyTorch vs ONNX Runtime: end-to-end pipeline latency of the same requests, one run.

The backends alternate every repeat (torch, onnx, torch, onnx, ...) so that load from other
processes, thermal state and caches hit both alike; the figure that matters is the ratio.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from export.backends import create_runner
from model.pipeline import Pipeline, Request


def compare_backends(checkpoint: str | Path, images: list[Image.Image], tasks: tuple[str, ...],
                     repeats: int = 20, warmup: int = 3, device: str = "cpu",
                     refine_steps: dict[str, int] | None = None,
                     backends: tuple[str, ...] = ("torch", "onnx"), **options) -> dict:
    """Time `Pipeline(requests)` for each backend on one batch holding `images`.

    -> {"backends": {name: {median_ms, p90_ms, mean_ms, min_ms, describe}},
        "ratio": baseline median / other median (> 1: the second backend is faster),
        "images", "tasks", "repeats", "warmup", "threads"}
    options go to create_runner (export_dir, threads, precision, ...).
    """
    requests = [Request(image, tuple(tasks), dict(refine_steps or {})) for image in images]
    pipelines = {}
    for backend in backends:
        mad, runner = create_runner(backend, checkpoint, device, **options)
        pipelines[backend] = Pipeline(mad, runner)
    times: dict[str, list[float]] = {b: [] for b in backends}
    for i in range(warmup + repeats):
        for backend, pipeline in pipelines.items():
            start = time.perf_counter()
            pipeline(requests)
            if i >= warmup:
                times[backend].append(time.perf_counter() - start)
    report = {"backends": {b: {**summarize(times[b]), "describe": pipelines[b].runner.describe()}
                           for b in backends},
              "images": len(images), "tasks": list(tasks), "repeats": repeats, "warmup": warmup,
              "torch_threads": torch.get_num_threads()}
    if len(backends) == 2:
        first, second = (report["backends"][b]["median_ms"] for b in backends)
        report["ratio"] = first / second
        report["ratio_of"] = f"{backends[0]} median / {backends[1]} median"
    return report


def summarize(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return {"median_ms": statistics.median(ms), "p90_ms": p90, "mean_ms": statistics.fmean(ms),
            "min_ms": ms[0]}
