"""`mad checkpoint average`: the mean of checkpoints' weights in a new checkpoint that loads
and records its sources; checkpoints of different models are refused in one line."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mad.cli import app as mad_cli
from model.checkpoint import CONFIG, WEIGHTS, load_checkpoint, write_schedules


def average(*args: str):
    return CliRunner().invoke(mad_cli, ["checkpoint", "average", *args])


def shifted_copy(source, out, shift: float):
    """A copy of `source` whose floating-point weights are all `shift` higher."""
    shutil.copytree(source, out)
    state = load_file(out / WEIGHTS)
    moved = {k: v + shift if v.is_floating_point() else v + 1 for k, v in state.items()}
    save_file(moved, out / WEIGHTS, metadata={"format": "mad-checkpoint/1"})
    return out


def test_the_average_is_the_mean_of_the_weights(micro_checkpoint, tmp_path):
    up = shifted_copy(micro_checkpoint, tmp_path / "up", 0.25)
    down = shifted_copy(micro_checkpoint, tmp_path / "down", -0.75)
    out = tmp_path / "avg"
    result = average(str(up), str(down), str(micro_checkpoint), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "mean of 3 checkpoints" in result.stdout
    original, averaged, first = (load_file(p / WEIGHTS) for p in (micro_checkpoint, out, up))
    for name, tensor in original.items():
        if tensor.is_floating_point():  # (0.25 - 0.75 + 0) / 3
            assert torch.allclose(averaged[name], tensor - 0.5 / 3, atol=1e-6), name
        else:  # integer buffers: the first checkpoint's
            assert torch.equal(averaged[name], first[name]), name
    meta = json.loads((out / CONFIG).read_text())
    assert meta["averaged_from"] == [str(up), str(down), str(micro_checkpoint)]
    load_checkpoint(out)  # a checkpoint like any other


def test_checkpoints_trained_or_tuned_apart_are_one_network(micro_checkpoint, tmp_path):
    """Loss weights, the initial backbone file and schedules are not the network: a source
    annealed with other task weights and tuned apart still averages, and the copy keeps the
    first source's schedules, whichever comes first."""
    bundled = json.loads((micro_checkpoint / CONFIG).read_text())["model"]["schedules"]
    tuned = shifted_copy(micro_checkpoint, tmp_path / "tuned", 0.5)
    write_schedules(tuned, bundled | {"caption": [0.9, 0.5]})
    meta = json.loads((tuned / CONFIG).read_text())
    meta["model"]["task_weights"]["keypoints"] = 2.5
    meta["model"]["backbone_weights"] = "/weights/resnet18.pth"
    (tuned / CONFIG).write_text(json.dumps(meta))
    for order, caption in (
        ((tuned, micro_checkpoint), [0.9, 0.5]),
        ((micro_checkpoint, tuned), bundled["caption"]),
    ):
        out = tmp_path / f"avg-{order[0].name}"
        result = average(*map(str, order), "--out", str(out))
        assert result.exit_code == 0, result.output
        assert load_checkpoint(out)[0].config.schedules["caption"] == caption


def test_other_models_and_bad_arguments_are_refused(micro_checkpoint, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(micro_checkpoint, other)
    meta = json.loads((other / CONFIG).read_text())
    meta["model"]["mask_size"] = meta["model"]["mask_size"] * 2
    (other / CONFIG).write_text(json.dumps(meta))
    result = average(str(micro_checkpoint), str(other), "--out", str(tmp_path / "a"))
    assert result.exit_code != 0 and "another model config" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "a").exists()
    result = average(str(micro_checkpoint), "--out", str(tmp_path / "b"))
    assert result.exit_code != 0 and "two checkpoints or more" in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = average(str(micro_checkpoint), str(micro_checkpoint), "--out", str(tmp_path / "full"))
    assert result.exit_code != 0 and "already exists" in result.output
