"""Inference pipeline: images in, results of the asked tasks out.

One batch of requests is encoded together; each task is then decoded in batches across the
requests that asked for it (grouped by refinement steps). Detection runs first: its kept
boxes (score threshold, max count) prompt segmentation, and its persons prompt keypoints, so
no decoding is paid for objects nobody will see.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from PIL import Image

from model.checkpoint import MAD
from model.codecs.detection import Detections
from model.decoding import Runner, decoder_passes, mask_schedule, masked_decode
from model.preprocess import prepare_batch
from model.stopwatch import Stopwatch

# Tasks prompted by detections, and the Result field holding one output per detection.
DETECTION_DEPENDENT = {"segmentation": "masks", "keypoints": "keypoints"}


@dataclass
class Request:
    """One image and what to do with it (already validated)."""

    image: Image.Image
    tasks: tuple[str, ...]
    refine_steps: dict[str, int] = field(default_factory=dict)  # missing: the default schedule
    score_threshold: float = 0.5
    max_detections: int | None = None


@dataclass
class Result:
    """Results of one image. Fields of tasks not asked for stay None.

    masks[i] / keypoints[i] belong to detections[i] (keypoints None for non-persons).
    timings are seconds per stage; passes counts decoder passes per task.
    """

    image_size: tuple[int, int]
    tasks: tuple[str, ...]
    detections: Detections | None = None
    masks: list[torch.Tensor] | None = None
    keypoints: list[torch.Tensor | None] | None = None
    caption: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)


class Pipeline:
    def __init__(self, mad: MAD, runner: Runner):
        self.mad, self.runner = mad, runner
        self.config, self.codecs = mad.config, mad.codecs
        self.device = getattr(runner, "device", torch.device("cpu"))

    def tasks_to_run(self, asked: tuple[str, ...]) -> tuple[str, ...]:
        """Asked tasks plus detection when a detection-prompted task needs it, model order."""
        needed = set(asked)
        if needed & set(DETECTION_DEPENDENT):
            needed.add("detection")
        return tuple(t for t in self.config.tasks if t in needed)

    def ratios(self, request: Request, task: str) -> list[float]:
        default = self.config.schedules.get(task, [])
        return mask_schedule(request.refine_steps.get(task, len(default)), default)

    def __call__(self, requests: list[Request]) -> list[Result]:
        start = time.perf_counter()
        batch = prepare_batch([r.image for r in requests], self.config.image_size, self.device)
        contexts = batch.contexts
        results = [Result(c.image_size, self.tasks_to_run(r.tasks))
                   for r, c in zip(requests, contexts, strict=True)]
        stage = Stopwatch(self.device, start)
        stage.lap("preprocess")
        memory = self.runner.encode(batch.images, batch.pad_mask)
        stage.lap("encode")
        if any("detection" in r.tasks for r in results):
            self.detect(requests, results, memory, contexts)
            stage.lap("detection")
        for task in DETECTION_DEPENDENT:
            if any(task in r.tasks for r in results):
                self.prompted_by_detections(task, requests, results, memory, contexts)
                stage.lap(task)
        if any("caption" in r.tasks for r in results):
            self.caption(requests, results, memory, contexts)
            stage.lap("caption")
        for result in results:  # the batch shares the work: every result gets its timings
            result.timings.update(stage.times)
        return results

    # --- tasks ------------------------------------------------------------------------------
    def groups(self, task: str, requests: list[Request], results: list[Result]):
        """Images asking for `task`, grouped by their mask-ratio schedule."""
        groups = defaultdict(list)
        for i, (request, result) in enumerate(zip(requests, results, strict=True)):
            if task in result.tasks:
                groups[tuple(self.ratios(request, task))].append(i)
        return groups.items()

    def decode(self, task, memory, prompts, image_index, ratios, results, owners):
        logits = masked_decode(self.runner, memory, self.codecs[task], prompts.to(self.device),
                               image_index.to(self.device), list(ratios))
        for i in set(owners):
            results[i].passes[task] = decoder_passes(ratios, self.codecs[task].body_len)
        return logits.cpu()

    def detect(self, requests, results, memory, contexts):
        codec = self.codecs["detection"]
        for ratios, idx in self.groups("detection", requests, results):
            logits = self.decode("detection", memory, codec.prompts(len(idx)),
                                 torch.tensor(idx), ratios, results, idx)
            found = codec.decode(logits, None, [contexts[i] for i in idx])
            for i, dets in zip(idx, found, strict=True):
                keep = dets.scores >= requests[i].score_threshold
                keep = keep.nonzero().flatten()[: requests[i].max_detections]
                results[i].detections = dets.select(keep)

    def prompted_by_detections(self, task, requests, results, memory, contexts):
        codec = self.codecs[task]
        person = codec.person_label if task == "keypoints" else None
        field = DETECTION_DEPENDENT[task]
        for result in results:
            if task in result.tasks:
                setattr(result, field, [None] * len(result.detections))
        for ratios, idx in self.groups(task, requests, results):
            owners, which = [], []  # (image, detection) of each sequence
            for i in idx:
                for j, label in enumerate(results[i].detections.labels.tolist()):
                    if person is None or label == person:
                        owners.append(i)
                        which.append(j)
            if not owners:
                continue
            tokens = torch.stack([results[i].detections.tokens[j]
                                  for i, j in zip(owners, which, strict=True)])
            logits = self.decode(task, memory, codec.prompts(tokens), torch.tensor(owners),
                                 ratios, results, owners)
            boxes = [results[i].detections.boxes[j] for i, j in zip(owners, which, strict=True)]
            outputs = codec.decode(logits, None, [contexts[i] for i in owners], boxes=boxes)
            for i, j, out in zip(owners, which, outputs, strict=True):
                getattr(results[i], field)[j] = out

    def caption(self, requests, results, memory, contexts):
        codec = self.codecs["caption"]
        for ratios, idx in self.groups("caption", requests, results):
            logits = self.decode("caption", memory, codec.prompts(len(idx)), torch.tensor(idx),
                                 ratios, results, idx)
            for i, text in zip(idx, codec.decode(logits, None, []), strict=True):
                results[i].caption = text

