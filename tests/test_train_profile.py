"""`mad train --profile-steps A:B`: the window's report and trace, and its grammar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.train import train
from model.train_profile import PHASES, REPORT, TRACE, parse_window
from tests.test_train import config, read_log


def profiled_forwards(run: Path) -> int:
    """How many steps the trace holds: one `forward` range each."""
    events = json.loads((run / "profile" / TRACE).read_text())["traceEvents"]
    return sum(e.get("name") == "forward" and e.get("ph") == "X" for e in events)


def test_a_profiled_window_reports_every_phase_of_its_steps(synth_data, tmp_path):
    train(config(synth_data, tmp_path / "run", profile_steps=(1, 3)))
    report = (tmp_path / "run" / "profile" / REPORT).read_text()
    assert report.startswith("profiled steps: 2;")
    phase_table = report.split("\n\n")[1].splitlines()[1:]  # below its header line
    rows = {line.split()[0]: float(line.split()[1]) for line in phase_table}
    assert list(rows) == list(PHASES) and all(ms > 0 for ms in rows.values())
    assert "aten::" in report  # the operator table
    assert profiled_forwards(tmp_path / "run") == 2  # steps 2 and 3, not 1..2 or 2..4
    # Profiling observes: the losses are those of a run without it.
    train(config(synth_data, tmp_path / "plain"))
    profiled, plain = (
        read_log(tmp_path / "run" / "train_log.csv"),
        read_log(tmp_path / "plain" / "train_log.csv"),
    )
    assert profiled == pytest.approx(plain, rel=1e-5)


def test_a_resumed_run_profiles_the_rest_of_a_window_it_begins_inside(synth_data, tmp_path):
    run = tmp_path / "run"
    train(config(synth_data, run, stop_at=2))
    train(config(synth_data, run, resume=run, overrides=None, profile_steps=(1, 3)))
    assert (run / "profile" / REPORT).read_text().startswith("profiled steps: 1;")
    assert profiled_forwards(run) == 1


def test_a_run_that_ends_inside_its_window_reports_what_it_profiled(synth_data, tmp_path):
    train(config(synth_data, tmp_path / "run", steps=3, profile_steps=(2, 10)))
    assert (tmp_path / "run" / "profile" / REPORT).read_text().startswith("profiled steps: 1;")


@pytest.mark.parametrize("window", [(2, 5), (6, 8)], ids=["ends-at-its-start", "beyond-the-run"])
def test_a_window_without_steps_writes_no_report(synth_data, tmp_path, window, capsys):
    train(config(synth_data, tmp_path / "run", steps=2, profile_steps=window))
    assert not (tmp_path / "run" / "profile").exists()
    assert "no steps profiled" in capsys.readouterr().out


def test_no_window_no_report(synth_data, tmp_path):
    train(config(synth_data, tmp_path / "run", steps=2))
    assert not (tmp_path / "run" / "profile").exists()


@pytest.mark.parametrize("text", ["5", "5:5", "6:5", "-1:3", "a:b", ":4", "1:2:3"])
def test_a_window_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError, match="not a step window"):
        parse_window(text)


def test_a_window_parses():
    assert parse_window("40:50") == (40, 50)
