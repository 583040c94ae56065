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
from typing import Any, Generic, Protocol, TypeVar

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


def content_noise(
    predicted: torch.Tensor, step: int, variant: torch.Tensor | None = None
) -> torch.Tensor:
    """predicted [S, L] token ids -> [S, L] scores in [0, 1) for random re-masking; variant
    [S]: each row's candidate number (`refinement`; 0, the default, for every row).

    Each row's noise is a hash of its own current prediction, the positions and the step:
    the same image always gets the same positions (the same request, the same answer), an
    answer never depends on its batch mates, different images get different positions (one
    pattern shared by every image scored caption BLEU-4 0.212 on the bundled model's validation
    images, per-image patterns 0.262; see docs/model-card.md), and nothing leaves the
    device. REFINE_SEED offsets the hash, a row's variant its row's."""
    position = torch.arange(predicted.shape[1], device=predicted.device)
    tokens = mix(predicted.long() + position * 0x9E3779B9 + REFINE_SEED) >> 8  # sum fits
    rows = tokens.sum(1, keepdim=True)
    if variant is not None:
        rows = rows + variant.long().unsqueeze(1) * 0x2545F4914F6CDD1D
    row = mix(rows & HASH_BITS)
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
    argmax of every position). The loop ends with the schedule or when none is active.

    A codec with several `candidates` (one that re-masks random positions) refines that many
    answers per sequence, each re-masking its own positions. The Decoding shows the likeliest
    so far (`best_candidates`); once a sequence's candidates are done, one more pass reads
    them back (`CandidateCheck`) and the one whose tokens score highest, as predicted and as
    predicted with them masked, is kept: a likely answer the model also reads back as likely."""
    counts = [c for c in (remask_count(r, codec.body_len) for r in ratios) if c > 0]
    n = candidate_count(codec) if counts else 1  # unrefined candidates would all be the same
    loop = refine_rows(
        runner,
        memory,
        codec,
        prompts.repeat_interleave(n, 0),
        image_index.repeat_interleave(n, 0),
        counts,
        early_stop,
        torch.arange(n, device=prompts.device).repeat(len(prompts)),
        copies=n,
    )
    if n == 1:
        yield from loop
        return
    each = next(loop)  # one Decoding over every candidate of every sequence, updated in place
    S = len(prompts)
    state = Decoding(
        best_candidates(codec, each.logits, n), each.passes[::n].clone(), each.active[::n].clone()
    )
    check = CandidateCheck(runner, memory, codec, prompts, image_index, n)
    yield state
    each.active &= state.active.repeat_interleave(n)  # the caller's stops
    for _ in loop:
        refining = state.active.nonzero().flatten()  # a chosen sequence keeps its choice
        on_device = refining.to(state.logits.device)
        rows = candidate_rows(on_device, n)
        state.logits[on_device] = best_candidates(codec, each.logits[rows], n)
        state.passes[refining] = each.passes.view(S, n)[refining].max(1).values
        done = refining[~each.active.view(S, n)[refining].any(1)]
        state.active[done] = False
        if len(done):
            check.choose(state, each.logits, done)
        yield state
        each.active &= state.active.repeat_interleave(n)


def decode_bodies(
    runner: Runner[Memory],
    memory: Memory,
    codec: TaskCodec,
    prompts: torch.Tensor,
    image_index: torch.Tensor,
    body: torch.Tensor,
) -> torch.Tensor:
    """prompts [s, P] and bodies [s, L] of images image_index [s] -> the bodies' logits
    [s, L, V_slice], each position restricted to the ids it may take."""
    tokens = torch.cat([prompts, body], 1)
    logits = runner.decode(memory, tokens, image_index, codec.vocab_slice())
    return logits[:, prompts.shape[1] :].float() + codec.constraint(body.device)


def refine_rows(
    runner: Runner[Memory],
    memory: Memory,
    codec: TaskCodec,
    prompts: torch.Tensor,
    image_index: torch.Tensor,
    counts: list[int],
    early_stop: bool,
    variant: torch.Tensor,
    copies: int = 1,
) -> Iterator[Decoding]:
    """The refinement loop over rows: `refinement` with each step's re-mask counts, and each
    row's candidate number `variant` [S] (its random re-masking's offset). Rows come in runs
    of `copies` of one sequence, whose first pass (all masked) is the same: it runs once."""
    L = codec.body_len
    device = prompts.device
    mask_id = codec.vocab.mask

    def run(rows: torch.Tensor | None, body: torch.Tensor) -> torch.Tensor:
        """Decode `body` [s, L] of the sequences `rows` (None: all)."""
        if rows is None:
            return decode_bodies(runner, memory, codec, prompts, image_index, body)
        return decode_bodies(runner, memory, codec, prompts[rows], image_index[rows], body)

    S = len(prompts)
    firsts = None if copies == 1 else torch.arange(0, S, copies, device=device)
    first = run(firsts, torch.full((S // copies, L), mask_id, device=device))
    state = Decoding(
        first.repeat_interleave(copies, 0),
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
            offset = variant if on_device is None else variant[on_device]
            scores = content_noise(predicted, step, offset)
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


# --- candidates -----------------------------------------------------------------------------
def candidate_count(codec: TaskCodec) -> int:
    """Answers `refinement` decodes per sequence of this codec: its `candidates` where it
    re-masks random positions (confidence-ordered re-masking would make them all the same)."""
    return codec.candidates if codec.random_remask else 1


def closing_passes(codec: TaskCodec) -> int:
    """Decoder passes a refined sequence of this codec takes after its last step: the choice
    among its candidates, if it has several."""
    return int(candidate_count(codec) > 1)


def decoder_passes(codec: TaskCodec, ratios: list[float]) -> int:
    """Decoder passes `refinement` makes for a sequence of this codec under this schedule,
    without early stop: the first, one per step that re-masks any token, and the closing."""
    steps = sum(remask_count(r, codec.body_len) > 0 for r in ratios)
    return 1 + steps + (closing_passes(codec) if steps else 0)


def candidate_rows(sequences: torch.Tensor, n: int) -> torch.Tensor:
    """sequences [D] -> [D * n] the rows of their n candidates each (sequence s's: s * n ...)."""
    return (sequences.unsqueeze(1) * n + torch.arange(n, device=sequences.device)).flatten()


def best_rows(scores: torch.Tensor, n: int) -> torch.Tensor:
    """scores [D * n] of n candidates per sequence -> [D] the row of each one's best."""
    by_sequence = scores.view(-1, n)
    return by_sequence.argmax(1) + torch.arange(len(by_sequence), device=scores.device) * n


def scored_mean(codec: TaskCodec, values: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """values [R, L] -> [R] their mean over the codec's scored positions of `predicted`."""
    counted = codec.scored_positions(predicted)
    return (values * counted).sum(1) / counted.sum(1).clamp(min=1)


def candidate_likelihood(codec: TaskCodec, logits: torch.Tensor) -> torch.Tensor:
    """logits [R, L, V] -> [R] the mean log-probability of each row's predicted tokens at
    the codec's scored positions."""
    top, predicted = logits.log_softmax(-1).max(-1)
    return scored_mean(codec, top, predicted)


def best_candidates(codec: TaskCodec, logits: torch.Tensor, n: int) -> torch.Tensor:
    """logits [S * n, L, V] of n candidates per sequence -> [S, L, V] the likeliest's."""
    return logits[best_rows(candidate_likelihood(codec, logits), n)]


# The read-back's groups: each position is masked in one of them, all read in one pass (2
# chose as well as 4 on the tuning images, for half the work).
VERIFY_GROUPS = 2


class CandidateCheck(Generic[Memory]):
    """The final choice among a sequence's candidates (`refinement`)."""

    def __init__(
        self,
        runner: Runner[Memory],
        memory: Memory,
        codec: TaskCodec,
        prompts: torch.Tensor,
        image_index: torch.Tensor,
        n: int,
    ) -> None:
        self.runner, self.memory, self.codec = runner, memory, codec
        self.prompts, self.image_index, self.n = prompts, image_index, n

    def choose(self, state: Decoding, candidates: torch.Tensor, done: torch.Tensor) -> None:
        """Set state.logits of the sequences `done` (indices [D], host) to their best
        candidate's of `candidates` [S * n, L, V]: the highest sum of the mean log-probability
        of its tokens as predicted and read back (`read_back`). One more pass each."""
        n, codec = self.n, self.codec
        sequences = done.to(candidates.device)
        logits = candidates[candidate_rows(sequences, n)]
        predicted = logits.argmax(-1)
        read = self.read_back(sequences.repeat_interleave(n), predicted)
        score = candidate_likelihood(codec, logits) + scored_mean(codec, read, predicted)
        state.logits[sequences] = logits[best_rows(score, n)]
        state.passes[done] += 1

    def read_back(self, sequences: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """predicted [R, L] local ids of the sequences `sequences` [R] -> [R, L] the
        log-probability of each token with it (and every VERIFY_GROUPS-th position from it)
        masked: a pseudo-log-likelihood, as masked language models are scored. One decoder
        pass of R x VERIFY_GROUPS rows, each masking its own group of positions."""
        codec, (R, L), G = self.codec, predicted.shape, VERIFY_GROUPS
        position = torch.arange(L, device=predicted.device)
        masked = position % G == torch.arange(G, device=predicted.device).unsqueeze(1)
        masked = masked.repeat(R, 1)  # [R * G, L]: row r * G + g masks group g
        body = torch.where(
            masked, codec.vocab.mask, codec.to_global(predicted).repeat_interleave(G, 0)
        )
        logits = decode_bodies(
            self.runner,
            self.memory,
            codec,
            self.prompts[sequences].repeat_interleave(G, 0),
            self.image_index[sequences].repeat_interleave(G, 0),
            body,
        )
        tokens = predicted.repeat_interleave(G, 0).unsqueeze(-1)
        read = logits.log_softmax(-1).gather(-1, tokens)[..., 0]
        return (read * masked).view(R, G, L).sum(1)  # each position is masked in one group


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
