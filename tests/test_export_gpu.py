"""GPU paths: CUDA eager with autocast, torch.compile, ONNX Runtime on CUDA, TensorRT engines.
Each runs only where its GPU and library are present and is skipped with the reason otherwise.
Reference: fp32 eager on CPU. Tolerances are looser than the CPU parity test's 1e-3 because
these paths compute in reduced precision (bf16/fp16, TF32 convolutions)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from export.onnx_export import export_onnx
from model.checkpoint import load_checkpoint
from model.inference_io import Request
from model.pipeline import Pipeline
from runtime.backends import create_runner
from runtime.torch_runner import TorchRunner
from service.model_cache import load_runner
from tests.helpers import ALL_TASKS, synthetic_images

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible to torch")


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def reference(micro_checkpoint):
    """CPU fp32 logits of every task for a fixed batch."""
    mad, _ = load_checkpoint(micro_checkpoint)
    runner = TorchRunner(mad.network)
    generator = torch.Generator().manual_seed(0)
    height, width = mad.config.image_size
    images = torch.rand(2, 3, height, width, generator=generator)
    pad = torch.zeros(2, height, width, dtype=torch.bool)
    pad[1, :, width // 2 :] = True
    memory = runner.encode(images, pad)
    cases = {}
    for task, codec in mad.codecs.items():
        tokens = torch.randint(0, mad.vocab.size, (3, codec.seq_len), generator=generator)
        index = torch.tensor([1, 0, 1])
        cases[task] = (
            tokens,
            index,
            codec.vocab_slice(),
            runner.decode(memory, tokens, index, codec.vocab_slice()),
        )
    return images, pad, cases


def check_runner(runner, reference, atol: float) -> None:
    images, pad, cases = reference
    memory = runner.encode(images.to(runner.device), pad.to(runner.device))
    for task, (tokens, index, vocab_slice, expected) in cases.items():
        got = runner.decode(memory, tokens.to(runner.device), index.to(runner.device), vocab_slice)
        assert got.dtype == torch.float32
        assert (got.cpu() - expected).abs().max() < atol, task


def check_pipeline(mad, runner) -> None:
    results = Pipeline(mad, runner)([Request(image, ALL_TASKS) for image in synthetic_images(2)])
    assert all(r.caption is not None and r.detections is not None for r in results)


@needs_cuda
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-2), ("bf16", 0.3), ("fp16", 0.1)])
def test_torch_cuda_autocast(micro_checkpoint, reference, precision, atol):
    mad, runner = create_runner("torch", micro_checkpoint, "cuda", precision=precision)
    info = runner.describe()
    assert info["device"].startswith("cuda") and info["precision"] == precision
    check_runner(runner, reference, atol)
    check_pipeline(mad, runner)


@needs_cuda
def test_torch_compile_cuda(micro_checkpoint, reference):
    mad, runner = create_runner("torch", micro_checkpoint, "cuda", compile=True)
    check_runner(runner, reference, 1e-2)
    check_pipeline(mad, runner)


@needs_cuda
@pytest.mark.skipif(
    not _ort_has_cuda(),
    reason="this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)",
)
def test_onnx_runtime_cuda(micro_checkpoint, reference, tmp_path):
    export_onnx(micro_checkpoint, tmp_path / "onnx")
    mad, runner = create_runner(
        "onnx",
        micro_checkpoint,
        "cuda",
        export_dir=tmp_path / "onnx",
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    info = runner.describe()
    assert info["providers"][0] == "CUDAExecutionProvider" and info["device"] == "cpu"
    check_runner(runner, reference, 1e-2)
    check_pipeline(mad, runner)


@needs_cuda
@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed"
)
def test_tensorrt_engines(micro_checkpoint, reference, tmp_path):
    from export.tensorrt import Profile

    export_onnx(micro_checkpoint, tmp_path / "onnx")
    profile = Profile(max_batch=2, max_sequences=16)
    mad, runner = load_runner(
        "tensorrt", micro_checkpoint, "cuda", export_dir=tmp_path / "onnx", profile=profile
    )
    info = runner.describe()
    assert info["precision"] == "fp16" and info["device"].startswith("cuda")
    check_runner(runner, reference, 0.1)
    check_pipeline(mad, runner)
    engine = tmp_path / "onnx" / runner.entry["engines"]["encoder"]
    stamp = engine.stat().st_mtime_ns
    _, again = load_runner(
        "tensorrt", micro_checkpoint, "cuda", export_dir=tmp_path / "onnx", profile=profile
    )
    assert engine.stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt
    assert again.entry == runner.entry
    _, smaller = load_runner(
        "tensorrt",
        micro_checkpoint,
        "cuda",
        export_dir=tmp_path / "onnx",
        profile=Profile(max_batch=1, max_sequences=8),
    )
    assert smaller.entry == runner.entry  # covered: served as built
    _, larger = load_runner(
        "tensorrt",
        micro_checkpoint,
        "cuda",
        export_dir=tmp_path / "onnx",
        profile=Profile(max_batch=4),
    )
    assert larger.entry["profile"]["max_batch"] == 4 and not engine.exists()
    check_runner(larger, reference, 0.1)


@needs_cuda
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-2), ("bf16", 0.3)])
def test_torch_cuda_graphs(micro_checkpoint, reference, precision, atol):
    mad, runner = create_runner(
        "torch", micro_checkpoint, "cuda", precision=precision, cuda_graphs=True
    )
    check_runner(runner, reference, atol)
    check_pipeline(mad, runner)
    graphs = runner.describe()["cuda_graphs"]
    assert graphs["graphs"] > 0 and graphs["replays"] > 0 and graphs["fallbacks"] == 0
    # Beyond the largest bucket: the eager pass answers, and says so.
    images, pad, cases = reference
    memory = runner.encode(images.to("cuda"), pad.to("cuda"))
    tokens, _, vocab_slice, _ = cases["caption"]
    many = tokens[:1].repeat(200, 1).cuda()
    logits = runner.decode(
        memory, many, torch.zeros(200, dtype=torch.long, device="cuda"), vocab_slice
    )
    assert logits.shape[0] == 200 and runner.describe()["cuda_graphs"]["fallbacks"] == 1
