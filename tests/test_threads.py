"""The `threads` setting (MAD_THREADS, --threads): the model runs on that many CPU threads."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from mad.cli import app as mad_cli
from model.inference_io import Request
from model.pipeline import Pipeline
from service.model_cache import load_configured
from service.settings import Settings
from tests.helpers import scene_image


def test_the_torch_model_runs_on_the_configured_threads(micro_checkpoint):
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    mad, runner = load_configured(Settings(checkpoint=micro_checkpoint, threads=wanted))
    seen: list[int] = []
    encode = runner.encode

    def recording_encode(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return encode(*args, **kwargs)

    runner.encode = recording_encode  # type: ignore[method-assign]
    Pipeline(mad, runner)([Request(scene_image(120, 90), ("detection",), score_threshold=0.0)])
    assert seen == [wanted]
    assert torch.get_num_threads() == before  # only while the model runs


def test_unset_threads_leave_torch_alone(micro_checkpoint):
    _, runner = load_configured(Settings(checkpoint=micro_checkpoint))
    assert runner.host_threads is None  # type: ignore[attr-defined]


def test_threads_must_be_positive(monkeypatch, micro_checkpoint, tmp_path):
    with pytest.raises(ValidationError):
        Settings(checkpoint=micro_checkpoint, threads=0)
    monkeypatch.setenv("MAD_THREADS", "2")
    assert Settings(checkpoint=micro_checkpoint).threads == 2
    image = tmp_path / "x.png"
    scene_image().save(image)
    result = CliRunner().invoke(
        mad_cli, ["predict", str(image), "--checkpoint", str(micro_checkpoint), "--threads", "0"]
    )
    assert result.exit_code != 0 and "threads" in result.output
    assert "Traceback" not in result.output
