"""The request grammar: what a caller may ask of a loaded model, parsed and checked once.

The HTTP API, `mad predict`, `mad eval`, `mad tune` and `mad bench` all read their options
with these functions, so one input means the same everywhere and fails with the same
message. Task names are always checked against the loaded model's tasks.

    tasks           names separated by commas and/or repeated: "detection,caption"
    refine_steps    items separated by commas and/or repeated, each K (every task) or
                    task:K (that task; wins over a bare K), K in 0..MAX_REFINE_STEPS;
                    each task and the bare K at most once; task:K only for a task the
                    request runs (detection runs for the tasks it prompts)
    score_threshold 0..1
    max_detections  1..the model's detection slots, or None (all)
    nms_iou         0..1 (1: no suppression), or None (the model's default)
    latency_budget_ms  milliseconds from arrival to answer, 0 < ms <= MAX_LATENCY_BUDGET_MS,
                    or None (no budget); as text (an HTTP header) a plain decimal number
    refine_early_stop  a refinement loop stops once a step changes no token (a bool)

A blank value is the same as none given (a form's empty field); an empty item inside a
value ("2,", "detection,,caption") is an error. Task names are case-insensitive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

MAX_REFINE_STEPS = 8
MAX_LATENCY_BUDGET_MS = 600_000.0  # ten minutes: longer is no budget
STEPS = re.compile(r"-?[0-9]{1,9}")  # bounded: int() of thousands of digits raises
DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")


class RequestError(ValueError):
    """A request value outside the grammar. str(): "field: problem", naming what is allowed."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def items(values: Iterable[str] | None, field: str, expected: str) -> list[str]:
    """Comma-separated and/or repeated values -> their stripped items; blank values skipped."""
    out = []
    for value in values or ():
        if not value.strip():
            continue
        parts = [p.strip() for p in value.split(",")]
        if not all(parts):
            raise RequestError(field, f"{value!r} has an empty item; expected {expected}")
        out += parts
    return out


def parse_tasks(values: Iterable[str] | None, model_tasks: Sequence[str]) -> tuple[str, ...]:
    """["detection,caption"] -> those tasks in model order; none given -> every task."""
    allowed = ", ".join(model_tasks)
    expected = f"task names separated by commas (this model has {allowed})"
    names = [name.lower() for name in items(values, "tasks", expected)]
    unknown = [name for name in dict.fromkeys(names) if name not in model_tasks]
    if unknown:
        raise RequestError(
            "tasks", f"unknown task {', '.join(map(repr, unknown))}; this model has {allowed}"
        )
    return tuple(t for t in model_tasks if t in names) if names else tuple(model_tasks)


def parse_refine_steps(
    values: Iterable[str] | None,
    model_tasks: Sequence[str],
    runs: Sequence[str] | None = None,
) -> dict[str, int]:
    """["2"] -> every task 2; ["2,caption:3"] -> every task 2 but caption 3; none -> {}
    (each task keeps its checkpoint schedule).

    runs: the tasks the request runs (model.checkpoint.MAD.tasks_to_run), when known; a
    task:K for a model task outside them is refused rather than ignored."""
    allowed = ", ".join(model_tasks)
    every: int | None = None
    steps: dict[str, int] = {}
    given: dict[str | None, str] = {}  # the part that gave each task's K (None: every task)
    for part in items(values, "refine_steps", "K or task:K separated by commas"):
        task, sep, count = part.rpartition(":")
        task, count = task.strip().lower(), count.strip()
        if sep and task not in model_tasks:
            raise RequestError(
                "refine_steps", f"unknown task {task!r} in {part!r}; this model has {allowed}"
            )
        if not STEPS.fullmatch(count):
            raise RequestError(
                "refine_steps",
                f"{part!r} is not K or task:K (K an integer "
                f"0..{MAX_REFINE_STEPS}, task one of {allowed})",
            )
        k = int(count)
        if not 0 <= k <= MAX_REFINE_STEPS:
            raise RequestError("refine_steps", f"{k} in {part!r} is outside 0..{MAX_REFINE_STEPS}")
        if sep and runs is not None and task not in runs:
            raise RequestError(
                "refine_steps",
                f"{part!r} names {task}, which this request does not run "
                f"(it runs {', '.join(runs)})",
            )
        key = task if sep else None  # None: the bare K
        if key in given:
            what = f"{task}:K" if sep else "K for every task"
            raise RequestError("refine_steps", f"{what} given twice ({given[key]!r} and {part!r})")
        given[key] = part
        if sep:
            steps[task] = k
        else:
            every = k
    # Detection runs for segmentation/keypoints too, so a bare K applies to it as well.
    return {**(dict.fromkeys(model_tasks, every) if every is not None else {}), **steps}


def check_score_threshold(value: float) -> float:
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise RequestError("score_threshold", f"{value} is outside 0..1")
    return value


def check_nms_iou(value: float | None) -> float | None:
    """None: the model's default; else 0..1 (1 keeps overlapping boxes: NMS off)."""
    if value is not None and not 0.0 <= value <= 1.0:  # also refuses NaN
        raise RequestError("nms_iou", f"{value} is outside 0..1 (1 turns NMS off)")
    return value


def check_max_detections(value: int | None, num_slots: int) -> int | None:
    """None keeps every detection; else 1..num_slots (the model finds no more than that)."""
    if value is not None and not 1 <= value <= num_slots:
        raise RequestError(
            "max_detections",
            f"{value} is outside 1..{num_slots} (this model has {num_slots} detection slots)",
        )
    return value


def check_latency_budget(value: float | None) -> float | None:
    """None: no budget; else milliseconds in (0, MAX_LATENCY_BUDGET_MS]."""
    if value is not None and not 0.0 < value <= MAX_LATENCY_BUDGET_MS:  # also refuses NaN
        raise RequestError(
            "latency_budget_ms",
            f"{value:g} is outside 0 < ms <= {MAX_LATENCY_BUDGET_MS:g} (milliseconds from "
            "arrival to answer)",
        )
    return value


def parse_latency_budget(text: str | None) -> float | None:
    """ "250" or "62.5" (an X-Latency-Budget-Ms header) -> milliseconds; blank -> None."""
    if text is None or not text.strip():
        return None
    if not DECIMAL.fullmatch(text.strip()):
        raise RequestError("latency_budget_ms", f"{text!r} is not a number of milliseconds")
    return check_latency_budget(float(text))
