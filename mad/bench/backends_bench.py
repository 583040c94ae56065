"""Eager PyTorch vs ONNX Runtime: end-to-end pipeline latency of the same requests, one run.

The backends alternate every repeat (torch, onnx, torch, onnx, ...) so that load from other
processes, thermal state and caches hit both alike; the figure that matters is the ratio.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mad.bench.stats import summarize
from model.inference_io import Request
from model.pipeline import Pipeline
from runtime.backends import create_runner


def compare_backends(
    checkpoint: str | Path,
    images: list[Image.Image],
    tasks: tuple[str, ...],
    repeats: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    refine_steps: dict[str, int] | None = None,
    backends: tuple[str, ...] = ("torch", "onnx"),
    **options: Any,
) -> dict[str, Any]:
    """Time `Pipeline(requests)` for each backend on one batch holding `images`.

    -> {"backends": {name: {median_ms, p90_ms, p99_ms, mean_ms, min_ms, max_ms, n, describe}},
        "ratio": baseline median / other median (> 1: the second backend is faster),
        "images", "tasks", "repeats", "warmup", "torch_threads"}
    options go to runtime.backends.create_runner (export_dir, which onnx needs; threads,
    precision, ...).
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
    report: dict[str, Any] = {
        "backends": {
            b: {**summarize(times[b]), "describe": pipelines[b].runner.describe()} for b in backends
        },
        "images": len(images),
        "tasks": list(tasks),
        "repeats": repeats,
        "warmup": warmup,
        "torch_threads": torch.get_num_threads(),
    }
    if len(backends) == 2:
        first, second = (report["backends"][b]["median_ms"] for b in backends)
        report["ratio"] = first / second
        report["ratio_of"] = f"{backends[0]} median / {backends[1]} median"
    return report
