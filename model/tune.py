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
the others held, in passes until one changes nothing, per family of tasks (`decoding_families`):
detection and the tasks it prompts, scored together by their mean metric (an option of
detection's changes the boxes, and so the masks and skeletons they prompt and their ranking),
then each other task by its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from model.checkpoint import MAD
from model.codecs import DetectionCodec
from model.config import ModelConfig
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
    """Detection and the tasks it prompts among `tasks` (default all), in model order;
    detection whenever one of those is asked, as its options shape what it prompts."""
    asked = set(tasks or mad.config.tasks)
    prompted = {t for t in asked if mad.codecs[t].prompted_by_detections}
    if prompted or DetectionCodec.name in asked:
        prompted.add(DetectionCodec.name)
    return tuple(task for task in mad.config.tasks if task in prompted)


def decoding_families(
    mad: MAD, tasks: tuple[str, ...] | None = None, only: Collection[str] | None = None
) -> list[tuple[str, ...]]:
    """The tasks whose decoding options are tuned together, among `tasks` (default all): the
    detection family, then each task outside it on its own; only those with options (among
    `only`, when given)."""
    asked = set(tasks or mad.config.tasks)
    detection = detection_family(mad, tasks)
    families = [detection] + [
        (task,) for task in mad.config.tasks if task in asked and task not in detection
    ]
    return [family for family in families if family and decoding_candidates(mad, family, only)]


def family_metric(mad: MAD, family: tuple[str, ...]) -> str:
    """What a family's options are chosen by: its tasks' metric, or their mean."""
    metrics = [mad.codecs[task].metric for task in family]
    return metrics[0] if len(metrics) == 1 else "mean of " + ", ".join(metrics)


def decoding_candidates(
    mad: MAD, family: tuple[str, ...], only: Collection[str] | None = None
) -> dict[str, list[Any]]:
    """{option: values to try} of the `family`'s codecs (those in `only`, when given): the
    values each declares, then the config's current value where it is not among them."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    options: dict[str, list[Any]] = {}
    for task in family:
        for option, values in mad.codecs[task].decoding_options.items():
            if option not in fields:
                raise ValueError(f"{task}'s decoding option {option!r} is not a config field")
            if option in options and options[option] != list(values):
                raise ValueError(f"two tasks declare different values for {option!r}")
            options[option] = list(values)
    if only is not None:
        options = {option: values for option, values in options.items() if option in only}
    for option, tried in options.items():
        if getattr(mad.config, option) not in tried:
            tried.append(getattr(mad.config, option))
    return options


@dataclass
class DecodingTrial:
    option: str
    value: Any
    score: float
    metric: str  # what `score` is (`family_metric`)


def tune_decoding(
    mad: MAD,
    data: Path,
    split: str = "val2017",
    tasks: tuple[str, ...] | None = None,
    limit: int | None = 200,
    device: str = "cpu",
    tolerance: float = 0.003,
    report: Callable[[DecodingTrial], None] = lambda trial: None,
    max_passes: int = 3,
    only: Collection[str] | None = None,
) -> list[DecodingTrial]:
    """Try each decoding option's values in turn, the others held, and set mad.config's field
    to the best; the first value listed (the reference's) stays unless the best beats it by
    more than `tolerance`. Passes repeat until one changes nothing (at most `max_passes`);
    a combination is scored once. Each family of `tasks` (default all; `decoding_families`)
    is tuned in turn, by the mean metric of its tasks that the data can score; `only`: tune
    just these options, the others held. -> the trials in the order they ran."""
    trials: list[DecodingTrial] = []
    for family in decoding_families(mad, tasks, only):
        trials += tune_family(
            mad, family, data, split, limit, device, tolerance, report, max_passes, only
        )
    return trials


def tune_family(
    mad: MAD,
    family: tuple[str, ...],
    data: Path,
    split: str,
    limit: int | None,
    device: str,
    tolerance: float,
    report: Callable[[DecodingTrial], None],
    max_passes: int,
    only: Collection[str] | None = None,
) -> list[DecodingTrial]:
    """`tune_decoding` of one family of tasks."""
    options = decoding_candidates(mad, family, only)
    metric = family_metric(mad, family)
    scores: dict[tuple[Any, ...], float] = {}  # by the values of every option

    def score() -> float:
        key = tuple(getattr(mad.config, option) for option in options)
        if key not in scores:
            metrics = evaluate(mad, data, split, device, limit=limit, tasks=family)
            scored = [metrics[m] for m in (mad.codecs[t].metric for t in family) if m in metrics]
            if not scored:
                raise ValueError(f"{data} scores none of {', '.join(family)}")
            scores[key] = mean(scored)
        return scores[key]

    trials: list[DecodingTrial] = []
    for _ in range(max_passes):  # until a pass changes nothing: each choice moves the others'
        before = {option: getattr(mad.config, option) for option in options}
        for option, values in options.items():
            tried = []
            for value in values:
                setattr(mad.config, option, value)
                tried.append(DecodingTrial(option, value, score(), metric))
                report(tried[-1])
            best = max(tried, key=lambda trial: trial.score)
            reference = tried[0]  # kept unless another value beats it by more than `tolerance`
            chosen = reference if reference.score >= best.score - tolerance else best
            setattr(mad.config, option, chosen.value)
            trials += tried
        if len(options) == 1 or all(
            getattr(mad.config, option) == value for option, value in before.items()
        ):
            break  # a lone option's choice moves no other: one pass is all
    return trials
