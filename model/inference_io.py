"""What the pipeline takes and gives: a Request (one image and what to do with it), its
Result (the outputs of each task run, with typed views of the built-in tasks), and Progress
(how a caller follows a request through its batch: partial results, cancellation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from model.codecs import DetectionCodec
from model.codecs.caption import CaptionCodec
from model.codecs.detection import Detections
from model.codecs.keypoints import KeypointCodec
from model.codecs.segmentation import SegmentationCodec
from model.mask_formats import BoxMask


class Progress(Protocol):
    """How a caller follows one request through its batch (the service: streaming, early
    answers, disconnected clients). Called on the thread that runs the pipeline."""

    partials: bool  # wants a result after the draft and after every refinement round

    def cancelled(self) -> bool:
        """True once nobody waits for the answer: the request gets no further passes."""
        ...

    def partial(self, result: Result, round: int) -> None:
        """The result as it stands after round `round` (0: the draft), the request still
        refining."""
        ...

    def finished(self, result: Result) -> None:
        """The final result, as soon as the request's last pass has run."""
        ...


@dataclass
class Request:
    """One image and what to do with it (already validated)."""

    image: Image.Image
    tasks: tuple[str, ...]
    refine_steps: dict[str, int] = field(default_factory=dict)  # missing: the default schedule
    score_threshold: float = 0.5
    max_detections: int | None = None
    nms_iou: float | None = None  # None: the model's default (config.nms_iou)
    early_stop: bool = False  # a sequence stops refining once a step changes none of its tokens
    image_key: str | None = None  # digest of the image's bytes: its features may be cached
    progress: Progress | None = None


@dataclass
class Result:
    """Results of one image.

    outputs[task] for each task run, in its codec's own type: one value for a task with one
    sequence per image (Detections, a caption), a list for a task prompted by detections whose
    entry j belongs to detections[j] (None where the codec does not apply, e.g. keypoints of a
    non-person); read-only (a streamed request's partial results share them). The properties
    below are typed views of the built-in tasks (None when not run).
    timings are seconds per stage; passes counts decoder passes per task; refine_steps is the
    length of each task's schedule; cancelled: the caller went away and the work stopped.
    """

    image_size: tuple[int, int]
    tasks: tuple[str, ...]
    outputs: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    refine_steps: dict[str, int] = field(default_factory=dict)
    cancelled: bool = False

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
    def masks(self) -> list[BoxMask | None] | None:
        return self.outputs.get(SegmentationCodec.name)

    @property
    def keypoints(self) -> list[torch.Tensor | None] | None:
        return self.outputs.get(KeypointCodec.name)

    @property
    def caption(self) -> str | None:
        return self.outputs.get(CaptionCodec.name)
