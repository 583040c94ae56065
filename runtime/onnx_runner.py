"""ONNX Runtime backend: the exported encoder + one decoder session per task.

The refinement loop stays in Python (`model.decoding.masked_decode`); this runner only runs
the graphs. Every run goes through IO binding: on CPU that is plain host memory, on CUDA the
image memory stays on the GPU between the decoder calls of a request, and only tokens go up
and logits come down. Logits are returned as CPU tensors, so `device` is always "cpu".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.startup import StartupError, install_hint
from runtime.manifest import encoder_batch_axes, read_manifest

if TYPE_CHECKING:
    import numpy as np
    from onnxruntime import InferenceSession, IOBinding, OrtValue

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = PROVIDER_ORDER[:2]


@dataclass
class OnnxMemory:
    """Encoder outputs (OrtValues, on the device the encoder ran on)."""

    keys: OrtValue
    values: OrtValue
    mask: OrtValue


def choose_providers(device: str, available: list[str]) -> list[str]:
    """ "cpu" -> CPU only; "cuda[:N]" -> TensorRT, CUDA (must exist), CPU; "auto" -> the best
    available. Raises at start-up when the device asked for cannot be served."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "auto" and not device.startswith("cuda"):
        raise StartupError(
            f"unknown device {device!r} for the onnx backend; choose cpu, cuda[:N] or auto"
        )
    if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise StartupError(
            f"device {device!r} asked for, but this ONNX Runtime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); use --device cpu, or install "
            f"onnxruntime-gpu: {install_hint('gpu')}"
        )
    return [p for p in PROVIDER_ORDER if p in available]


def default_threads() -> int:
    """All cores this process may use: one request at a time owns the machine's ALUs; the
    service scales out with processes, not with concurrent sessions in one process."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # None: the count is unknown


class OnnxRunner:
    name = "onnx"

    def __init__(
        self,
        export_dir: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        providers: list[str] | None = None,
    ):
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        available = ort.get_available_providers()
        if providers:
            missing = [p for p in providers if p not in available]
            if missing:
                raise StartupError(
                    f"ONNX Runtime providers {missing} not available (available: {available}); "
                    "choose among those"
                )
        else:
            providers = choose_providers(device, available)
        self.device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1  # the graphs are one chain: no parallel branches
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        if providers[0] == "CPUExecutionProvider":
            # ORT's idle threads spin by default, and the pipeline runs torch ops (codecs,
            # re-masking) between ORT calls: on 2 cores the spinning made the ONNX pipeline
            # 2.5x slower (119.9 -> 47.8 ms median with spinning off, bundled model).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.threads = options.intra_op_num_threads
        provider_options = [self.provider_options(p) for p in providers]

        def session(file: str) -> ort.InferenceSession:
            return ort.InferenceSession(
                str(self.export_dir / file),
                options,
                providers=providers,
                provider_options=provider_options,
            )

        graphs = self.manifest["graphs"]
        self.encoder = session(graphs["encoder"]["file"])
        self.decoders = {
            tuple(g["vocab_slice"]): session(g["file"]) for g in graphs["decoders"].values()
        }
        # Exports made before single-image graphs existed have none: the general one serves.
        self.single_image_decoders = {
            tuple(g["vocab_slice"]): session(g["single_image"]["file"])
            for g in graphs["decoders"].values()
            if "single_image" in g
        }
        # With one image there is nothing to index: the tracer drops that input.
        decoders = [*self.decoders.values(), *self.single_image_decoders.values()]
        self._takes_index = {s: "image_index" in {i.name for i in s.get_inputs()} for s in decoders}
        self.providers = self.encoder.get_providers()  # what ORT really enabled
        on_gpu = self.providers[0] in GPU_PROVIDERS
        if device.startswith("cuda") and not on_gpu:
            raise StartupError(
                f"ONNX Runtime fell back to {self.providers} on {device!r}; check the CUDA "
                "install or use --device cpu"
            )
        self.io_device = "cuda" if on_gpu else "cpu"
        self.device = torch.device("cpu")  # where the pipeline keeps prompts and logits
        # The pipeline's torch work between the graphs runs on one thread (model.pipeline.
        # torch_threads): on CPU the cores belong to ONNX Runtime's pool.
        self.host_threads = None if on_gpu else 1

    def provider_options(self, provider: str) -> dict[str, Any]:
        if provider == "TensorrtExecutionProvider":
            # ORT builds TensorRT engines per shape range; caching them beside the graphs
            # saves minutes on every later start.
            return {
                "device_id": self.device_id,
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(self.export_dir / "ort-trt-cache"),
            }
        if provider == "CUDAExecutionProvider":
            return {"device_id": self.device_id}
        return {}

    def _bind_outputs(self, binding: IOBinding, session: InferenceSession) -> None:
        for output in session.get_outputs():
            binding.bind_output(output.name, self.io_device, self.device_id)

    def encode(self, images: torch.Tensor, pad_mask: torch.Tensor) -> OnnxMemory:
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("images", _numpy(images, torch.float32))
        binding.bind_cpu_input("pad_mask", _numpy(pad_mask, torch.bool))
        self._bind_outputs(binding, self.encoder)
        self.encoder.run_with_iobinding(binding)
        return OnnxMemory(*binding.get_outputs())

    def decode(
        self,
        memory: OnnxMemory,
        tokens: torch.Tensor,
        image_index: torch.Tensor,
        vocab_slice: tuple[int, int],
    ) -> torch.Tensor:
        session = self.decoders.get(tuple(vocab_slice))
        if memory.keys.shape()[1] == 1:  # [layers, batch, heads, features, head_dim]
            session = self.single_image_decoders.get(tuple(vocab_slice), session)
        if session is None:
            raise KeyError(
                f"no decoder graph for vocabulary slice {vocab_slice}; "
                f"exported: {sorted(self.decoders)}"
            )
        binding = session.io_binding()
        binding.bind_ortvalue_input("keys", memory.keys)
        binding.bind_ortvalue_input("values", memory.values)
        binding.bind_ortvalue_input("mask", memory.mask)
        binding.bind_cpu_input("tokens", _numpy(tokens, torch.int64))
        if self._takes_index[session]:
            binding.bind_cpu_input("image_index", _numpy(image_index, torch.int64))
        self._bind_outputs(binding, session)
        session.run_with_iobinding(binding)
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0])

    # What a feature cache needs (model.feature_cache.SplitsMemory). The parts are copied
    # through host memory (numpy), which on CUDA costs a transfer each way.
    def split_memory(self, memory: OnnxMemory) -> list[OnnxMemory]:
        arrays = {name: getattr(memory, name).numpy() for name in ("keys", "values", "mask")}
        axes = encoder_batch_axes(self.manifest)
        images = arrays["mask"].shape[axes["mask"]]
        return [
            OnnxMemory(
                *(
                    self._ortvalue(arrays[name].take([i], axis=axes[name]))
                    for name in ("keys", "values", "mask")
                )
            )
            for i in range(images)
        ]

    def join_memory(self, parts: list[OnnxMemory]) -> OnnxMemory:
        import numpy as np

        axes = encoder_batch_axes(self.manifest)
        joined = (
            self._ortvalue(
                np.concatenate([getattr(p, name).numpy() for p in parts], axis=axes[name])
            )
            for name in ("keys", "values", "mask")
        )
        return OnnxMemory(*joined)

    def memory_bytes(self, memory: OnnxMemory) -> int:
        return sum(getattr(memory, name).numpy().nbytes for name in ("keys", "values", "mask"))

    def _ortvalue(self, array: np.ndarray) -> OrtValue:
        from onnxruntime import OrtValue

        return OrtValue.ortvalue_from_numpy(array, self.io_device, self.device_id)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "device_name": gpu_name(self.device_id) if self.io_device == "cuda" else cpu_name(),
            "precision": self.manifest["precision"],
            "providers": self.providers,
            "threads": self.threads,
            "export_dir": str(self.export_dir),
            "opset": self.manifest["opset"],
            "checkpoint_sha256": self.manifest["checkpoint"]["sha256"],
        }


def _numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to("cpu", dtype).contiguous().numpy()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def gpu_name(index: int) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(index)
    return f"cuda:{index}"
