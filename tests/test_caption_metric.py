"""Caption BLEU-4 on the COCO caption evaluator's tokens: lowercased, PTB-tokenised,
punctuation dropped (what pycocoevalcap does before BLEU), so COCO figures compare with the
paper's."""

from __future__ import annotations

import pytest
import sacrebleu

from model.evaluate import caption_bleu4, coco_caption_text


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
        ("A man's T-shirt, (red).", "a man 's t-shirt red"),
        (
            'Two dogs don\'t play... in the 3.5 m pool -- "wow"!',
            "two dogs do n't play in the 3.5 m pool wow",
        ),
        (
            "It's 1,000 people; they're here: the dogs' bowls?",
            "it 's 1,000 people they 're here the dogs bowls",
        ),
        ("  Spaces\tand\nnew lines  ", "spaces and new lines"),
    ],
)
def test_captions_are_tokenised_as_the_coco_evaluator_does(text, tokens):
    assert coco_caption_text(text) == tokens


def test_case_and_punctuation_do_not_count():
    references = [["A man riding a wave on top of a surfboard.", "A surfer on a big wave."]]
    hypothesis = ["a man riding a wave on top of a surfboard"]
    assert caption_bleu4(hypothesis, references) == pytest.approx(1.0)
    # sacrebleu's own defaults (13a tokens, case kept) would count "A" and "." against it.
    assert sacrebleu.corpus_bleu(hypothesis, [[r[0]] for r in references]).score < 90


def test_bleu_over_images_with_different_reference_counts():
    hypotheses = ["a red circle above a blue square", "two green stars"]
    references = [
        ["A red circle above a blue square.", "A circle and a square."],
        ["Two green stars.", "Some stars.", "Two stars, both green!"],
    ]
    assert caption_bleu4(hypotheses, references) == pytest.approx(1.0)
    assert 0.0 < caption_bleu4(["a blue circle above a red square"], references[:1]) < 0.5
    assert caption_bleu4([], []) == 0.0
