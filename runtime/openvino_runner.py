"""OpenVINO backend (CPU): the exported ONNX graphs compiled by OpenVINO, fp32 or bf16.

OpenVINO reads the fp32 export's graphs directly (no conversion step, dynamic shapes kept)
and compiles them for this CPU. With precision bf16 it runs them at bfloat16 inference
precision (`INFERENCE_PRECISION_HINT`), which pays on CPUs with AVX512-BF16 or AMX: the
weights stay fp32 on disk, OpenVINO converts them at compile time. As with ONNX Runtime, the
refinement loop stays in Python; this runner only runs the graphs. One infer request per
graph, used from the one model thread; outputs are copied out of the request's buffers
(the next call reuses them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.startup import StartupError, install_hint
from runtime.manifest import encoder_batch_axes, read_manifest
from runtime.onnx_runner import cpu_name, default_threads

if TYPE_CHECKING:
    from openvino import InferRequest

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # ours -> OpenVINO's inference precision


@dataclass
class OpenVinoMemory:
    """Encoder outputs, host arrays: keys/values [layers, B, heads, N, head_dim], mask."""

    keys: np.ndarray
    values: np.ndarray
    mask: np.ndarray


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise StartupError(
            f"the openvino backend needs OpenVINO: {install_hint('openvino')}"
        ) from e
    return openvino


def check_openvino(device: str, precision: str) -> None:
    """Start-up checks: OpenVINO installed, a CPU device, a precision this CPU runs fast."""
    if device not in ("cpu", "auto"):
        raise StartupError(
            f"the openvino backend runs on the CPU, and the device is {device!r}; use "
            "--device cpu (on a GPU: --backend tensorrt, onnx or torch)"
        )
    if precision not in PRECISIONS:
        raise StartupError(
            f"the openvino backend runs fp32 or bf16, not {precision!r}; choose fp32 or bf16"
        )
    ov = import_openvino()
    if precision == "bf16":
        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in capabilities:
            raise StartupError(
                f"this CPU has no bf16 support OpenVINO uses ({', '.join(capabilities)}); "
                "use --precision fp32"
            )


class OpenVinoRunner:
    name = "openvino"

    def __init__(self, export_dir: str | Path, precision: str = "fp32", threads: int | None = None):
        check_openvino("cpu", precision)
        ov = import_openvino()
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        if self.manifest["precision"] != "fp32":
            raise StartupError(
                f"{export_dir} is a {self.manifest['precision']} export; OpenVINO runs fp32 "
                "exports (at fp32 or bf16): pass one made without --quantize"
            )
        self.precision = precision
        self.threads = threads or default_threads()
        config = {
            "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all cores on it
        }
        core = ov.Core()

        def request(file: str) -> InferRequest:
            compiled = core.compile_model(str(self.export_dir / file), "CPU", config)
            return compiled.create_infer_request()

        graphs = self.manifest["graphs"]
        self.encoder = request(graphs["encoder"]["file"])
        self.decoders = {
            tuple(g["vocab_slice"]): request(g["file"]) for g in graphs["decoders"].values()
        }
        self.single_image_decoders = {
            tuple(g["vocab_slice"]): request(g["single_image"]["file"])
            for g in graphs["decoders"].values()
            if "single_image" in g
        }
        # The single-image graphs have no image_index input (the tracer dropped it).
        self._inputs = {
            id(r): {p.get_any_name() for p in r.model_inputs}
            for r in [*self.decoders.values(), *self.single_image_decoders.values()]
        }
        self.device = torch.device("cpu")
        self.host_threads = 1  # the cores belong to OpenVINO's pool (model.pipeline.torch_threads)

    def encode(self, images: torch.Tensor, pad_mask: torch.Tensor) -> OpenVinoMemory:
        outputs = self.encoder.infer(
            {"images": _numpy(images, torch.float32), "pad_mask": _numpy(pad_mask, torch.bool)}
        )
        keys, values, mask = (np.array(outputs[i]) for i in range(3))  # copies
        return OpenVinoMemory(keys, values, mask)

    def decode(
        self,
        memory: OpenVinoMemory,
        tokens: torch.Tensor,
        image_index: torch.Tensor,
        vocab_slice: tuple[int, int],
    ) -> torch.Tensor:
        request = self.decoders.get(tuple(vocab_slice))
        if memory.keys.shape[1] == 1:  # [layers, batch, heads, features, head_dim]
            request = self.single_image_decoders.get(tuple(vocab_slice), request)
        if request is None:
            raise KeyError(
                f"no decoder graph for vocabulary slice {vocab_slice}; "
                f"exported: {sorted(self.decoders)}"
            )
        feed = {"keys": memory.keys, "values": memory.values, "mask": memory.mask}
        feed["tokens"] = _numpy(tokens, torch.int64)
        if "image_index" in self._inputs[id(request)]:
            feed["image_index"] = _numpy(image_index, torch.int64)
        outputs = request.infer(feed)
        return torch.from_numpy(np.array(outputs[0]))  # a copy: the buffer is reused

    # What a feature cache needs (model.feature_cache.SplitsMemory).
    def split_memory(self, memory: OpenVinoMemory) -> list[OpenVinoMemory]:
        axes = encoder_batch_axes(self.manifest)
        images = memory.mask.shape[axes["mask"]]
        return [
            OpenVinoMemory(
                *(
                    getattr(memory, name).take([i], axis=axes[name])
                    for name in ("keys", "values", "mask")
                )
            )
            for i in range(images)
        ]

    def join_memory(self, parts: list[OpenVinoMemory]) -> OpenVinoMemory:
        axes = encoder_batch_axes(self.manifest)
        return OpenVinoMemory(
            *(
                np.concatenate([getattr(p, name) for p in parts], axis=axes[name])
                for name in ("keys", "values", "mask")
            )
        )

    def memory_bytes(self, memory: OpenVinoMemory) -> int:
        return sum(getattr(memory, name).nbytes for name in ("keys", "values", "mask"))

    def describe(self) -> dict[str, Any]:
        from importlib import metadata

        return {
            "backend": self.name,
            "device": "cpu",
            "device_name": cpu_name(),
            "precision": self.precision,
            "threads": self.threads,
            "openvino": metadata.version("openvino"),
            "export_dir": str(self.export_dir),
            "opset": self.manifest["opset"],
            "checkpoint_sha256": self.manifest["checkpoint"]["sha256"],
        }


def _numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to("cpu", dtype).contiguous().numpy()
