"""`mad checkpoint convert`: the weights stored in half precision load back into an fp32
network that gives the same answers, at half the file size; what cannot convert says why."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mad.cli import app as mad_cli
from model.checkpoint import CONFIG, WEIGHTS, load_checkpoint

RELATIVE_ERROR = {"float16": 2**-11, "bfloat16": 2**-8}  # half a unit in the last place


def convert(*args: str):
    return CliRunner().invoke(mad_cli, ["checkpoint", "convert", *args])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_weights_load_as_fp32_and_answer_the_same(micro_checkpoint, tmp_path, dtype):
    out = tmp_path / dtype
    result = convert(str(micro_checkpoint), "--out", str(out), "--dtype", dtype)
    assert result.exit_code == 0, result.output
    assert f"weights in {dtype}" in result.stdout
    stored = load_file(out / WEIGHTS)
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {getattr(torch, dtype)}
    size = (out / WEIGHTS).stat().st_size / (micro_checkpoint / WEIGHTS).stat().st_size
    assert 0.45 < size < 0.55
    assert json.loads((out / CONFIG).read_text())["weights_dtype"] == dtype

    original, _ = load_checkpoint(micro_checkpoint)
    converted, _ = load_checkpoint(out)
    before = original.required_network().state_dict()
    for name, weights in converted.required_network().state_dict().items():
        if weights.is_floating_point():
            assert weights.dtype == torch.float32, name
            tolerance = RELATIVE_ERROR[dtype] * before[name].abs() + 1e-7
            assert ((weights - before[name]).abs() <= tolerance).all(), name
        else:
            assert torch.equal(weights, before[name]), name

    images = torch.rand(2, 3, *original.config.image_size)
    with torch.no_grad():
        memories = [m.required_network().encode(images) for m in (original, converted)]
    for (k, v), (k_half, v_half) in zip(memories[0].kv, memories[1].kv, strict=True):
        for full, half in ((k, k_half), (v, v_half)):
            scale = full.abs().max().item()
            torch.testing.assert_close(half, full, atol=20 * RELATIVE_ERROR[dtype] * scale, rtol=0)


def test_float16_refuses_weights_beyond_its_range(micro_checkpoint, tmp_path):
    source = tmp_path / "big"
    source.mkdir()
    for name in (CONFIG, "tokenizer.model"):
        (source / name).write_bytes((micro_checkpoint / name).read_bytes())
    weights = load_file(micro_checkpoint / WEIGHTS)
    name = next(n for n, t in weights.items() if t.is_floating_point())
    weights[name] = weights[name] * 0 + 1e6
    save_file(weights, source / WEIGHTS)
    result = convert(str(source), "--out", str(tmp_path / "out"))
    assert result.exit_code == 3 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"mad checkpoint convert: {name} has weights beyond float16's range (65504): use bfloat16"
    )
    assert convert(str(source), "--out", str(tmp_path / "b"), "--dtype", "bfloat16").exit_code == 0


def test_bad_arguments_are_usage_errors(micro_checkpoint, tmp_path):
    result = convert(str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 3 and "is not a checkpoint directory" in result.stderr
    result = convert(str(micro_checkpoint), "--out", str(tmp_path / "out"), "--dtype", "int8")
    assert result.exit_code == 2 and "expected one of float32, float16, bfloat16" in result.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_state.json").write_text("{}")  # an earlier run's state
    for out in (micro_checkpoint, tmp_path / "run"):
        result = convert(str(micro_checkpoint), "--out", str(out))
        assert result.exit_code == 2 and "already exists" in result.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["train_state.json"]
    assert not (tmp_path / "out").exists()


def copy_of(checkpoint, directory):
    directory.mkdir()
    for path in checkpoint.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    return directory


@pytest.mark.parametrize("damage", ["weights", "tokenizer", "config"])
def test_a_damaged_source_is_one_line_and_writes_nothing(micro_checkpoint, tmp_path, damage):
    source = copy_of(micro_checkpoint, tmp_path / "source")
    if damage == "weights":
        (source / WEIGHTS).write_bytes((source / WEIGHTS).read_bytes()[:1000])
    elif damage == "tokenizer":
        (source / "tokenizer.model").unlink()
    else:
        (source / CONFIG).write_text('{"format": "something else"}')
    result = convert(str(source), "--out", str(tmp_path / "out"))
    assert result.exit_code == 3 and "Traceback" not in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no copy, no scratch


def test_float32_round_trip_and_a_named_version_changes(micro_checkpoint, tmp_path):
    source = copy_of(micro_checkpoint, tmp_path / "source")
    meta = json.loads((source / CONFIG).read_text())
    (source / CONFIG).write_text(json.dumps({**meta, "version": "2026-11"}))
    assert convert(str(source), "--out", str(tmp_path / "half")).exit_code == 0
    assert json.loads((tmp_path / "half" / CONFIG).read_text())["version"] == "2026-11-float16"
    (tmp_path / "full").mkdir()  # an empty directory is fine
    result = convert(str(tmp_path / "half"), "--out", str(tmp_path / "full"), "--dtype", "float32")
    assert result.exit_code == 0, result.output
    half, full = load_file(tmp_path / "half" / WEIGHTS), load_file(tmp_path / "full" / WEIGHTS)
    for name, weights in full.items():
        if weights.is_floating_point():
            assert weights.dtype == torch.float32
            assert torch.equal(weights, half[name].float()), name


def test_weights_files_get_the_usual_permissions(micro_model, tmp_path):
    """Not safetensors' 0600: a container running as another user reads a mounted checkpoint."""
    import os

    from model.checkpoint import save_checkpoint

    umask = os.umask(0o022)
    try:
        written = save_checkpoint(micro_model, tmp_path / "ckpt")
        assert convert(str(written), "--out", str(tmp_path / "half")).exit_code == 0
    finally:
        os.umask(umask)
    for path in (written / WEIGHTS, tmp_path / "half" / WEIGHTS):
        assert path.stat().st_mode & 0o777 == 0o644, path
