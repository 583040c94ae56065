"""Eager PyTorch runner: the network on one device in fp32, what training and evaluation
decode with. Serving builds on it (runtime/torch_runner.py: autocast, torch.compile, CUDA
graphs); model/ itself never needs more."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch

from model.network import ImageMemory, MADNetwork
from model.startup import StartupError, resolve_device


def torch_device(device: str) -> torch.device:
    """ "cpu", "cuda[:N]" or "auto" (model/startup.py), refused when torch sees no CUDA
    device."""
    device = resolve_device(device)
    try:
        torch.device(device)
    except RuntimeError:
        raise StartupError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StartupError(
            f"device {device!r} requested but torch sees no CUDA device; use --device cpu (or auto)"
        )
    return torch.device(device)


class EagerRunner:
    name = "torch"

    def __init__(self, network: MADNetwork, device: str = "cpu"):
        self.device = torch_device(device)
        self.precision = "fp32"
        self.network = network.to(self.device).eval()
        # What encode/decode call: the network's methods, or compiled versions of them.
        self._encode, self._decode = self.network.encode, self.network.decode

    def autocast(self) -> AbstractContextManager[Any]:
        """The autocast context every pass runs in: none in fp32."""
        return contextlib.nullcontext()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, pad_mask: torch.Tensor) -> ImageMemory:
        """images [B, 3, H, W] float, pad_mask [B, H, W]; host tensors from pinned memory
        (model.preprocess.stack) are copied without blocking the host."""
        images = images.to(self.device, non_blocking=True)
        pad_mask = pad_mask.to(self.device, non_blocking=True)
        with self.autocast():
            return self._encode(images, pad_mask)

    @torch.inference_mode()
    def decode(
        self,
        memory: ImageMemory,
        tokens: torch.Tensor,
        image_index: torch.Tensor,
        vocab_slice: tuple[int, int],
    ) -> torch.Tensor:
        """tokens [S, T], image_index [S] -> logits [S, T, V_slice] float32."""
        tokens, image_index = tokens.to(self.device), image_index.to(self.device)
        with self.autocast():
            logits = self._decode(memory, tokens, image_index, vocab_slice)
        return logits.float()

    # What a feature cache needs (model.feature_cache.SplitsMemory).
    def split_memory(self, memory: ImageMemory) -> list[ImageMemory]:
        return memory.split()

    def join_memory(self, parts: list[ImageMemory]) -> ImageMemory:
        return ImageMemory.join(parts)

    def memory_bytes(self, memory: ImageMemory) -> int:
        return memory.nbytes()

    def describe(self) -> dict[str, Any]:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {
            "backend": self.name,
            "device": str(self.device),
            "device_name": name,
            "precision": self.precision,
        }
