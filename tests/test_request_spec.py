"""The request grammar (model/request_spec.py), and the CLIs turning its errors into one line."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from mad.cli import app as mad_cli
from model.request_spec import (
    MAX_REFINE_STEPS,
    RequestError,
    check_max_detections,
    check_score_threshold,
    parse_refine_steps,
    parse_tasks,
)
from tests.helpers import scene_image

ALL = ("detection", "segmentation", "keypoints", "caption")
TWO = ("detection", "caption")  # a model without segmentation and keypoints


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (None, ALL),
        ([], ALL),
        ([""], ALL),  # a form's empty field: none given
        (["caption,detection"], ("detection", "caption")),  # model order
        (["caption", "segmentation"], ("segmentation", "caption")),
        ([" Caption , KEYPOINTS "], ("keypoints", "caption")),
        (["detection,detection"], ("detection",)),
    ],
)
def test_tasks(values, expected):
    assert parse_tasks(values, ALL) == expected


@pytest.mark.parametrize(
    ("values", "model_tasks", "says"),
    [
        (["panoptic"], ALL, "'panoptic'"),
        (["detection,depth,panoptic"], ALL, "'depth', 'panoptic'"),
        (["segmentation"], TWO, "this model has detection, caption"),
        (["detection,"], ALL, "empty item"),
        (["detection,,caption"], ALL, "empty item"),
    ],
)
def test_bad_tasks(values, model_tasks, says):
    with pytest.raises(RequestError) as caught:
        parse_tasks(values, model_tasks)
    assert caught.value.field == "tasks" and str(caught.value).startswith("tasks: ")
    assert says in str(caught.value)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (None, {}),
        ([], {}),
        (["", " "], {}),
        (["2"], dict.fromkeys(TWO, 2)),
        ([" 0 "], dict.fromkeys(TWO, 0)),
        ([str(MAX_REFINE_STEPS)], dict.fromkeys(TWO, MAX_REFINE_STEPS)),
        (["caption:3, detection:0"], {"caption": 3, "detection": 0}),
        (["caption:3", "detection:1"], {"caption": 3, "detection": 1}),
        (["Caption:1"], {"caption": 1}),
        (["2,caption:3"], {"detection": 2, "caption": 3}),
        (["caption:3", "2"], {"detection": 2, "caption": 3}),  # task:K wins, in any order
    ],
)
def test_refine_steps(values, expected):
    assert parse_refine_steps(values, TWO) == expected


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (["abc"], "'abc' is not K or task:K (K an integer 0..8, task one of detection, caption)"),
        (["2,"], "'2,' has an empty item"),
        ([",2"], "empty item"),
        (["caption:"], "'caption:' is not K or task:K"),
        (["caption:many"], "'caption:many' is not K or task:K"),
        (["2.5"], "is not K or task:K"),
        (["+2"], "is not K or task:K"),
        ([":2"], "unknown task '' in ':2'; this model has detection, caption"),
        (["nosuchtask:2"], "unknown task 'nosuchtask' in 'nosuchtask:2'; this model has"),
        (["segmentation:1"], "unknown task 'segmentation'"),  # not this model's
        (["-1"], "-1 in '-1' is outside 0..8"),
        (["caption:-1"], "-1 in 'caption:-1' is outside 0..8"),
        (["9"], "9 in '9' is outside 0..8"),
        (["9" * 5000], "is not K or task:K"),  # int() would refuse it with a bare ValueError
        (["caption:2,caption:3"], "caption:K given twice ('caption:2' and 'caption:3')"),
        (["caption:2", "Caption:2"], "caption:K given twice"),
        (["2", "3"], "K for every task given twice ('2' and '3')"),
    ],
)
def test_bad_refine_steps(values, says):
    with pytest.raises(RequestError) as caught:
        parse_refine_steps(values, TWO)
    assert caught.value.field == "refine_steps"
    assert str(caught.value) == f"refine_steps: {caught.value.problem}"
    assert says in caught.value.problem
    assert isinstance(caught.value, ValueError)


def test_refine_steps_only_for_tasks_the_request_runs():
    """task:K for a task the request does not run is refused, not ignored; a bare K covers
    whatever runs; detection runs (and takes its K) for the tasks it prompts."""
    runs = ("detection", "keypoints")  # asked: keypoints
    assert parse_refine_steps(["detection:1,keypoints:2"], ALL, runs) == {
        "detection": 1,
        "keypoints": 2,
    }
    assert parse_refine_steps(["2"], ALL, ("caption",)) == dict.fromkeys(ALL, 2)
    with pytest.raises(RequestError) as caught:
        parse_refine_steps(["2,caption:3"], ALL, runs)
    assert caught.value.problem == (
        "'caption:3' names caption, which this request does not run (it runs detection, keypoints)"
    )
    with pytest.raises(RequestError, match="'nosuchtask:1'; this model has"):
        parse_refine_steps(["nosuchtask:1"], ALL, runs)  # unknown to the model says so first


def test_score_threshold_and_max_detections():
    assert [check_score_threshold(v) for v in (0.0, 0.5, 1.0)] == [0.0, 0.5, 1.0]
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(RequestError, match=r"^score_threshold: .* outside 0\.\.1$"):
            check_score_threshold(bad)
    assert [check_max_detections(v, 6) for v in (None, 1, 6)] == [None, 1, 6]
    for bad in (-1, 0, 7):
        with pytest.raises(RequestError, match=r"^max_detections: .* outside 1\.\.6 "):
            check_max_detections(bad, 6)


# --- the CLIs: one line on stderr, exit status 2, no traceback ------------------------------
@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    scene_image(96, 96).save(path)
    return path


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["eval", "--refine-steps", "abc"], "mad eval: --refine-steps: 'abc' is not K or task:K"),
        (["eval", "--refine", "2,"], "mad eval: --refine-steps: '2,' has an empty item"),
        (["eval", "--refine", "caption:", "--refine", "1"], "mad eval: --refine-steps: 'caption:'"),
        (
            ["eval", "--task", "panoptic"],
            "mad eval: --tasks: unknown task 'panoptic'; this model "
            "has detection, segmentation, keypoints, caption",
        ),
        (["tune", "--task", "detection,"], "mad tune: --tasks: 'detection,' has an empty item"),
        (
            ["predict", "IMAGE", "--refine-steps", "nosuchtask:2"],
            "mad predict: --refine-steps: unknown task 'nosuchtask'",
        ),
        (
            ["predict", "IMAGE", "--tasks", "caption", "--refine-steps", "detection:1"],
            "mad predict: --refine-steps: 'detection:1' names detection, which this request "
            "does not run (it runs caption)",
        ),
        (
            ["eval", "--task", "detection", "--refine", "caption:1"],
            "mad eval: --refine-steps: 'caption:1' names caption",
        ),
        (
            ["predict", "IMAGE", "--max-detections", "7"],
            "mad predict: --max-detections: 7 is outside 1..6",
        ),
        (
            ["bench", "--quick", "--refine-steps", "-1"],
            "mad bench: --refine-steps: -1 in '-1' is outside 0..8",
        ),
    ],
)
def test_cli_request_errors_are_one_line(micro_checkpoint, image, tmp_path, args, line):
    args = [str(image) if a == "IMAGE" else a for a in args]
    if args[0] in ("eval", "tune"):
        args += ["--data", str(tmp_path)]  # never read: the options fail first
    if args[0] == "bench":
        args += ["--out", str(tmp_path)]
    result = CliRunner().invoke(mad_cli, [*args, "--checkpoint", str(micro_checkpoint)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip().startswith(line), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_missing_inputs_are_one_line(micro_checkpoint, tmp_path, command):
    """No annotations under --data, or a --checkpoint that is not one: one line, exit 3 (a
    start-up failure, as in every command)."""
    cases = [
        (["--data", str(tmp_path), "--checkpoint", str(micro_checkpoint)], "--data: "),
        (["--data", str(tmp_path), "--checkpoint", str(tmp_path)], "--checkpoint: "),
    ]
    for args, option in cases:
        result = CliRunner().invoke(mad_cli, [command, *args])
        assert result.exit_code == 3, result.output
        assert "Traceback" not in result.output
        assert result.stderr.startswith(f"mad {command}: {option}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
