"""The one vocabulary every task shares: a layout object that owns every id range.

Layout (reference sizes in brackets: 80 classes, 500 bins, 11421 text tokens):

    0..19            prompts and specials: detection prompt = 6 tokens 0..5, segmentation = 6,
                     keypoints = 7, caption prompt = 6 tokens 8..13, <mask> = 19
    classes          C class tokens                              [20..99]
    no-object        target of unmatched detection slots         [100]
    coordinates      num_bins + 1 tokens                         [101..601]
    visible, invisible (keypoints)                               [602, 603]
    foreground, background (bit masks)                           [604, 605]
    text             the caption tokenizer's ids; text id 0 is pad and end of sentence
    task ranges      ids a codec reserves for itself (TaskCodec.reserved_tokens: e.g. its
                     prompt and values), one range per such task in config.tasks order;
                     the four built-in tasks reserve none, so their ids never move

Unlike the reference, visibility comes before fg/bg so that each task's logit slice is one
contiguous range: detection = classes..coordinates, keypoints = coordinates..invisible,
segmentation = fg..bg, caption = text; a task with a range of its own can use it as its
slice. Nothing else in the project hard-codes an id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

import torch

if TYPE_CHECKING:
    from model.config import ModelConfig

NUM_SPECIALS = 20


@dataclass(frozen=True)
class VocabLayout:
    num_classes: int
    num_bins: int
    text_size: int

    # Prompts and specials.
    detection_prompt: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    segmentation_prompt: int = 6
    keypoint_prompt: int = 7
    caption_prompt: tuple[int, ...] = (8, 9, 10, 11, 12, 13)
    mask: int = 19
    # (task, number of ids) of each task that reserves ids, in the order they are appended.
    task_tokens: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_config(cls, config: ModelConfig) -> VocabLayout:
        # Read here, not at import: the codecs import this module.
        from model.codecs import CODECS

        reserved = (
            (task, CODECS[task].reserved_tokens(config)) for task in config.tasks if task in CODECS
        )
        return cls(
            config.num_classes,
            config.num_bins,
            config.text_vocab_size,
            task_tokens=tuple((task, n) for task, n in reserved if n > 0),
        )

    # Id ranges, as [start, stop).
    @property
    def class_start(self) -> int:
        return NUM_SPECIALS

    @property
    def no_object(self) -> int:
        return self.class_start + self.num_classes

    @property
    def coord_start(self) -> int:
        return self.no_object + 1

    @property
    def coord_stop(self) -> int:
        return self.coord_start + self.num_bins + 1

    @property
    def visible(self) -> int:
        return self.coord_stop

    @property
    def invisible(self) -> int:
        return self.coord_stop + 1

    @property
    def foreground(self) -> int:
        return self.coord_stop + 2

    @property
    def background(self) -> int:
        return self.coord_stop + 3

    @property
    def text_start(self) -> int:
        return self.coord_stop + 4

    @property
    def text_stop(self) -> int:
        return self.text_start + self.text_size

    @property
    def size(self) -> int:
        return self.text_stop + sum(n for _, n in self.task_tokens)

    def task_range(self, task: str) -> tuple[int, int]:
        """[start, stop) of the ids `task` reserved (after the text and earlier tasks' ids)."""
        start = self.text_stop
        for name, count in self.task_tokens:
            if name == task:
                return start, start + count
            start += count
        raise KeyError(f"task {task!r} reserved no vocabulary ids")

    # Conversions between values and ids.
    @overload
    def class_token(self, label: int) -> int: ...
    @overload
    def class_token(self, label: torch.Tensor) -> torch.Tensor: ...
    def class_token(self, label: torch.Tensor | int) -> torch.Tensor | int:
        return label + self.class_start

    def quantize(self, coord: torch.Tensor) -> torch.Tensor:
        """Normalised coordinates in [0, 1] -> coordinate token ids (bin = floor(c * bins))."""
        bins = torch.floor(coord * self.num_bins).long().clamp(0, self.num_bins)
        return bins + self.coord_start

    def dequantize(self, token: torch.Tensor) -> torch.Tensor:
        """Coordinate token ids -> normalised coordinates at the centre of their bin (a
        fractional id, between two bins, maps between their centres)."""
        bins = (token - self.coord_start).float()
        return ((bins + 0.5) / self.num_bins).clamp(0.0, 1.0)

    def read_coordinates(
        self, logits: torch.Tensor, window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [..., num_bins + 1] over the coordinate tokens -> (normalised coordinates
        [...], confidence [...]). The coordinate: with window 0 the most likely bin's centre
        (`dequantize`), else the probability-weighted mean of the bins within `window` of it,
        which places a coordinate between bins where the model's belief spans neighbours. The
        confidence: the probability of those bins, the coordinate's own and its window's."""
        probs = logits.float().softmax(-1)
        best = probs.argmax(-1, keepdim=True)
        bins = best + torch.arange(-window, window + 1, device=best.device)
        inside = (bins >= 0) & (bins <= self.num_bins)  # a window past an edge is cut there
        near = probs.gather(-1, bins.clamp(0, self.num_bins)) * inside
        confidence = near.sum(-1)
        mean = (near * bins).sum(-1) / confidence
        return self.dequantize(mean + self.coord_start), confidence

    @overload
    def text_token(self, text_id: int) -> int: ...
    @overload
    def text_token(self, text_id: torch.Tensor) -> torch.Tensor: ...
    def text_token(self, text_id: torch.Tensor | int) -> torch.Tensor | int:
        return text_id + self.text_start
