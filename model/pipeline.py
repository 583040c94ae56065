"""Inference pipeline: images in, results of the asked tasks out.

One batch of requests is encoded together (or its images' features come from the feature
cache). The images of one batch share a canvas: a portrait image on a landscape canvas runs
on the transposed one, in a batch of its own. With a task's flip option
(`reads_mirror_image`), the mirror images of the requests that run it are encoded in the same
batch; they get a memory of their own, so the tasks' passes on the images attend over the
images alone. Then model.batch_run decodes the tasks, in rounds, across the batch's requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Generic, cast

import torch
from PIL import Image

from model.batch_run import BatchRun, StageObserver
from model.checkpoint import MAD
from model.codecs import DecodeContext
from model.decoding import Memory, Runner
from model.feature_cache import FeatureCache, SplitsMemory
from model.inference_io import Request, Result
from model.preprocess import canvas_groups, decode_context, image_canvas, prepare_batch
from model.stopwatch import Stopwatch


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads on this thread for the block (None: unchanged). Runners whose
    graphs run on their own thread pool (ONNX Runtime, OpenVINO on CPU) ask for 1: the torch
    work between their calls (letterboxing, re-masking, codecs) is on small tensors, where a
    second team of threads only adds synchronisation, and on a busy 2-core host its waits for
    a descheduled thread made a four-task request 3x slower."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Pipeline(Generic[Memory]):
    """Generic in what its runner's encode returns (model.network.ImageMemory for torch).

    features: a cache of encoded images (its runner must implement SplitsMemory); observer:
    told the seconds of the encoder and of every decoder pass."""

    def __init__(
        self,
        mad: MAD,
        runner: Runner[Memory],
        features: FeatureCache[Memory] | None = None,
        observer: StageObserver | None = None,
    ) -> None:
        self.mad, self.runner = mad, runner
        self.config, self.codecs = mad.config, mad.codecs
        self.device: torch.device = getattr(runner, "device", torch.device("cpu"))
        if features is not None and not isinstance(runner, SplitsMemory):
            raise TypeError(f"the {runner.name} runner cannot split its features for a cache")
        self.features = features
        self.observer: StageObserver = observer or (lambda stage, images, seconds: None)

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
        with torch_threads(getattr(self.runner, "host_threads", None)):
            return self._run_batch(requests)

    def _run_batch(self, requests: list[Request]) -> list[Result]:
        start = time.perf_counter()
        stage = Stopwatch(self.device, start)
        results = [Result((0, 0), self.mad.tasks_to_run(r.tasks)) for r in requests]
        # The mirror images of the requests that run a task reading them follow all the
        # requests' images in the batch: mirrors[i] is request i's mirror's place.
        reading = [i for i, request in enumerate(requests) if self.mad.views(request.tasks) > 1]
        mirrors = {i: len(requests) + k for k, i in enumerate(reading)}
        views = [*requests, *(mirrored(requests[i]) for i in mirrors)]
        memory, contexts = self.encode(views, stage)
        contexts = contexts[: len(requests)]  # a mirror image has its original's geometry
        for result, context in zip(results, contexts, strict=True):
            result.image_size = context.image_size
        BatchRun(
            self.mad,
            self.runner,
            self.observer,
            requests,
            results,
            memory,
            contexts,
            stage,
            mirrors,
        ).run()
        return results

    def encode(
        self, requests: list[Request], stage: Stopwatch
    ) -> tuple[Memory, list[DecodeContext]]:
        """Letterbox and encode the images the feature cache does not hold. -> the batch's
        memory, each image's decode context. The stage observer is told of every image
        encoded, mirror images included (the planner prices a request's `MAD.views`)."""
        canvas = self.config.image_size
        contexts = [decode_context(r.image, canvas) for r in requests]
        if self.features is None:
            batch = prepare_batch([r.image for r in requests], canvas, self.device)
            self.observer("preprocess", len(requests), stage.lap("preprocess"))
            memory = self.runner.encode(batch.images, batch.pad_mask)
            self.observer("encode", len(requests), stage.lap("encode"))
            return memory, contexts
        features, store = self.features, cast(SplitsMemory[Memory], self.runner)
        parts = [features.get(r.image_key) if r.image_key else None for r in requests]
        missing = [i for i, part in enumerate(parts) if part is None]
        if missing:
            batch = prepare_batch([requests[i].image for i in missing], canvas, self.device)
            self.observer("preprocess", len(missing), stage.lap("preprocess"))
            fresh = self.runner.encode(batch.images, batch.pad_mask)
            self.observer("encode", len(missing), stage.lap("encode"))
            # Split to keep each image's features, or to join them with the cached ones.
            if len(missing) < len(requests) or any(requests[i].image_key for i in missing):
                for i, part in zip(missing, store.split_memory(fresh), strict=True):
                    parts[i] = part
                    if key := requests[i].image_key:
                        features.put(key, part, store.memory_bytes(part))
            if len(missing) == len(requests):
                return fresh, contexts
        else:
            stage.lap("preprocess")
        kept = [part for part in parts if part is not None]
        memory = kept[0] if len(kept) == 1 else store.join_memory(kept)
        stage.lap("encode")
        return memory, contexts


def mirrored(request: Request) -> Request:
    """A request's image mirrored left to right (`reads_mirror_image`), cached under its own
    key."""
    key = f"{request.image_key}/mirrored" if request.image_key else None
    return dataclasses.replace(
        request, image=request.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image_key=key
    )
