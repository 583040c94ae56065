"""The `decoding` setting (MAD_DECODING, --decoding): a server reads the checkpoint's weights
with other decoding options, e.g. one view and one caption candidate for less CPU time."""

from __future__ import annotations

import dataclasses
import json

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from export.tensorrt import Profile
from mad.cli import app as mad_cli
from model.inference_io import Request
from model.pipeline import Pipeline
from model.startup import StartupError
from service.model_cache import load_configured
from service.settings import Settings
from tests.helpers import scene_image
from tests.test_refinement import CountingRunner


def test_the_setting_takes_items_comma_separated_or_as_a_json_list(monkeypatch, micro_checkpoint):
    settings = Settings(
        checkpoint=micro_checkpoint, decoding="detection_flip=true, mask_threshold=0.4"
    )
    assert settings.decoding == ["detection_flip=true", "mask_threshold=0.4"]
    monkeypatch.setenv("MAD_DECODING", '["caption_candidates=2"]')
    assert Settings(checkpoint=micro_checkpoint).decoding == ["caption_candidates=2"]
    # A repeated option gives a list, whose items may hold several.
    items = ["detection_flip=true,mask_threshold=0.4", "caption_candidates=2"]
    repeated = Settings(checkpoint=micro_checkpoint, decoding=items)
    assert repeated.decoding == [*items[0].split(","), items[1]]
    # Worker processes rebuild the settings from their variables.
    monkeypatch.setenv("MAD_DECODING", settings.env()["MAD_DECODING"])
    assert Settings(checkpoint=micro_checkpoint).decoding == settings.decoding


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("detection_flip", "KEY=VALUE"),
        ("d_model=64", "not a decoding option"),  # a config field, but no decoding option
        ("caption_candidate=2", "unknown config key"),
        ("caption_candidates=many", "caption_candidates"),
        ("caption_candidates=0", "caption_candidates must be at least 1"),
        ("mask_threshold=2", "mask_threshold must be between 0 and 1"),
    ],
)
def test_a_bad_item_is_refused_before_the_model_loads(micro_checkpoint, value, says):
    with pytest.raises(ValidationError, match=says):
        Settings(checkpoint=micro_checkpoint, decoding=value)


def test_the_served_model_reads_its_logits_the_set_way(micro_checkpoint, micro_model):
    base, _ = load_configured(Settings(checkpoint=micro_checkpoint))
    assert (base.config.detection_flip, base.config.caption_candidates) == (False, 1)
    mad, _ = load_configured(
        Settings(checkpoint=micro_checkpoint, decoding="detection_flip=true,caption_candidates=2")
    )
    assert (mad.config.detection_flip, mad.config.caption_candidates) == (True, 2)
    assert all(codec.config is mad.config for codec in mad.codecs.values())
    counting = CountingRunner(mad.required_network())
    Pipeline(mad, counting)([Request(scene_image(120, 90), ("detection",))])
    assert counting.encoded == 2  # the image and its mirror image


def test_an_option_of_a_task_the_model_lacks_stops_the_start(micro_checkpoint, monkeypatch):
    import service.model_cache

    def without_captions(*args, **kwargs):
        mad, runner = load_runner(*args, **kwargs)
        codecs = {k: v for k, v in mad.codecs.items() if k != "caption"}
        return dataclasses.replace(mad, codecs=codecs), runner

    load_runner = service.model_cache.load_runner
    monkeypatch.setattr(service.model_cache, "load_runner", without_captions)
    settings = Settings(checkpoint=micro_checkpoint, decoding="caption_candidates=2")
    with pytest.raises(StartupError, match="MAD_DECODING: caption_candidates is not"):
        load_configured(settings)


def test_mad_predict_and_serve_refuse_a_bad_item_in_one_line(micro_checkpoint, tmp_path):
    image = tmp_path / "x.png"
    scene_image().save(image)
    for command in (
        ["predict", str(image), "--checkpoint", str(micro_checkpoint)],
        ["serve", "--checkpoint", str(micro_checkpoint)],
    ):
        # Repeated, every item counts: the bad one first is not lost behind a good one.
        decoding = ["--decoding", "flip=yes", "--decoding", "caption_candidates=2"]
        result = CliRunner().invoke(mad_cli, [*command, *decoding])
        assert result.exit_code == 2, result.output
        assert "unknown config key 'flip'" in result.output
        assert "Traceback" not in result.output and "Value error" not in result.output


def test_mad_predict_reads_with_the_set_options(micro_checkpoint, tmp_path):
    image = tmp_path / "x.png"
    scene_image().save(image)
    args = ["predict", str(image), "--checkpoint", str(micro_checkpoint), "--tasks", "caption"]
    passes = []
    for extra in ([], ["--decoding", "caption_candidates=2"]):
        result = CliRunner().invoke(mad_cli, [*args, "--json", *extra])
        assert result.exit_code == 0, result.output
        passes.append(json.loads(result.output)["decoder_passes"]["caption"])
    assert passes[1] == passes[0] + 1  # two candidates: one more pass chooses between them


def test_tensorrt_shapes_follow_the_served_options():
    model = {"image_size": [256, 256], "num_slots": 10}
    plain = Profile(max_batch=4).resolved(model)
    keypoints = Profile(max_batch=4, decoding={"keypoints_flip": True}).resolved(model)
    boxes = Profile(max_batch=4, decoding={"detection_flip": True}).resolved(model)
    # Two views encode twice the images; only fused detections double an image's sequences.
    assert (plain.max_batch, keypoints.max_batch, boxes.max_batch) == (4, 8, 8)
    assert (plain.max_sequences, keypoints.max_sequences, boxes.max_sequences) == (40, 40, 80)
    assert keypoints.decoding == {}  # resolved into the shapes


def test_tensorrt_shapes_hold_a_zoomed_task_s_crops():
    model = {"image_size": [256, 256], "num_slots": 10, "zoom": 3.0}
    zoomed = Profile(max_batch=4, decoding={"keypoints_zoom": True}).resolved(model)
    both = Profile(max_batch=4, decoding={"detection_zoom": True, "detection_flip": True})
    # A crop per detection of every request, encoded in one call and decoded on.
    assert zoomed.max_batch == 40 and zoomed.max_sequences == 40
    assert both.resolved(model).max_batch == 80
    unzoomed = Profile(max_batch=4, decoding={"keypoints_zoom": True, "zoom": 1.0})
    assert unzoomed.resolved(model).max_batch == 4
