"""Decoder passes replayed from CUDA graphs.

A decoder pass over a few short sequences is a few hundred small kernels: on a GPU its time is
mostly launch overhead, and a refinement schedule pays it once per pass. A CUDA graph records
the pass once and replays it with a single launch.

Graphs have fixed shapes and fixed addresses, so the decoder runs on padded copies:
- sequences are laid out per image, `per_image` rows each (the image's count rounded up to a
  bucket: 1, 2, 4, ... 128), which is the folded cross-attention layout (model.folding) with
  no counting left to do on the device;
- the encoded images are copied into a static buffer per (batch, shapes, dtype) whenever a
  new encode result comes in (a device-to-device copy of the keys/values).
One graph is captured per (images, per-image bucket, sequence length, vocabulary slice), on
first use. Padding rows hold valid tokens and are dropped from the output; they never mix
with real rows (self-attention is per sequence, cross-attention per query). Shapes outside
the buckets, or past the graph budget, return None and the caller runs the eager pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from model.folding import ImageGroups
from model.network import ImageMemory

SEQUENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_GRAPHS = 96


def bucket(count: int, buckets: tuple[int, ...] = SEQUENCE_BUCKETS) -> int | None:
    """The smallest bucket holding `count` sequences, None above the largest."""
    return next((b for b in buckets if b >= count), None)


@dataclass(frozen=True)
class PaddedLayout:
    """Where the S real sequences sit among batch * per_image padded rows.

    rows: [S] padded row of each sequence (image * per_image + its rank within the image).
    """

    rows: torch.Tensor
    batch: int
    per_image: int

    @classmethod
    def of(
        cls, image_index: torch.Tensor, batch: int, buckets: tuple[int, ...] = SEQUENCE_BUCKETS
    ) -> PaddedLayout | None:
        """image_index [S] (host tensor) -> the layout, None when an image has more
        sequences than the largest bucket."""
        groups = ImageGroups.of(image_index, batch)
        per_image = bucket(groups.per_image, buckets)
        if per_image is None:
            return None
        return cls(groups.image_index * per_image + groups.rank, batch, per_image)

    def groups(self, device: torch.device) -> ImageGroups:
        """The folded layout of the padded rows: image b owns rows b * per_image ..."""
        index = torch.arange(self.batch, device=device).repeat_interleave(self.per_image)
        rank = torch.arange(self.per_image, device=device).repeat(self.batch)
        return ImageGroups(index, rank, self.batch, self.per_image)


def memory_signature(memory: ImageMemory) -> tuple:
    """What a static copy of `memory` must match: shapes and dtypes of keys/values and mask."""
    k = memory.kv[0][0]
    mask = None if memory.mask is None else tuple(memory.mask.shape)
    return (len(memory.kv), tuple(k.shape), k.dtype, mask)


@dataclass
class CapturedPass:
    """A graph and every tensor it reads or writes: the graph holds their addresses, so they
    must live as long as it does (a freed index tensor would be reused and read as garbage)."""

    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [batch * per_image, T] static input
    groups: ImageGroups  # static folded layout
    logits: torch.Tensor  # [batch * per_image, T, V_slice] static output


class GraphedDecoder:
    """network.decode through CUDA graphs; __call__ returns None where it cannot serve."""

    def __init__(
        self,
        decode: Callable[..., torch.Tensor],
        autocast: Callable[[], AbstractContextManager[object]],
        buckets: tuple[int, ...] = SEQUENCE_BUCKETS,
        max_graphs: int = MAX_GRAPHS,
    ):
        """decode: MADNetwork.decode, or a compiled version of it."""
        self.decode, self.autocast = decode, autocast
        self.buckets, self.max_graphs = buckets, max_graphs
        self.passes: dict[tuple, CapturedPass] = {}
        # signature -> (weak reference to the encode result copied, the static copy)
        self.static: dict[tuple, tuple[weakref.ref[ImageMemory], ImageMemory]] = {}
        # graph_pool_handle()'s type, which torch names only privately.
        self.pool: torch.cuda._POOL_HANDLE | None = None
        self.layout_of: tuple[torch.Tensor, PaddedLayout | None, torch.Tensor | None] | None = None
        self.replays = self.fallbacks = 0

    def describe(self) -> dict[str, int]:
        return {"graphs": len(self.passes), "replays": self.replays, "fallbacks": self.fallbacks}

    def layout(
        self, image_index: torch.Tensor, batch: int
    ) -> tuple[PaddedLayout | None, torch.Tensor | None]:
        """The layout of this image_index, computed on the host once per decoding call (the
        refinement steps of one call pass the same tensor)."""
        cached = self.layout_of
        if (
            cached is None
            or cached[0] is not image_index
            or (cached[1] is not None and cached[1].batch != batch)
        ):
            layout = PaddedLayout.of(image_index.cpu(), batch, self.buckets)
            rows = None if layout is None else layout.rows.to(image_index.device)
            cached = self.layout_of = (image_index, layout, rows)
        return cached[1], cached[2]

    def static_memory(self, memory: ImageMemory) -> ImageMemory:
        """The static copy graphs read, refreshed when a new encode result comes in (the
        source is remembered by a weak reference: it is not kept alive for this)."""
        sig = memory_signature(memory)
        entry = self.static.get(sig)
        if entry is None:
            copy = ImageMemory(
                [(k.clone(), v.clone()) for k, v in memory.kv],
                None if memory.mask is None else memory.mask.clone(),
            )
            self.static[sig] = (weakref.ref(memory), copy)
            return copy
        source, copy = entry
        if source() is not memory:
            for (k, v), (sk, sv) in zip(memory.kv, copy.kv, strict=True):
                sk.copy_(k)
                sv.copy_(v)
            if memory.mask is not None and copy.mask is not None:
                copy.mask.copy_(memory.mask)
            self.static[sig] = (weakref.ref(memory), copy)
        return copy

    def capture(
        self, memory: ImageMemory, layout: PaddedLayout, length: int, vocab_slice: tuple[int, int]
    ) -> CapturedPass:
        device = memory.kv[0][0].device
        groups = layout.groups(device)
        tokens = torch.zeros(
            layout.batch * layout.per_image, length, dtype=torch.long, device=device
        )

        def forward() -> torch.Tensor:
            with self.autocast():
                return self.decode(
                    memory, tokens, groups.image_index, vocab_slice, groups=groups
                ).float()

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: lazy initialisation and workspaces
            for _ in range(2):
                forward()
        torch.cuda.current_stream(device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = forward()
        return CapturedPass(graph, tokens, groups, logits)

    def __call__(
        self,
        memory: ImageMemory,
        tokens: torch.Tensor,
        image_index: torch.Tensor,
        vocab_slice: tuple[int, int],
    ) -> torch.Tensor | None:
        """tokens [S, T], image_index [S] on the device -> logits [S, T, V_slice], or None."""
        layout, rows = self.layout(image_index, memory.kv[0][0].shape[0])
        if layout is None or rows is None:
            self.fallbacks += 1
            return None
        sig = memory_signature(memory)
        key = (sig, layout.batch, layout.per_image, tokens.shape[1], tuple(vocab_slice))
        captured = self.passes.get(key)
        if captured is None and len(self.passes) >= self.max_graphs:
            self.fallbacks += 1  # checked first: a fallback copies no image memory
            return None
        static = self.static_memory(memory)
        if captured is None:
            captured = self.passes[key] = self.capture(static, layout, tokens.shape[1], vocab_slice)
        captured.tokens.index_copy_(0, rows, tokens)
        captured.graph.replay()
        self.replays += 1
        return captured.logits.index_select(0, rows)
