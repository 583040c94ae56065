"""Training: single process, DDP on CPU (gloo), exact resume, and `mad eval`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import MAD, WEIGHTS, load_checkpoint, write_files
from model.evaluate import METRICS
from model.startup import StartupError
from model.train import synchronised_batchnorm, train
from model.train_log import CsvLog
from model.train_start import TrainConfig
from model.train_state import META
from tests.helpers import MICRO_OVERRIDES as MICRO
from tests.helpers import free_port, micro_config


def read_log(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


def config(data: Path, out: Path, **kwargs) -> TrainConfig:
    values = dict(
        data=data,
        out=out,
        steps=4,
        batch_size=2,
        workers=0,
        warmup_steps=1,
        log_every=1,
        save_every=100,
        eval_images=2,
        overrides=dict(MICRO),
        lr=1e-3,
    )
    values.update(kwargs)
    return TrainConfig(**values)


def test_training_writes_a_checkpoint_and_resumes_exactly(synth_data, tmp_path):
    train(config(synth_data, tmp_path / "straight"))
    straight = read_log(tmp_path / "straight" / "train_log.csv")
    assert sorted(straight) == [1, 2, 3, 4]
    mad, meta = load_checkpoint(tmp_path / "straight")
    assert meta["step"] == 4 and mad.config.d_model == 32
    assert mad.config.class_names[0] == "person" and len(mad.config.keypoint_names) == 17

    train(config(synth_data, tmp_path / "split", stop_at=2))
    train(config(synth_data, tmp_path / "split", resume=tmp_path / "split", overrides=None))
    resumed = read_log(tmp_path / "split" / "train_log.csv")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step


def test_tasks_the_data_has_no_annotations_for_are_left_out(synth_data, tmp_path, capsys):
    """A detection-only COCO set (no captions, no keypoints anywhere) trains detection and
    segmentation, saying so; no tokenizer is trained on zero captions."""
    data = tmp_path / "boxes-only"
    shutil.copytree(synth_data, data)
    for split in ("train2017", "val2017"):
        for name in ("captions", "person_keypoints"):
            (data / "annotations" / f"{name}_{split}.json").unlink()
        instances = data / "annotations" / f"instances_{split}.json"
        coco = json.loads(instances.read_text())
        for ann in coco["annotations"]:  # the synthetic set also keeps them here
            ann.pop("keypoints", None)
            ann.pop("num_keypoints", None)
        instances.write_text(json.dumps(coco))
    train(config(data, tmp_path / "run", steps=1))
    mad, _ = load_checkpoint(tmp_path / "run")
    assert mad.config.tasks == ["detection", "segmentation"] and mad.tokenizer is None
    assert not (tmp_path / "run" / "tokenizer.model").exists()
    said = capsys.readouterr()
    for task in ("caption", "keypoints"):
        assert f"has no {task} annotations: training without {task}" in said.out + said.err


def test_accumulated_micro_batches_step_with_their_mean_gradient(synth_data, tmp_path, monkeypatch):
    """--accumulate 2 x batch 1: one step on the mean of the two micro-batches' gradients,
    the same images, augmentations and dropout as two plain steps of batch 1 would see."""
    seen: list[torch.Tensor] = []
    clip = torch.nn.utils.clip_grad_norm_

    def record(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        seen.append(torch.cat([p.grad.flatten() for p in parameters if p.grad is not None]))
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    # lr 0: the second plain step starts from the first's weights.
    fixed = dict(amp="none", lr=0.0, weight_decay=0.0, batch_size=1)
    train(config(synth_data, tmp_path / "plain", steps=2, **fixed))
    first, second = seen
    seen.clear()
    train(config(synth_data, tmp_path / "accumulated", steps=1, accumulate=2, **fixed))
    (accumulated,) = seen
    torch.testing.assert_close(accumulated, (first + second) / 2, rtol=1e-6, atol=0)
    assert not torch.allclose(first, second)


def test_an_accumulating_run_resumes_exactly_with_its_own_micro_batches(
    synth_data, tmp_path, capsys
):
    train(config(synth_data, tmp_path / "straight", accumulate=2))
    straight = read_log(tmp_path / "straight" / "train_log.csv")
    split = tmp_path / "split"
    train(config(synth_data, split, accumulate=2, stop_at=2))
    capsys.readouterr()
    train(config(synth_data, split, accumulate=2, resume=split, overrides=None))
    assert "--resume" not in capsys.readouterr().out
    resumed = read_log(split / "train_log.csv")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step


def test_a_resume_keeps_the_saved_schedule(synth_data, tmp_path):
    """The CLI fills schedule options left out from the saved run (a warmup of 1, not the
    default 100); the run then continues as the uninterrupted one did. A schedule option
    given with another value, a finished run and a missing directory are refused."""
    from typer.testing import CliRunner

    from mad.cli import app as mad_cli

    def cli(out: Path, *extra: str):
        args = ["train", "--data", str(synth_data), "--out", str(out), "--workers", "0"]
        return CliRunner().invoke(mad_cli, [*args, "--batch-size", "2", "--log-every", "1", *extra])

    first = ["--steps", "3", "--warmup-steps", "1", "--lr", "1e-3", "--eval-images", "1"]
    sets = [f"--set={k}={json.dumps(v)}" for k, v in MICRO.items()]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli(straight, *first, *sets).exit_code == 0
    assert cli(split, *first, *sets, "--stop-at", "2").exit_code == 0
    resumed = cli(split, "--resume", str(split), "--eval-images", "1")
    assert resumed.exit_code == 0, resumed.output
    assert read_log(split / "train_log.csv")[3] == pytest.approx(
        read_log(straight / "train_log.csv")[3], rel=1e-4
    )
    training = json.loads((split / "config.json").read_text())["training"]
    assert training["warmup_steps"] == 1 and training["lr"] == 1e-3
    with open(split / "train_log.csv") as f:  # the logged lr is --lr's, not the backbone's
        lrs = [float(row["lr"]) for row in csv.DictReader(f) if row.get("lr")]
    assert lrs[0] == pytest.approx(1e-3)  # the warmup's end: the peak (the backbone's: 1e-4)
    refused = cli(split, "--resume", str(split), "--lr", "1")
    assert refused.exit_code == 3
    assert "--lr 1.0 (saved: 0.001) would change its schedule" in refused.stderr
    finished = cli(split, "--resume", str(split))
    assert finished.exit_code == 3 and "the run is finished (step 3 of 3)" in finished.stderr
    missing = cli(tmp_path / "new", "--resume", str(tmp_path / "nope"))
    assert missing.exit_code == 3 and "no checkpoint there (config.json missing)" in missing.stderr


def test_ctrl_c_says_which_step_is_kept(synth_data, tmp_path, monkeypatch, capsys):
    """Interrupted at step 3 of a run saving every 2 steps: the run stops (the interrupt goes
    on) and says that step 2 is kept, and how to continue."""
    calls = iter(range(100))

    def interrupting(*_):
        if next(calls) == 2:  # during the third step
            raise KeyboardInterrupt
        return 0.0

    monkeypatch.setattr("model.train._time_spent", interrupting)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config(synth_data, out, save_every=2))
    said = capsys.readouterr()
    assert f"interrupted after step 2: {out} holds step 2; continue with --resume {out}" in (
        said.out + said.err
    )
    assert json.loads((out / "config.json").read_text())["step"] == 2


def test_a_resume_with_other_batches_goes_on_and_says_so(synth_data, tmp_path, capsys):
    """Another --batch-size or --accumulate (or number of processes) changes which images a
    step sees: the run continues from its step and optimizer state, and says it is not exact."""
    out = tmp_path / "run"
    train(config(synth_data, out, accumulate=2, stop_at=2))
    capsys.readouterr()
    train(config(synth_data, out, batch_size=1, resume=out, overrides=None, stop_at=3))
    said = capsys.readouterr().out
    assert "--batch-size 2 -> 1, --accumulate 2 -> 1: training goes on from step 2" in said
    assert sorted(read_log(out / "train_log.csv")) == [1, 2, 3]


def test_resume_refuses_weights_without_their_training_state(synth_data, tmp_path):
    """A checkpoint without optimizer state, or with one from another step (a save cut
    short), cannot continue exactly: refused, pointing at --init."""
    out = tmp_path / "run"
    train(config(synth_data, out, stop_at=1))
    meta = json.loads((out / META).read_text())
    (out / META).write_text(json.dumps({**meta, "step": 7}))
    with pytest.raises(StartupError, match=r"from step 7 and its weights from step 1.*--init"):
        train(config(synth_data, out, resume=out, overrides=None))
    (out / META).unlink()
    with pytest.raises(StartupError, match=r"no training state.*--init"):
        train(config(synth_data, out, resume=out, overrides=None))
    with pytest.raises(StartupError, match=r"--set would be ignored.*--init"):
        train(config(synth_data, out, resume=out, overrides={"dropout": 0.1}))


def test_a_save_cut_short_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    write_files(tmp_path, {WEIGHTS: b"old weights", "config.json": b"old config"})
    real = Path.write_bytes

    def fail_on_config(path: Path, data: bytes) -> int:
        if "config" in path.name:
            real(path, data[:3])  # the disk fills up halfway
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", fail_on_config)
    with pytest.raises(OSError, match="disk full"):
        write_files(tmp_path, {WEIGHTS: b"new weights", "config.json": b"new config"})
    assert (tmp_path / WEIGHTS).read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS]


def test_a_step_needs_a_micro_batch(synth_data, tmp_path):
    with pytest.raises(StartupError, match="--accumulate 0"):
        train(config(synth_data, tmp_path / "run", accumulate=0))


def test_a_new_run_trains_its_own_tokenizer_over_one_left_in_out(synth_data, tmp_path):
    """An interrupted first run leaves tokenizer.model in --out; the next run (other data or
    settings, say) trains its own rather than reading that one."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"left by an interrupted run")
    train(config(synth_data, out, steps=1))
    mad, _ = load_checkpoint(out)
    assert mad.tokenizer is not None and mad.tokenizer.vocab_size > 0


def test_a_stop_past_the_schedule_is_refused(synth_data, tmp_path):
    with pytest.raises(StartupError, match="--stop-at 5 is past the schedule's end"):
        train(config(synth_data, tmp_path / "run", steps=2, stop_at=5))
    assert not (tmp_path / "run").exists()


def test_fp16_is_refused_off_cuda(synth_data, tmp_path):
    with pytest.raises(StartupError, match="fp16 runs on CUDA only"):
        train(config(synth_data, tmp_path / "run", device="cpu", amp="fp16"))


def test_a_resumed_log_drops_the_rows_logged_after_the_last_save(tmp_path):
    log = CsvLog(tmp_path / "train_log.csv")
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    CsvLog(tmp_path / "train_log.csv", up_to=3).write({"step": 4, "loss": 0.5})
    assert read_log(tmp_path / "train_log.csv") == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3), 4: 0.5}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_process_ddp_on_cpu(synth_data, tmp_path, accumulate):
    """Two gloo ranks; with --accumulate 2 the first micro-batch of each step skips DDP's
    all-reduce (no_sync) while the token counts inside the loss still meet on both ranks."""
    out = tmp_path / "ddp"
    sets = [arg for key, value in MICRO.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "mad.cli",
            "train",
            "--data",
            str(synth_data),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--accumulate",
            str(accumulate),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--warmup-steps",
            "1",
            "--eval-images",
            "2",
            *sets,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(read_log(out / "train_log.csv")) == [2]
    meta = load_checkpoint(out)[1]
    assert meta["step"] == 2 and meta["training"]["accumulate"] == accumulate


def test_batch_norms_that_train_are_synchronised_under_ddp_on_gpus(tokenizer):
    """Only for several processes on CUDA (torch's SyncBatchNorm needs a GPU); frozen batch
    norms stay frozen, and the state dict keeps its names (checkpoints load into BatchNorm2d).
    The conversion itself needs no GPU."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for frozen in (False, True):
        network = MAD.build(micro_config(frozen_batchnorm=frozen), tokenizer).required_network()
        names, params = set(network.state_dict()), [id(p) for p in network.parameters()]
        assert synchronised_batchnorm(network, 1, cuda) is network
        assert synchronised_batchnorm(network, 2, cpu) is network
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in network.modules())
        synced = synchronised_batchnorm(network, 2, cuda)
        # In place, the same parameters in the same order: the model saved, the optimizer built
        # and the state resumed are the converted network's.
        assert synced is network and [id(p) for p in synced.parameters()] == params
        kinds = {type(m) for m in synced.modules()}
        assert (torch.nn.SyncBatchNorm in kinds) is not frozen
        assert torch.nn.BatchNorm2d not in kinds
        assert set(synced.state_dict()) == names


def test_mad_eval_reports_every_metric(micro_checkpoint, synth_data, tmp_path):
    report = tmp_path / "eval.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mad.cli",
            "eval",
            "--checkpoint",
            str(micro_checkpoint),
            "--data",
            str(synth_data),
            "--refine",
            "caption:1",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(report.read_text())["metrics"]
    # a synthetic-world model: also how many captions are sentences of its language
    assert set(metrics) - set(METRICS) == {"caption_sentence_share", "caption_BLEU4_x_sentences"}
    assert set(METRICS) <= set(metrics)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert "bbox_AP" in result.stdout
