"""One batch's decoding (model.pipeline encodes it): images' memory in, the asked tasks'
results out.

The tasks are decoded in batches across the requests that asked for them (grouped by
refinement schedule, model.task_groups). A task runs one sequence per image, or, when its codec
is prompted by detections, one per kept detection the codec applies to. Detection comes first
and runs its whole schedule, so its kept boxes (each request's score threshold and max count)
prompt the tasks after it and no decoding is paid for objects nobody will see. Detection is
the one task named here, as the provider of those prompts (and Result has typed views of the
built-in tasks' outputs); everything else comes from the codecs. With a task's
flip option (`reads_mirror_image`), the task decodes on the requests' mirror images too:
detection fuses each image's two sets of boxes (`DetectionCodec.fuse_flipped`); a task prompted
by detections runs its sequences again on the mirror image, prompted by the mirrored boxes,
and averages the two views' probabilities (`TaskCodec.fuse_mirror`). When a task reads zoomed
crops (model.crops), detection re-reads each kept box on its crop (`DetectionCodec.reread`)
before the boxes prompt anything, and a task prompted by detections decodes each detection's
sequence on its crop; detection's passes over the crops count as the batch's crop work.

The decoding runs in rounds: the draft (every asked task's first pass), then round k runs the
k-th refinement step of every sequence still refining. A request is finished, and its result
handed over (`Progress.finished`), as soon as its own last pass has run, before its batch
mates'; a request that follows its progress gets a result after the draft and every round; a
request whose caller went away (`Progress.cancelled`) gets no further passes. The order of the
passes changes no answer: each sequence's loop is its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, cast

import torch

from model.checkpoint import MAD
from model.codecs import DecodeContext, DetectionCodec, TaskCodec
from model.codecs.detection import Detections
from model.crops import Crops
from model.decoding import Runner, mask_schedule, refinement
from model.feature_cache import SplitsMemory
from model.inference_io import Request, Result
from model.stopwatch import Stopwatch
from model.task_groups import Schedule, TaskGroup

# Called on the model thread with (stage, images, seconds) for the encoder and each decoder
# pass: what the service's cost estimates learn from.
StageObserver = Callable[[str, int, float], None]
# A batch's work on zoomed crops (model.crops): cutting and encoding them and detection's
# passes over them, observed once per batch by the images whose tasks read crops (how many
# crops an image has is known only once detection ran, so the planner prices it per image).
CROP_STAGE = "crops"


def task_schedule(mad: MAD, request: Request, task: str) -> Schedule:
    """The mask ratios of a task's refinement steps for a request."""
    steps = mad.refine_steps(request.refine_steps, [task])[task]
    return tuple(mask_schedule(steps, mad.config.schedules.get(task, [])))


def usable(codecs: dict[str, TaskCodec], detections: Detections, request: Request) -> Detections:
    """Detections run only to prompt other tasks keep what those tasks apply to, so a
    request's max_detections counts boxes it gets an answer for (keypoints: persons)."""
    kept = torch.zeros(len(detections), dtype=torch.bool)
    for task in request.tasks:
        codec = codecs[task]
        if codec.prompted_by_detections:
            kept |= codec.applies_to(detections.labels)
    return detections.select(kept.nonzero().flatten())


class BatchRun:
    """One batch's decoding, in rounds (see the module docstring). mirrors: where the memory
    holds the mirror image of each request that has one (`reads_mirror_image`), after all the
    requests' images."""

    def __init__(
        self,
        mad: MAD,
        runner: Runner[Any],
        observer: StageObserver,
        requests: list[Request],
        results: list[Result],
        memory: Any,
        contexts: list[DecodeContext],
        stage: Stopwatch,
        mirrors: dict[int, int] | None = None,
    ) -> None:
        self.mad, self.runner, self.observer = mad, runner, observer
        self.codecs, self.config = mad.codecs, mad.config
        self.device: torch.device = getattr(runner, "device", torch.device("cpu"))
        self.requests, self.results = requests, results
        self.contexts, self.stage = contexts, stage
        self.mirrors = mirrors or {}
        self.memory, self.mirror_memory, self.mirror_offset = self.split_views(memory)
        self.groups: list[TaskGroup] = []
        self.open = set(range(len(requests)))  # neither finished nor cancelled
        # Seconds of mirror groups' passes not yet observed, by (task, owners).
        self.unobserved: defaultdict[tuple[str, tuple[int, ...]], float] = defaultdict(float)
        images = [request.image for request in requests]
        views = len(requests) + len(self.mirrors)  # images the batch's encoder call took
        self.crops = Crops(
            runner, self.config, self.device, images, contexts, self.own, stage, views
        )

    def split_views(self, memory: Any) -> tuple[Any, Any, int]:
        """The batch's memory -> (the images', the mirror images', what to subtract from a
        mirror image's place in the batch for its place in the latter). A runner that can
        split its memory gives each view one of its own: every pass attends over all the
        images of its memory (the folded cross-attention), so a pass on the images would pay
        for the mirror images too."""
        runner, count = self.runner, len(self.requests)
        if not self.mirrors or not isinstance(runner, SplitsMemory):
            return memory, memory, 0
        parts = runner.split_memory(memory)
        joined = [
            p[0] if len(p) == 1 else runner.join_memory(p) for p in (parts[:count], parts[count:])
        ]
        return joined[0], joined[1], count

    def own(self, images: list[int], mirror: bool) -> list[Any]:
        """These images' (mirror: their mirror images') own parts of the batch's memory."""
        memory = self.mirror_memory if mirror else self.memory
        parts = cast(SplitsMemory[Any], self.runner).split_memory(memory)
        return [parts[self.mirrors[i] - self.mirror_offset if mirror else i] for i in images]

    def run(self) -> None:
        for task, codec in self.codecs.items():  # the draft, in model order
            self.drop_cancelled()
            asked = [i for i in sorted(self.open) if task in self.results[i].tasks]
            if not asked:
                continue
            groups = self.start(codec, asked)
            self.stage.lap(task)  # building its prompts (a task with none still has a stage)
            for group in groups:
                self.advance(group)
            if task == DetectionCodec.name:  # its boxes prompt the later tasks: refine now
                refining = groups
                while refining:  # a round of passes, each group's next one, until all ended
                    refining = [group for group in refining if self.advance(group)]
                self.set_detections(groups)
        reading = [i for i in self.crops.windows if self.mad.reads_crops(self.requests[i].tasks)]
        if reading:
            self.observer(CROP_STAGE, len(reading), self.crops.seconds)
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
            schedule = task_schedule(self.mad, request, codec.name)
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
        if not codec.reads_crops:
            group = self.group(codec, schedule, owners, codec.prompts(tokens), early_stop)
            group.which, group.boxes = which, boxes
            return group
        # Each detection's sequence on its crop, prompted by its box on the crop.
        windows = [self.crops.windows[i][j] for i, j in zip(owners, which, strict=True)]
        contexts = self.crops.contexts(owners, windows)
        prompts = codec.prompts(self.crops.prompts(codec, tokens, boxes, contexts, windows))
        memory = self.crops.memory(codec.name, owners, windows, mirror=False)
        group = self.group(codec, schedule, owners, prompts, early_stop, crops=memory)
        group.which, group.boxes, group.contexts, group.windows = which, boxes, contexts, windows
        return group

    def mirror_group(self, group: TaskGroup, early_stop: bool) -> TaskGroup:
        """A prompted group's sequences on the mirror images, prompted by the mirrored
        detections (its partner: TaskGroup.decode fuses the two)."""
        detection = cast(DetectionCodec, self.codecs[DetectionCodec.name])
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
            tokens = self.crops.prompts(
                group.codec, tokens, group.boxes, group.contexts, group.windows, mirror=True
            )
            memory = self.crops.memory(group.task, group.owners, group.windows, mirror=True)
        prompts = group.codec.prompts(tokens)
        mirror = self.group(
            group.codec, group.schedule, group.owners, prompts, early_stop, True, crops=memory
        )
        mirror.which, mirror.boxes = group.which, group.boxes
        mirror.contexts, mirror.windows = group.contexts, group.windows
        return mirror

    def reread_detections(self, images: list[int]) -> None:
        """Detection re-read on the crops of these images' kept detections
        (`DetectionCodec.reread`), each request's schedule run to its end (or its early stop);
        a request's decoder passes count both runs. Boxes the re-read brought together go
        through the request's NMS again. The passes over crops are timed under detection and
        observed as crop work (CROP_STAGE): they decode a sequence per crop, not per image."""
        codec = cast(DetectionCodec, self.codecs[DetectionCodec.name])
        by_schedule: dict[tuple[Schedule, bool], list[tuple[int, int]]] = defaultdict(list)
        for i in images:
            request = self.requests[i]
            schedule = task_schedule(self.mad, request, codec.name)
            for j, window in enumerate(self.crops.windows[i]):
                if window is not None:
                    by_schedule[(schedule, request.early_stop)].append((i, j))
        on_crops: dict[int, list[Detections | None]] = {
            i: [None] * len(self.crops.windows[i]) for i in images
        }
        for (schedule, early_stop), crops in by_schedule.items():
            owners = [i for i, _ in crops]
            windows = [self.crops.windows[i][j] for i, j in crops]
            memory = self.crops.memory(codec.name, owners, windows, mirror=False)
            prompts = codec.prompts(len(crops))
            group = self.group(codec, schedule, owners, prompts, early_stop, crops=memory)
            while group.advance():
                self.crops.seconds += self.stage.lap(codec.name)
            assert group.state is not None
            found = codec.decode(
                group.state.logits.cpu(), prompts, self.crops.contexts(owners, windows)
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
            self.crops.keep(i, keep.tolist())
        self.stage.lap(codec.name)

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
        crops: on the memory of each one's own crop, `Crops.memory`)."""
        device = self.device
        memory = self.mirror_memory if mirror else self.memory
        images = [self.mirrors[i] - self.mirror_offset for i in owners] if mirror else owners
        if crops is not None:
            memory, images = crops, list(range(len(owners)))
        steps = refinement(
            self.runner,
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
            self.observer(group.task, group.images, seconds)
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
        codec = cast(DetectionCodec, self.codecs[DetectionCodec.name])
        for i, output in found.items():
            if i in mirrored:
                output = codec.fuse_flipped(output, mirrored[i], self.contexts[i])
            self.results[i].outputs[codec.name] = self.keep(i, codec.name, output)
        self.stage.lap(DetectionCodec.name)  # decoding a task's outputs is that task's time
        if any(task_codec.reads_crops for task_codec in self.codecs.values()):
            for i in sorted(found):  # each crop from the box as detection first gave it
                self.crops.set_windows(i, self.results[i].required_detections().boxes)
        if codec.reads_crops:
            self.reread_detections(sorted(found))

    def keep(self, i: int, task: str, output: Any) -> Any:
        """What request i keeps of its image's output of a per-image task."""
        request, codec = self.requests[i], self.codecs[task]
        if isinstance(output, Detections) and task not in request.tasks:
            output = usable(self.codecs, output, request)
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
