"""Eager PyTorch runner: the reference backend (CPU or CUDA, optional autocast/compile)."""

from __future__ import annotations

import contextlib

import torch

from model.cuda_graphs import GraphedDecoder
from model.network import ImageMemory, MADNetwork


class TorchRunner:
    name = "torch"

    def __init__(self, network: MADNetwork, device: str = "cpu", precision: str = "fp32",
                 compile: bool = False, cuda_graphs: bool = False):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {precision!r}")
        if precision != "fp32" and not device.startswith("cuda"):
            raise ValueError(f"{precision} autocast is only supported on CUDA here")
        if cuda_graphs and not device.startswith("cuda"):
            raise ValueError("CUDA graphs need a CUDA device")
        self.device = torch.device(device)
        self.precision = precision
        self.network = network.to(self.device).eval()
        self._encode, self._decode = self.network.encode, self.network.decode
        if compile:
            self._encode = torch.compile(self.network.encode, dynamic=True)
            self._decode = torch.compile(self.network.decode, dynamic=True)
        self.graphs = GraphedDecoder(self._decode, self.autocast) if cuda_graphs else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        # No weight-cast cache: each pass uses a weight once, and CUDA graph capture needs it off.
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=False)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, pad_mask: torch.Tensor) -> ImageMemory:
        """images [B, 3, H, W] float, pad_mask [B, H, W]; host tensors from pinned memory
        (model.preprocess.stack) are copied without blocking the host."""
        images = images.to(self.device, non_blocking=True)
        pad_mask = pad_mask.to(self.device, non_blocking=True)
        with self.autocast():
            return self._encode(images, pad_mask)

    @torch.inference_mode()
    def decode(self, memory: ImageMemory, tokens: torch.Tensor, image_index: torch.Tensor,
               vocab_slice: tuple[int, int]) -> torch.Tensor:
        tokens, image_index = tokens.to(self.device), image_index.to(self.device)
        if self.graphs is not None:
            logits = self.graphs(memory, tokens, image_index, vocab_slice)
            if logits is not None:
                return logits
        with self.autocast():
            logits = self._decode(memory, tokens, image_index, vocab_slice)
        return logits.float()

    def describe(self) -> dict:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        info = {"backend": self.name, "device": str(self.device), "device_name": name,
                "precision": self.precision}
        if self.graphs is not None:
            info["cuda_graphs"] = self.graphs.describe()
        return info
