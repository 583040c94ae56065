"""Masked decoding: one parallel pass, then K refinement steps.

Step 0 decodes the fully masked body. Step k re-masks the r_k * L least confident tokens
(random positions for captions: a hash of the sequence's own prediction), decodes again, and
averages the new logits of re-masked positions with the previous ones; shown positions keep
theirs.

`refinement` is the loop, as an iterator that yields the logits after every pass, so a caller
can show each improvement, stop sequences whose caller went away (`Decoding.stop`), or let a
sequence stop when a step changes none of its tokens (early stop). `masked_decode` runs it to
the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from model.codecs import TaskCodec

REFINE_SEED = 0  # random re-masking is seeded: the same request gives the same answer

# What a runner's encode returns and its decode takes back, opaque to decoding: ImageMemory
# (eager PyTorch), OnnxMemory (ONNX Runtime), a dict of tensors (TensorRT).
Memory = TypeVar("Memory")


class Runner(Protocol[Memory]):
    """What decoding needs from a backend (eager PyTorch, ONNX Runtime, TensorRT, OpenVINO).
    A runner may also say `host_threads`: the torch threads the pipeline's work between its
    calls should get (model.pipeline.torch_threads)."""

    name: str  # "torch", "onnx", "tensorrt", "openvino"
    device: torch.device  # where prompts, tokens and logits live

    def encode(self, images: torch.Tensor, pad_mask: torch.Tensor) -> Memory:
        """images [B, 3, H, W] float, pad_mask [B, H, W] bool -> the encoded batch."""
        ...

    def decode(
        self,
        memory: Memory,
        tokens: torch.Tensor,
        image_index: torch.Tensor,
        vocab_slice: tuple[int, int],
    ) -> torch.Tensor:
        """tokens [S, T] of images image_index [S] -> float logits [S, T, V_slice]."""
        ...

    def describe(self) -> dict[str, Any]:
        """backend, device, precision and what else identifies the runtime."""
        ...


def mask_schedule(steps: int, default: list[float]) -> list[float]:
    """The mask ratios of `steps` refinement steps. The checkpoint's default schedule when it
    has that many steps, else a linear ramp between its first and last ratio (0.7 -> 0.3 for a
    task whose default is no refinement)."""
    if steps <= 0:
        return []
    if len(default) == steps:
        return list(default)
    first, last = (default[0], default[-1]) if default else (0.7, 0.3)
    if steps == 1:
        return [first]
    return [first + (last - first) * i / (steps - 1) for i in range(steps)]


def remask_count(ratio: float, length: int) -> int:
    """Tokens a step with this mask ratio re-masks (a step re-masking none is skipped)."""
    return round(ratio * length)


def decoder_passes(ratios: list[float], length: int) -> int:
    """Decoder passes masked_decode makes for this schedule: one, plus each real step."""
    return 1 + sum(remask_count(r, length) > 0 for r in ratios)


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[S, L] -> bool [S, L], True at each row's `count` lowest scores."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    return chosen.scatter_(1, scores.argsort(dim=1)[:, :count], True)


HASH_BITS = (1 << 62) - 1  # hashes stay non-negative int64


def mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps), kept to 62 bits."""
    x = (x ^ (x >> 31)) & HASH_BITS
    x = (x * 0x5851F42D4C957F2D) & HASH_BITS
    x = (x ^ (x >> 29)) & HASH_BITS
    x = (x * 0x14057B7EF767814F) & HASH_BITS
    return (x ^ (x >> 32)) & HASH_BITS


def content_noise(predicted: torch.Tensor, step: int) -> torch.Tensor:
    """predicted [S, L] token ids -> [S, L] scores in [0, 1) for random re-masking.

    Each row's noise is a hash of its own current prediction, the positions and the step:
    the same image always gets the same positions (the same request, the same answer), an
    answer never depends on its batch mates, different images get different positions (one
    pattern shared by every image scored caption BLEU-4 0.212 on the bundled model's validation
    images, per-image patterns 0.262; see docs/model-card.md), and nothing leaves the
    device. REFINE_SEED offsets the hash."""
    position = torch.arange(predicted.shape[1], device=predicted.device)
    tokens = mix(predicted.long() + position * 0x9E3779B9 + REFINE_SEED) >> 8  # sum fits
    row = mix(tokens.sum(1, keepdim=True) & HASH_BITS)
    x = mix(row + (step + 1) * 0x632BE59B + position * 0x85EBCA6B)
    return (x >> 38).float() / float(1 << 24)


@dataclass
class Decoding:
    """The state of a refinement loop between passes.

    logits: [S, L, V_slice] each sequence's current body logits (a stopped sequence keeps its
            last ones); passes: [S] decoder passes each sequence has had; active: [S] bool,
            the sequences a next step will refine (all False after the schedule's last step;
            passes and active live on the host).
    """

    logits: torch.Tensor
    passes: torch.Tensor
    active: torch.Tensor

    @torch.inference_mode()
    def stop(self, rows: torch.Tensor) -> None:
        """No further passes for these sequences (indices or a bool mask [S], on the host)."""
        self.active[rows] = False


@torch.inference_mode()
def refinement(
    runner: Runner[Memory],
    memory: Memory,
    codec: TaskCodec,
    prompts: torch.Tensor,
    image_index: torch.Tensor,
    ratios: list[float],
    early_stop: bool = False,
) -> Iterator[Decoding]:
    """prompts [S, P] of images image_index [S] -> the Decoding after the first pass, then
    after each of the len(ratios) refinement steps (one Decoding, updated in place). Each
    position's logits are restricted to the ids it may take. A step decodes only the active
    sequences; with early_stop a sequence stops once a step changed none of its tokens (the
    argmax of every position). The loop ends with the schedule or when none is active."""
    P, L = prompts.shape[1], codec.body_len
    device = prompts.device
    constraint = codec.constraint().to(device)
    mask_id = codec.vocab.mask

    def run(rows: torch.Tensor | None, body: torch.Tensor) -> torch.Tensor:
        """Decode `body` [s, L] of the sequences `rows` (None: all)."""
        chosen, index = (
            (prompts, image_index) if rows is None else (prompts[rows], image_index[rows])
        )
        logits = runner.decode(memory, torch.cat([chosen, body], 1), index, codec.vocab_slice())
        return logits[:, P:].float() + constraint

    counts = [c for c in (remask_count(r, L) for r in ratios) if c > 0]
    S = len(prompts)
    state = Decoding(
        run(None, torch.full((S, L), mask_id, device=device)),
        torch.ones(S, dtype=torch.long),
        torch.full((S,), bool(counts)),
    )
    yield state
    for step, count in enumerate(counts):
        if not state.active.any():  # the caller stopped them all, or they stopped early
            return
        # Every sequence (the usual case) without gathering; else only the active ones.
        rows = None if state.active.all() else state.active.nonzero().flatten()
        on_device = None if rows is None else rows.to(device)
        logits = state.logits if on_device is None else state.logits[on_device]
        probs = logits.softmax(-1)
        confidence, predicted = probs.max(-1)
        if codec.random_remask:
            scores = content_noise(predicted, step)
        else:
            scores = codec.remask_scores(probs, confidence)
        remask = lowest(scores, count)
        body = torch.where(remask, mask_id, codec.to_global(predicted))
        logits = torch.where(remask.unsqueeze(-1), (logits + run(on_device, body)) / 2, logits)
        if on_device is None:
            state.logits = logits
            state.passes += 1
        else:
            state.logits[on_device] = logits
            state.passes[rows] += 1
        if step == len(counts) - 1:
            state.active[:] = False
        elif early_stop:
            unchanged = (logits.argmax(-1) == predicted).all(1).cpu()
            state.stop(unchanged if rows is None else rows[unchanged])
        yield state


def masked_decode(
    runner: Runner[Memory],
    memory: Memory,
    codec: TaskCodec,
    prompts: torch.Tensor,
    image_index: torch.Tensor,
    ratios: list[float],
) -> torch.Tensor:
    """prompts [S, P] of images image_index [S] -> body logits [S, L, V_slice] after
    len(ratios) refinement steps; each position's logits restricted to the ids it may take."""
    steps = refinement(runner, memory, codec, prompts, image_index, ratios)
    state = next(steps)  # the same Decoding after every pass
    for _ in steps:
        pass
    return state.logits
