"""The natural-photo report: one row per photo, and what counts as a grammatical caption."""

from __future__ import annotations

import dataclasses
import statistics

from mad.bench.photos import NOT_A_SENTENCE, PHOTOS, caption_errors, photo_report
from model.checkpoint import MAD


def test_report_has_a_row_per_photo_and_its_summary(micro_checkpoint):
    report = photo_report(micro_checkpoint)
    assert [r["photo"] for r in report["photos"]] == [name.split(".")[0] for name in PHOTOS]
    counts = [r["detections"] for r in report["photos"]]
    assert report["median_detections"] == statistics.median(counts)
    good = sum(not r["grammar_errors"] for r in report["photos"])
    assert report["grammatical_captions"] == good


def test_a_world_model_caption_must_be_a_sentence_of_the_world(micro_model):
    assert caption_errors(micro_model, "a person in red is at the top left") == []
    assert caption_errors(micro_model, "a person in is is the top triangle") == [NOT_A_SENTENCE]
    assert caption_errors(micro_model, "a red circle and a") == ["ends with 'a'", NOT_A_SENTENCE]


def test_another_model_is_held_to_agreement_alone(micro_model):
    config = dataclasses.replace(micro_model.config, class_names=["cat", "dog"])
    other = MAD.build(config, micro_model.tokenizer)
    assert caption_errors(other, "a dog on a sofa next to two cats") == []
    assert caption_errors(other, "a dog next to a") == ["ends with 'a'"]
