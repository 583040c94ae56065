"""Expected start-up failures (a wrong option, a missing GPU, library, file or port) are one
line on stderr and exit status 3, no traceback; `mad --debug` (MAD_DEBUG=1) shows it. Every
case here fails before a model loads."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mad.cli import app as mad_cli
from model.checkpoint import WEIGHTS
from model.startup import StartupError, resolve_device
from runtime.manifest import MANIFEST
from service.settings import Settings
from tests.helpers import encode, scene_image

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


def onnx_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def one_line_failure(args: list[str]) -> str:
    """Run `mad ARGS` in-process; -> its stderr, checked to be one line and exit status 3."""
    result = CliRunner().invoke(mad_cli, args)
    assert result.exit_code == 3, (result.output, result.exception)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    path.write_bytes(encode(scene_image()))
    return path


@pytest.mark.parametrize("command", ["serve", "predict"])
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_tensorrt_not_installed(command, micro_checkpoint, image):
    args = [command, "--backend", "tensorrt", "--checkpoint", str(micro_checkpoint)]
    stderr = one_line_failure(args + ([str(image)] if command == "predict" else []))
    assert stderr.startswith(f"mad {command}: ") and "TensorRT is not installed" in stderr
    assert (
        "pip install 'mad-serve[tensorrt]'" in stderr and "pip install -e '.[tensorrt]'" in stderr
    )


@NO_CUDA
@pytest.mark.parametrize("command", ["serve", "predict"])
def test_cuda_without_a_gpu(command, micro_checkpoint, image):
    args = [command, "--device", "cuda", "--checkpoint", str(micro_checkpoint)]
    stderr = one_line_failure(args + ([str(image)] if command == "predict" else []))
    assert "no CUDA device" in stderr and "--device cpu" in stderr


@pytest.mark.parametrize("command", ["serve", "predict"])
def test_onnx_on_cuda_without_cuda_provider(command, micro_checkpoint, image):
    if onnx_has_cuda():
        pytest.skip("this ONNX Runtime has CUDA")
    args = [command, "--backend", "onnx", "--device", "cuda", "--checkpoint", str(micro_checkpoint)]
    stderr = one_line_failure(args + ([str(image)] if command == "predict" else []))
    assert "CUDAExecutionProvider" in stderr and "--device cpu" in stderr


@pytest.mark.parametrize("command", ["serve", "predict"])
def test_fp16_on_cpu(command, micro_checkpoint, image):
    args = [
        command,
        "--precision",
        "fp16",
        "--device",
        "cpu",
        "--checkpoint",
        str(micro_checkpoint),
    ]
    stderr = one_line_failure(args + ([str(image)] if command == "predict" else []))
    assert "fp16" in stderr and "--precision bf16 or fp32" in stderr


@pytest.mark.parametrize(
    ("backend", "precision", "says"),
    [
        ("torch", "int8", "--backend onnx --precision int8"),
        ("onnx", "bf16", "choose fp32 or int8"),
    ],
)
def test_precisions_a_backend_does_not_run(backend, precision, says, micro_checkpoint):
    args = ["serve", "--backend", backend, "--precision", precision]
    stderr = one_line_failure([*args, "--checkpoint", str(micro_checkpoint)])
    assert says in stderr


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is not None, reason="onnxscript present")
def test_dynamo_exporter_without_onnxscript(micro_checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ["export", "--exporter", "dynamo", "--checkpoint", str(micro_checkpoint)]
    stderr = one_line_failure([*args, "--out", str(out)])
    assert "onnxscript" in stderr and "--exporter torchscript" in stderr
    assert not out.exists()  # refused before any export work


def test_export_of_a_missing_checkpoint(tmp_path):
    args = ["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert "no checkpoint" in one_line_failure(args)


def test_torch_backend_given_an_export(micro_checkpoint, tmp_path):
    export = tmp_path / "export"  # what `mad export` writes, as far as the check looks
    export.mkdir()
    (export / "config.json").write_text((micro_checkpoint / "config.json").read_text())
    (export / MANIFEST).write_text(json.dumps({"format": "mad-export/1"}))
    stderr = one_line_failure(["serve", "--backend", "torch", "--checkpoint", str(export)])
    assert "is an ONNX export, not a checkpoint" in stderr and "--backend onnx" in stderr


def test_port_in_use_is_refused_before_the_model_loads(micro_checkpoint, monkeypatch):
    import service.app

    def never(*_):
        raise AssertionError("the model loaded before the port was bound")

    monkeypatch.setattr(service.app, "load_model", never)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        stderr = one_line_failure([*args, "--checkpoint", str(micro_checkpoint)])
    assert stderr.strip() == (
        f"mad serve: cannot listen on 127.0.0.1:{port}: Address already in use; stop whatever "
        "uses it or choose another --port (MAD_PORT)"
    )


def test_a_host_that_does_not_resolve_says_so(micro_checkpoint):
    args = ["serve", "--host", "no-such-host.invalid", "--checkpoint", str(micro_checkpoint)]
    stderr = one_line_failure(args)
    assert "cannot listen on no-such-host.invalid:" in stderr
    assert stderr.strip().endswith("; check --host (MAD_HOST)")


def test_debug_shows_the_traceback(micro_checkpoint, monkeypatch):
    monkeypatch.setenv("MAD_DEBUG", "0")  # restored after the test: --debug sets it
    args = ["serve", "--precision", "fp16", "--checkpoint", str(micro_checkpoint)]
    result = CliRunner().invoke(mad_cli, ["--debug", *args])
    assert isinstance(result.exception, StartupError)


def test_the_real_command_prints_one_line(micro_checkpoint):
    """No JSON log line, no traceback: the process's whole stderr is the one sentence."""
    process = subprocess.run(
        [sys.executable, "-m", "mad.cli", "serve", "--precision", "fp16"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "MAD_CHECKPOINT": str(micro_checkpoint)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 3
    assert process.stderr.count("\n") == 1 and "Traceback" not in process.stderr
    assert process.stderr.startswith("mad serve: fp16 autocast runs on CUDA only")


def test_device_auto(micro_checkpoint, image):
    assert Settings(device="auto").device == "auto"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1"
    args = ["predict", "--device", "auto", "--checkpoint", str(micro_checkpoint), str(image)]
    result = CliRunner().invoke(mad_cli, args)
    assert result.exit_code == 0, (result.output, result.exception)


def damaged_checkpoint(micro_checkpoint: Path, where: Path) -> Path:
    """A copy of the micro checkpoint whose weights file was cut short: only loading it finds
    out (the checks before the server starts look at which files exist)."""
    where.mkdir()
    for source in micro_checkpoint.iterdir():
        (where / source.name).write_bytes(source.read_bytes())
    weights = where / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:4000])
    return where


def run_mad(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mad.cli", *args],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_failure_while_the_server_loads_the_model(micro_checkpoint, tmp_path):
    """What only the load finds fails the server's start: the server, listening already,
    logs one JSON line without a traceback and stops; `mad serve` ends with the sentence."""
    damaged = damaged_checkpoint(micro_checkpoint, tmp_path / "damaged")
    process = run_mad("serve", "--port", "0", MAD_CHECKPOINT=str(damaged), MAD_HOST="127.0.0.1")
    assert process.returncode == 3 and "Traceback" not in process.stderr
    *logs, last = process.stderr.strip().splitlines()
    assert last.startswith(f"mad serve: {damaged / WEIGHTS} cannot be read")
    failed = [json.loads(line) for line in logs if '"start-up failed"' in line]
    assert len(failed) == 1 and "damaged or incomplete" in failed[0]["error"]


@pytest.mark.slow
def test_failure_of_a_worker_stops_every_worker(micro_checkpoint, tmp_path):
    """With --workers 2, a worker whose model cannot load ends `mad serve` (exit 3, its
    message last) instead of being restarted for ever."""
    damaged = damaged_checkpoint(micro_checkpoint, tmp_path / "damaged")
    process = run_mad(
        "serve", "--port", "0", "--workers", "2", MAD_CHECKPOINT=str(damaged), MAD_HOST="127.0.0.1"
    )
    assert process.returncode == 3 and "Traceback" not in process.stderr
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mad serve: {damaged / WEIGHTS} cannot be read"), last


@pytest.mark.parametrize("command", ["serve", "predict"])
def test_checkpoint_without_weights(command, micro_checkpoint, image, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((micro_checkpoint / "config.json").read_text())
    args = [command, "--checkpoint", str(partial)] + ([str(image)] if command == "predict" else [])
    stderr = one_line_failure(args)
    assert f"{partial} has a config.json but no {WEIGHTS}" in stderr


def test_export_dir_that_is_not_an_export(micro_checkpoint, tmp_path):
    args = ["serve", "--backend", "onnx", "--checkpoint", str(micro_checkpoint)]
    stderr = one_line_failure([*args, "--export-dir", str(tmp_path)])
    assert f"{tmp_path} is not a MAD export" in stderr


@pytest.mark.parametrize("command", ["serve", "predict"])
def test_an_export_dir_the_torch_backend_would_ignore_is_refused(
    command, micro_checkpoint, image, tmp_path
):
    args = [command, "--checkpoint", str(micro_checkpoint), "--export-dir", str(tmp_path)]
    stderr = one_line_failure(args + ([str(image)] if command == "predict" else []))
    assert "which the torch backend would ignore" in stderr


def usage_failure(args: list[str], **env: str) -> str:
    """Run `mad ARGS`; -> its stderr, checked to be one line and exit status 2."""
    result = CliRunner().invoke(mad_cli, args, env=env)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_invalid_setting_values_are_one_line():
    stderr = usage_failure(["serve", "--device", "gpu"])
    assert stderr.startswith("mad serve: --device: 'gpu': expected cpu, cuda, cuda:N or auto")
    # From the environment, the variable is named instead of the option.
    assert usage_failure(["serve"], MAD_DEVICE="gpu").startswith("mad serve: MAD_DEVICE: 'gpu'")
    stderr = usage_failure(["serve", "--backend", "tf"])
    assert "--backend: 'tf': Input should be 'torch', 'onnx', 'tensorrt' or 'openvino'" in stderr
    assert "--workers: 0" in usage_failure(["serve", "--workers", "0"])
    # A rule across settings is its own message, without a variable's name or the inputs.
    stderr = usage_failure(["serve", "--queue-size", "8", "--degrade-queue-depth", "100"])
    assert stderr.startswith("mad serve: degrade_queue_depth (100) must be below queue_size (8)")


def test_other_usage_errors_are_one_line(image):
    assert "'--port'" in usage_failure(["serve", "--port", "eighty"])
    assert "(see mad serve --help)" in usage_failure(["serve", "--no-such-option"])
    assert "Missing argument 'IMAGE'" in usage_failure(["predict"])
    assert "expected rle or polygon" in usage_failure(["predict", str(image), "--mask-format", "x"])
