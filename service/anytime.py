"""Anytime serving: how many refinement steps each request gets.

MAD's answer after one parallel pass is complete, and each refinement step only improves it,
so the service trades quality for latency per request instead of only queueing or refusing:

- **Latency budget.** A request may carry `latency_budget_ms` (end to end, from its arrival).
  When its batch starts, each task it did not fix with `refine_steps` gets the most steps
  that fit what is left of the budget, from live cost estimates (`CostModel`): the draft
  (encoder + one pass of every task) is always run; then steps are added round by round, as
  the pipeline runs them (every task's first step, then every task's second, ...), each task
  up to its default schedule. A budget that cannot hold the draft, even at the fastest each
  stage ran lately, is refused on arrival.
  What the stage estimates miss (waiting for the CPU between stages, serialising the answer)
  is learnt too: the median of the last answers' measured minus estimated latency is added
  when steps are chosen (a median, so one stalled request does not starve the next ones;
  not when refusing, which only the draft's own estimate decides).
- **Degradation under load.** Past a queue depth watermark W (of a queue of size Q), a new
  request's default steps shrink with the depth d it finds: K' = floor(K * (Q - d) / (Q - W)),
  down to one pass, before the queue is full and answers 503. Steps the caller gave are kept.

Both are decided in one place, `RefinementPlanner`, which the engine calls for every request
(on arrival: `admit`; when its batch starts: `plan`), whatever protocol it came in by.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Weight of a new measurement in a stage's running average: about the last 10 count.
SMOOTHING = 0.2
SLACK_S = 1e-6  # sums of estimates are compared with this tolerance (float rounding)
MISSED_WINDOW = 20  # answers whose estimate errors `CostModel.missed` takes the median of
RECENT = 20  # measurements per stage whose least decides whether a budget is refused


class BudgetTooSmall(ValueError):
    """The budget cannot hold even one decoder pass of each task."""


class CostModel:
    """Seconds of each stage per batch size, as exponentially weighted averages of what the
    model thread measures: "preprocess", "encode", each task's decoder pass ("detection",
    ...), and "postprocess" (the response). Seeded at warm-up; written on the model thread,
    read on the event loop (hence the lock)."""

    def __init__(self, smoothing: float = SMOOTHING) -> None:
        self.smoothing = smoothing
        self.averages: dict[str, dict[int, float]] = {}
        self.recent: dict[str, dict[int, deque[float]]] = {}  # the last RECENT measurements
        self.errors: deque[float] = deque(maxlen=MISSED_WINDOW)
        self.lock = threading.Lock()

    def observe_missed(self, seconds: float) -> None:
        """An answer took `seconds` longer than its stages were estimated to take (negative:
        shorter), before the `missed` correction."""
        with self.lock:
            self.errors.append(seconds)

    def learn(self, plan: StepPlan | None, total_s: float, postprocess_s: float) -> None:
        """What an answered request teaches (every protocol's final answers, not streamed
        ones, whose time includes their partial answers): building one image's response took
        `postprocess_s`; the request took `total_s` from arrival, against its plan's
        estimate."""
        self.observe("postprocess", 1, postprocess_s)
        if plan is not None and plan.estimated_s is not None:
            # Against the stages' own estimate: the error measured after the correction
            # would settle at half what the estimates really miss.
            self.observe_missed(total_s - (plan.estimated_s - plan.missed_s))

    def missed(self) -> float:
        """The median of the last answers' estimate errors (0 before any)."""
        with self.lock:
            return statistics.median(self.errors) if self.errors else 0.0

    def observe(self, stage: str, images: int, seconds: float) -> None:
        with self.lock:
            sizes = self.averages.setdefault(stage, {})
            old = sizes.get(images)
            sizes[images] = seconds if old is None else old + self.smoothing * (seconds - old)
            recent = self.recent.setdefault(stage, {})
            recent.setdefault(images, deque(maxlen=RECENT)).append(seconds)

    def estimate(self, stage: str, images: int, fastest: bool = False) -> float:
        """Seconds of `stage` for `images` images: its average at that batch size (fastest:
        the least of its last RECENT measurements), else the nearest size measured scaled
        linearly; 0 for a stage never measured."""
        with self.lock:
            sizes = self.averages.get(stage)
            if not sizes:
                return 0.0
            nearest = min(sizes, key=lambda size: (abs(size - images), size))
            value = min(self.recent[stage][nearest]) if fastest else sizes[nearest]
            return value * images / nearest

    def clear(self) -> None:
        with self.lock:
            self.averages.clear()
            self.recent.clear()
            self.errors.clear()

    def snapshot(self) -> dict[str, dict[int, float]]:
        with self.lock:
            return {stage: dict(sizes) for stage, sizes in self.averages.items()}


@dataclass
class StepPlan:
    """What was decided for one request: steps per task run, and why fewer than the default."""

    steps: dict[str, int]
    degraded: bool = False  # queue pressure lowered some task's default steps
    budget_cut: bool = False  # the budget lowered some task's steps
    estimated_s: float | None = None  # the expected latency from arrival to answer
    missed_s: float = 0.0  # of which the learnt correction (CostModel.missed)


@dataclass
class Admission:
    """What `admit` decided on arrival; `plan` finishes the decision when the batch starts."""

    budget_s: float | None
    arrived: float  # time.perf_counter() at arrival
    explicit: frozenset[str]  # tasks whose steps the caller fixed
    quality: float = 1.0  # share of the default steps left by degradation (1: all)
    plan: StepPlan | None = field(default=None)


class RefinementPlanner:
    """tasks_to_run: a request's tasks -> the tasks the pipeline runs (detection added for
    the tasks it prompts), in model order; default_steps: each task's default K;
    closing_passes: the passes a task runs once it refined at all (a caption's choice among
    its candidates: model.decoding.closing_passes), priced with its first step; views: the
    images a request's tasks encode (MAD.views: its mirror image too), for the encoder's
    price; reads_crops: whether a request's tasks read zoomed crops (MAD.reads_crops), whose
    work is priced per image ("crops", model.batch_run.CROP_STAGE)."""

    def __init__(
        self,
        tasks_to_run: Callable[[tuple[str, ...]], tuple[str, ...]],
        default_steps: Mapping[str, int],
        costs: CostModel,
        queue_size: int,
        degrade_depth: int | None,
        record: Callable[[StepPlan], None] | None = None,
        closing_passes: Mapping[str, int] | None = None,
        views: Callable[[tuple[str, ...]], int] | None = None,
        reads_crops: Callable[[tuple[str, ...]], bool] | None = None,
    ) -> None:
        self.closing_passes = dict(closing_passes or {})
        self.views = views or (lambda tasks: 1)
        self.reads_crops = reads_crops or (lambda tasks: False)
        self.tasks_to_run, self.default_steps = tasks_to_run, dict(default_steps)
        self.costs, self.queue_size = costs, queue_size
        self.degrade_depth = degrade_depth  # None: degradation off
        self.record = record or (lambda plan: None)  # metrics of every plan made

    # --- on arrival -------------------------------------------------------------------------
    def quality(self, depth: int) -> float:
        """Share of its default steps a request arriving at queue depth `depth` gets."""
        watermark = self.degrade_depth
        if watermark is None or depth <= watermark or watermark >= self.queue_size:
            return 1.0
        return max(0.0, (self.queue_size - depth) / (self.queue_size - watermark))

    def draft_seconds(
        self,
        tasks: tuple[str, ...],
        images: int = 1,
        fastest: bool = False,
        encoded: int | None = None,
    ) -> dict[str, float]:
        """Estimated seconds of each stage of the one-pass answer (batch of `images`; fastest:
        at the least each stage took lately; encoded: the images the batch encodes, mirror
        images included, if known, else as if every request asked `tasks`)."""
        encoded = images * self.views(tasks) if encoded is None else encoded
        estimate = {
            stage: self.costs.estimate(stage, encoded, fastest)
            for stage in ("preprocess", "encode")
        }
        for task in self.tasks_to_run(tasks):
            estimate[task] = self.costs.estimate(task, images, fastest)
        if self.reads_crops(tasks):  # the crops of its detections: their count unknown yet
            estimate["crops"] = self.costs.estimate("crops", images, fastest)
        estimate["postprocess"] = self.costs.estimate("postprocess", 1, fastest)
        return estimate

    def admit(
        self,
        tasks: tuple[str, ...],
        explicit: Mapping[str, int],
        budget_s: float | None,
        arrived: float,
        now: float,
        depth: int,
    ) -> Admission:
        """Decide what can be on arrival; BudgetTooSmall when the budget cannot hold the
        draft even if every stage ran as fast as it did lately (what was spent already,
        receiving and decoding the image, included): only a clearly impossible budget is
        refused."""
        if budget_s is not None:
            stages = self.draft_seconds(tasks, fastest=True)
            spent, needed = now - arrived, sum(stages.values())
            if spent + needed > budget_s + SLACK_S:
                parts = ", ".join(f"{k} {1000 * v:.1f}" for k, v in stages.items() if v > 0)
                raise BudgetTooSmall(
                    f"latency_budget_ms={1000 * budget_s:g} cannot hold one decoder pass of "
                    f"each task: about {1000 * needed:.1f} ms ({parts}) after "
                    f"{1000 * spent:.1f} ms spent receiving the request"
                )
        return Admission(budget_s, arrived, frozenset(explicit), self.quality(depth))

    # --- when the batch starts --------------------------------------------------------------
    def plan(
        self,
        tasks: tuple[str, ...],
        explicit: Mapping[str, int],
        admission: Admission,
        batch_size: int,
        now: float,
        batch_tasks: tuple[str, ...] = (),
        encoded: int | None = None,
    ) -> StepPlan:
        """Steps per task run for a request whose batch of `batch_size` starts now;
        batch_tasks: what its batch mates asked (their first passes are in its draft);
        encoded: the images the batch encodes (the sum of its requests' `views`)."""
        plan = self.decide(tasks, explicit, admission, batch_size, now, batch_tasks, encoded)
        self.record(plan)
        return plan

    def decide(
        self,
        tasks: tuple[str, ...],
        explicit: Mapping[str, int],
        admission: Admission,
        batch_size: int,
        now: float,
        batch_tasks: tuple[str, ...] = (),
        encoded: int | None = None,
    ) -> StepPlan:
        run = self.tasks_to_run(tasks)
        wanted = {}
        for task in run:
            default = self.default_steps.get(task, 0)
            wanted[task] = (
                explicit[task]
                if task in explicit
                else math.floor(default * admission.quality + 1e-9)
            )
        degraded = any(wanted[t] < self.default_steps.get(t, 0) for t in run if t not in explicit)
        pass_s = {task: self.costs.estimate(task, batch_size) for task in run}

        def cost_of(task: str, steps: int) -> float:
            """Seconds of `steps` refinement steps of `task`, its closing passes included."""
            closing = self.closing_passes.get(task, 0) if steps > 0 else 0
            return (steps + closing) * pass_s[task]

        # The pipeline runs the draft of every task of the batch before any refinement.
        draft_tasks = tuple(dict.fromkeys((*tasks, *batch_tasks)))
        draft = sum(self.draft_seconds(draft_tasks, batch_size, encoded=encoded).values())
        missed = self.costs.missed()
        draft = max(draft + missed, 0.0)  # never a free draft
        spent = now - admission.arrived
        if admission.budget_s is None:  # estimated anyway: what the estimates miss is learnt
            estimate = spent + draft + sum(cost_of(t, wanted[t]) for t in run)
            return StepPlan(wanted, degraded, False, estimate, missed)
        left = admission.budget_s - spent - draft
        steps = {t: (wanted[t] if t in explicit else 0) for t in run}
        cost = sum(cost_of(t, steps[t]) for t in run)  # the caller's own steps come first
        growing = [t for t in run if t not in explicit and wanted[t] > 0]
        depth = 0
        while growing:  # round by round, as the pipeline runs them
            depth += 1
            for task in list(growing):
                more = cost_of(task, depth) - cost_of(task, depth - 1)
                if cost + more > left + SLACK_S:
                    growing.remove(task)  # no room: this task stops here
                    continue
                steps[task], cost = depth, cost + more
                if steps[task] == wanted[task]:
                    growing.remove(task)
        cut = any(steps[t] < wanted[t] for t in run)
        return StepPlan(steps, degraded, cut, spent + draft + cost, missed)
