"""`mad train --profile-steps A:B`: torch.profiler over training steps A+1..B, so that a slow
run says where its time goes (host or device, which phase of the step, which operators).

The loop marks its phases (`data`, `sequences`, `forward`, `backward`, `optimizer`) with
`record_function`; outside the window that costs a few microseconds a step. After step B the
report goes to OUT/profile/: `steps.txt` (the phases' and the top operators' host and device
times, per step) and `trace.json` (Chrome trace: chrome://tracing or ui.perfetto.dev).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("data", "sequences", "forward", "backward", "optimizer")
REPORT, TRACE = "steps.txt", "trace.json"


def parse_window(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B): profile the steps after A up to B (0 <= A < B)."""
    first, sep, last = text.partition(":")
    try:
        window = int(first), int(last)
    except ValueError:
        window = (-1, -1)
    if not sep or window[0] < 0 or window[1] <= window[0]:
        raise ValueError(f"{text!r} is not a step window A:B with 0 <= A < B (e.g. 40:50)")
    return window


class StepProfiler:
    """Profiles the steps of a (start, end] window; does nothing without one.

    Call `phase(name)` around each part of a step and `stepped(step)` after each step: the
    profiler starts when step `start` is done and writes its report when step `end` is."""

    def __init__(self, window: tuple[int, int] | None, out_dir: Path, device: torch.device):
        self.window, self.out_dir = window, out_dir / "profile"
        self.cuda = device.type == "cuda"
        self.active: profile | None = None
        self.started = 0.0
        self.paths: list[Path] = []

    def phase(self, name: str) -> contextlib.AbstractContextManager[object]:
        return record_function(name) if self.active is not None else contextlib.nullcontext()

    def stepped(self, step: int) -> None:
        if self.window is None:
            return
        start, end = self.window
        if step == start and self.active is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            if not self.cuda:  # else its tracer logs an ERROR line looking for a GPU
                os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            self.active = profile(activities=activities)
            self.active.__enter__()
            self.started = time.perf_counter()
        elif step == end and self.active is not None:
            self.finish(end - start)

    def finish(self, steps: int) -> None:
        """Stop (the run may end inside the window) and write the report."""
        if self.active is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self.started) * 1000 / max(1, steps)
        self.active.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        report, trace = self.out_dir / REPORT, self.out_dir / TRACE
        report.write_text(summary(self.active, steps, wall_ms, self.cuda))
        self.active.export_chrome_trace(str(trace))
        self.active, self.window, self.paths = None, None, [report, trace]

    def close(self, step: int) -> None:
        """The run ended at `step`: a window it ended inside is reported as far as it got."""
        if self.active is not None and self.window is not None:
            self.finish(step - self.window[0])


def summary(prof: profile, steps: int, wall_ms: float, cuda: bool) -> str:
    """The phases' host (and device) milliseconds per step, then the top operators."""
    events = prof.key_averages()
    per_step = max(1, steps)
    device_key = "device_time_total" if cuda else None
    lines = [
        f"{steps} profiled steps, {wall_ms:.1f} ms per step (wall, profiler on)",
        "",
        "phase       host ms  device ms  (per step)",
    ]
    by_name = {e.key: e for e in events}
    for name in PHASES:
        event = by_name.get(name)
        if event is None:
            continue
        host = event.cpu_time_total / 1000 / per_step
        device = getattr(event, device_key) / 1000 / per_step if device_key else float("nan")
        lines.append(f"{name:<10} {host:8.1f}  {device:9.1f}")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines += ["", f"operators by {sort} (totals over the window, not per step)", ""]
    lines.append(events.table(sort_by=sort, row_limit=30))
    return "\n".join(lines) + "\n"
