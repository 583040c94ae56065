"""Inference pipeline: images in, results of the asked tasks out.

One batch of requests is encoded together (the images that share a canvas: a portrait
image on a landscape canvas runs on the transposed one, in a batch of its own); then every
codec of the model runs in the model's task order, decoding in batches across the requests
that asked for it (grouped by refinement schedule). A task runs one sequence per image, or,
when its codec is prompted by detections, one per kept detection the codec applies to.
Detection comes first, so its kept boxes (each request's score threshold and max count)
prompt the tasks after it and no decoding is paid for objects nobody will see. Detection is
the one task the pipeline names, as the provider of those prompts (and Result has typed views
of the built-in tasks' outputs); everything else comes from the codecs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Generic

import torch
from PIL import Image

from model.checkpoint import MAD
from model.codecs import DecodeContext, DetectionCodec, TaskCodec
from model.codecs.caption import CaptionCodec
from model.codecs.detection import Detections
from model.codecs.keypoints import KeypointCodec
from model.codecs.segmentation import SegmentationCodec
from model.decoding import Memory, Runner, decoder_passes, mask_schedule, masked_decode
from model.preprocess import canvas_groups, image_canvas, prepare_batch
from model.stopwatch import Stopwatch

Schedule = tuple[float, ...]  # mask ratios of the refinement steps


@dataclass
class Request:
    """One image and what to do with it (already validated)."""

    image: Image.Image
    tasks: tuple[str, ...]
    refine_steps: dict[str, int] = field(default_factory=dict)  # missing: the default schedule
    score_threshold: float = 0.5
    max_detections: int | None = None
    nms_iou: float | None = None  # None: the model's default (config.nms_iou)


@dataclass
class Result:
    """Results of one image.

    outputs[task] for each task run, in its codec's own type: one value for a task with one
    sequence per image (Detections, a caption), a list for a task prompted by detections whose
    entry j belongs to detections[j] (None where the codec does not apply, e.g. keypoints of a
    non-person). The properties below are typed views of the built-in tasks (None when not run).
    timings are seconds per stage; passes counts decoder passes per task.
    """

    image_size: tuple[int, int]
    tasks: tuple[str, ...]
    outputs: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)

    @property
    def detections(self) -> Detections | None:
        return self.outputs.get(DetectionCodec.name)

    def required_detections(self) -> Detections:
        """`detections`, where detection must have run: for every task it prompts, and for
        detection metrics."""
        detections = self.detections
        if detections is None:
            raise ValueError(f"this result has no detections (tasks run: {self.tasks})")
        return detections

    @property
    def masks(self) -> list[torch.Tensor | None] | None:
        return self.outputs.get(SegmentationCodec.name)

    @property
    def keypoints(self) -> list[torch.Tensor | None] | None:
        return self.outputs.get(KeypointCodec.name)

    @property
    def caption(self) -> str | None:
        return self.outputs.get(CaptionCodec.name)


class Pipeline(Generic[Memory]):
    """Generic in what its runner's encode returns (model.network.ImageMemory for torch)."""

    def __init__(self, mad: MAD, runner: Runner[Memory]) -> None:
        self.mad, self.runner = mad, runner
        self.config, self.codecs = mad.config, mad.codecs
        self.device: torch.device = getattr(runner, "device", torch.device("cpu"))

    def tasks_to_run(self, asked: tuple[str, ...]) -> tuple[str, ...]:
        """Asked tasks plus detection when a task prompted by detections needs it, model order."""
        needed = set(asked)
        if any(self.codecs[task].prompted_by_detections for task in asked):
            needed.add(DetectionCodec.name)
        return tuple(task for task in self.codecs if task in needed)

    def ratios(self, request: Request, task: str) -> Schedule:
        default = self.config.schedules.get(task, [])
        return tuple(mask_schedule(request.refine_steps.get(task, len(default)), default))

    def canvas(self, request: Request) -> tuple[int, int]:
        """(H, W) of the canvas the request's image runs on (model.preprocess.image_canvas)."""
        return image_canvas((request.image.height, request.image.width), self.config.image_size)

    def __call__(self, requests: list[Request]) -> list[Result]:
        """One Result per request. Images that run on different canvases (portrait and
        landscape, model.preprocess) are encoded and decoded as separate batches."""
        sizes = [(r.image.height, r.image.width) for r in requests]
        groups = list(canvas_groups(sizes, self.config.image_size).values())
        if len(groups) == 1:
            return self.run_batch(requests)
        results: list[Result | None] = [None] * len(requests)
        for group in groups:
            for i, result in zip(group, self.run_batch([requests[i] for i in group]), strict=True):
                results[i] = result
        return [result for result in results if result is not None]

    def run_batch(self, requests: list[Request]) -> list[Result]:
        """Requests whose images share a canvas -> their Results."""
        start = time.perf_counter()
        batch = prepare_batch([r.image for r in requests], self.config.image_size, self.device)
        contexts = batch.contexts
        results = [
            Result(c.image_size, self.tasks_to_run(r.tasks))
            for r, c in zip(requests, contexts, strict=True)
        ]
        stage = Stopwatch(self.device, start)
        stage.lap("preprocess")
        memory = self.runner.encode(batch.images, batch.pad_mask)
        stage.lap("encode")
        for task, codec in self.codecs.items():  # model order: detection before those it prompts
            if not any(task in r.tasks for r in results):
                continue
            if codec.prompted_by_detections:
                self.run_per_detection(codec, requests, results, memory, contexts)
            else:
                self.run_per_image(codec, requests, results, memory, contexts)
            stage.lap(task)
        for result in results:  # the batch shares the work: every result gets its timings
            result.timings.update(stage.times)
        return results

    # --- tasks ------------------------------------------------------------------------------
    def groups(
        self, task: str, requests: list[Request], results: list[Result]
    ) -> list[tuple[Schedule, list[int]]]:
        """Images asking for `task`, grouped by their mask-ratio schedule."""
        groups: dict[Schedule, list[int]] = defaultdict(list)
        for i, (request, result) in enumerate(zip(requests, results, strict=True)):
            if task in result.tasks:
                groups[self.ratios(request, task)].append(i)
        return list(groups.items())

    def decode(
        self,
        codec: TaskCodec,
        memory: Memory,
        prompts: torch.Tensor,
        owners: list[int],
        ratios: Schedule,
        results: list[Result],
    ) -> torch.Tensor:
        """Masked decoding of sequences `prompts` [S, P] of images `owners` [S] -> body logits
        [S, L, V_slice] on the host; counts the passes of every image involved."""
        logits = masked_decode(
            self.runner,
            memory,
            codec,
            prompts.to(self.device),
            torch.tensor(owners, device=self.device),
            list(ratios),
        )
        for i in set(owners):
            results[i].passes[codec.name] = decoder_passes(list(ratios), codec.body_len)
        return logits.cpu()

    def run_per_image(
        self,
        codec: TaskCodec,
        requests: list[Request],
        results: list[Result],
        memory: Memory,
        contexts: list[DecodeContext],
    ) -> None:
        """One sequence per image; each request keeps what its options allow (codec.select)."""
        for ratios, idx in self.groups(codec.name, requests, results):
            prompts = codec.prompts(len(idx))
            logits = self.decode(codec, memory, prompts, idx, ratios, results)
            outputs = codec.decode(logits, prompts, [contexts[i] for i in idx])
            for i, output in zip(idx, outputs, strict=True):
                if isinstance(output, Detections) and codec.name not in requests[i].tasks:
                    output = self.usable(output, requests[i])
                results[i].outputs[codec.name] = codec.select(output, requests[i])

    def usable(self, detections: Detections, request: Request) -> Detections:
        """Detections run only to prompt other tasks keep what those tasks apply to, so a
        request's max_detections counts boxes it gets an answer for (keypoints: persons)."""
        usable = torch.zeros(len(detections), dtype=torch.bool)
        for task in request.tasks:
            codec = self.codecs[task]
            if codec.prompted_by_detections:
                usable |= codec.applies_to(detections.labels)
        return detections.select(usable.nonzero().flatten())

    def run_per_detection(
        self,
        codec: TaskCodec,
        requests: list[Request],
        results: list[Result],
        memory: Memory,
        contexts: list[DecodeContext],
    ) -> None:
        """One sequence per kept detection the codec applies to, prompted by its tokens."""
        for result in results:
            if codec.name in result.tasks:
                result.outputs[codec.name] = [None] * len(result.required_detections())
        for ratios, idx in self.groups(codec.name, requests, results):
            owners: list[int] = []  # (image, detection) of each sequence
            which: list[int] = []
            for i in idx:
                applies = codec.applies_to(results[i].required_detections().labels)
                for j in applies.nonzero().flatten().tolist():
                    owners.append(i)
                    which.append(j)
            if not owners:
                continue
            detections = [results[i].required_detections() for i in owners]
            tokens = torch.stack([d.tokens[j] for d, j in zip(detections, which, strict=True)])
            prompts = codec.prompts(tokens)
            logits = self.decode(codec, memory, prompts, owners, ratios, results)
            boxes = [d.boxes[j] for d, j in zip(detections, which, strict=True)]
            outputs = codec.decode(logits, prompts, [contexts[i] for i in owners], boxes=boxes)
            for i, j, output in zip(owners, which, outputs, strict=True):
                results[i].outputs[codec.name][j] = output
