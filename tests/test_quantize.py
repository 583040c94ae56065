"""int8 exports (`mad export --quantize int8`) and the onnx backend's int8 precision, on CPU:
what is quantised, the check against fp32 in the manifest, refusals, the service's cache."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from export.onnx_export import export_onnx
from export.quantize import MIN_TOKEN_AGREEMENT, quantize_export
from mad.cli import app as mad_cli
from model.inference_io import Request
from model.pipeline import Pipeline
from model.startup import StartupError
from runtime.backends import create_runner
from runtime.manifest import read_manifest
from service.model_cache import load_runner
from tests.helpers import ALL_TASKS, synthetic_images


@pytest.fixture(scope="module")
def fp32_export(micro_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "onnx"
    export_onnx(micro_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def int8_export(fp32_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "onnx"
    quantize_export(fp32_export, out, calibration_images=4)
    return out


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_the_encoder_is_statically_and_the_decoders_dynamically_quantised(int8_export):
    manifest = read_manifest(int8_export)
    assert manifest["precision"] == "int8"
    assert manifest["quantization"]["encoder"]["method"] == "static"
    assert manifest["quantization"]["decoders"]["method"] == "dynamic"
    # QDQ: the convolutions read int8 weights through DequantizeLinear.
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= op_types(int8_export / "encoder.onnx")
    for graph in manifest["graphs"]["decoders"].values():
        for file in (graph["file"], graph["single_image"]["file"]):
            assert "MatMulInteger" in op_types(int8_export / file)
    assert (int8_export / "config.json").is_file() and (int8_export / "tokenizer.model").is_file()


def test_the_check_against_fp32_is_in_the_manifest(int8_export):
    check = read_manifest(int8_export)["quantization"]["check"]
    assert check["max_abs_logit_diff"] > 0  # int8 is not fp32
    assert MIN_TOKEN_AGREEMENT <= check["token_agreement"] <= 1
    assert set(check["token_agreement_by_task"]) == set(ALL_TASKS)
    decoded = check["decoded"]
    assert decoded["images"] > 0
    if decoded["detections_fp32"]:
        assert 0 <= decoded["detection_agreement"] <= 1
    else:  # nothing to compare when neither found a box (not a perfect score)
        assert decoded["detection_agreement"] in (None, 0.0)
    assert 0 <= decoded["caption_agreement"] <= 1


def test_int8_runs_the_pipeline_and_mostly_agrees_with_fp32(fp32_export, int8_export):
    images = synthetic_images(2)
    results = {}
    for precision, export in (("fp32", fp32_export), ("int8", int8_export)):
        mad, runner = create_runner("onnx", None, export_dir=export, precision=precision)
        assert runner.describe()["precision"] == precision
        requests = [Request(image, ALL_TASKS, {}, 0.0) for image in images]
        results[precision] = Pipeline(mad, runner)(requests)
    for fp32, int8 in zip(results["fp32"], results["int8"], strict=True):
        assert int8.image_size == fp32.image_size and set(int8.tasks) == set(fp32.tasks)
        assert isinstance(int8.caption, str)


def test_precision_and_export_must_agree(fp32_export, int8_export):
    with pytest.raises(StartupError, match="is an export at int8 and fp32 was asked for"):
        create_runner("onnx", None, export_dir=int8_export)
    with pytest.raises(StartupError, match="is an export at fp32 and int8 was asked for"):
        create_runner("onnx", None, export_dir=fp32_export, precision="int8")
    with pytest.raises(StartupError, match="quantise an fp32 one"):
        quantize_export(int8_export, int8_export.parent / "again")


def test_too_little_agreement_refuses_the_export(fp32_export, tmp_path, monkeypatch):
    monkeypatch.setattr("export.quantize.MIN_TOKEN_AGREEMENT", 1.01)
    with pytest.raises(StartupError, match="serve the fp32 export"):
        quantize_export(fp32_export, tmp_path / "int8", calibration_images=2)


def test_the_service_quantises_once_into_its_cache(micro_checkpoint, tmp_path, monkeypatch):
    calls = []
    real = quantize_export
    monkeypatch.setattr(
        "export.quantize.quantize_export",
        lambda *args, **kw: calls.append(args) or real(*args, calibration_images=2),
    )
    for _ in range(2):
        _, runner = load_runner("onnx", micro_checkpoint, cache_dir=tmp_path, precision="int8")
        assert runner.describe()["precision"] == "int8"
    assert len(calls) == 1
    assert Path(runner.describe()["export_dir"]).name == "onnx-int8"


def test_cli_export_quantize(micro_checkpoint, tmp_path):
    out = tmp_path / "int8"
    args = ["export", "--checkpoint", str(micro_checkpoint), "--out", str(out)]
    result = CliRunner().invoke(mad_cli, [*args, "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["precision"] == "int8" and "token_agreement" in summary["quantization_check"]
    refused = CliRunner().invoke(mad_cli, [*args, "--quantize", "int4"])
    assert refused.exit_code != 0 and "choose int8" in refused.output
