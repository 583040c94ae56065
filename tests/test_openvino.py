"""The openvino backend (CPU) on the ONNX export: logits and pipeline parity with eager
PyTorch at fp32, bf16 close to it, the feature cache's split and join, start-up refusals,
the service's cache, and the host-thread setting the export backends ask for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from export.onnx_export import export_onnx
from export.quantize import quantize_export
from model.checkpoint import load_checkpoint
from model.feature_cache import FeatureCache
from model.inference_io import Request
from model.pipeline import Pipeline, torch_threads
from model.startup import StartupError
from runtime.backends import create_runner
from runtime.torch_runner import TorchRunner
from service.model_cache import load_runner
from tests.helpers import ALL_TASKS, synthetic_images
from tests.test_export import assert_same_results

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="no openvino (the openvino extra)"
)


@pytest.fixture(scope="module")
def exported(micro_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(micro_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def runners(micro_checkpoint, exported):
    mad, _ = load_checkpoint(micro_checkpoint)
    _, openvino = create_runner("openvino", None, export_dir=exported)
    return mad, TorchRunner(mad.network), openvino


@pytest.mark.parametrize("batch, sequences", [(3, 5), (1, 4)])
def test_logits_match_eager_at_fp32(runners, batch, sequences):
    """Batch 1 runs the single-image decoder graphs (no image_index input)."""
    mad, torch_runner, openvino = runners
    generator = torch.Generator().manual_seed(batch)
    images = torch.rand(batch, 3, 80, 112, generator=generator)
    pad = torch.zeros(batch, 80, 112, dtype=torch.bool)
    pad[-1, :, 56:] = True
    expected_memory, got_memory = torch_runner.encode(images, pad), openvino.encode(images, pad)
    for task, codec in mad.codecs.items():
        tokens = torch.randint(0, mad.vocab.size, (sequences, codec.seq_len), generator=generator)
        index = torch.randint(0, batch, (sequences,), generator=generator)
        expected = torch_runner.decode(expected_memory, tokens, index, codec.vocab_slice())
        got = openvino.decode(got_memory, tokens, index, codec.vocab_slice())
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).abs().max() < 1e-3, task


def test_pipeline_results_match_eager(runners, monkeypatch):
    mad, torch_runner, openvino = runners
    images = synthetic_images(2)
    found = Pipeline(mad, torch_runner)([Request(images[0], ("detection",), score_threshold=0)])
    label = int(found[0].detections.labels[0])
    monkeypatch.setattr(type(mad.codecs["keypoints"]), "person_label", property(lambda _: label))
    requests = [
        Request(image, ALL_TASKS, dict.fromkeys(ALL_TASKS, 2), score_threshold=0.0)
        for image in images
    ]
    assert_same_results(Pipeline(mad, torch_runner)(requests), Pipeline(mad, openvino)(requests))


def test_features_split_and_join_for_the_feature_cache(runners):
    mad, _, openvino = runners
    a, b = synthetic_images(2, seed=4)
    cache: FeatureCache = FeatureCache(2**24, "v")
    cached = Pipeline(mad, openvino, features=cache)
    cached([Request(a, ("caption",), image_key="a")])
    mixed = cached(
        [Request(b, ("caption",), image_key="b"), Request(a, ("caption",), image_key="a")]
    )
    assert (cache.hits, cache.misses) == (1, 2)
    expected = Pipeline(mad, openvino)([Request(b, ("caption",)), Request(a, ("caption",))])
    assert [r.caption for r in mixed] == [r.caption for r in expected]


def test_bf16_runs_close_to_fp32(micro_checkpoint, exported, runners):
    mad, _, fp32 = runners
    try:
        _, bf16 = create_runner("openvino", None, export_dir=exported, precision="bf16")
    except StartupError as exc:  # a CPU without bf16
        pytest.skip(str(exc))
    assert bf16.describe()["precision"] == "bf16" and fp32.describe()["precision"] == "fp32"
    images = torch.rand(1, 3, 64, 64)
    pad = torch.zeros(1, 64, 64, dtype=torch.bool)
    codec = mad.codecs["caption"]
    tokens = torch.randint(0, mad.vocab.size, (2, codec.seq_len))
    index = torch.zeros(2, dtype=torch.long)
    logits = [
        runner.decode(runner.encode(images, pad), tokens, index, codec.vocab_slice())
        for runner in (fp32, bf16)
    ]
    assert (logits[0] - logits[1]).abs().max() < 0.5  # bf16 keeps ~3 significant digits


def test_refusals(micro_checkpoint, exported, tmp_path):
    with pytest.raises(StartupError, match="runs on the CPU"):
        create_runner("openvino", None, "cuda", export_dir=exported)
    with pytest.raises(StartupError, match="choose fp32 or bf16"):
        create_runner("openvino", None, export_dir=exported, precision="fp16")
    int8 = tmp_path / "int8"
    quantize_export(exported, int8, calibration_images=2)
    with pytest.raises(StartupError, match="OpenVINO runs fp32 exports"):
        create_runner("openvino", None, export_dir=int8)


def test_the_service_exports_into_its_cache(micro_checkpoint, tmp_path):
    _, runner = load_runner("openvino", micro_checkpoint, cache_dir=tmp_path)
    assert runner.describe()["backend"] == "openvino"
    assert Path(runner.describe()["export_dir"]).parent.parent == tmp_path


def test_export_backends_run_the_host_work_on_one_torch_thread(runners):
    _, torch_runner, openvino = runners
    assert openvino.host_threads == 1 and getattr(torch_runner, "host_threads", None) is None
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
