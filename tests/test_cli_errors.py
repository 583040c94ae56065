"""Mistakes with the files and values the training and evaluation commands take are one line
(StartupError: exit 3; usage: exit 2), caught before the work starts, and leave nothing
half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mad.cli import app as mad_cli
from model.decoding import CandidateCheck
from tests.helpers import encode, scene_image
from tests.test_startup_errors import one_line_failure, usage_failure


def damaged(micro_checkpoint: Path, tmp_path: Path, change) -> Path:
    """A copy of the micro checkpoint with `change(copy)` applied."""
    copy = tmp_path / "damaged"
    shutil.copytree(micro_checkpoint, copy)
    change(copy)
    return copy


def edit_config(**fields):
    def change(copy: Path) -> None:
        meta = json.loads((copy / "config.json").read_text())
        meta["model"].update(fields)
        (copy / "config.json").write_text(json.dumps(meta))

    return change


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda c: (c / "config.json").write_text("{not json"), "cannot be read as JSON"),
        (lambda c: (c / "config.json").write_text("[1, 2]"), "is not a MAD checkpoint config"),
        (lambda c: (c / "tokenizer.model").unlink(), "tokenizer.model is missing"),
        (lambda c: (c / "tokenizer.model").write_text("text"), "not a readable SentencePiece"),
        (edit_config(d_model="abc"), "d_model must be int, not 'abc'"),
        (edit_config(foo=1), "unknown model config keys: ['foo']"),
        (edit_config(image_size=[-5, 0]), "image_size must be two positive integers"),
        (edit_config(schedules={"caption": [2.0]}), "must be mask ratios in 0..1"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "tune", "predict"])
def test_a_damaged_checkpoint_is_one_line(command, change, says, micro_checkpoint, tmp_path):
    checkpoint = damaged(micro_checkpoint, tmp_path, change)
    args = [command, "--checkpoint", str(checkpoint)]
    if command == "predict":
        image = tmp_path / "scene.png"
        image.write_bytes(encode(scene_image()))
        args.append(str(image))
    else:
        args += ["--data", str(tmp_path)]  # never reached: the checkpoint fails first
    assert says in one_line_failure(args)


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_an_export_is_not_a_checkpoint(command, micro_checkpoint, tmp_path):
    export = damaged(micro_checkpoint, tmp_path, lambda c: (c / "manifest.json").write_text("{}"))
    args = [command, "--checkpoint", str(export), "--data", str(tmp_path)]
    assert "is an ONNX export, not a checkpoint" in one_line_failure(args)


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_devices_are_checked_before_loading(command, micro_checkpoint, synth_data):
    """A device no setting could name is a usage error (exit 2), as for `mad serve`."""
    args = [command, "--checkpoint", str(micro_checkpoint), "--data", str(synth_data)]
    stderr = usage_failure([*args, "--device", "gpu"])
    assert "--device" in stderr and "'gpu': expected cpu, cuda, cuda:N or auto" in stderr


def test_eval_checks_its_json_path_before_evaluating(micro_checkpoint, synth_data, tmp_path):
    args = ["eval", "--checkpoint", str(micro_checkpoint), "--data", str(synth_data)]
    assert "is a directory" in one_line_failure([*args, "--json", str(tmp_path)])
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "is a file, not a directory" in one_line_failure([*args, "--json", f"{blocker}/m.json"])


def test_counts_that_mean_nothing_are_usage_errors(micro_checkpoint, synth_data):
    common = ["--checkpoint", str(micro_checkpoint), "--data", str(synth_data)]
    assert "--limit" in usage_failure(["tune", *common, "--limit", "0"])
    assert "--limit" in usage_failure(["eval", *common, "--limit", "-1"])
    assert "--max-steps" in usage_failure(["tune", *common, "--max-steps", "100"])


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("caption_candidates", "expected KEY=VALUE"),
        ("d_model=64", "d_model is not a decoding option of this model"),
        ("caption_candidates=0", "caption_candidates must be at least 1"),
        ("mask_threshold=1.5", "mask_threshold must be between 0 and 1"),
        ("caption_candidates=two", "caption_candidates must be int"),
    ],
)
def test_eval_decoding_overrides_are_checked_before_evaluating(
    item, says, micro_checkpoint, synth_data
):
    args = ["eval", "--checkpoint", str(micro_checkpoint), "--data", str(synth_data)]
    stderr = usage_failure([*args, "--decoding", item])
    assert "--decoding" in stderr and says in stderr


def test_eval_decoding_reads_the_same_weights_another_way(
    micro_checkpoint, synth_data, tmp_path, monkeypatch
):
    read_backs = []  # the candidates' choosing passes the evaluation ran
    original = CandidateCheck.read_back
    monkeypatch.setattr(
        CandidateCheck,
        "read_back",
        lambda self, *a: read_backs.append(self.n) or original(self, *a),
    )
    args = ["eval", "--checkpoint", str(micro_checkpoint), "--data", str(synth_data)]
    args += ["--tasks", "caption", "--limit", "2", "--refine", "caption:3"]
    reports = {}
    for n in (1, 3):
        out = tmp_path / f"{n}.json"
        read_backs.clear()
        result = CliRunner().invoke(
            mad_cli, [*args, "--decoding", f"caption_candidates={n}", "--json", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert set(read_backs) == (set() if n == 1 else {n})
        reports[n] = json.loads(out.read_text())
    assert reports[1]["decoding"]["caption_candidates"] == 1
    assert reports[3]["decoding"]["caption_candidates"] == 3
    assert set(reports[1]["decoding"]) >= {"coordinate_window", "mask_threshold"}
    # The checkpoint itself is untouched.
    config = json.loads((micro_checkpoint / "config.json").read_text())["model"]
    assert config.get("caption_candidates", 1) == 1


def test_an_unknown_benchmark_backend_is_refused_before_any_output(micro_checkpoint, tmp_path):
    args = ["bench", "--checkpoint", str(micro_checkpoint), "--out", str(tmp_path / "b")]
    stderr = usage_failure([*args, "--backend", "foo"])
    assert "'foo' is not one of torch, onnx, tensorrt, openvino" in stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--device", "gpu"], "'gpu': expected cpu, cuda, cuda:N or auto"),
        (["--precision", "int9"], "'int9': expected one of fp32, bf16, fp16, int8"),
        (["--concurrency", "abc"], "'abc': expected positive integers separated by commas"),
        (["--concurrency", "0,2"], "expected positive integers"),
    ],
)
def test_benchmark_values_are_usage_errors(extra, says, micro_checkpoint, tmp_path):
    args = ["bench", "--checkpoint", str(micro_checkpoint), "--out", str(tmp_path / "b")]
    stderr = usage_failure([*args, *extra])
    assert says in stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--precision", "int8"], "int8 is a precision of the onnx backend"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 autocast runs on CUDA only"),
        (["--backend", "onnx", "--precision", "bf16"], "the onnx backend runs fp32 or int8"),
    ],
)
def test_benchmark_options_that_do_not_go_together_fail_before_any_section(
    extra, says, micro_checkpoint, tmp_path
):
    args = ["bench", "--checkpoint", str(micro_checkpoint), "--out", str(tmp_path / "b")]
    assert says in one_line_failure([*args, *extra])
    assert not list((tmp_path / "b").iterdir())  # no report: no section ran


def empty_images(annotations: Path) -> None:
    coco = json.loads(annotations.read_text())
    annotations.write_text(json.dumps({**coco, "images": [], "annotations": []}))


def train_args(synth_data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(synth_data), "--out", str(out), "--steps", "1", *extra]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--set", "foo=1"], "unknown config key 'foo'"),
        (["--set", "d_modle=64"], "did you mean d_model?"),
        (["--set", "d_model=abc"], "d_model must be int, not 'abc'"),
        (["--set", "task_weights={bad"], "task_weights must be dict[str, float]"),
        (["--set", "d_model=-4"], "d_model must be at least 1"),
        (["--device", "foo"], "'foo': expected cpu, cuda, cuda:N or auto"),
    ],
)
def test_training_mistakes_leave_no_directory(extra, says, synth_data, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(mad_cli, train_args(synth_data, out, "--workers", "0", *extra))
    assert result.exit_code in (2, 3), (result.output, result.exception)
    assert "Traceback" not in result.stderr and says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--preset", "huge"], "--preset"),
        (["--amp", "fp8"], "--amp"),
        (["--lr", "-1"], "--lr"),
        (["--stop-at", "0"], "--stop-at"),
        (["--set", "image_size=[128"], "--set: image_size must be tuple[int, int], not '[128'"),
    ],
)
def test_training_values_are_usage_errors(extra, says, synth_data, tmp_path):
    assert says in usage_failure(train_args(synth_data, tmp_path / "run", *extra))


def test_training_data_is_checked_first(tmp_path):
    stderr = one_line_failure(train_args(tmp_path / "nothing", tmp_path / "run"))
    assert "instances_train2017.json not found" in stderr
    assert not (tmp_path / "run").exists()

    assert not (tmp_path / "run").exists()


def test_training_will_not_overwrite_a_trained_model(micro_checkpoint, synth_data, tmp_path):
    out = tmp_path / "trained"
    shutil.copytree(micro_checkpoint, out)
    stderr = one_line_failure(train_args(synth_data, out))
    assert f"already holds a trained model: continue it with --resume {out}" in stderr


def test_synth_replaces_its_own_dataset_and_nothing_else(tmp_path):
    out = tmp_path / "data"
    args = ["data", "synth", "--out", str(out), "--val", "0"]
    assert CliRunner().invoke(mad_cli, [*args, "--train", "3"]).exit_code == 0
    assert CliRunner().invoke(mad_cli, [*args, "--train", "1"]).exit_code == 0
    assert len(list((out / "train2017").iterdir())) == 1  # the first run's images are gone
    (out / "notes.txt").write_text("mine")
    assert "holds something other than" in one_line_failure([*args, "--train", "1"])
    assert (out / "notes.txt").exists() and len(list((out / "train2017").iterdir())) == 1
    # A COCO download has the same folders, but its annotations are not this writer's.
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2017").mkdir()
    (coco / "train2017" / "000000000009.jpg").write_bytes(b"jpeg")
    (coco / "annotations" / "instances_train2017.json").write_text('{"info": {}, "images": []}')
    refused = one_line_failure(["data", "synth", "--out", str(coco), "--train", "1"])
    assert "holds something other than" in refused
    assert (coco / "train2017" / "000000000009.jpg").exists()


def test_export_into_the_checkpoint_is_refused(micro_checkpoint):
    args = ["export", "--checkpoint", str(micro_checkpoint), "--out", str(micro_checkpoint)]
    assert "is the checkpoint itself" in one_line_failure(args)


def test_export_into_another_checkpoint_or_folder_is_refused(micro_checkpoint, tmp_path):
    """Only a new or empty directory, or an export, is written: a checkpoint stays whole."""
    other = tmp_path / "other-run"
    shutil.copytree(micro_checkpoint, other)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    args = ["export", "--checkpoint", str(micro_checkpoint), "--out", str(other)]
    assert "holds something other than an export" in one_line_failure(args)
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    args = ["export", "--checkpoint", str(micro_checkpoint), "--out", str(notes)]
    assert "holds something other than an export" in one_line_failure(args)
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


def test_render_names_stay_apart(micro_checkpoint, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(encode(scene_image()))
    out = tmp_path / "drawn" / "out.png"  # its directory is made
    args = ["predict", "--checkpoint", str(micro_checkpoint), "--tasks", "detection"]
    result = CliRunner().invoke(
        mad_cli, [*args, str(tmp_path / "a/x.png"), str(tmp_path / "b/x.png"), "--render", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["out-x-0.png", "out-x-1.png"]
    assert "--render" in usage_failure([*args, str(tmp_path / "a/x.png"), "--render", "out"])


def test_tasks_without_ground_truth_are_not_scored(micro_checkpoint, synth_data, tmp_path):
    """A data set without keypoint or caption files (detection-only COCO, say) leaves those
    tasks out, saying so, instead of scoring them 0."""
    data = tmp_path / "boxes-only"
    shutil.copytree(synth_data, data)
    (data / "annotations" / "person_keypoints_val2017.json").unlink()
    (data / "annotations" / "captions_val2017.json").unlink()
    args = ["--checkpoint", str(micro_checkpoint), "--data", str(data)]
    result = CliRunner().invoke(mad_cli, ["eval", *args])
    assert result.exit_code == 0, result.output
    assert "mad eval: keypoints not scored:" in result.stderr
    assert "mad eval: caption not scored:" in result.stderr
    assert "bbox_AP" in result.stdout and "keypoints_AP" not in result.stdout
    assert "caption_BLEU4" not in result.stdout
    stderr = one_line_failure(["tune", *args, "--task", "caption", "--max-steps", "1"])
    assert "has no ground truth for the tasks to tune" in stderr


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda d: (d / "annotations/instances_val2017.json").write_text("{"), "not a COCO"),
        (lambda d: (d / "annotations/captions_val2017.json").write_text("[]"), "not a COCO"),
        (lambda d: next((d / "val2017").iterdir()).unlink(), "lacks 1 of the 4 images"),
        (lambda d: empty_images(d / "annotations/instances_val2017.json"), "lists no images"),
    ],
)
def test_a_damaged_data_set_is_one_line(damage, says, micro_checkpoint, synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    damage(data)
    args = ["eval", "--checkpoint", str(micro_checkpoint), "--data", str(data)]
    assert says in one_line_failure(args)
