"""One device-aware stopwatch: wall time per stage, for the pipeline's metrics and the bench.

CUDA kernels run asynchronously: without a synchronisation at each lap, a GPU stage would
measure its kernel launches and the next host copy would absorb its work. Each lap waits for
the device first, so the work lands in the stage that issued it.
"""

from __future__ import annotations

import time

import torch


def synchronize(device: str | torch.device | None) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


class Stopwatch:
    """Consecutive stage durations in seconds; a stage lapped twice accumulates."""

    def __init__(self, device: str | torch.device | None = None, start: float | None = None):
        self.device = device
        self.times: dict[str, float] = {}
        synchronize(device)
        self.start = self.last = time.perf_counter() if start is None else start

    def lap(self, name: str) -> float:
        """Close the stage `name` now. -> this lap's seconds."""
        synchronize(self.device)
        now = time.perf_counter()
        seconds = now - self.last
        self.times[name] = self.times.get(name, 0.0) + seconds
        self.last = now
        return seconds

    def total(self) -> float:
        return self.last - self.start
