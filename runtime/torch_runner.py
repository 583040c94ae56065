"""PyTorch backend: the eager runner (model/runner.py) with the serving options, CPU or CUDA:
bf16 autocast (CPU and CUDA; fast on CPUs with AVX512-BF16 or AMX), fp16 autocast (CUDA),
torch.compile, and decoder passes replayed from CUDA graphs
(runtime/cuda_graphs.py)."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch

from model.network import ImageMemory, MADNetwork
from model.runner import EagerRunner, torch_device
from model.startup import StartupError
from runtime.cuda_graphs import GraphedDecoder


def check_torch_options(device: str, precision: str = "fp32", cuda_graphs: bool = False) -> str:
    """-> the device ("auto" resolved); a StartupError for options that do not go together."""
    device = str(torch_device(device))  # checked first: no CUDA says so, whatever else
    if precision == "int8":
        raise StartupError(
            "int8 is a precision of the onnx backend (a quantised export): use --backend onnx "
            "--precision int8"
        )
    if precision not in ("fp32", "bf16", "fp16"):
        raise StartupError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")
    if precision == "fp16" and not device.startswith("cuda"):
        raise StartupError(
            f"fp16 autocast runs on CUDA only, and the device is {device}; "
            "use --precision bf16 or fp32 on CPU"
        )
    if cuda_graphs and not device.startswith("cuda"):
        raise StartupError(
            f"CUDA graphs need a CUDA device, and the device is {device}; "
            "turn them off (MAD_CUDA_GRAPHS=false) on CPU"
        )
    return device


class TorchRunner(EagerRunner):
    def __init__(
        self,
        network: MADNetwork,
        device: str = "cpu",
        precision: str = "fp32",
        compile: bool = False,
        cuda_graphs: bool = False,
        threads: int | None = None,
    ):
        device = check_torch_options(device, precision, cuda_graphs)
        super().__init__(network, device)
        self.precision = precision
        # The pipeline runs everything under these intra-op threads (None: torch's setting).
        self.host_threads = threads
        if compile:
            self._encode = torch.compile(self.network.encode, dynamic=True)
            self._decode = torch.compile(self.network.decode, dynamic=True)
        self.graphs = GraphedDecoder(self._decode, self.autocast) if cuda_graphs else None

    def autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        # No weight-cast cache: each pass uses a weight once, and CUDA graph capture needs it off.
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=False)

    @torch.inference_mode()
    def decode(
        self,
        memory: ImageMemory,
        tokens: torch.Tensor,
        image_index: torch.Tensor,
        vocab_slice: tuple[int, int],
    ) -> torch.Tensor:
        """A replayed CUDA graph where one serves this shape, else the eager pass."""
        if self.graphs is not None:
            tokens, image_index = tokens.to(self.device), image_index.to(self.device)
            logits = self.graphs(memory, tokens, image_index, vocab_slice)
            if logits is not None:
                return logits
        return super().decode(memory, tokens, image_index, vocab_slice)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.graphs is not None:
            info["cuda_graphs"] = self.graphs.describe()
        return info
