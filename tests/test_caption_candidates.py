"""Caption candidates: several captions refined apart per image, the likeliest kept."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.codecs.caption import CaptionCodec
from model.decoding import (
    VERIFY_GROUPS,
    content_noise,
    masked_decode,
    refine_rows,
    refinement,
)
from model.inference_io import Request
from model.pipeline import Pipeline
from tests.helpers import synthetic_images
from tests.test_refinement import CountingRunner

RATIOS = [0.8, 0.6, 0.4]


def candidate_setup(micro_model, n: int):
    config = dataclasses.replace(micro_model.config, caption_candidates=n)
    codec = CaptionCodec(config, micro_model.vocab, micro_model.tokenizer)
    runner = CountingRunner(micro_model.network)
    torch.manual_seed(1)
    memory = runner.encode(torch.rand(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.bool))
    return runner, memory, codec, codec.prompts(2), torch.tensor([0, 1])


def one_candidate(runner, memory, codec, prompts, index, variant: int) -> torch.Tensor:
    """What candidate `variant` of each sequence decodes to, refined on its own."""
    counts = [round(r * codec.body_len) for r in RATIOS]
    variants = torch.full((len(prompts),), variant)
    loop = refine_rows(runner, memory, codec, prompts, index, counts, False, variants)
    state = next(loop)
    for _ in loop:
        pass
    return state.logits


def read_back(runner, memory, codec, prompts, index, logits) -> torch.Tensor:
    """[S] a candidate's score, computed position group by position group: the mean over
    its words and end token of log p(token) as predicted plus with it masked."""
    predicted = logits.argmax(-1)
    L, P = codec.body_len, prompts.shape[1]
    as_predicted = logits.log_softmax(-1).max(-1).values
    masked_back = torch.zeros(predicted.shape)
    for group in range(VERIFY_GROUPS):
        body = codec.to_global(predicted)
        positions = [i for i in range(L) if i % VERIFY_GROUPS == group]
        body[:, positions] = codec.vocab.mask
        out = runner.decode(memory, torch.cat([prompts, body], 1), index, codec.vocab_slice())
        log_probs = (out[:, P:].float() + codec.constraint()).log_softmax(-1)
        for i in positions:
            masked_back[:, i] = log_probs[torch.arange(len(predicted)), i, predicted[:, i]]
    counted = codec.scored_positions(predicted).float()
    return ((as_predicted + masked_back) * counted).sum(1) / counted.sum(1)


def test_the_scored_positions_are_a_captions_words_and_its_end():
    codec = CaptionCodec.__new__(CaptionCodec)  # scored_positions reads no state
    predicted = torch.tensor([[5, 3, 0, 0, 7], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    assert codec.scored_positions(predicted).tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [True, True, True, True, True],
    ]


def test_a_candidates_random_positions_are_its_own():
    predicted = torch.randint(0, 50, (3, 20))
    assert torch.equal(content_noise(predicted, 2), content_noise(predicted, 2, torch.zeros(3)))
    other = content_noise(predicted, 2, torch.tensor([0, 1, 2]))
    assert torch.equal(other[0], content_noise(predicted, 2)[0])
    assert not torch.equal(other[1], other[0]) and not torch.equal(other[2], other[1])


def test_candidates_keep_the_one_the_model_reads_back_as_likeliest(micro_model):
    n = 3
    runner, memory, codec, prompts, index = candidate_setup(micro_model, n)
    passes = []
    for state in refinement(runner, memory, codec, prompts, index, RATIOS):
        passes.append(state.passes.tolist())
    assert passes == [[1, 1], [2, 2], [3, 3], [5, 5]]
    start = codec.vocab_slice()[0]
    # The first pass, the same for every candidate, runs once per sequence.
    assert runner.decodes == [(start, 2)] + [(start, 2 * n)] * 3 + [(start, 2 * n * VERIFY_GROUPS)]
    candidates = [one_candidate(runner, memory, codec, prompts, index, v) for v in range(n)]
    tokens = [c.argmax(-1) for c in candidates]
    assert any(not torch.equal(tokens[0][s], tokens[v][s]) for v in (1, 2) for s in (0, 1))
    scores = torch.stack(
        [read_back(runner, memory, codec, prompts, index, c) for c in candidates], 1
    )  # [S, n]
    for s, best in enumerate(scores.argmax(1).tolist()):
        torch.testing.assert_close(state.logits[s], candidates[best][s])


def test_a_sequences_candidates_do_not_depend_on_its_batch_mates(micro_model):
    runner, memory, codec, prompts, index = candidate_setup(micro_model, 4)
    both = masked_decode(runner, memory, codec, prompts, index, RATIOS)
    alone = masked_decode(runner, memory, codec, prompts[1:], index[1:], RATIOS)
    torch.testing.assert_close(both[1], alone[0])


def test_a_stopped_sequence_gets_neither_refinement_nor_a_choice(micro_model):
    runner, memory, codec, prompts, index = candidate_setup(micro_model, 3)
    steps = refinement(runner, memory, codec, prompts, index, RATIOS)
    state = next(steps)
    state.stop(torch.tensor([1]))
    kept = state.logits[1].clone()
    runner.decodes.clear()
    for _ in steps:
        pass
    assert state.passes.tolist() == [5, 1]
    assert [rows for _, rows in runner.decodes] == [3] * 3 + [3 * VERIFY_GROUPS]  # one's
    assert torch.equal(state.logits[1], kept)


@pytest.mark.parametrize("early_stop", [False, True])
def test_candidates_and_early_stop_end_with_the_choice(micro_model, early_stop):
    runner, memory, codec, prompts, index = candidate_setup(micro_model, 2)
    ratios = [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.3]
    steps = refinement(runner, memory, codec, prompts, index, ratios, early_stop)
    actives = []
    for state in steps:
        actives.append(state.active.tolist())
    assert actives[-1] == [False, False]
    finished_at = [next(i for i, a in enumerate(actives) if not a[s]) for s in (0, 1)]
    passes = state.passes.tolist()
    assert passes == [f + 2 for f in finished_at]
    if not early_stop:
        assert passes == [len(ratios) + 2] * 2


def test_without_refinement_there_is_one_candidate(micro_model):
    runner, memory, codec, prompts, index = candidate_setup(micro_model, 4)
    logits = masked_decode(runner, memory, codec, prompts, index, [])
    assert runner.decodes == [(codec.vocab_slice()[0], 2)]
    single = dataclasses.replace(codec.config, caption_candidates=1)
    plain = CaptionCodec(single, codec.vocab, codec.tokenizer)
    assert torch.equal(logits, masked_decode(runner, memory, plain, prompts, index, []))


def test_the_pipeline_reports_the_choices_passes(micro_model):
    config = dataclasses.replace(micro_model.config, caption_candidates=2)
    mad = dataclasses.replace(micro_model, config=config)
    mad.codecs = dict(micro_model.codecs)
    mad.codecs["caption"] = CaptionCodec(config, micro_model.vocab, micro_model.tokenizer)
    pipeline = Pipeline(mad, CountingRunner(micro_model.network))
    image = synthetic_images(1)[0]
    result = pipeline([Request(image, ("caption",), {"caption": 3})])[0]
    assert result.passes["caption"] == 5
    assert isinstance(result.caption, str)
