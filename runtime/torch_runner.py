"""PyTorch backend: the eager runner (model/runner.py) with the serving options, CPU or CUDA:
bf16/fp16 autocast, torch.compile, and decoder passes replayed from CUDA graphs
(runtime/cuda_graphs.py)."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch

from model.network import ImageMemory, MADNetwork
from model.runner import EagerRunner, torch_device
from runtime.cuda_graphs import GraphedDecoder


class TorchRunner(EagerRunner):
    def __init__(
        self,
        network: MADNetwork,
        device: str = "cpu",
        precision: str = "fp32",
        compile: bool = False,
        cuda_graphs: bool = False,
    ):
        torch_device(device)  # checked first: no CUDA says so whatever else is asked
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {precision!r}")
        if precision != "fp32" and not device.startswith("cuda"):
            raise ValueError(f"{precision} autocast is only supported on CUDA here")
        if cuda_graphs and not device.startswith("cuda"):
            raise ValueError("CUDA graphs need a CUDA device")
        super().__init__(network, device)
        self.precision = precision
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
