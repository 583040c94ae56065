"""The planner's rules with a cost model of known numbers: budgets, degradation, estimates."""

from __future__ import annotations

import pytest

from service.anytime import BudgetTooSmall, CostModel, RefinementPlanner, StepPlan

TASKS = ("detection", "segmentation", "keypoints", "caption")
DEFAULTS = {"detection": 0, "segmentation": 0, "keypoints": 2, "caption": 3}
MS = 0.001


def tasks_to_run(asked: tuple[str, ...]) -> tuple[str, ...]:
    needed = set(asked) | ({"detection"} if {"segmentation", "keypoints"} & set(asked) else set())
    return tuple(t for t in TASKS if t in needed)


def costs(**stages_ms: float) -> CostModel:
    model = CostModel()
    for stage, ms in stages_ms.items():
        model.observe(stage, 1, ms * MS)
    return model


# preprocess 1 + encode 10 + detection 2 + keypoints 3 + caption 4 + postprocess 1 = 21 ms draft
COSTS = dict(preprocess=1, encode=10, detection=2, keypoints=3, caption=4, postprocess=1)


def planner(
    model: CostModel | None = None, queue: int = 10, watermark: int | None = 4
) -> tuple[RefinementPlanner, list[StepPlan]]:
    plans: list[StepPlan] = []
    return (
        RefinementPlanner(
            tasks_to_run, DEFAULTS, model or costs(**COSTS), queue, watermark, plans.append
        ),
        plans,
    )


def plan(p: RefinementPlanner, tasks, budget_ms=None, explicit=None, spent_ms=0.0, depth=0):
    explicit = explicit or {}
    budget = None if budget_ms is None else budget_ms * MS
    admission = p.admit(tasks, explicit, budget, 0.0, spent_ms * MS, depth)
    return p.plan(tasks, explicit, admission, 1, spent_ms * MS)


@pytest.mark.parametrize(
    "budget_ms, steps, cut",
    [
        (None, {"detection": 0, "keypoints": 2, "caption": 3}, False),
        (1000, {"detection": 0, "keypoints": 2, "caption": 3}, False),
        (21, {"detection": 0, "keypoints": 0, "caption": 0}, True),  # the draft only
        (24, {"detection": 0, "keypoints": 1, "caption": 0}, True),  # round 1: keypoints fits
        (28, {"detection": 0, "keypoints": 1, "caption": 1}, True),  # round 1 whole
        (31, {"detection": 0, "keypoints": 2, "caption": 1}, True),
        (35, {"detection": 0, "keypoints": 2, "caption": 2}, True),
        (39, {"detection": 0, "keypoints": 2, "caption": 3}, False),  # everything: 39 ms
    ],
)
def test_a_budget_buys_steps_round_by_round(budget_ms, steps, cut):
    p, recorded = planner()
    result = plan(p, ("keypoints", "caption"), budget_ms)
    assert result.steps == steps and result.budget_cut == cut and not result.degraded
    assert recorded == [result]
    if budget_ms is not None:
        assert result.estimated_s is not None and result.estimated_s <= budget_ms * MS + 1e-12


def test_a_captions_choice_among_candidates_is_priced_with_its_first_step():
    """Caption candidates end with one more pass once the caption refined at all: the first
    step costs two passes (8 ms), each later one one (4 ms)."""
    p = RefinementPlanner(tasks_to_run, DEFAULTS, costs(**COSTS), 10, 4, None, {"caption": 1})
    assert plan(p, ("caption",), 23).steps == {"caption": 0}  # draft 16: 7 ms buy no step
    assert plan(p, ("caption",), 24).steps == {"caption": 1}
    assert plan(p, ("caption",), 28).steps == {"caption": 2}
    assert plan(p, ("caption",)).estimated_s == pytest.approx((16 + 3 * 4 + 4) * MS)
    assert plan(p, ("caption",), explicit={"caption": 0}).estimated_s == pytest.approx(16 * MS)


def test_a_request_that_encodes_its_mirror_image_pays_the_encoder_twice():
    """The pipeline tells the encoder's time per image encoded, mirror images included; a
    request whose tasks read its mirror image (here: keypoints) encodes two."""
    model = costs(**COSTS)
    model.observe("encode", 2, 20 * MS)
    model.observe("preprocess", 2, 2 * MS)
    views = lambda tasks: 2 if "keypoints" in tasks else 1  # noqa: E731
    p = RefinementPlanner(tasks_to_run, DEFAULTS, model, 10, 4, None, views=views)
    mirrored = p.draft_seconds(("keypoints",))
    assert (mirrored["encode"], mirrored["preprocess"]) == (20 * MS, 2 * MS)
    assert (mirrored["detection"], mirrored["keypoints"]) == (2 * MS, 3 * MS)  # per image
    plain = p.draft_seconds(("caption",))
    assert (plain["encode"], plain["preprocess"]) == (10 * MS, 1 * MS)
    # A batch of a keypoints request and a caption one encodes three images, not four.
    model.observe("encode", 3, 30 * MS)
    admission = p.admit(("caption",), {}, None, 0.0, 0.0, 0)
    mixed = p.plan(("caption",), {}, admission, 2, 0.0, ("keypoints", "caption"), encoded=3)
    as_if_all = p.plan(("caption",), {}, admission, 2, 0.0, ("keypoints", "caption"))
    assert as_if_all.estimated_s is not None and mixed.estimated_s is not None
    # The encoder at 4 images against 3 (40 against 30 ms), letterboxing 4 against 3 ms.
    assert as_if_all.estimated_s - mixed.estimated_s == pytest.approx(11 * MS)


def test_a_request_that_reads_zoomed_crops_pays_for_them_per_image():
    """The pipeline tells a batch's crop work once, per image reading crops (their count is
    known only once detection ran): a request that reads crops has it in its draft."""
    model = costs(**COSTS)
    model.observe("crops", 2, 40 * MS)
    reads = lambda tasks: "keypoints" in tasks  # noqa: E731
    p = RefinementPlanner(tasks_to_run, DEFAULTS, model, 10, 4, None, reads_crops=reads)
    assert p.draft_seconds(("keypoints",))["crops"] == pytest.approx(20 * MS)
    assert "crops" not in p.draft_seconds(("caption",))
    admission = p.admit(("caption",), {}, None, 0.0, 0.0, 0)
    alone = p.plan(("caption",), {}, admission, 1, 0.0)
    beside = p.plan(("caption",), {}, admission, 1, 0.0, ("keypoints",))
    assert alone.estimated_s is not None and beside.estimated_s is not None
    # A batch mate's crops are in this request's draft too (the pipeline runs them first).
    assert beside.estimated_s - alone.estimated_s >= 20 * MS


def test_time_already_spent_counts_against_the_budget():
    p, _ = planner()
    assert plan(p, ("caption",), 27).steps == {"caption": 2}  # draft 16, steps 4 each
    assert plan(p, ("caption",), 27, spent_ms=5).steps == {"caption": 1}


def test_what_the_estimates_missed_lately_is_planned_for():
    model = costs(**COSTS)
    for ms in (4, 4, 900):  # answers took 4 ms longer than estimated, one stalled
        model.observe_missed(ms * MS)
    p, _ = planner(model)
    assert model.missed() == pytest.approx(4 * MS)  # the median: the stall weighs nothing
    assert plan(p, ("caption",), 27).steps == {"caption": 1}  # draft 16 + 4: 7 ms left
    assert plan(p, ("caption",), 20).steps == {"caption": 0}  # refused only below 16 ms
    for _ in range(5):
        model.observe_missed(-1.0)  # wild overestimates never make the draft free
    assert plan(p, ("caption",), 27).estimated_s >= 0


def test_learning_from_its_own_answers_settles_on_what_the_estimates_really_miss():
    """Every answer takes 10 ms more than its stages: fed back through `learn`, the
    correction converges on those 10 ms (not on what is left once it is applied)."""
    model = costs(**COSTS)
    p, _ = planner(model)
    for _ in range(30):
        result = plan(p, ("caption",))
        stages_s = result.estimated_s - result.missed_s
        model.learn(result, stages_s + 10 * MS, COSTS["postprocess"] * MS)
    assert model.missed() == pytest.approx(10 * MS)
    assert plan(p, ("caption",)).estimated_s == pytest.approx((16 + 3 * 4 + 10) * MS)


def test_batch_mates_tasks_are_in_the_draft():
    p, _ = planner()
    alone = plan(p, ("caption",), 27)
    admission = p.admit(("caption",), {}, 27 * MS, 0.0, 0.0, 0)
    batched = p.plan(("caption",), {}, admission, 1, 0.0, ("caption", "keypoints"))
    # The mate's detection and keypoints first passes (5 ms) leave 6 ms: one step, not two.
    assert alone.steps == {"caption": 2} and batched.steps == {"caption": 1}


def test_only_a_budget_below_the_fastest_draft_lately_is_refused():
    model = costs(**COSTS)
    model.observe("encode", 1, 60 * MS)  # one slow encode: the average is 20 ms, the least 10
    p, _ = planner(model)
    result = plan(p, ("caption",), 17)  # holds the fastest draft (16 ms), not the average
    assert result.steps == {"caption": 0} and result.budget_cut
    with pytest.raises(BudgetTooSmall):
        plan(p, ("caption",), 15)


def test_explicit_steps_win_and_are_paid_first():
    p, _ = planner()
    # caption:3 given (12 ms of steps) leaves 2 ms of a 35 ms budget: keypoints gets none.
    result = plan(p, ("keypoints", "caption"), 35, explicit={"caption": 3})
    assert result.steps == {"detection": 0, "keypoints": 0, "caption": 3}
    assert result.budget_cut  # keypoints lost its default steps
    result = plan(p, ("caption",), 17, explicit={"caption": 5})  # over budget: still 5
    assert result.steps == {"caption": 5}


def test_a_budget_below_the_draft_is_refused_on_arrival_saying_why():
    p, _ = planner()
    with pytest.raises(BudgetTooSmall, match=r"latency_budget_ms=20 .* about 21\.0 ms"):
        plan(p, ("keypoints", "caption"), 20)
    with pytest.raises(BudgetTooSmall, match=r"after 10\.0 ms spent"):
        plan(p, ("caption",), 20, spent_ms=10)


@pytest.mark.parametrize(
    "depth, steps, degraded",
    [
        (0, {"keypoints": 2, "caption": 3}, False),
        (4, {"keypoints": 2, "caption": 3}, False),  # at the watermark: still full
        (5, {"keypoints": 1, "caption": 2}, True),  # 5/6 of the steps, rounded down
        (7, {"keypoints": 1, "caption": 1}, True),  # 3/6
        (9, {"keypoints": 0, "caption": 0}, True),  # 1/6: one pass each
    ],
)
def test_degradation_shrinks_default_steps_with_queue_depth(depth, steps, degraded):
    p, _ = planner(queue=10, watermark=4)
    result = plan(p, ("keypoints", "caption"), depth=depth)
    assert {t: result.steps[t] for t in steps} == steps and result.degraded == degraded


def test_degradation_keeps_explicit_steps_and_can_be_off():
    p, _ = planner(queue=10, watermark=4)
    result = plan(p, ("caption",), explicit={"caption": 3}, depth=9)
    assert result.steps == {"caption": 3} and not result.degraded
    off, _ = planner(queue=10, watermark=None)
    assert plan(off, ("caption",), depth=9).steps == {"caption": 3}


def test_cost_estimates_average_and_scale_to_unseen_batch_sizes():
    model = CostModel(smoothing=0.5)
    assert model.estimate("encode", 1) == 0.0  # never measured
    model.observe("encode", 1, 0.010)
    model.observe("encode", 1, 0.020)
    assert model.estimate("encode", 1) == pytest.approx(0.015)
    assert model.estimate("encode", 4) == pytest.approx(0.060)  # linear from batch 1
    model.observe("encode", 8, 0.080)
    assert model.estimate("encode", 6) == pytest.approx(0.060)  # nearest: 8
    assert model.estimate("encode", 8) == pytest.approx(0.080)
    assert model.estimate("encode", 1, fastest=True) == pytest.approx(0.010)
    assert model.estimate("encode", 2, fastest=True) == pytest.approx(0.020)
