"""TensorRT backend: runs the FP16 engines that export/tensorrt.py built from the ONNX graphs.

Engines are specific to a GPU model, a TensorRT version and the checkpoint: the manifest
records them under `cache_key` (`<gpu>-sm<cc>-trt<version>-<checkpoint sha256[:12]>`), and
this runner loads the entry for the GPU it runs on; it builds nothing. `tensorrt` is imported
lazily: nothing here is needed unless this backend is chosen. Weak typing (BuilderFlag.FP16)
is what TensorRT 10 offers; TensorRT 11 removed it, and is refused with a clear message (see
docs/export.md).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import torch

from model.startup import StartupError, install_hint, resolve_device
from runtime.manifest import encoder_batch_axes, read_manifest

# The encoder's outputs as the decoders take them: "keys", "values", "mask" on the GPU.
TensorRTMemory = dict[str, torch.Tensor]


def import_tensorrt() -> Any:
    """tensorrt, or a start-up error that says what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise StartupError(
            "the tensorrt backend needs NVIDIA TensorRT 10 and a CUDA GPU, and TensorRT is not "
            f"installed here: {install_hint('tensorrt')} (onnx and torch need neither)"
        ) from e
    if not torch.cuda.is_available():
        raise StartupError(
            "TensorRT is installed but torch sees no CUDA GPU to build or run "
            "engines on; use --backend onnx or torch, which run on CPU"
        )
    if not hasattr(trt.BuilderFlag, "FP16"):
        raise StartupError(
            f"TensorRT {trt.__version__} has no weakly typed FP16 builds "
            "(removed in TensorRT 11); install tensorrt>=10,<11"
        )
    return trt


def engine_key(
    gpu_name: str, capability: tuple[int, int], tensorrt_version: str, checkpoint_sha256: str
) -> str:
    """The manifest key of a set of engines: GPU model, compute capability, TensorRT version
    and the checkpoint the graphs came from (an export dir re-exported from another checkpoint
    never reuses old engines)."""
    name = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    major, minor = capability
    return f"{name}-sm{major}{minor}-trt{tensorrt_version}-{checkpoint_sha256[:12]}"


def cache_key(trt: Any, device_index: int, checkpoint_sha256: str) -> str:
    """engine_key for this process's GPU `device_index` and TensorRT."""
    return engine_key(
        torch.cuda.get_device_name(device_index),
        torch.cuda.get_device_capability(device_index),
        trt.__version__,
        checkpoint_sha256,
    )


def cuda_device(device: str) -> torch.device:
    """The CUDA device the engines run on; anything else is refused."""
    device = resolve_device(device)
    if not device.startswith("cuda"):
        raise StartupError(
            f"the tensorrt backend runs on CUDA GPUs only, not {device!r}; pass --device cuda"
        )
    return torch.device(device)


class Engine:
    """One deserialized engine + execution context; runs on torch CUDA tensors."""

    def __init__(self, trt: Any, runtime: Any, path: Path, device: torch.device):
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot load TensorRT engine {path} (built by another version?)")
        self.context = self.engine.create_execution_context()
        self.device, self.lock = device, threading.Lock()  # one context: one call at a time
        dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.bool: torch.bool,
            trt.int8: torch.int8,
        }
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.lock:
            kept = {}
            for name in self.inputs:
                tensor = feeds[name].to(self.device, self.dtypes[name]).contiguous()
                kept[name] = tensor
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise ValueError(
                        f"input {name} {tuple(tensor.shape)} is outside the "
                        "engine's optimisation profile; rebuild with larger limits"
                    )
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            return outputs


class TensorRTRunner:
    name = "tensorrt"

    def __init__(
        self, export_dir: str | Path, device: str = "cuda", engines: dict[str, Any] | None = None
    ):
        """engines: the manifest entry to run (the one just built or chosen: the manifest may
        meanwhile name another start's); None: the manifest's for this GPU."""
        trt = import_tensorrt()
        self.device = cuda_device(device)
        index = self.device.index or 0
        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        key = cache_key(trt, index, manifest["checkpoint"]["sha256"])
        entry = engines or manifest.get("tensorrt", {}).get(key)
        if entry is None or not all(
            (self.export_dir / f).is_file() for f in entry["engines"].values()
        ):
            raise FileNotFoundError(
                f"{self.export_dir} has no TensorRT engines for this GPU ({key}); build them "
                "here with `mad export --format tensorrt`, or let `mad serve` build them"
            )
        self.entry: dict[str, Any] = entry
        self.batch_axes = encoder_batch_axes(manifest)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engines = {k: self.export_dir / v for k, v in entry["engines"].items()}
        self.encoder = Engine(trt, runtime, engines["encoder"], self.device)
        self.decoders = {
            tuple(g["vocab_slice"]): Engine(trt, runtime, engines[task], self.device)
            for task, g in manifest["graphs"]["decoders"].items()
        }

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, pad_mask: torch.Tensor) -> TensorRTMemory:
        return self.encoder({"images": images, "pad_mask": pad_mask})

    @torch.inference_mode()
    def decode(
        self,
        memory: TensorRTMemory,
        tokens: torch.Tensor,
        image_index: torch.Tensor,
        vocab_slice: tuple[int, int],
    ) -> torch.Tensor:
        engine = self.decoders.get(tuple(vocab_slice))
        if engine is None:
            raise KeyError(f"no decoder engine for vocabulary slice {vocab_slice}")
        return engine({**memory, "tokens": tokens, "image_index": image_index})["logits"].float()

    # What a feature cache needs (model.feature_cache.SplitsMemory).
    def split_memory(self, memory: TensorRTMemory) -> list[TensorRTMemory]:
        images = memory["mask"].shape[self.batch_axes["mask"]]
        return [
            {k: v.narrow(self.batch_axes[k], i, 1).clone() for k, v in memory.items()}
            for i in range(images)
        ]

    def join_memory(self, parts: list[TensorRTMemory]) -> TensorRTMemory:
        return {k: torch.cat([p[k] for p in parts], self.batch_axes[k]) for k in parts[0]}

    def memory_bytes(self, memory: TensorRTMemory) -> int:
        return sum(v.numel() * v.element_size() for v in memory.values())

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "device_name": self.entry["gpu"],
            "precision": self.entry["precision"],
            "tensorrt": self.entry["tensorrt"],
            "profile": self.entry["profile"],
            "export_dir": str(self.export_dir),
        }
