"""The sequences of one task that a batch decodes together, and their refinement loop.

A group holds the sequences of the images that asked for one task with the same refinement
schedule: one sequence per image, or one per kept detection for a task prompted by
detections. Its loop (`model.decoding.refinement`) advances one decoder pass at a time, so
the pipeline can run every task's first pass before anyone's refinement, show results after
each round, and stop the sequences of a request nobody waits for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from model.codecs import DecodeContext, TaskCodec
from model.decoding import Decoding

Schedule = tuple[float, ...]  # mask ratios of the refinement steps


@dataclass
class TaskGroup:
    """owners[s]: the batch index of sequence s's image; which[s]: the detection that prompts
    it (tasks prompted by detections, else None); boxes[s]: that detection's pixel box. A
    partner's sequences are this group's, in the same order."""

    codec: TaskCodec
    schedule: Schedule
    owners: list[int]
    prompts: torch.Tensor  # [S, P], on the host
    steps: Iterator[Decoding]
    which: list[int] | None = None
    boxes: list[torch.Tensor] | None = None
    mirror: bool = False  # the sequences of the owners' mirror images (`reads_mirror_image`)
    # A prompted task's same sequences on the mirror images, fused into this group's outputs
    # (TaskCodec.fuse_mirror).
    partner: TaskGroup | None = None
    # Sequences on crops of their images (model.zoom): each one's window (None: the whole
    # image) and decode context, which `decode` reads instead of its image's.
    windows: list[tuple[int, int, int, int] | None] | None = None
    contexts: list[DecodeContext] | None = None
    state: Decoding | None = None
    _rows: dict[int, torch.Tensor] = field(default_factory=dict)
    _settled: dict[int, list[tuple[int, int | None, Any]]] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.codec.name

    @property
    def images(self) -> int:
        """How many images the group decodes for (what its pass time is measured against)."""
        return len(set(self.owners))

    def advance(self) -> bool:
        """Run the next decoder pass of the sequences still active. -> False when there was
        none to run."""
        if self.state is not None and not self.state.active.any():
            return False
        try:
            self.state = next(self.steps)
        except StopIteration:  # every sequence stopped before the schedule's end
            if self.state is not None:
                self.state.active[:] = False
            return False
        return True

    def rows(self, image: int) -> torch.Tensor:
        """Indices of image `image`'s sequences."""
        if image not in self._rows:
            self._rows[image] = torch.tensor(
                [s for s, owner in enumerate(self.owners) if owner == image], dtype=torch.long
            )
        return self._rows[image]

    def refining(self, image: int) -> bool:
        """Whether passes are still to come for any of `image`'s sequences."""
        if self.partner is not None and self.partner.refining(image):
            return True
        rows = self.rows(image)
        return self.state is None or bool(len(rows) and self.state.active[rows].any())

    def stop(self, image: int) -> None:
        """No more passes for `image`'s sequences."""
        if self.state is not None and len(self.rows(image)):
            self.state.stop(self.rows(image))

    def passes(self, image: int) -> int:
        """Decoder passes `image`'s sequences had (the most of any of them, or of their
        partner's)."""
        rows = self.rows(image)
        own = 0 if self.state is None or not len(rows) else int(self.state.passes[rows].max())
        return max(own, self.partner.passes(image)) if self.partner is not None else own

    def decoded(
        self, image: int, contexts: list[DecodeContext]
    ) -> list[tuple[int, int | None, Any]]:
        """decode([image]), kept once none of the image's sequences refines any more (a
        stopped sequence keeps its logits): a streamed request's snapshot after every round
        does not decode its finished tasks again (7 masks took 10 ms over 8 caption rounds).
        The snapshots and the final result then share these outputs: they are read-only."""
        if image in self._settled:
            return self._settled[image]
        decoded = self.decode([image], contexts)
        if not self.refining(image):
            self._settled[image] = decoded
        return decoded

    def decode(
        self, images: list[int], contexts: list[DecodeContext]
    ) -> list[tuple[int, int | None, Any]]:
        """The current outputs of `images`' sequences -> (image, detection or None, output)
        per sequence, from the logits as they stand (codec.decode)."""
        if self.state is None:
            return []
        rows = torch.cat([self.rows(i) for i in images]) if images else torch.zeros(0).long()
        if not len(rows):
            return []
        order = rows.tolist()
        logits = self.state.logits[rows.to(self.state.logits.device)].cpu()
        owners = [self.owners[s] for s in order]
        seen = (
            [contexts[i] for i in owners]
            if self.contexts is None
            else [self.contexts[s] for s in order]
        )
        if self.partner is not None and self.partner.state is not None:
            mirror = self.partner.state.logits
            logits = self.codec.fuse_mirror(logits, mirror[rows.to(mirror.device)].cpu(), seen)
        kwargs = {} if self.boxes is None else {"boxes": [self.boxes[s] for s in order]}
        outputs = self.codec.decode(logits, self.prompts[rows], seen, **kwargs)
        which = [None] * len(order) if self.which is None else [self.which[s] for s in order]
        return list(zip(owners, which, outputs, strict=True))
