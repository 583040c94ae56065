"""Caption candidates: several captions refined apart per image, the likeliest kept."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mad.bench.workload import BUNDLED_CHECKPOINT
from model.checkpoint import load_checkpoint
from model.codecs.caption import CaptionCodec
from model.decoding import (
    VERIFY_GROUPS,
    content_noise,
    decoder_passes,
    masked_decode,
    refine_rows,
    refinement,
)
from model.inference_io import Request
from model.pipeline import Pipeline
from model.preprocess import prepare_batch
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


def one_candidate(
    runner, memory, codec, prompts, index, variant: int, ratios=RATIOS, early_stop=False
):
    """What candidate `variant` of each sequence decodes to, refined on its own. -> the final
    Decoding."""
    counts = [round(r * codec.body_len) for r in ratios]
    variants = torch.full((len(prompts),), variant)
    loop = refine_rows(runner, memory, codec, prompts, index, counts, early_stop, variants)
    state = next(loop)
    for _ in loop:
        pass
    return state


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
    assert decoder_passes(codec, RATIOS) == 5 and decoder_passes(codec, []) == 1
    start = codec.vocab_slice()[0]
    # The first pass, the same for every candidate, runs once per sequence.
    assert runner.decodes == [(start, 2)] + [(start, 2 * n)] * 3 + [(start, 2 * n * VERIFY_GROUPS)]
    candidates = [one_candidate(runner, memory, codec, prompts, index, v).logits for v in range(n)]
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


def test_a_sequence_stopped_mid_loop_keeps_the_likeliest_so_far(micro_model):
    runner, memory, codec, prompts, index = candidate_setup(micro_model, 3)
    steps = refinement(runner, memory, codec, prompts, index, RATIOS)
    next(steps)
    state = next(steps)  # after the first step
    state.stop(torch.tensor([0]))
    kept = state.logits[0].clone()
    for _ in steps:
        pass
    assert state.passes.tolist() == [2, 5] and torch.equal(state.logits[0], kept)


@pytest.mark.skipif(
    not (BUNDLED_CHECKPOINT / "config.json").is_file(), reason="no bundled checkpoint"
)
def test_early_stopped_candidates_end_when_the_last_one_does():
    """On the bundled model a caption's candidates settle after different steps: the sequence
    refines until its last one has, then chooses among them as they stand."""
    mad, _ = load_checkpoint(BUNDLED_CHECKPOINT)
    config = dataclasses.replace(mad.config, caption_candidates=4)
    codec = CaptionCodec(config, mad.vocab, mad.tokenizer)
    runner = CountingRunner(mad.network)
    batch = prepare_batch(synthetic_images(3, seed=5), mad.config.image_size)
    memory = runner.encode(batch.images, batch.pad_mask)
    prompts, index = codec.prompts(3), torch.arange(3)
    ratios = mad.config.schedules["caption"]
    steps = refinement(runner, memory, codec, prompts, index, ratios, early_stop=True)
    state = next(steps)  # the same Decoding after every pass
    for _ in steps:
        pass
    alone = [
        one_candidate(runner, memory, codec, prompts, index, v, ratios, early_stop=True)
        for v in range(4)
    ]
    own_passes = torch.stack([c.passes for c in alone], 1)  # [3, 4]
    assert len(set(own_passes.flatten().tolist())) > 1  # they settle after different steps
    assert state.passes.tolist() == (own_passes.max(1).values + 1).tolist()
    for s in range(3):
        # One of its candidates' answers (as tokens, and logits up to the float noise of
        # another batch size).
        assert any(
            torch.equal(state.logits[s].argmax(-1), c.logits[s].argmax(-1))
            and torch.allclose(state.logits[s], c.logits[s], atol=1e-4)
            for c in alone
        )


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
    runner = CountingRunner(micro_model.network)
    image = synthetic_images(1)[0]
    result = Pipeline(mad, runner)([Request(image, ("caption",), {"caption": 3})])[0]
    assert result.passes["caption"] == 5
    # The caption is the candidates' choice, as refinement makes it on the same image.
    batch = prepare_batch([image], config.image_size)
    memory = runner.encode(batch.images, batch.pad_mask)
    codec = mad.codecs["caption"]
    ratios = [0.8, 0.6, 0.4]  # the micro model's three caption steps
    assert config.schedules["caption"] == ratios
    logits = masked_decode(runner, memory, codec, codec.prompts(1), torch.tensor([0]), ratios)
    assert result.caption == codec.decode(logits, None, [None])[0]
