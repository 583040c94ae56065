"""Pick each task's default refinement schedule, and optionally how its logits are read, on
held-out data.

How much masked refinement helps, and with which mask ratios, depends on the trained model
(the paper ablates K per task). `mad tune` scores candidate schedules with the real evaluators
on images the model did not train on and keeps, per task, the best one; among schedules within
`tolerance` of the best it takes the shortest, because every step costs each request another
decoder pass. A task is scored by its codec's metric (`TaskCodec.metric`). Tasks are tuned in
model order, so the tasks prompted by detections are scored on the boxes of the detection
schedule just chosen.

The decoding options (`TaskCodec.decoding_options`, docs/model.md) are chosen one at a time,
the others held, by the mean metric of detection and the tasks it prompts: an option of
detection's changes the boxes, and so the masks and skeletons they prompt and their ranking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from model.checkpoint import MAD
from model.codecs import DetectionCodec
from model.decoding import mask_schedule
from model.evaluate import evaluate

# (first, last) mask ratios of the linear ramps tried at each length.
RAMPS = ((0.9, 0.3), (0.7, 0.3), (0.5, 0.1))


@dataclass
class Trial:
    ratios: list[float]
    score: float


def candidate_schedules(max_steps: int, current: list[float]) -> list[list[float]]:
    """No refinement, linear ramps of 1..max_steps steps, and the current default."""
    candidates: list[list[float]] = [[]]
    for steps in range(1, max_steps + 1):
        for first, last in RAMPS:
            ratios = [round(r, 3) for r in mask_schedule(steps, [first, last])]
            if ratios not in candidates:
                candidates.append(ratios)
    if list(current) not in candidates:
        candidates.append(list(current))
    return candidates


def choose(trials: list[Trial], tolerance: float) -> Trial:
    """The shortest schedule scoring within `tolerance` of the best (then the higher score)."""
    best = max(t.score for t in trials)
    close = [t for t in trials if t.score >= best - tolerance]
    return min(close, key=lambda t: (len(t.ratios), -t.score))


def tune_schedules(
    mad: MAD,
    data: Path,
    split: str = "val2017",
    tasks: tuple[str, ...] | None = None,
    limit: int | None = 200,
    device: str = "cpu",
    max_steps: int = 4,
    tolerance: float = 0.003,
    report: Callable[[str, Trial], None] = lambda task, trial: None,
) -> dict[str, list[Trial]]:
    """Score every candidate of every task; set mad.config.schedules to the chosen ones.
    -> {task: trials in the order they ran}."""
    tasks = tuple(t for t in mad.config.tasks if t in (tasks or mad.config.tasks))
    results: dict[str, list[Trial]] = {}
    for task in tasks:
        current = list(mad.config.schedules.get(task, []))
        trials = []
        for ratios in candidate_schedules(max_steps, current):
            mad.config.schedules[task] = ratios
            metrics = evaluate(mad, data, split, device, limit=limit, tasks=(task,))
            trials.append(Trial(ratios, metrics[mad.codecs[task].metric]))
            report(task, trials[-1])
        mad.config.schedules[task] = choose(trials, tolerance).ratios
        results[task] = trials
    return results


def detection_family(mad: MAD, tasks: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Detection and the tasks it prompts, among `tasks` (default all), in model order."""
    asked = tasks or tuple(mad.config.tasks)
    return tuple(
        task
        for task in mad.config.tasks
        if task in asked
        and (task == DetectionCodec.name or mad.codecs[task].prompted_by_detections)
    )


@dataclass
class DecodingTrial:
    option: str
    value: Any
    score: float  # the mean metric of the tasks decoded


def tune_decoding(
    mad: MAD,
    data: Path,
    split: str = "val2017",
    tasks: tuple[str, ...] | None = None,
    limit: int | None = 200,
    device: str = "cpu",
    tolerance: float = 0.003,
    report: Callable[[DecodingTrial], None] = lambda trial: None,
) -> list[DecodingTrial]:
    """Try each decoding option's values in turn, the others held, and set mad.config's field
    to the best; the first value listed (the reference's) stays unless the best beats it by
    more than `tolerance`. Scored on detection and the tasks it prompts among `tasks` (default
    all). -> the trials in the order they ran."""
    family = detection_family(mad, tasks)
    options: dict[str, tuple[Any, ...]] = {}
    for task in family:
        for option, values in mad.codecs[task].decoding_options.items():
            options.setdefault(option, values)
    scores: dict[tuple[Any, ...], float] = {}  # by the values of every option

    def score() -> float:
        key = tuple(getattr(mad.config, option) for option in options)
        if key not in scores:
            metrics = evaluate(mad, data, split, device, limit=limit, tasks=family)
            scores[key] = mean(metrics[mad.codecs[task].metric] for task in family)
        return scores[key]

    trials: list[DecodingTrial] = []
    for option, values in options.items():
        tried = []
        for value in values:
            setattr(mad.config, option, value)
            tried.append(DecodingTrial(option, value, score()))
            report(tried[-1])
        best = max(tried, key=lambda trial: trial.score)
        reference = tried[0]  # kept unless another value beats it by more than `tolerance`
        chosen = reference if reference.score >= best.score - tolerance else best
        setattr(mad.config, option, chosen.value)
        trials += tried
    return trials
