"""Refinement schedule tuning (`mad tune`) and single-task evaluation."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from mad.cli import app as mad_cli
from model import tune
from model.checkpoint import (
    MAD,
    checkpoint_digest,
    load_checkpoint,
    read_checkpoint_config,
    tuning_records,
    write_schedules,
)
from model.codecs.caption import CaptionCodec
from model.data.synth.language import is_grammatical
from model.evaluate import CaptionBLEU, evaluate
from model.inference_io import Request
from model.pipeline import Pipeline
from model.runner import EagerRunner
from model.tune import Trial, choose
from tests.helpers import scene_image


def test_mad_tune_scores_schedules_and_writes_the_chosen_one(
    micro_checkpoint, synth_data, tmp_path
):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(micro_checkpoint, checkpoint)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mad.cli",
            "tune",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(synth_data),
            "--task",
            "caption",
            "--max-steps",
            "1",
            "--limit",
            "2",
            "--write",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = load_checkpoint(checkpoint)[1]
    record = meta["schedule_tuning"]["caption"]
    tried = [ratios for ratios, _ in record["scores"]]
    # No refinement, three one-step ramps, and the checkpoint's own default.
    assert tried == [[], [0.9], [0.7], [0.5], [0.8, 0.6, 0.4]]
    assert meta["schedules"]["caption"] in tried
    assert record["metric"] == "caption_BLEU4_x_sentences" and record["images"] == 2
    assert meta["model"]["schedules"] == meta["schedules"]
    assert meta["schedules"]["keypoints"] == [0.7]  # not asked: unchanged


def test_choose_prefers_the_shortest_schedule_within_tolerance():
    trials = [Trial([], 0.20), Trial([0.7], 0.248), Trial([0.9, 0.3], 0.25), Trial([0.5], 0.1)]
    assert choose(trials, tolerance=0.003).ratios == [0.7]
    assert choose(trials, tolerance=0.0).ratios == [0.9, 0.3]


def test_eval_of_one_task_reports_only_its_metrics(micro_model, synth_data):
    metrics = evaluate(micro_model, synth_data, tasks=("caption",), limit=2)
    # a model of the synthetic world: also how many of its captions are sentences
    assert set(metrics) == {"caption_BLEU4", "caption_sentence_share", "caption_BLEU4_x_sentences"}
    metrics = evaluate(micro_model, synth_data, tasks=("keypoints",), limit=2)
    assert set(metrics) == {"bbox_AP", "bbox_AP50", "bbox_AP75", "keypoints_AP"}


def test_eval_json_says_the_steps_each_task_ran(micro_checkpoint, synth_data, tmp_path):
    """What the pipeline applies to the same request: the steps given, the checkpoint's
    schedule for the rest of what ran (detection runs for keypoints)."""
    out = tmp_path / "metrics.json"
    args = ["--checkpoint", str(micro_checkpoint), "--data", str(synth_data), "--limit", "1"]
    args += ["--tasks", "keypoints", "--refine-steps", "keypoints:1", "--json", str(out)]
    result = CliRunner().invoke(mad_cli, ["eval", *args])
    assert result.exit_code == 0, result.output
    mad, _ = load_checkpoint(micro_checkpoint)
    runner = EagerRunner(mad.required_network())
    [applied] = Pipeline(mad, runner)([Request(scene_image(), ("keypoints",), {"keypoints": 1})])
    assert json.loads(out.read_text())["refine_steps"] == applied.refine_steps
    assert set(applied.refine_steps) == {"detection", "keypoints"}


def test_rewritten_schedules_change_the_checkpoint_digest(micro_checkpoint, tmp_path):
    # Cached exports and the service's model version key on it: a retuned checkpoint must
    # not reuse an export holding the old schedules.
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(micro_checkpoint, checkpoint)
    before = checkpoint_digest(checkpoint)
    write_schedules(checkpoint, {"caption": [0.5]})
    assert checkpoint_digest(checkpoint) != before


def test_the_tuned_caption_metric_weighs_bleu_by_the_share_of_sentences():
    no_truth = None  # summarize() reads only the hypotheses and references set below
    bleu = CaptionBLEU(no_truth, "caption", "caption_BLEU4", is_grammatical)  # type: ignore[arg-type]
    truth = ["a red circle above a person in blue", "a red circle is at the top left"]
    bleu.hypotheses = ["a red circle above a person in blue", "a red circle above a person in"]
    bleu.references = [truth, truth]
    metrics = bleu.summarize()
    assert metrics["caption_sentence_share"] == 0.5
    assert metrics["caption_BLEU4_x_sentences"] == metrics["caption_BLEU4"] * 0.5 > 0


def test_the_tuned_caption_metric_holds_world_models_to_sentences(micro_model):
    assert micro_model.codecs["caption"].metric == "caption_BLEU4_x_sentences"
    config = dataclasses.replace(micro_model.config, class_names=["cat", "dog"])
    other = MAD.build(config, micro_model.tokenizer)
    assert other.codecs["caption"].metric == "caption_BLEU4"


def test_tuning_one_task_keeps_the_record_of_another(micro_checkpoint, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(micro_checkpoint, checkpoint)
    caption = {"data": "d1", "metric": "caption_BLEU4", "scores": [[[], 0.2]]}
    write_schedules(checkpoint, {"caption": [0.5]}, {"caption": caption})
    keypoints = {"data": "d2", "metric": "keypoints_AP", "scores": [[[], 0.1]]}
    write_schedules(checkpoint, {"caption": [0.5], "keypoints": []}, {"keypoints": keypoints})
    assert read_checkpoint_config(checkpoint)["schedule_tuning"] == {
        "caption": caption,
        "keypoints": keypoints,
    }


def test_a_record_from_before_per_task_records_is_split_by_task():
    old = {"data": "d", "images": 200, "metrics": {"caption": "m"}, "scores": {"caption": [1]}}
    assert tuning_records(old) == {
        "caption": {"data": "d", "images": 200, "metric": "m", "scores": [1]}
    }


def test_tune_decoding_keeps_the_reference_unless_beaten_by_more_than_tolerance(
    micro_model, monkeypatch
):
    """Scores as a function of the options: windows help up to 2, box confidence 0.5 helps by
    less than the tolerance, a 0.4 mask threshold by more, mask scores not at all, masks on
    the mirror image too, boxes and masks on zoomed crops too (a larger zoom by less than the
    tolerance); caption candidates up to 4, scored apart by the caption's metric."""
    config = dataclasses.replace(micro_model.config, coordinate_window=0)
    mad = MAD.build(config, micro_model.tokenizer)  # its own config: the shared model's is kept
    calls = []

    def fake_evaluate(mad_, data, split, device, limit, tasks):
        c = mad_.config
        if tasks == ("caption",):
            calls.append(("caption", c.caption_candidates))
            return {"caption_BLEU4_x_sentences": 0.2 + 0.01 * min(c.caption_candidates, 4)}
        assert tasks == ("detection", "segmentation", "keypoints")
        calls.append(
            (
                c.coordinate_window,
                c.box_confidence_exponent,
                c.detection_flip,
                c.mask_threshold,
                c.mask_scoring,
                c.segmentation_flip,
                c.keypoints_flip,
                c.detection_zoom,
                c.zoom,
                c.zoom_context,
                c.segmentation_zoom,
                c.keypoints_zoom,
            )
        )
        return {
            "bbox_AP": 0.5
            + 0.03 * min(c.coordinate_window, 2)
            + 0.002 * c.box_confidence_exponent
            + (0.05 + 0.001 * c.zoom if c.detection_zoom else 0.0),
            "segm_AP": 0.3
            + (0.03 if c.mask_threshold == 0.4 else 0.0)
            + (0.02 if c.segmentation_flip else 0.0)
            + (0.02 if c.segmentation_zoom else 0.0),
            "keypoints_AP": 0.2,
        }

    monkeypatch.setattr(tune, "evaluate", fake_evaluate)
    trials = tune.tune_decoding(mad, Path("unused"), tolerance=0.003)
    chosen = {t.option: getattr(mad.config, t.option) for t in trials}
    assert chosen == {
        "coordinate_window": 2,  # 3 and 4 tie with 2: the first best
        "box_confidence_exponent": 0.0,  # +0.001 mean AP: within tolerance of the reference
        "detection_flip": False,  # no gain here
        "detection_zoom": True,
        "zoom": 3.0,  # 4 gains 0.001 x 1/3 mean AP: within tolerance of the default
        "zoom_context": 3.0,
        "mask_threshold": 0.4,
        "mask_scoring": False,
        "segmentation_flip": True,
        "segmentation_zoom": True,
        "keypoints_flip": False,
        "keypoints_zoom": False,
        "caption_candidates": 4,  # 8 ties with 4
    }
    one_pass = ["coordinate_window"] * 5 + ["box_confidence_exponent"] * 3
    one_pass += ["detection_flip"] * 2 + ["detection_zoom"] * 2 + ["zoom"] * 3
    one_pass += ["zoom_context"] * 3 + ["mask_threshold"] * 4 + ["mask_scoring"] * 2
    one_pass += ["segmentation_flip"] * 2 + ["segmentation_zoom"] * 2
    one_pass += ["keypoints_flip"] * 2 + ["keypoints_zoom"] * 2
    # The first pass changed options, the second nothing: two passes; one for a lone option.
    assert [t.option for t in trials] == one_pass * 2 + ["caption_candidates"] * 4
    assert {t.metric for t in trials if t.option == "caption_candidates"} == {
        "caption_BLEU4_x_sentences"
    }
    assert len(calls) == len(set(calls))  # each combination scored once


def test_tune_decoding_also_scores_a_current_value_it_would_not_try(micro_model, monkeypatch):
    config = dataclasses.replace(micro_model.config, coordinate_window=6, mask_threshold=0.45)
    mad = MAD.build(config, micro_model.tokenizer)
    scores = {"bbox_AP": 0.5, "segm_AP": 0.3, "keypoints_AP": 0.2, "caption_BLEU4_x_sentences": 0.2}
    monkeypatch.setattr(tune, "evaluate", lambda *args, **kwargs: scores)
    trials = tune.tune_decoding(mad, Path("unused"))
    tried = {(t.option, t.value) for t in trials}
    assert ("coordinate_window", 6) in tried and ("mask_threshold", 0.45) in tried
    assert mad.config.coordinate_window == 0 and mad.config.mask_threshold == 0.5  # all tie


def test_mad_tune_decoding_writes_the_options_and_their_record(
    micro_checkpoint, synth_data, tmp_path
):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(micro_checkpoint, checkpoint)
    args = ["tune", "--checkpoint", str(checkpoint), "--data", str(synth_data)]
    result = CliRunner().invoke(mad_cli, [*args, "--decoding", "--limit", "2", "--write"])
    assert result.exit_code == 0, result.output
    assert "coordinate_window" in result.output and "wrote the decoding options" in result.output
    meta = read_checkpoint_config(checkpoint)
    before = read_checkpoint_config(micro_checkpoint)["model"]
    record = meta["decoding_tuning"]
    record_options = (
        "coordinate_window",
        "box_confidence_exponent",
        "detection_flip",
        "mask_threshold",
        "mask_scoring",
        "segmentation_flip",
        "keypoints_flip",
        "detection_zoom",
        "zoom",
        "zoom_context",
        "segmentation_zoom",
        "keypoints_zoom",
    )
    assert set(record) == {*record_options, "caption_candidates"}
    for option in record_options:
        assert record[option]["metric"] == "mean of bbox_AP, segm_AP, keypoints_AP"
        assert len(record[option]["scores"]) >= 2
    chosen = {}
    for line in result.output.splitlines():  # "option: before -> after"
        if " -> " in line:
            option, values = line.split(": ", 1)
            chosen[option] = values.split(" -> ")[1]
    assert set(chosen) == {*record_options, "caption_candidates"}
    for option, value in chosen.items():
        assert str(meta["model"][option]) == value
    for option in record_options:
        assert record[option]["start"] == {o: before[o] for o in record_options}
    assert (
        meta["model"]["schedules"] == read_checkpoint_config(micro_checkpoint)["model"]["schedules"]
    )  # --decoding leaves the schedules alone
    # A caption's options are chosen by its own metric, apart from detection's family.
    caption_only = CliRunner().invoke(
        mad_cli, [*args, "--decoding", "--tasks", "caption", "--limit", "2", "--write"]
    )
    assert "mean of" not in caption_only.output
    assert caption_only.exit_code == 0, caption_only.output
    assert "caption_candidates" in caption_only.output
    assert "coordinate_window" not in caption_only.output
    caption_record = read_checkpoint_config(checkpoint)["decoding_tuning"]["caption_candidates"]
    assert caption_record["metric"] == "caption_BLEU4_x_sentences"
    assert caption_record["start"] == {"caption_candidates": before["caption_candidates"]}
    assert [value for value, _ in caption_record["scores"]] == [1, 2, 4, 8]
    assert set(read_checkpoint_config(checkpoint)["decoding_tuning"]) == {
        *record_options,
        "caption_candidates",
    }  # the detection family's records stay


def test_mad_tune_decoding_refuses_tasks_without_options(micro_checkpoint, synth_data, monkeypatch):
    monkeypatch.setattr(CaptionCodec, "decoding_options", {})
    args = ["tune", "--checkpoint", str(micro_checkpoint), "--data", str(synth_data)]
    result = CliRunner().invoke(mad_cli, [*args, "--decoding", "--tasks", "caption"])
    assert result.exit_code != 0
    assert "none of the tasks to tune has decoding options" in result.output


def test_mad_tune_decoding_tunes_only_the_options_named(micro_checkpoint, synth_data, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(micro_checkpoint, checkpoint)
    args = ["tune", "--checkpoint", str(checkpoint), "--data", str(synth_data), "--limit", "2"]
    result = CliRunner().invoke(
        mad_cli, [*args, "--decoding", "--option", "detection_flip", "--write"]
    )
    assert result.exit_code == 0, result.output
    tried = [line.split()[0] for line in result.output.splitlines() if " mean of " in line]
    assert tried == ["detection_flip", "detection_flip"]
    record = read_checkpoint_config(checkpoint)["decoding_tuning"]
    assert set(record) == {"detection_flip"} and record["detection_flip"]["start"] == {
        "detection_flip": False
    }
    unknown = CliRunner().invoke(mad_cli, [*args, "--decoding", "--option", "d_model"])
    assert unknown.exit_code == 2 and "d_model is not a decoding option" in unknown.output
    alone = CliRunner().invoke(mad_cli, [*args, "--option", "detection_flip"])
    assert alone.exit_code == 2 and "only with --decoding" in alone.output
