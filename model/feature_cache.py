"""Encode once per image, across requests: an LRU of encoded image features, bounded in bytes.

A client that asks for detection now and for a caption of the same image a moment later pays
the encoder once. Entries are keyed by the model version and a digest of the image's bytes
(the same bytes decode, letterbox and encode to the same features), so one model never gets
another's features. Features stay where the runner keeps them (GPU memory on CUDA), which is
what the byte bound counts. Used by the one model thread only; the counters are plain ints.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Protocol, runtime_checkable

from model.decoding import Memory


@runtime_checkable
class SplitsMemory(Protocol[Memory]):
    """What a runner needs for its features to be cached: one batch's encoded images taken
    apart and put back together."""

    def split_memory(self, memory: Memory) -> list[Memory]:
        """A batch's memory -> one memory per image, each owning its storage (no views that
        would keep the whole batch alive)."""
        ...

    def join_memory(self, parts: list[Memory]) -> Memory:
        """Per-image memories (same canvas) -> one batch, in this order."""
        ...

    def memory_bytes(self, memory: Memory) -> int:
        """The bytes a memory holds."""
        ...


class FeatureCache(Generic[Memory]):
    def __init__(self, capacity_bytes: int, model_version: str) -> None:
        self.capacity_bytes, self.model_version = capacity_bytes, model_version
        self.entries: OrderedDict[tuple[str, str], tuple[Memory, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def key(self, digest: str) -> tuple[str, str]:
        return (self.model_version, digest)

    def get(self, digest: str) -> Memory | None:
        """The features of the image whose bytes have this digest, or None (counted)."""
        entry = self.entries.get(self.key(digest))
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(self.key(digest))
        self.hits += 1
        return entry[0]

    def put(self, digest: str, memory: Memory, size: int) -> None:
        """Keep `memory` (`size` bytes), evicting the least recently used entries to fit; an
        entry larger than the whole cache is not kept."""
        key = self.key(digest)
        if key in self.entries or size > self.capacity_bytes:
            return
        while self.bytes + size > self.capacity_bytes:
            _, (_, evicted) = self.entries.popitem(last=False)
            self.bytes -= evicted
            self.evictions += 1
        self.entries[key] = (memory, size)
        self.bytes += size

    def __len__(self) -> int:
        return len(self.entries)
