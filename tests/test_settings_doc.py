"""One settings table, generated from `Settings` (service/setting_options.py): docs/service.md
holds it and no other document has one; every setting is a `mad serve` option."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import service.cli
from mad.cli import app as mad_cli
from model.startup import StartupError
from service.setting_options import (
    DOC,
    MODEL_SETTINGS,
    documented_table,
    option_name,
    settings_table,
)
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def test_the_documented_table_is_the_generated_one():
    assert documented_table(DOC.read_text()) == settings_table(), (
        "docs/service.md's settings table is out of date: run `python -m service.setting_options`"
    )
    for name in Settings.model_fields:
        assert f"`MAD_{name.upper()}`" in settings_table()


def test_no_other_document_has_a_settings_table():
    documents = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for path in documents:
        text = path.read_text()
        if path == DOC:
            text = text.replace(documented_table(text), "")
        rows = [line for line in text.splitlines() if re.match(r"\| `MAD_[A-Z_]+` \|", line)]
        assert not rows, f"{path.name} has settings rows of its own: {rows[:2]}"


@pytest.mark.parametrize(
    "command,names", [("serve", list(Settings.model_fields)), ("predict", MODEL_SETTINGS)]
)
def test_every_setting_is_an_option(command, names):
    help_text = CliRunner().invoke(mad_cli, [command, "--help"], terminal_width=200).output
    for name in names:
        assert re.search(rf"^\s+{option_name(name)}\b", help_text, re.M), name
        assert f"env MAD_{name.upper()}" in " ".join(help_text.split()), name


def test_options_reach_the_settings(monkeypatch, micro_checkpoint, tmp_path):
    """Each kind of option (path, choice, flag, number, list) arrives in Settings; a variable
    fills what the command line leaves out."""
    seen: list[Settings] = []

    def record(settings: Settings) -> None:
        seen.append(settings)
        raise StartupError("stop here")

    monkeypatch.setattr(service.cli, "check_settings", record)
    args = [
        "serve",
        "--checkpoint",
        str(micro_checkpoint),
        "--backend",
        "onnx",
        "--compile",
        "--queue-size",
        "3",
        "--batch-delay-ms",
        "0.5",
        "--cache-dir",
        str(tmp_path),
        "--cors-origins",
        "https://a.example,https://b.example",
    ]
    result = CliRunner().invoke(mad_cli, args, env={"MAD_MAX_BATCH_SIZE": "2"})
    assert result.exit_code == 3, result.output
    [settings] = seen
    assert settings.checkpoint == micro_checkpoint and settings.backend == "onnx"
    assert settings.compile is True and settings.queue_size == 3
    assert settings.batch_delay_ms == 0.5 and settings.cache_dir == tmp_path
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.max_batch_size == 2  # from the environment
