"""Timing helpers: warm-up, repeated runs, medians and tail percentiles, ratios.

Every timed region ends with a device synchronisation: CUDA kernels run asynchronously, so
without it a GPU timing measures the launch, not the work.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from model.stopwatch import synchronize


def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated q-th percentile (0..100) of `values` (numpy's default method)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(seconds: list[float]) -> dict[str, float]:
    """Seconds of repeated runs -> milliseconds: median, p90, p99, mean, min, max, n."""
    ms = [s * 1000 for s in seconds]
    if not ms:
        return {"n": 0}
    return {
        "median_ms": statistics.median(ms),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "n": len(ms),
    }


def time_call(fn: Callable[[], object], device: str | torch.device | None = None) -> float:
    """Wall seconds of one call, synchronised on `device` before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(
    fn: Callable[[], object], repeats: int, warmup: int, device: str | torch.device | None = None
) -> dict[str, float]:
    """Run `fn` warmup times untimed (lazy init, allocator, autotuning), then `repeats` timed."""
    for _ in range(warmup):
        fn()
    return summarize([time_call(fn, device) for _ in range(repeats)])


def ratio(slow: float | None, fast: float | None) -> float | None:
    """slow / fast (how many times faster `fast` is), None when either is missing."""
    if slow is None or fast is None or fast <= 0 or math.isnan(slow) or math.isnan(fast):
        return None
    return slow / fast


def median(stats: Mapping[str, Any] | None) -> float | None:
    return None if not stats else stats.get("median_ms")
