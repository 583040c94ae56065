"""Inference pipeline: images in, results of the asked tasks out.

One batch of requests is encoded together (or its images' features come from the feature
cache). The images of one batch share a canvas: a portrait image on a landscape canvas runs
on the transposed one, in a batch of its own. Then the tasks are decoded in batches across the
requests that asked for them (grouped by refinement schedule, model.task_groups). A task runs
one sequence per image, or, when its codec is prompted by detections, one per kept detection
the codec applies to. Detection comes first and runs its whole schedule, so its kept boxes
(each request's score threshold and max count) prompt the tasks after it and no decoding is
paid for objects nobody will see. Detection is the one task the pipeline names, as the
provider of those prompts (and Result has typed views of the built-in tasks' outputs);
everything else comes from the codecs. With a task's flip option (`reads_mirror_image`), the
mirror images of the requests that run it are encoded in the same batch and the task decodes
on them too: detection fuses each image's two sets of boxes (`DetectionCodec.fuse_flipped`); a
task prompted by detections runs its sequences again on the mirror image, prompted by the
mirrored boxes, and averages the two views' probabilities (`TaskCodec.fuse_mirror`). The mirror
images have a memory of their own: the tasks' passes on the images attend over the images
alone. When a task reads zoomed crops (model.zoom), each kept detection gets a crop of its
image around its box (its window, from the box as detection first gave it), encoded once per
batch however many tasks read it (timed under the first task that reads it, and told to the
observer with detection's passes over the crops as the batch's crop work, CROP_STAGE); a
detection whose crop would be the whole image reads the image's own memory. Detection re-reads
each kept box on its crop (`DetectionCodec.reread`) before the boxes prompt anything; a task
prompted by detections decodes each detection's sequence on its crop.

The decoding runs in rounds: the draft (every asked task's first pass), then round k runs the
k-th refinement step of every sequence still refining. A request is finished, and its result
handed over (`Progress.finished`), as soon as its own last pass has run, before its batch
mates'; a request that follows its progress gets a result after the draft and every round; a
request whose caller went away (`Progress.cancelled`) gets no further passes. The order of the
passes changes no answer: each sequence's loop is its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, Generic, cast

import torch
from PIL import Image

from model.checkpoint import MAD
from model.codecs import DecodeContext, DetectionCodec, TaskCodec
from model.codecs.base import box_tokens
from model.codecs.detection import Detections
from model.decoding import Memory, Runner, mask_schedule, refinement
from model.feature_cache import FeatureCache, SplitsMemory
from model.inference_io import Request, Result
from model.preprocess import canvas_groups, decode_context, image_canvas, prepare_batch
from model.stopwatch import Stopwatch
from model.task_groups import Schedule, TaskGroup
from model.zoom import Window, crop_zoom, mirror_in, window_context, zoom_window

# Called on the model thread with (stage, images, seconds) for the encoder and each decoder
# pass: what the service's cost estimates learn from.
# A batch's work on zoomed crops (model.zoom): cutting and encoding them and detection's
# passes over them, observed once per batch by the images whose tasks read crops (how many
# crops an image has is known only once detection ran, so the planner prices it per image).
CROP_STAGE = "crops"
StageObserver = Callable[[str, int, float], None]


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

    def ratios(self, request: Request, task: str) -> Schedule:
        steps = self.mad.refine_steps(request.refine_steps, [task])[task]
        return tuple(mask_schedule(steps, self.config.schedules.get(task, [])))

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
        BatchRun(self, requests, results, memory, contexts, stage, mirrors).run()
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

    def usable(self, detections: Detections, request: Request) -> Detections:
        """Detections run only to prompt other tasks keep what those tasks apply to, so a
        request's max_detections counts boxes it gets an answer for (keypoints: persons)."""
        usable = torch.zeros(len(detections), dtype=torch.bool)
        for task in request.tasks:
            codec = self.codecs[task]
            if codec.prompted_by_detections:
                usable |= codec.applies_to(detections.labels)
        return detections.select(usable.nonzero().flatten())


def mirrored(request: Request) -> Request:
    """A request's image mirrored left to right (`reads_mirror_image`), cached under its own
    key."""
    key = f"{request.image_key}/mirrored" if request.image_key else None
    return dataclasses.replace(
        request, image=request.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image_key=key
    )


class BatchRun:
    """One batch's decoding, in rounds (see the module docstring). mirrors: where the memory
    holds the mirror image of each request that has one (`reads_mirror_image`), after all the
    requests' images."""

    def __init__(
        self,
        pipeline: Pipeline[Any],
        requests: list[Request],
        results: list[Result],
        memory: Any,
        contexts: list[DecodeContext],
        stage: Stopwatch,
        mirrors: dict[int, int] | None = None,
    ) -> None:
        self.pipeline, self.requests, self.results = pipeline, requests, results
        self.contexts, self.stage = contexts, stage
        self.mirrors = mirrors or {}
        self.memory, self.mirror_memory, self.mirror_offset = self.split_views(memory)
        self.groups: list[TaskGroup] = []
        self.open = set(range(len(requests)))  # neither finished nor cancelled
        # Seconds of mirror groups' passes not yet observed, by (task, owners).
        self.unobserved: defaultdict[tuple[str, tuple[int, ...]], float] = defaultdict(float)
        # Each encoded crop's memory (model.zoom), by (image, window, mirrored); a window of
        # None is the whole image.
        self.crops: dict[tuple[int, Window | None, bool], Any] = {}
        self.windows: dict[int, list[Window | None]] = {}  # of each image's kept detections
        self.crop_seconds = 0.0  # CROP_STAGE's, so far

    def split_views(self, memory: Any) -> tuple[Any, Any, int]:
        """The batch's memory -> (the images', the mirror images', what to subtract from a
        mirror image's place in the batch for its place in the latter). A runner that can
        split its memory gives each view one of its own: every pass attends over all the
        images of its memory (the folded cross-attention), so a pass on the images would pay
        for the mirror images too."""
        runner, count = self.pipeline.runner, len(self.requests)
        if not self.mirrors or not isinstance(runner, SplitsMemory):
            return memory, memory, 0
        parts = runner.split_memory(memory)
        joined = [
            p[0] if len(p) == 1 else runner.join_memory(p) for p in (parts[:count], parts[count:])
        ]
        return joined[0], joined[1], count

    def run(self) -> None:
        for task, codec in self.pipeline.codecs.items():  # the draft, in model order
            self.drop_cancelled()
            asked = [i for i in sorted(self.open) if task in self.results[i].tasks]
            if not asked:
                continue
            groups = self.start(codec, asked)
            self.stage.lap(task)  # building its prompts (a task with none still has a stage)
            for group in groups:
                self.advance(group)
            if task == DetectionCodec.name:  # its boxes prompt the later tasks: refine now
                while any([self.advance(group) for group in groups]):
                    pass
                self.set_detections(groups)
        reading = [i for i in self.windows if self.pipeline.mad.reads_crops(self.requests[i].tasks)]
        if reading:
            self.pipeline.observer(CROP_STAGE, len(reading), self.crop_seconds)
        self.finish_ready()
        self.report(0)
        round = 0
        while self.open:
            round += 1
            self.drop_cancelled()
            ran = [self.advance(group) for group in self.groups]
            self.finish_ready()
            if not any(ran):
                break
            self.report(round)
        for i in sorted(self.open):  # only cancelled ones can be left; nothing to run
            self.finish(i)

    # --- groups -----------------------------------------------------------------------------
    def start(self, codec: TaskCodec, asked: list[int]) -> list[TaskGroup]:
        """The groups of one task over the images `asked`, by refinement schedule."""
        by_schedule: dict[tuple[Schedule, bool], list[int]] = defaultdict(list)
        for i in asked:
            request = self.requests[i]
            schedule = self.pipeline.ratios(request, codec.name)
            self.results[i].refine_steps[codec.name] = len(schedule)
            by_schedule[(schedule, request.early_stop)].append(i)
        groups = []
        for (schedule, early_stop), images in by_schedule.items():
            if codec.prompted_by_detections:
                group = self.prompted_group(codec, schedule, images, early_stop)
                if group is not None and codec.reads_mirror_image:  # the mirror images too
                    group.partner = self.mirror_group(group, early_stop)
                    groups.append(group.partner)
            else:
                prompts = codec.prompts(len(images))
                group = self.group(codec, schedule, images, prompts, early_stop)
                if codec.reads_mirror_image:  # the mirror images too: fused in set_detections
                    mirror = self.group(codec, schedule, images, prompts, early_stop, True)
                    groups.append(mirror)
            if group is not None:
                groups.append(group)
        self.groups += groups
        return groups

    def prompted_group(
        self, codec: TaskCodec, schedule: Schedule, images: list[int], early_stop: bool
    ) -> TaskGroup | None:
        """One sequence per kept detection the codec applies to, prompted by its tokens."""
        owners: list[int] = []  # (image, detection) of each sequence
        which: list[int] = []
        for i in images:
            kept = self.results[i].required_detections()
            self.results[i].outputs[codec.name] = [None] * len(kept)
            for j in codec.applies_to(kept.labels).nonzero().flatten().tolist():
                owners.append(i)
                which.append(j)
        if not owners:
            return None
        prompting = [self.results[i].required_detections() for i in owners]
        tokens = torch.stack([d.tokens[j] for d, j in zip(prompting, which, strict=True)])
        boxes = [d.boxes[j] for d, j in zip(prompting, which, strict=True)]
        if codec.reads_crops:
            windows = [self.windows[i][j] for i, j in zip(owners, which, strict=True)]
            group = self.zoomed_group(codec, schedule, owners, tokens, boxes, windows, early_stop)
        else:
            group = self.group(codec, schedule, owners, codec.prompts(tokens), early_stop)
        group.which, group.boxes = which, boxes
        return group

    def zoomed_group(
        self,
        codec: TaskCodec,
        schedule: Schedule,
        owners: list[int],
        tokens: torch.Tensor,
        boxes: list[torch.Tensor],
        windows: list[Window | None],
        early_stop: bool,
    ) -> TaskGroup:
        """The sequences of detections `tokens` [S, 5] (pixel `boxes`), each on its crop
        `windows[s]` (model.zoom), prompted by its box on the crop."""
        contexts = self.crop_contexts(owners, windows)
        on_crops = tokens.clone()  # a whole-image sequence keeps its slot's own tokens
        for s, (window, context) in enumerate(zip(windows, contexts, strict=True)):
            if window is not None:
                on_crops[s, :4] = box_tokens(codec.vocab, context.to_canvas(boxes[s]))
        memory = self.crop_memory(codec.name, owners, windows, mirror=False)
        group = self.group(
            codec, schedule, owners, codec.prompts(on_crops), early_stop, crops=memory
        )
        group.contexts, group.windows = contexts, windows
        return group

    def mirror_group(self, group: TaskGroup, early_stop: bool) -> TaskGroup:
        """A prompted group's sequences on the mirror images, prompted by the mirrored
        detections (its partner: TaskGroup.decode fuses the two)."""
        detection = cast(DetectionCodec, self.pipeline.codecs[DetectionCodec.name])
        on_mirror = {
            i: detection.mirror(self.results[i].required_detections(), self.contexts[i])
            for i in set(group.owners)
        }
        assert group.which is not None
        tokens = torch.stack(
            [on_mirror[i].tokens[j] for i, j in zip(group.owners, group.which, strict=True)]
        )
        memory = None
        if group.windows is not None and group.contexts is not None and group.boxes is not None:
            for s, (window, context) in enumerate(zip(group.windows, group.contexts, strict=True)):
                if window is not None:  # the box on its crop's mirror image
                    on_mirror_crop = context.to_canvas(mirror_in(context, group.boxes[s]))
                    tokens[s, :4] = box_tokens(group.codec.vocab, on_mirror_crop)
            memory = self.crop_memory(group.task, group.owners, group.windows, mirror=True)
        prompts = group.codec.prompts(tokens)
        mirror = self.group(
            group.codec, group.schedule, group.owners, prompts, early_stop, True, crops=memory
        )
        mirror.which, mirror.boxes = group.which, group.boxes
        mirror.contexts, mirror.windows = group.contexts, group.windows
        return mirror

    def crop_contexts(self, owners: list[int], windows: list[Window | None]) -> list[DecodeContext]:
        """Each crop's decode context (a window of None: its image's)."""
        canvas = self.pipeline.config.image_size
        return [
            self.contexts[i]
            if window is None
            else window_context(window, self.contexts[i].image_size, canvas)
            for i, window in zip(owners, windows, strict=True)
        ]

    def set_windows(self, images: list[int]) -> None:
        """The crop of each of these images' kept detections (model.zoom), when a task reads
        crops: from the boxes as detection first gave them."""
        if not any(codec.reads_crops for codec in self.pipeline.codecs.values()):
            return
        zoom, canvas = crop_zoom(self.pipeline.config), self.pipeline.config.image_size
        for i in images:
            size = self.contexts[i].image_size
            boxes = self.results[i].required_detections().boxes
            self.windows[i] = [zoom_window(box, size, canvas, zoom) for box in boxes]

    def reread_detections(self, images: list[int]) -> None:
        """Detection re-read on the crops of these images' kept detections
        (`DetectionCodec.reread`), each request's schedule run to its end (or its early stop);
        a request's decoder passes count both runs. Boxes the re-read brought together go
        through the request's NMS again. The passes over crops are timed under detection and
        observed as crop work (CROP_STAGE): they decode a sequence per crop, not per image."""
        codec = cast(DetectionCodec, self.pipeline.codecs[DetectionCodec.name])
        by_schedule: dict[tuple[Schedule, bool], list[tuple[int, int]]] = defaultdict(list)
        for i in images:
            request = self.requests[i]
            schedule = self.pipeline.ratios(request, codec.name)
            for j, window in enumerate(self.windows[i]):
                if window is not None:
                    by_schedule[(schedule, request.early_stop)].append((i, j))
        on_crops: dict[int, list[Detections | None]] = {
            i: [None] * len(self.windows[i]) for i in images
        }
        for (schedule, early_stop), crops in by_schedule.items():
            owners = [i for i, _ in crops]
            windows = [self.windows[i][j] for i, j in crops]
            memory = self.crop_memory(codec.name, owners, windows, mirror=False)
            prompts = codec.prompts(len(crops))
            group = self.group(codec, schedule, owners, prompts, early_stop, crops=memory)
            while group.advance():
                self.crop_seconds += self.stage.lap(codec.name)
            assert group.state is not None
            found = codec.decode(
                group.state.logits.cpu(), prompts, self.crop_contexts(owners, windows)
            )
            for (i, j), detections in zip(crops, found, strict=True):
                on_crops[i][j] = detections
            for i in set(owners):
                passes = self.results[i].passes
                passes[codec.name] = passes.get(codec.name, 0) + group.passes(i)
        for i in images:
            kept = self.results[i].required_detections()
            reread = codec.reread(kept, on_crops[i], self.contexts[i])
            keep = codec.after_nms(reread, self.requests[i])
            self.results[i].outputs[codec.name] = reread.select(keep)
            self.windows[i] = [self.windows[i][k] for k in keep.tolist()]
        self.stage.lap(codec.name)

    def crop_memory(
        self, task: str, owners: list[int], windows: list[Window | None], mirror: bool
    ) -> Any:
        """The memory of each sequence's crop of its image (mirror: of its mirror image), in
        sequence order. Crops not encoded yet in this batch are, in one encoder call: timed
        under `task`, observed as crop work (CROP_STAGE)."""
        runner = self.pipeline.runner
        if not isinstance(runner, SplitsMemory):
            raise TypeError(f"the {runner.name} runner cannot split its features for crops")
        keys = [(i, window, mirror) for i, window in zip(owners, windows, strict=True)]
        new = [key for key in dict.fromkeys(keys) if key not in self.crops]
        cut = [key for key in new if key[1] is not None]
        if cut:
            images = []
            for i, window, flipped in cut:
                crop = self.requests[i].image.crop(window)
                images.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else crop)
            self.stage.lap(task)
            batch = prepare_batch(images, self.pipeline.config.image_size, self.pipeline.device)
            encoded = runner.split_memory(runner.encode(batch.images, batch.pad_mask))
            self.crop_seconds += self.stage.lap(task)
            self.crops.update(zip(cut, encoded, strict=True))
        whole = [key for key in new if key[1] is None]
        if whole:  # the image's own memory
            parts = runner.split_memory(self.mirror_memory if mirror else self.memory)
            for i, _, _ in whole:
                self.crops[(i, None, mirror)] = parts[
                    self.mirrors[i] - self.mirror_offset if mirror else i
                ]
        memories = [self.crops[key] for key in keys]
        return memories[0] if len(memories) == 1 else runner.join_memory(memories)

    def group(
        self,
        codec: TaskCodec,
        schedule: Schedule,
        owners: list[int],
        prompts: torch.Tensor,
        early_stop: bool,
        mirror: bool = False,
        crops: Any = None,
    ) -> TaskGroup:
        """The sequences `prompts` of the images `owners` (mirror: of their mirror images;
        crops: on the memory of each one's own crop, `crop_memory`)."""
        device = self.pipeline.device
        memory = self.mirror_memory if mirror else self.memory
        images = [self.mirrors[i] - self.mirror_offset for i in owners] if mirror else owners
        if crops is not None:
            memory, images = crops, list(range(len(owners)))
        steps = refinement(
            self.pipeline.runner,
            memory,
            codec,
            prompts.to(device),
            torch.tensor(images, device=device),
            list(schedule),
            early_stop,
        )
        return TaskGroup(codec, schedule, owners, prompts, steps, mirror=mirror)

    def advance(self, group: TaskGroup) -> bool:
        """One pass of `group`, timed under its task. -> whether a pass ran."""
        if not group.advance():
            return False
        seconds = self.stage.lap(group.task)
        views = (group.task, tuple(group.owners))  # a mirror group's sequences: its original's
        if group.mirror:  # observed with its original's pass, which runs next if it still can
            self.unobserved[views] += seconds
        else:
            seconds += self.unobserved.pop(views, 0.0)
            self.pipeline.observer(group.task, group.images, seconds)
        return True

    # --- results ----------------------------------------------------------------------------
    def set_detections(self, groups: list[TaskGroup]) -> None:
        """Detection's final outputs, which the later tasks' prompts read (with
        `detection_flip`, each image's fused with its mirror image's)."""
        found: dict[int, Any] = {}
        mirrored: dict[int, Any] = {}
        for group in groups:
            for i, _, output in group.decode(sorted(set(group.owners)), self.contexts):
                (mirrored if group.mirror else found)[i] = output
                passes = self.results[i].passes
                passes[group.task] = max(passes.get(group.task, 0), group.passes(i))
        codec = cast(DetectionCodec, self.pipeline.codecs[DetectionCodec.name])
        for i, output in found.items():
            if i in mirrored:
                output = codec.fuse_flipped(output, mirrored[i], self.contexts[i])
            self.results[i].outputs[codec.name] = self.keep(i, codec.name, output)
        self.stage.lap(DetectionCodec.name)  # decoding a task's outputs is that task's time
        self.set_windows(sorted(found))
        if codec.reads_crops:
            self.reread_detections(sorted(found))

    def keep(self, i: int, task: str, output: Any) -> Any:
        """What request i keeps of its image's output of a per-image task."""
        request, codec = self.requests[i], self.pipeline.codecs[task]
        if isinstance(output, Detections) and task not in request.tasks:
            output = self.pipeline.usable(output, request)
        return codec.select(output, request)

    def outputs(self, i: int, into: Result) -> None:
        """Request i's outputs, from its groups' logits as they stand, into `into`."""
        for group in self.groups:
            if group.task == DetectionCodec.name or group.mirror:
                continue  # set once, before the tasks it prompts; fused into its partner
            decoded = group.decoded(i, self.contexts)
            self.stage.lap(group.task)  # decoding a task's outputs is that task's time
            if not decoded:
                continue
            into.passes[group.task] = group.passes(i)
            if group.which is None:
                into.outputs[group.task] = self.keep(i, group.task, decoded[0][2])
                continue
            if into is not self.results[i]:  # a snapshot: its own list
                into.outputs[group.task] = list(into.outputs[group.task])
            for _, j, output in decoded:
                into.outputs[group.task][j] = output
        for task in into.tasks:  # a prompted task with nothing to prompt it ran no pass
            into.passes.setdefault(task, 0)

    def finish_ready(self) -> None:
        """Hand over every open request none of whose sequences is still refining."""
        for i in sorted(self.open):
            if not any(g.refining(i) for g in self.groups):
                self.finish(i)

    def finish(self, i: int) -> None:
        self.open.discard(i)
        result = self.results[i]
        if not result.cancelled:
            self.outputs(i, result)
        result.timings.update(self.stage.times)  # the batch shares the work
        if result.cancelled:
            return
        if (progress := self.requests[i].progress) is not None:
            progress.finished(result)

    def report(self, round: int) -> None:
        """A snapshot of each open request that follows its progress."""
        for i in sorted(self.open):
            progress = self.requests[i].progress
            if progress is None or not progress.partials:
                continue
            result = self.results[i]
            snapshot = Result(
                result.image_size,
                result.tasks,
                dict(result.outputs),
                {},
                dict(result.passes),
                dict(result.refine_steps),
            )
            self.outputs(i, snapshot)
            snapshot.timings = dict(self.stage.times)
            progress.partial(snapshot, round)

    def drop_cancelled(self) -> None:
        """No further passes for requests whose caller went away."""
        for i in sorted(self.open):
            progress = self.requests[i].progress
            if progress is not None and progress.cancelled():
                self.results[i].cancelled = True
                for group in self.groups:
                    group.stop(i)
                self.finish(i)
