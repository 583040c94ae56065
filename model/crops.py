"""A batch's zoomed crops (model.zoom): the window of each kept detection, each crop's decode
context, the sequences' prompts on their crops, and each crop's memory, encoded once per batch
however many tasks read it.

A detection's window comes from its box as detection first gave it; a window of None is the
whole image, which reads the image's own memory part. The crops are cut from the request's
image (or its mirror image) and encoded in one encoder call per `Crops.memory` call that asks
for new ones (a group of sequences, on the images or on their mirror images); that time, and
the passes detection runs over them (model.batch_run), add up to the batch's crop work
(model.batch_run.CROP_STAGE)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from model.codecs import DecodeContext, TaskCodec
from model.codecs.base import box_tokens
from model.config import ModelConfig
from model.decoding import Runner
from model.feature_cache import SplitsMemory
from model.preprocess import prepare_batch
from model.stopwatch import Stopwatch
from model.zoom import Window, crop_zoom, mirror_in, window_context, zoom_window

CROP_CHUNK = 8  # the least crops per encoder call: the service's default max batch
# (images, mirrored) -> those images' own memory parts, for the detections read whole.
OwnMemory = Callable[[list[int], bool], list[Any]]


class Crops:
    """The crops of one batch. images, contexts: each request's image and its decode context;
    own_memory: images' (or their mirror images') parts of the batch's memory; stage: the
    batch's stopwatch, crop encodes being timed under the task that asks for them;
    batch_images: how many images the batch's own encoder call took."""

    def __init__(
        self,
        runner: Runner[Any],
        config: ModelConfig,
        device: torch.device,
        images: list[Image.Image],
        contexts: list[DecodeContext],
        own_memory: OwnMemory,
        stage: Stopwatch,
        batch_images: int = 1,
    ) -> None:
        self.runner, self.config, self.device = runner, config, device
        self.images, self.image_contexts = images, contexts
        self.own_memory, self.stage = own_memory, stage
        # Crops per encoder call: as many images as the batch's own call took, or CROP_CHUNK
        # when that is more. A batch's crops (one per kept detection: up to num_slots per
        # image) then never need more encoder memory than a batch the service already runs,
        # in calls still large enough to keep an accelerator busy.
        self.chunk = max(batch_images, CROP_CHUNK)
        self.encoded: dict[tuple[int, Window | None, bool], Any] = {}
        self.windows: dict[int, list[Window | None]] = {}  # of each image's kept detections
        self.seconds = 0.0  # the batch's crop work so far

    def set_windows(self, i: int, boxes: torch.Tensor) -> None:
        """The windows of image i's kept detections, pixel `boxes` [N, 4]."""
        zoom, canvas = crop_zoom(self.config), self.config.image_size
        size = self.image_contexts[i].image_size
        self.windows[i] = [zoom_window(box, size, canvas, zoom) for box in boxes]

    def keep(self, i: int, kept: list[int]) -> None:
        """Image i keeps only the detections `kept` (indices, in their new order)."""
        self.windows[i] = [self.windows[i][k] for k in kept]

    def contexts(self, owners: list[int], windows: list[Window | None]) -> list[DecodeContext]:
        """Each crop's decode context (a window of None: its image's)."""
        canvas = self.config.image_size
        return [
            self.image_contexts[i]
            if window is None
            else window_context(window, self.image_contexts[i].image_size, canvas)
            for i, window in zip(owners, windows, strict=True)
        ]

    def prompts(
        self,
        codec: TaskCodec,
        tokens: torch.Tensor,
        boxes: list[torch.Tensor],
        contexts: list[DecodeContext],
        windows: list[Window | None],
        mirror: bool = False,
    ) -> torch.Tensor:
        """Detections' `tokens` [S, 5] (pixel `boxes` of the image, or with `mirror`
        their tokens on the mirror image) -> the tokens with each box on its crop (mirror: on
        its crop's mirror image). A whole-image sequence keeps its own tokens."""
        on_crops = tokens.clone()
        for s, (window, context) in enumerate(zip(windows, contexts, strict=True)):
            if window is not None:
                box = mirror_in(context, boxes[s]) if mirror else boxes[s]
                on_crops[s, :4] = box_tokens(codec.vocab, context.to_canvas(box))
        return on_crops

    def memory(
        self, task: str, owners: list[int], windows: list[Window | None], mirror: bool
    ) -> Any:
        """The memory of each sequence's crop of its image (mirror: of its mirror image), in
        sequence order. Crops not encoded yet in this batch are, `chunk` at a time, timed under
        `task` and added to the crop work."""
        runner = self.runner
        if not isinstance(runner, SplitsMemory):
            raise TypeError(f"the {runner.name} runner cannot split its features for crops")
        keys = [(i, window, mirror) for i, window in zip(owners, windows, strict=True)]
        new = [key for key in dict.fromkeys(keys) if key not in self.encoded]
        cut = [key for key in new if key[1] is not None]
        if cut:
            self.stage.lap(task)
            for start in range(0, len(cut), self.chunk):
                chunk = cut[start : start + self.chunk]
                images = [self.images[i].crop(window) for i, window, _ in chunk]
                if mirror:
                    images = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
                batch = prepare_batch(images, self.config.image_size, self.device)
                encoded = runner.split_memory(runner.encode(batch.images, batch.pad_mask))
                self.encoded.update(zip(chunk, encoded, strict=True))
            self.seconds += self.stage.lap(task)
        whole = [key for key in new if key[1] is None]
        if whole:
            parts = self.own_memory([i for i, _, _ in whole], mirror)
            self.encoded.update(zip(whole, parts, strict=True))
        memories = [self.encoded[key] for key in keys]
        return memories[0] if len(memories) == 1 else runner.join_memory(memories)
