"""Cross-attention of many sequences against few images, without copying the images.

Cross-attention never mixes queries, so the sequences of one image can be laid end to end as
one long query row against that image's keys/values: [S, L, D] -> [B, n * L, D], where n is
the most sequences any image has (shorter images are padded with zero queries). The exact
result costs a scatter and a gather of the queries instead of a copy of every image's
keys/values per sequence ([S, heads, N, head_dim] per layer, and its backward in training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageGroups:
    """Where each sequence's queries sit in the folded layout.

    image_index: [S] image of each sequence; rank: [S] its place among that image's sequences;
    batch: B images; per_image: n, the most sequences of one image.
    """

    image_index: torch.Tensor
    rank: torch.Tensor
    batch: int
    per_image: int

    @classmethod
    def of(cls, image_index: torch.Tensor, batch: int) -> ImageGroups:
        if batch == 1:  # every sequence reads the one image: no counting needed (nor traced)
            return cls.one_image(len(image_index), image_index.device)
        counts = torch.bincount(image_index, minlength=batch)
        order = torch.argsort(image_index, stable=True)
        starts = counts.cumsum(0) - counts
        rank = torch.empty_like(image_index)
        rank[order] = (
            torch.arange(len(image_index), device=image_index.device) - starts[image_index[order]]
        )
        return cls(image_index, rank, batch, int(counts.max()) if len(image_index) else 0)

    @classmethod
    def one_image(cls, sequences: int, device: torch.device | str | None = None) -> ImageGroups:
        index = torch.zeros(sequences, dtype=torch.long, device=device)
        return cls(index, torch.arange(sequences, device=device), 1, sequences)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """[S, L, D] -> [B, per_image * L, D]"""
        _, L, D = x.shape
        if self.batch == 1:
            return x.reshape(1, -1, D)  # -1, not S * L: traced graphs keep the length dynamic
        out = x.new_zeros(self.batch, self.per_image, L, D)
        out = out.index_put((self.image_index, self.rank), x)
        return out.reshape(self.batch, self.per_image * L, D)

    def unfold(self, y: torch.Tensor, length: int) -> torch.Tensor:
        """[B, per_image * L, D] -> [S, L, D]"""
        if self.batch == 1:
            return y.reshape(-1, length, y.shape[-1])
        return y.reshape(self.batch, self.per_image, length, -1)[self.image_index, self.rank]
