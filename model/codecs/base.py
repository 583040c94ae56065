"""The one interface every task codec implements.

A codec owns its task's whole life, so the pipeline, the service, `mad eval`, `mad tune` and
the benchmarks know no task by name:

    sequence format   prompt, slice of the shared vocabulary (and any ids it reserves),
                      targets -> masked training sequences, logits -> outputs
    orchestration     one sequence per image, or one per kept detection it applies to
                      (`prompted_by_detections`, `applies_to`); what a request keeps (`select`)
    response          where its output goes in the JSON (`output_field`) and how (`to_json`)
    metric            the evaluator `mad eval` runs and the metric `mad tune` maximises

Sequences are `prompt + body`; the network only ever sees token ids and returns logits over
the slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from model.config import ModelConfig
from model.tokenizer import CaptionTokenizer
from model.vocab import VocabLayout

if TYPE_CHECKING:
    from model.evaluate import GroundTruth
    from model.inference_io import Request, Result

NOT_ALLOWED = -1e4  # additive logit for ids a body position may not take (finite: ONNX/fp16)


@dataclass
class TrainSequences:
    """Masked training sequences of one task for a batch of images.

    inputs:      [S, T] token ids (prompt + masked body)
    targets:     [S, C, T] C candidate target sequences (best-of-C matching; C = 1 mostly)
    weights:     [S, T] 1.0 where the loss counts (masked tokens), else 0.0
    image_index: [S] which image of the batch each sequence belongs to
    extra:       task-specific tensors for target assignment (e.g. detection's objects)
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    image_index: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @classmethod
    def empty(cls, length: int) -> TrainSequences:
        """No sequences (a batch without objects of this task)."""
        tokens = torch.zeros(0, length, dtype=torch.long)
        return cls(tokens, tokens.unsqueeze(1), tokens.float(), torch.zeros(0, dtype=torch.long))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TrainSequences:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TrainSequences:
        """Page-locked copies, for asynchronous copies to a GPU."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TrainSequences:
        """The same sequences with `fn` applied to every tensor."""
        return TrainSequences(
            fn(self.inputs),
            fn(self.targets),
            fn(self.weights),
            fn(self.image_index),
            {k: fn(v) for k, v in self.extra.items()},
        )


@dataclass
class DecodeContext:
    """What a codec needs to turn normalised canvas coordinates into original-image pixels.

    canvas: (H, W) of the letterboxed model input; scale: resized / original size;
    image_size: (H, W) of the image the model saw. For a crop of an image (model.zoom), origin
    is the crop's top-left corner (x, y) on the image and full_size the image's (H, W): pixels
    are the image's, not the crop's.
    """

    canvas: tuple[int, int]
    scale: float
    image_size: tuple[int, int]
    origin: tuple[int, int] = (0, 0)
    full_size: tuple[int, int] | None = None

    @property
    def result_size(self) -> tuple[int, int]:
        """(H, W) of the image results are given on (the whole image, for a crop)."""
        return self.full_size or self.image_size

    def to_pixels(self, xy: torch.Tensor) -> torch.Tensor:
        """[..., 2k] normalised (x, y, x, y, ...) -> original-image pixels, clipped to the
        image the model saw."""
        h, w = self.canvas
        size = torch.tensor([w, h], dtype=xy.dtype).repeat(xy.shape[-1] // 2)
        limit = torch.tensor(self.image_size[::-1], dtype=xy.dtype).repeat(xy.shape[-1] // 2)
        seen = torch.minimum(xy * size / self.scale, limit).clamp(min=0)
        return seen + torch.tensor(self.origin, dtype=xy.dtype).repeat(xy.shape[-1] // 2)

    def to_canvas(self, xy: torch.Tensor) -> torch.Tensor:
        """[..., 2k] original-image pixels (x, y, x, y, ...) -> normalised canvas coordinates
        (`to_pixels`' inverse, unclipped)."""
        h, w = self.canvas
        size = torch.tensor([w, h], dtype=xy.dtype).repeat(xy.shape[-1] // 2)
        shift = torch.tensor(self.origin, dtype=xy.dtype).repeat(xy.shape[-1] // 2)
        return (xy - shift) * self.scale / size

    @property
    def mirror_span(self) -> float:
        """The canvas width (normalised) from the seen image's first pixel column's to its
        last's: pixel x on the mirror image is W - 1 - x here."""
        return (self.image_size[1] - 1) * self.scale / self.canvas[1]


@dataclass(frozen=True)
class JsonOptions:
    """How a response encodes outputs (the request's choices): masks as "rle" or "polygon"."""

    mask_format: str = "rle"


class TaskEvaluator(Protocol):
    """A task's metric over a data set: fed one pipeline Result per image, then summarized.
    An evaluator may also have `missing`: why the data set cannot score the task (it lacks
    the task's ground truth), or None; such a task is not scored rather than scored 0
    (model.evaluate.missing_truth)."""

    def add(self, image_id: int, result: Result) -> None: ...

    def summarize(self) -> dict[str, float]: ...


CODECS: dict[str, type[TaskCodec]] = {}


def decoding_option_names(codecs: Iterable[type[TaskCodec] | TaskCodec]) -> list[str]:
    """The decoding options (config fields) these codecs declare, each once, in order."""
    return list(dict.fromkeys(o for codec in codecs for o in codec.decoding_options))


def flip_options() -> list[str]:
    """The registered tasks' `flip_option`s: a model with any of them on encodes two views
    of each image."""
    return [c.flip_option for c in CODECS.values() if c.flip_option is not None]


def zoom_options() -> list[str]:
    """The registered tasks' `zoom_option`s (model.zoom)."""
    return [c.zoom_option for c in CODECS.values() if c.zoom_option is not None]


def register_codec(cls: type[TaskCodec]) -> type[TaskCodec]:
    """Class decorator: make a codec available under its `name`."""
    CODECS[cls.name] = cls
    return cls


class TaskCodec:
    """Base class: subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    # One sequence per kept detection `applies_to` (prompted by its box and class tokens),
    # instead of one per image; such a task's output is a list, one entry per detection.
    prompted_by_detections: ClassVar[bool] = False
    random_remask: ClassVar[bool] = False  # re-mask random positions instead of least confident
    # The key of this task's output in a /predict response: in the image's object, or in each
    # detection's object when prompted by detections.
    output_field: ClassVar[str]
    # JSON schema of `to_json`'s value, for the OpenAPI document of a model that has this
    # task. The built-in tasks' fields are declared in service/schemas.py instead.
    output_schema: ClassVar[dict[str, Any]] = {}
    # What `evaluator` reports; `mad tune` maximises the first.
    metrics: ClassVar[tuple[str, ...]]
    # A task prompted by detections that scores its own outputs (`output_score`): the key of
    # that score in each detection's object of a response (None: its detection's score is it).
    score_field: ClassVar[str | None] = None
    # The config fields that shape how this task reads its logits (docs/model.md), each with
    # the values `mad tune --decoding` tries, the reference's first.
    decoding_options: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # The decoding option (a bool config field, also in decoding_options) with which this task
    # decodes each image's mirror image too (None: it never does; `reads_mirror_image`).
    flip_option: ClassVar[str | None] = None
    # The decoding option (a bool config field, also in decoding_options) with which this
    # task reads each detection's zoomed crop (model.zoom); None: it cannot.
    zoom_option: ClassVar[str | None] = None

    def __init__(
        self, config: ModelConfig, vocab: VocabLayout, tokenizer: CaptionTokenizer | None = None
    ):
        self.config = config
        self.vocab = vocab
        self.tokenizer = tokenizer
        self._constraints: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def reserved_tokens(cls, config: ModelConfig) -> int:
        """How many ids of its own the task needs (prompt, values), beyond the shared ranges:
        the vocabulary appends them after the text (`VocabLayout.task_range`)."""
        return 0

    def reserved_range(self) -> tuple[int, int]:
        """[start, stop) of the ids reserved for this task (see `reserved_tokens`)."""
        return self.vocab.task_range(self.name)

    @property
    def metric(self) -> str:
        """The metric `mad tune` maximises."""
        return self.metrics[0]

    # --- sequence format -------------------------------------------------------------------
    @property
    def prompt_len(self) -> int:
        """Tokens of the prompt (a subclass may set it as a class attribute)."""
        raise NotImplementedError

    @property
    def body_len(self) -> int:
        """Tokens of the body (a subclass may set it as a class attribute)."""
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.body_len

    def vocab_slice(self) -> tuple[int, int]:
        """[start, stop) of the shared vocabulary this task's logits cover."""
        raise NotImplementedError

    def body_ranges(self) -> list[tuple[int, int]]:
        """For each body position, the [start, stop) of full-vocabulary ids it may take."""
        raise NotImplementedError

    def constraint(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[body_len, V_slice] additive logit mask: 0 where allowed, NOT_ALLOWED elsewhere;
        kept per device, so a decoder pass does not copy it there."""
        device = torch.device(device)
        if device not in self._constraints:
            start, stop = self.vocab_slice()
            mask = torch.full((self.body_len, stop - start), NOT_ALLOWED)
            for i, (lo, hi) in enumerate(self.body_ranges()):
                mask[i, lo - start : hi - start] = 0.0
            self._constraints[device] = mask.to(device)
        return self._constraints[device]

    def to_local(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> ids local to the slice (what cross-entropy needs)."""
        return tokens - self.vocab_slice()[0]

    def to_global(self, local: torch.Tensor) -> torch.Tensor:
        return local + self.vocab_slice()[0]

    # --- training ---------------------------------------------------------------------------
    def training_sequences(self, targets: list[dict], generator: torch.Generator) -> TrainSequences:
        """Ground truth of a batch of images -> fully and partly masked sequences.

        Each target dict holds normalised canvas coordinates: boxes [N, 4] xyxy, labels [N],
        masks [N, h, w] on the canvas, keypoints [N, K, 3] (x, y, v), captions list[str].
        """
        raise NotImplementedError

    def assign_targets(
        self, log_probs: torch.Tensor, seqs: TrainSequences
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose, per sequence, the candidate target the prediction is closest to.

        log_probs: [S, T, V_slice] of one decoder layer. Returns targets [S, T] (local ids) and
        weights [S, T]. The default is best-of-C by cross-entropy over the weighted tokens.
        """
        targets = self.to_local(seqs.targets).clamp(min=0)  # [S, C, T]
        if targets.shape[1] == 1:
            return targets[:, 0], seqs.weights
        lp = log_probs.unsqueeze(1).expand(-1, targets.shape[1], -1, -1)
        nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [S, C, T]
        cost = (nll * seqs.weights.unsqueeze(1)).sum(-1)
        best = cost.argmin(dim=1)
        chosen = targets[torch.arange(len(best)), best]
        return chosen, seqs.weights

    # --- inference --------------------------------------------------------------------------
    def prompts(self, source: int | torch.Tensor) -> torch.Tensor:
        """[S, prompt_len] prompt tokens for inference. `source`: the batch size, for a task
        with one sequence per image; the detection tokens [S, 5] (box + class) of the
        prompting detections, for a task prompted by detections."""
        raise NotImplementedError

    def _prompt_batch_size(self, source: int | torch.Tensor) -> int:
        """`prompts`' source, for a task with one sequence per image: the batch size."""
        if isinstance(source, torch.Tensor):
            raise TypeError(
                f"{self.name} has one sequence per image: its prompts take the "
                "batch size, not detection tokens"
            )
        return source

    def _prompt_detections(self, source: int | torch.Tensor) -> torch.Tensor:
        """`prompts`' source, for a task prompted by detections: their tokens [S, 5]."""
        if not isinstance(source, torch.Tensor):
            raise TypeError(
                f"{self.name} is prompted by detections: its prompts take their "
                "tokens [S, 5], not a batch size"
            )
        return source

    def applies_to(self, labels: torch.Tensor) -> torch.Tensor:
        """labels [N] of kept detections -> bool [N]: which ones prompt a sequence of this
        task (only asked of tasks prompted by detections). Default: every one."""
        return torch.ones_like(labels, dtype=torch.bool)

    def remask_scores(self, probs: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """probs [S, L, V_slice], confidence [S, L] -> the score that picks which tokens to
        re-mask (the lowest); by default the argmax token's probability."""
        return confidence

    @property
    def candidates(self) -> int:
        """Answers a refinement decodes per sequence, of which it keeps the best
        (model.decoding). Only a task that re-masks random positions gets different ones."""
        return 1

    def scored_positions(self, predicted: torch.Tensor) -> torch.Tensor:
        """predicted [S, L] local ids -> bool [S, L], the positions that score a candidate
        answer (by default all)."""
        return torch.ones_like(predicted, dtype=torch.bool)

    @property
    def reads_mirror_image(self) -> bool:
        """Whether this task also decodes on each image's mirror image (its `flip_option`).
        A task prompted by detections then fuses the two views by `fuse_mirror`; detection
        fuses its own sets of boxes (`fuse_flipped`)."""
        return self.flip_option is not None and bool(getattr(self.config, self.flip_option))

    @property
    def reads_crops(self) -> bool:
        """Whether this task reads each detection's zoomed crop (its `zoom_option`)."""
        return self.zoom_option is not None and bool(getattr(self.config, self.zoom_option))

    def from_mirror(self, probs: torch.Tensor, contexts: list[DecodeContext]) -> torch.Tensor:
        """probs [S, body_len, V_slice] of sequences decoded on the mirror images (prompted
        by the mirrored detections) -> the same beliefs about the images themselves."""
        raise NotImplementedError(f"{self.name} does not read mirror images")

    def fuse_mirror(
        self, logits: torch.Tensor, mirror_logits: torch.Tensor, contexts: list[DecodeContext]
    ) -> torch.Tensor:
        """Two views' logits [S, body_len, V_slice] of the same sequences -> the log of the
        mean of their probabilities (the mirror's read on the image: `from_mirror`), which
        `decode` reads like any logits (flip testing, as pose estimators average heatmaps)."""
        probs = logits.float().softmax(-1)
        mirrored = self.from_mirror(mirror_logits.float().softmax(-1), contexts)
        return ((probs + mirrored) / 2).clamp(min=1e-12).log()

    def decode(
        self,
        logits: torch.Tensor,
        prompts: torch.Tensor | None,
        contexts: list[DecodeContext],
        **kwargs: Any,
    ) -> list[Any]:
        """[S, body_len, V_slice] logits -> one output per sequence. Tasks prompted by
        detections also get `boxes`: the [4] pixel box of each sequence's detection."""
        raise NotImplementedError

    def select(self, output: Any, request: Request) -> Any:
        """One image's decoded output -> the part this request keeps (tasks with one sequence
        per image; detection applies the score threshold and maximum count). Default: all."""
        return output

    def output_score(self, output: Any, detection_score: float) -> float:
        """The score of one output of a task prompted by detections, whose detection scored
        `detection_score`: what COCO evaluation ranks it by. Default: that score."""
        return detection_score

    def output_scores(self, result: Result) -> list[float]:
        """`output_score` of each of a result's detections (its own score where this task
        has no output for it)."""
        scores = result.required_detections().scores.tolist()
        outputs = result.outputs[self.name]
        return [
            s if o is None else self.output_score(o, s)
            for o, s in zip(outputs, scores, strict=True)
        ]

    # --- response and metric ----------------------------------------------------------------
    def to_json(self, output: Any, options: JsonOptions) -> Any:
        """One output (an image's, or one detection's when prompted) -> a JSON-ready value."""
        raise NotImplementedError

    def evaluator(self, truth: GroundTruth) -> TaskEvaluator:
        """A fresh evaluator of this task against the ground truth of a data set; it reports
        `metrics`."""
        raise NotImplementedError

    # --- helpers ----------------------------------------------------------------------------
    def masked_copy(
        self, body: torch.Tensor, ratio: float, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a uniform random `ratio` of each row's body tokens.

        body [S, L] -> (masked body [S, L], masked positions [S, L] bool). At least one token
        is masked so every sequence contributes to the loss.
        """
        scores = torch.rand(body.shape, generator=generator)
        n_mask = max(1, round(ratio * body.shape[1]))
        order = scores.argsort(dim=1)
        masked = torch.zeros_like(body, dtype=torch.bool)
        masked.scatter_(1, order[:, :n_mask], True)
        return torch.where(masked, torch.full_like(body, self.vocab.mask), body), masked

    def fully_and_partly_masked(
        self, prompt: torch.Tensor, body: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt [S, P], body [S, L] -> inputs [2S, T] and weights [2S, T] (full first)."""
        full = torch.full_like(body, self.vocab.mask)
        partial, masked = self.masked_copy(body, self.config.train_mask_ratio, generator)
        inputs = torch.cat([torch.cat([prompt, full], 1), torch.cat([prompt, partial], 1)])
        zeros = torch.zeros_like(prompt, dtype=torch.float)
        weights = torch.cat(
            [
                torch.cat([zeros, torch.ones_like(body, dtype=torch.float)], 1),
                torch.cat([zeros, masked.float()], 1),
            ]
        )
        return inputs, weights

    def fully_or_partly_masked(
        self, prompt: torch.Tensor, body: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Half the cost of fully_and_partly_masked for long bodies: each sequence is fully
        masked with probability 1/2, else partly. prompt [S, P], body [S, L] -> inputs [S, T],
        weights [S, T]."""
        partial, masked = self.masked_copy(body, self.config.train_mask_ratio, generator)
        full = torch.rand(len(body), 1, generator=generator) < 0.5
        body_in = torch.where(full, self.vocab.mask, partial)
        zeros = torch.zeros_like(prompt, dtype=torch.float)
        return torch.cat([prompt, body_in], 1), torch.cat([zeros, (masked | full).float()], 1)


def box_tokens(vocab: VocabLayout, boxes: torch.Tensor) -> torch.Tensor:
    """[N, 4] normalised xyxy -> [N, 4] coordinate tokens."""
    return vocab.quantize(boxes.clamp(0, 1))
