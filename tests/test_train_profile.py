"""`mad train --profile-steps A:B`: the window's report and trace, and its grammar."""

from __future__ import annotations

import json

import pytest

from model.train import train
from model.train_profile import PHASES, REPORT, TRACE, parse_window
from tests.test_train import config


def test_a_profiled_window_reports_every_phase_of_its_steps(synth_data, tmp_path):
    train(config(synth_data, tmp_path / "run", profile_steps=(1, 3)))
    report = (tmp_path / "run" / "profile" / REPORT).read_text()
    assert report.startswith("2 profiled steps")
    phase_table = report.split("\n\n")[1].splitlines()[1:]  # below its header line
    rows = {line.split()[0]: line.split()[1:] for line in phase_table}
    assert list(rows) == list(PHASES)
    for phase in PHASES:
        assert float(rows[phase][0]) > 0, phase  # host milliseconds per step
    assert "aten::" in report  # the operator table
    trace = json.loads((tmp_path / "run" / "profile" / TRACE).read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"forward", "backward"} <= names


def test_a_run_that_ends_inside_its_window_reports_what_it_profiled(synth_data, tmp_path):
    train(config(synth_data, tmp_path / "run", steps=3, profile_steps=(2, 10)))
    assert (tmp_path / "run" / "profile" / REPORT).read_text().startswith("1 profiled steps")


def test_no_window_no_report(synth_data, tmp_path):
    train(config(synth_data, tmp_path / "run", steps=2))
    assert not (tmp_path / "run" / "profile").exists()


@pytest.mark.parametrize("text", ["5", "5:5", "6:5", "-1:3", "a:b", ":4"])
def test_a_window_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError, match="not a step window"):
        parse_window(text)


def test_a_window_parses():
    assert parse_window("40:50") == (40, 50)
