"""The two exportable graphs: image encoder and (per task) sequence decoder.

Both wrap `MADNetwork` methods instead of re-implementing them, so an exported graph computes
exactly what eager decoding computes. The per-layer cross-attention keys/values of
`ImageMemory` travel between the graphs stacked into two tensors, [layers, B, heads, N, d].
"""

from __future__ import annotations

import torch
from torch import nn

from model.network import ImageMemory, MADNetwork

ENCODER_INPUTS = ("images", "pad_mask")
ENCODER_OUTPUTS = ("keys", "values", "mask")
DECODER_INPUTS = ("keys", "values", "mask", "tokens", "image_index")
DECODER_OUTPUTS = ("logits",)

# Symbolic dimension names, shared by the ONNX dynamic axes, the manifest and TensorRT profiles.
ENCODER_AXES = {
    "images": {0: "batch", 2: "height", 3: "width"},
    "pad_mask": {0: "batch", 1: "height", 2: "width"},
    "keys": {1: "batch", 3: "features"},
    "values": {1: "batch", 3: "features"},
    "mask": {0: "batch", 3: "features"},
}
DECODER_AXES = {
    "keys": {1: "batch", 3: "features"},
    "values": {1: "batch", 3: "features"},
    "mask": {0: "batch", 3: "features"},
    "tokens": {0: "sequences", 1: "length"},
    "image_index": {0: "sequences"},
    "logits": {0: "sequences", 1: "length"},
}
# The single-image decoder graph: batch fixed at 1, everything else as above.
SINGLE_IMAGE_AXES = {
    name: {i: dim for i, dim in axes.items() if dim != "batch"}
    for name, axes in DECODER_AXES.items()
}


class EncoderGraph(nn.Module):
    """images [B, 3, H, W] float, pad_mask [B, H, W] bool -> keys, values
    [layers, B, heads, N, head_dim] and mask [B, 1, 1, N] bool (True = real image)."""

    def __init__(self, network: MADNetwork):
        super().__init__()
        self.network = network
        self.eval()  # a new Module trains by default, and the exporter restores that mode

    def forward(
        self, images: torch.Tensor, pad_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        memory = self.network.encode(images, pad_mask)
        keys = torch.stack([k for k, _ in memory.kv])
        values = torch.stack([v for _, v in memory.kv])
        return keys, values, memory.mask


class DecoderGraph(nn.Module):
    """keys, values, mask (as EncoderGraph returns them), tokens [S, T] int64, image_index [S]
    int64 -> logits [S, T, V] over one task's vocabulary slice, fixed at construction.

    The general graph gives each sequence its own copy of its image's keys/values: folding
    sequences per image sizes a tensor by the data, which a traced graph would freeze. With
    `single_image` (batch fixed at 1) all sequences fold into one query row, a plain reshape,
    as eager decoding does: the common case of a service answering one image at a time."""

    def __init__(
        self, network: MADNetwork, vocab_slice: tuple[int, int], single_image: bool = False
    ):
        super().__init__()
        start, stop = vocab_slice  # a list, when read from a manifest
        self.network, self.vocab_slice = network, (start, stop)
        self.single_image = single_image
        self.eval()

    def forward(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        tokens: torch.Tensor,
        image_index: torch.Tensor,
    ) -> torch.Tensor:
        memory = ImageMemory(list(zip(keys.unbind(0), values.unbind(0), strict=True)), mask)
        return self.network.decode(
            memory, tokens, image_index, self.vocab_slice, fold=self.single_image
        )


def example_inputs(
    network: MADNetwork, batch: int = 2, sequences: int = 3, length: int = 7
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """Tracing inputs. For the general graphs batch and sequence count must be >= 2:
    `ImageMemory.select` branches on size 1 in Python, and the traced branch (gather the
    memory of each sequence) is the general one, exact for every size. The single-image
    decoder graph is traced at batch 1."""
    height, width = network.config.image_size
    images = torch.rand(batch, 3, height, width)
    pad_mask = torch.zeros(batch, height, width, dtype=torch.bool)
    pad_mask[0, :, width // 2 :] = True  # a letterboxed image, so the mask path is live
    with torch.no_grad():
        keys, values, mask = EncoderGraph(network)(images, pad_mask)
    tokens = torch.randint(0, network.vocab.size, (sequences, length))
    image_index = torch.arange(sequences) % batch
    return (images, pad_mask), (keys, values, mask, tokens, image_index)
