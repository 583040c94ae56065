"""Codec round trips: targets -> tokens -> (one-hot) logits -> results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.codecs import DecodeContext, build_codecs
from model.codecs.detection import TOKENS_PER_SLOT
from model.mask_formats import BoxMask, encode_rle, mask_to_polygons
from model.vocab import VocabLayout
from tests.helpers import TINY_CAPTIONS, micro_config

SETTINGS = settings(max_examples=40, deadline=None)


def one_hot_logits(codec, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary body tokens [S, L] -> logits [S, L, V_slice] that pick exactly them."""
    start, stop = codec.vocab_slice()
    logits = torch.full((*tokens.shape, stop - start), -10.0)
    logits.scatter_(-1, codec.to_local(tokens).unsqueeze(-1), 10.0)
    return logits + codec.constraint()


def canvas_context(config) -> DecodeContext:
    return DecodeContext(config.image_size, 1.0, config.image_size)


boxes_strategy = st.lists(
    st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4, st.integers(0, 5)),
    min_size=1,
    max_size=6,
)


@SETTINGS
@given(objects=boxes_strategy)
def test_detection_round_trip_within_one_bin(micro_model, objects):
    codec, config = micro_model.codecs["detection"], micro_model.config
    boxes = torch.tensor(
        [[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d, _ in objects]
    )
    labels = torch.tensor([label for *_, label in objects])
    tokens = codec.object_tokens({"boxes": boxes, "labels": labels})
    body = torch.full((config.num_slots, TOKENS_PER_SLOT), micro_model.vocab.coord_start)
    body[:, 4] = micro_model.vocab.no_object
    body[: len(tokens)] = tokens[: config.num_slots]
    [dets] = codec.decode(
        one_hot_logits(codec, body.flatten()[None]), None, [canvas_context(config)]
    )
    n = min(len(tokens), config.num_slots)
    # Boxes without area are dropped: the empty slots' (every coordinate in bin 0) and those
    # of objects thinner than a bin.
    has_area = (tokens[:n, 2] > tokens[:n, 0]) & (tokens[:n, 3] > tokens[:n, 1])
    assert len(dets) == int(has_area.sum()) and (dets.scores > 0.99).all()
    # Same objects back: each original box within one bin of a decoded one of its class.
    bin_px = config.image_size[0] / config.num_bins
    for box, label in zip(boxes[:n][has_area], labels[:n][has_area], strict=True):
        pixels = box * torch.tensor(config.image_size * 2)
        close = ((dets.boxes - pixels).abs().max(1).values <= bin_px) & (dets.labels == label)
        assert close.any()


@SETTINGS
@given(bits=st.lists(st.booleans(), min_size=256, max_size=256))
def test_segmentation_round_trip_exact_at_16x16(micro_model, bits):
    codec = micro_model.codecs["segmentation"]
    mask = torch.tensor(bits).reshape(1, 16, 16)
    tokens = codec.mask_tokens(mask)
    probs = codec.mask_probabilities(one_hot_logits(codec, tokens))
    assert torch.equal(probs >= 0.5, mask)


def test_a_box_mask_encodes_as_its_full_size_mask_does():
    """RLE from the box's column strip and polygons from the crop equal those of the whole
    image's mask: boxes at the edges, empty, full, one pixel wide or tall."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        height, width = (int(v) for v in rng.integers(1, 24, 2))
        h, w = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        crop = torch.from_numpy(rng.random((h, w)) < rng.random())
        mask = BoxMask(crop, top, left, (height, width))
        assert encode_rle(mask) == encode_rle(mask.full())
        assert mask_to_polygons(mask) == mask_to_polygons(mask.full())


def test_segmentation_paste_fills_its_box(micro_model):
    codec = micro_model.codecs["segmentation"]
    tokens = codec.mask_tokens(torch.ones(1, 16, 16, dtype=torch.bool))
    [mask] = codec.decode(
        one_hot_logits(codec, tokens),
        None,
        [DecodeContext((96, 96), 1.0, (60, 80))],
        boxes=[torch.tensor([10.0, 20.0, 30.5, 50.0])],
    )
    full = mask.full()
    assert full.shape == (60, 80)
    ys, xs = full.nonzero(as_tuple=True)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 30, 20, 49)


@SETTINGS
@given(
    points=st.lists(
        st.tuples(st.floats(0, 1), st.floats(0, 1), st.booleans()), min_size=17, max_size=17
    )
)
def test_keypoints_round_trip_within_one_bin(micro_model, points):
    codec, vocab, config = micro_model.codecs["keypoints"], micro_model.vocab, micro_model.config
    xy = torch.tensor([[x, y] for x, y, _ in points])
    visible = torch.tensor([v for *_, v in points])
    coords = vocab.quantize(xy)
    vis = torch.where(visible, vocab.visible, vocab.invisible)
    body = torch.cat([coords, vis[:, None]], 1).flatten()[None]
    [kp] = codec.decode(one_hot_logits(codec, body), None, [canvas_context(config)])
    bin_px = config.image_size[0] / config.num_bins
    assert kp.shape == (17, 3)
    assert ((kp[:, :2] - xy * config.image_size[0]).abs() <= bin_px).all()
    assert torch.equal(kp[:, 2] > 0.5, visible)


words = sorted({w for caption in TINY_CAPTIONS for w in caption.split()})


@SETTINGS
@given(sentence=st.lists(st.sampled_from(words), min_size=1, max_size=12).map(" ".join))
def test_caption_round_trip_exact_through_tokenizer(micro_model, sentence):
    codec = micro_model.codecs["caption"]
    tokens = codec.encode_text(sentence)[None]
    [text] = codec.decode(one_hot_logits(codec, tokens), None, [])
    assert text == sentence


def test_each_task_slice_holds_exactly_its_ids(micro_model):
    v, codecs = micro_model.vocab, micro_model.codecs
    ids = lambda task: set(range(*codecs[task].vocab_slice()))  # noqa: E731
    coords = set(range(v.coord_start, v.coord_stop))
    classes = set(range(v.class_start, v.no_object + 1))
    assert ids("detection") == classes | coords
    assert ids("keypoints") == coords | {v.visible, v.invisible}
    assert ids("segmentation") == {v.foreground, v.background}
    assert ids("caption") == set(range(v.text_start, v.size))
    assert v.size == v.text_start + micro_model.tokenizer.vocab_size
    specials = set(range(v.class_start))  # prompts and <mask> are never predicted
    assert not specials & set().union(*(ids(t) for t in codecs))


def test_fully_or_partly_masked_weights_exactly_the_masked_tokens(micro_model):
    codec = micro_model.codecs["segmentation"]
    body = torch.full((400, 30), micro_model.vocab.foreground)
    prompt = torch.zeros(400, 2, dtype=torch.long)
    inputs, weights = codec.fully_or_partly_masked(prompt, body, torch.Generator().manual_seed(0))
    assert inputs.shape == weights.shape == (400, 32)
    assert (weights[:, :2] == 0).all()
    masked = inputs[:, 2:] == micro_model.vocab.mask
    assert torch.equal(masked, weights[:, 2:] > 0)
    full = masked.all(1)
    assert 0.35 < full.float().mean() < 0.65  # about half fully masked ...
    ratio = masked[~full].float().mean(1)  # ... the rest at the training mask ratio
    assert torch.allclose(ratio, torch.full_like(ratio, round(0.7 * 30) / 30))


def test_unmatched_slots_weigh_no_object_weight(micro_model):
    codec = micro_model.codecs["detection"]
    target = {"boxes": torch.tensor([[0.1, 0.1, 0.4, 0.5]]), "labels": torch.tensor([2])}
    seqs = codec.training_sequences([target], torch.Generator().manual_seed(0))
    start, stop = codec.vocab_slice()
    log_probs = torch.full((len(seqs), seqs.inputs.shape[1], stop - start), -1.0).log_softmax(-1)
    _, weights = codec.assign_targets(log_probs, seqs)
    full = weights[0, codec.prompt_len :].reshape(-1, TOKENS_PER_SLOT)  # fully masked copy
    class_weights = full[:, 4].sort().values
    assert torch.allclose(class_weights[:-1], torch.tensor(micro_model.config.no_object_weight))
    assert class_weights[-1] == 1.0 and (full[:, :4].sum(1) > 0).sum() == 1


def test_a_task_prompted_by_detections_must_come_after_detection():
    config = micro_config(tasks=["segmentation", "detection"])
    with pytest.raises(ValueError, match="must list 'detection' before it"):
        build_codecs(config, VocabLayout.from_config(config))


def test_to_canvas_inverts_to_pixels():
    """A letterboxed 300x200 image on a 256x256 canvas: pixels -> canvas -> pixels."""
    context = DecodeContext((256, 256), 256 / 300, (200, 300))
    pixels = torch.tensor([[0.0, 0.0, 299.0, 199.0], [150.0, 20.5, 10.0, 100.0]])
    normalised = context.to_canvas(pixels)
    assert normalised.max() <= 1.0 and normalised[0, 3] < 200 / 256  # the padding is below
    assert torch.allclose(context.to_pixels(normalised), pixels, atol=1e-4)
