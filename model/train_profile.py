"""`mad train --profile-steps A:B`: torch.profiler over training steps A+1..B, so that a slow
run says where its time goes (which phase of the step holds the host, how busy the GPU is,
which operators).

While profiling, the loop marks its phases (`data`, `forward`, `backward`, `optimizer`) with
`record_function`. After step B the report goes to OUT/profile/:
`steps.txt` (wall time, each phase's host time and the GPU's busy time per step, then the
operators) and `trace.json` (Chrome trace: chrome://tracing or ui.perfetto.dev).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed (types-tqdm)

PHASES = ("data", "forward", "backward", "optimizer")
REPORT, TRACE = "steps.txt", "trace.json"


def parse_window(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B): profile the steps after A up to B (0 <= A < B)."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        start, end = -1, -1
    if start < 0 or end <= start:
        raise ValueError(f"{text!r} is not a step window A:B with 0 <= A < B (e.g. 40:50)")
    return start, end


class StepProfiler:
    """Profiles the steps of a (start, end] window; does nothing without one.

    Call `phase(name)` around each part of a step, `stepped(step)` once before the first step
    and after each step, and `close(step)` when the run ends, however it ends."""

    def __init__(self, window: tuple[int, int] | None, out_dir: Path, device: torch.device):
        self.window, self.out_dir = window, out_dir / "profile"
        self.cuda = device.type == "cuda"
        self.active: profile | None = None
        self.first, self.started = 0, 0.0  # the step profiling began after, and when
        self.paths: list[Path] = []

    def phase(self, name: str) -> contextlib.AbstractContextManager[object]:
        return record_function(name) if self.active is not None else contextlib.nullcontext()

    def stepped(self, step: int) -> None:
        if self.window is None:
            return
        start, end = self.window
        if self.active is None and start <= step < end:  # a resumed run may begin inside
            if not self.cuda:  # else its tracer logs an ERROR line looking for a GPU
                os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.active = profile(activities=activities)
            self.active.start()
            self.first, self.started = step, time.perf_counter()
        elif self.active is None and step >= end:
            tqdm.write(f"profile: no steps profiled: the run began at step {step}, after {end}")
            self.window = None
        elif step == end:
            self.close(step)

    def close(self, step: int) -> None:
        """Stop profiling at `step` and write the report of the steps profiled (if any)."""
        if self.active is None:
            if self.window is not None and step <= self.window[0]:
                tqdm.write(f"profile: no steps profiled: the run ended at step {step}")
            self.window = None
            return
        if self.cuda:
            torch.cuda.synchronize()
        steps = step - self.first
        wall_ms = (time.perf_counter() - self.started) * 1000 / max(1, steps)
        self.active.stop()
        prof, self.active, self.window = self.active, None, None
        if steps == 0:
            tqdm.write(f"profile: no steps profiled: the run ended at step {step}")
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        report, trace = self.out_dir / REPORT, self.out_dir / TRACE
        report.write_text(summary(prof.key_averages(), steps, wall_ms, self.cuda))
        prof.export_chrome_trace(str(trace))
        self.paths = [report, trace]


def summary(events: EventList, steps: int, wall_ms: float, cuda: bool) -> str:
    """Wall, each phase's host and the GPU's busy milliseconds per step; then the operators."""
    # Host time from the phases' CPU ranges (on CUDA each also has a GPU-side annotation).
    host = {e.key: e for e in events if e.key in PHASES and e.device_type == DeviceType.CPU}
    lines = [f"profiled steps: {steps}; wall {wall_ms:.1f} ms per step (profiler on)", ""]
    lines.append("phase      host ms per step")
    lines += [
        f"{name:<10} {host[name].cpu_time_total / 1000 / steps:8.1f}"
        for name in PHASES
        if name in host
    ]
    busy = math.nan
    if cuda:  # every kernel's own time, whichever thread launched it (backward runs on its own)
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        kernels = [e for e in kernels if not e.is_user_annotation and e.key not in PHASES]
        busy = sum(e.self_device_time_total for e in kernels) / 1000 / steps
    lines += ["", f"GPU busy {busy:.1f} ms per step" if cuda else "(no GPU)", ""]
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines.append(f"operators by {sort} (totals over the window, not per step)")
    lines.append(events.table(sort_by=sort, row_limit=30))
    return "\n".join(lines) + "\n"
