"""Training options the reference sets differently, for ablations: the no-object weight (the
reference: 1.0, counted in the loss normaliser) and two masked copies per segmentation
instance (the reference: a fully and a partly masked one)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mad.cli import parse_overrides
from model.checkpoint import MAD
from model.codecs.detection import TOKENS_PER_SLOT
from model.config import get_preset
from model.losses import sequence_loss
from model.matcher import match_slots
from tests.helpers import micro_config


def detection_targets() -> list[dict]:
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6]])
    return [
        {"boxes": boxes, "labels": torch.tensor([1, 2])},
        {"boxes": boxes[:1], "labels": torch.tensor([0])},
    ]


@pytest.mark.parametrize("no_object_weight", [0.1, 1.0])
def test_no_object_weight_enters_the_loss_normaliser(tokenizer, no_object_weight):
    """Per masked token: 1 for every token of a matched slot, `no_object_weight` for the class
    token of an unmatched one, 0 for its coordinates; the loss divides by their sum. At 1.0
    that is the reference's target weight and loss normaliser."""
    torch.manual_seed(0)
    mad = MAD.build(micro_config(no_object_weight=no_object_weight), tokenizer)
    codec, slots, prompt = (
        mad.codecs["detection"],
        mad.config.num_slots,
        mad.codecs["detection"].prompt_len,
    )
    seqs = codec.training_sequences(detection_targets(), torch.Generator().manual_seed(0))
    start, stop = codec.vocab_slice()
    logits = torch.randn(1, len(seqs), seqs.inputs.shape[1], stop - start)
    log_probs = logits[0].log_softmax(-1)
    targets, weights = codec.assign_targets(log_probs, seqs)
    masked = seqs.weights[:, prompt:].reshape(len(seqs), slots, TOKENS_PER_SLOT) > 0
    body = weights[:, prompt:].reshape(len(seqs), slots, TOKENS_PER_SLOT)
    matched = targets[:, prompt:].reshape(len(seqs), slots, TOKENS_PER_SLOT)[
        ..., 4
    ] != codec.to_local(torch.tensor(mad.vocab.no_object))
    expected = torch.zeros_like(body)
    expected[..., 4] = no_object_weight
    expected[matched] = 1.0
    assert torch.equal(body, expected * masked)
    assert int(matched.sum()) == 2 * 3  # both copies of both images' objects
    assert (weights[:, :prompt] == 0).all()
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    loss = sequence_loss(logits, seqs, codec)
    assert loss.item() == pytest.approx(((nll * weights).sum() / weights.sum()).item(), rel=1e-5)


def segmentation_targets() -> list[dict]:
    masks = torch.zeros(3, 96, 96, dtype=torch.bool)
    masks[0, 10:40, 10:50] = masks[1, 50:90, 20:60] = masks[2, 5:30, 60:90] = True
    boxes = torch.tensor([[10, 10, 50, 40], [20, 50, 60, 90], [60, 5, 90, 30]]) / 96
    return [
        {"boxes": boxes[:2], "labels": torch.tensor([1, 2]), "masks": masks[:2]},
        {"boxes": boxes[2:], "labels": torch.tensor([3]), "masks": masks[2:]},
    ]


def test_segmentation_trains_one_or_two_masked_copies(tokenizer):
    body = 16 * 16
    partly = round(0.7 * body)
    for copies in (1, 2):
        mad = MAD.build(micro_config(segmentation_masked_copies=copies), tokenizer)
        codec = mad.codecs["segmentation"]
        seqs = codec.training_sequences(segmentation_targets(), torch.Generator().manual_seed(0))
        counts = seqs.weights[:, codec.prompt_len :].sum(1).tolist()
        assert len(seqs) == 3 * copies and seqs.targets.shape == (3 * copies, 1, codec.seq_len)
        if copies == 2:  # the reference's: each instance fully and partly (0.7) masked
            assert counts == [body] * 3 + [partly] * 3
            assert seqs.image_index.tolist() == [0, 0, 1, 0, 0, 1]
            assert torch.equal(seqs.targets[:3], seqs.targets[3:])
            assert (seqs.inputs[:3, codec.prompt_len :] == mad.vocab.mask).all()
        else:  # today's: one copy each, fully or partly masked at even odds
            assert set(counts) <= {body, partly} and seqs.image_index.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="segmentation_masked_copies"):
        micro_config(segmentation_masked_copies=3)


def test_both_are_set_from_the_command_line():
    sets = parse_overrides(["no_object_weight=1.0", "segmentation_masked_copies=2"])
    config = get_preset("r50", **sets)
    assert (config.no_object_weight, config.segmentation_masked_copies) == (1.0, 2)
    defaults = get_preset("r50")  # the presets keep today's choices
    assert (defaults.no_object_weight, defaults.segmentation_masked_copies) == (0.1, 1)
    assert dataclasses.replace(defaults, **sets).to_dict()["segmentation_masked_copies"] == 2


def test_detection_targets_are_each_sequence_matched_objects(tokenizer):
    """assign_targets writes all sequences' matched objects in one indexing op: the same
    targets as writing match_slots' pairs one by one."""
    torch.manual_seed(0)
    mad = MAD.build(micro_config(), tokenizer)
    codec, slots = mad.codecs["detection"], mad.config.num_slots
    prompt = codec.prompt_len
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    targets_in = [*detection_targets(), empty]
    seqs = codec.training_sequences(targets_in, torch.Generator().manual_seed(0))
    start, stop = codec.vocab_slice()
    log_probs = torch.randn(len(seqs), seqs.inputs.shape[1], stop - start).log_softmax(-1)
    targets, _ = codec.assign_targets(log_probs, seqs)

    body_lp = log_probs[:, prompt:].reshape(len(seqs), slots, TOKENS_PER_SLOT, -1)
    inputs = seqs.inputs[:, prompt:].reshape(len(seqs), slots, TOKENS_PER_SLOT)
    shown = seqs.weights[:, prompt:].reshape(len(seqs), slots, TOKENS_PER_SLOT) == 0
    objects = codec.to_local(seqs.extra["objects"]).clamp(min=0)
    pairs = match_slots(body_lp, codec.to_local(inputs), shown, objects, seqs.extra["num_objects"])
    expected = torch.full((len(seqs), slots, TOKENS_PER_SLOT), 0, dtype=torch.long)
    expected[..., 4] = codec.to_local(torch.tensor(mad.vocab.no_object))
    for s, slot, obj in zip(*(p.tolist() for p in pairs), strict=True):
        expected[s, slot] = objects[s, obj]
    got = targets[:, prompt:].reshape(len(seqs), slots, TOKENS_PER_SLOT)
    assert len(pairs[0]) == 2 * 3  # both copies of the two images' objects
    assert torch.equal(got, expected)  # unmatched: "no object", coordinates any (0)
