"""`mad bench`: helpers, the report, and a --quick smoke run that writes the files.

Nothing here asserts a timing: the numbers depend on the machine; only their presence and
shape are checked.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from mad.bench.model_bench import ModelBench, kept_vs_fixed, mad_vs_autoregressive, schedules
from mad.bench.report import markdown, targets
from mad.bench.stats import measure, percentile, ratio, summarize
from mad.bench.workload import (
    detection_prompts,
    load_model,
    parse_size,
    prepare_checkpoint,
    resolve_checkpoint,
    synthetic_image,
)
from mad.cli import app
from model.codecs import DecodeContext
from runtime.torch_runner import TorchRunner

REPORT_KEYS = {
    "schema",
    "created",
    "environment",
    "model",
    "settings",
    "stage_latency",
    "mad_vs_ar",
    "kept_vs_fixed",
    "backends",
    "http",
    "protocols",
    "targets",
    "errors",
    "skipped",
    "duration_s",
}
SUMMARY_KEYS = {"median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "n"}


def test_percentiles_and_summary():
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(range(101), 90) == 90
    assert percentile([1.0, 2.0], 50) == 1.5
    assert math.isnan(percentile([], 50))
    stats = summarize([0.001, 0.002, 0.003])
    assert set(stats) == SUMMARY_KEYS
    assert stats["median_ms"] == pytest.approx(2.0)
    assert summarize([]) == {"n": 0}
    assert ratio(10.0, 2.0) == 5.0
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None
    calls = []
    assert measure(lambda: calls.append(1), repeats=3, warmup=2)["n"] == 3
    assert len(calls) == 5


def test_parse_options():
    assert parse_size("800x1333") == (800, 1333)
    with pytest.raises(ValueError):
        parse_size("800")


def test_checkpoint_resolution(micro_checkpoint, tmp_path):
    assert resolve_checkpoint("tiny", None) is None  # a preset means random weights
    assert resolve_checkpoint(None, micro_checkpoint) == micro_checkpoint
    same, _ = prepare_checkpoint(None, micro_checkpoint, (96, 96), tmp_path)
    assert same == micro_checkpoint
    # Another canvas: a copy with the config changed, the original untouched.
    copy, source = prepare_checkpoint(None, micro_checkpoint, (64, 80), tmp_path)
    assert copy != micro_checkpoint and "64x80" in source
    assert load_model(copy).config.image_size == (64, 80)
    assert load_model(micro_checkpoint).config.image_size == (96, 96)


def test_detection_prompts(micro_model):
    contexts = [DecodeContext((96, 96), 1.0, (96, 96))] * 2
    tokens, owners, boxes, ctx = detection_prompts(micro_model, 5, contexts)
    assert tokens.shape == (10, 5) and owners.tolist() == [0] * 5 + [1] * 5
    assert len(boxes) == len(ctx) == 10
    person = micro_model.config.class_names.index(micro_model.config.person_class)
    assert (tokens[:, 4] == micro_model.vocab.class_token(person)).all()


def test_model_sections(micro_model):
    runner = TorchRunner(micro_model.network)
    bench = ModelBench(
        micro_model,
        runner,
        [synthetic_image((96, 96))] * 2,
        kept=3,
        ratios=schedules(micro_model, {"caption": 2}),
    )
    stage = bench.stage_latency(repeats=2, warmup=1)
    assert set(stage["stages"]) == {
        "preprocess",
        "encode",
        *micro_model.config.tasks,
        "postprocess",
    }
    assert stage["sequences"]["segmentation"] == 6 and stage["passes"]["caption"] == 3
    with torch.no_grad():
        versus = mad_vs_autoregressive(bench, repeats=1, ar_repeats=1, warmup=0)
    assert set(versus["tasks"]["keypoints"]) >= {
        "mad_k0",
        "mad_schedule",
        "ar_cache",
        "ar_no_cache",
    }
    assert all(v > 0 for v in versus["ratios"].values())
    kept = kept_vs_fixed(bench, kept=1, fixed=4, repeats=1, warmup=0)
    assert kept["kept"]["per_image"] == 1 and kept["fixed"]["per_image"] == 4
    assert kept["ratio"] > 0


def test_targets_report_without_sections():
    """Sections that did not run leave their targets unmeasured, not failed."""
    report = {
        "settings": {
            "device": "cpu",
            "preset": "tiny",
            "image_size": [96, 96],
            "batch_size": 1,
            "bundled_model": False,
        },
        "kept_vs_fixed": {"ratio": 6.0, "fixed": {"per_image": 100}},
        # measured, but on the CPU with the tiny model: no verdict on the GPU target
        "stage_latency": {"total": {"median_ms": 13.0}},
    }
    rows = {row["target"].split(":")[1].strip()[:10]: row for row in targets(report)}
    assert rows["fixed 100 "]["met"] is True and rows["fixed 100 "]["applies"] is True
    assert rows["r50 800x13"]["measured"] == 13.0 and not rows["r50 800x13"]["applies"]
    assert all(row["met"] is None for key, row in rows.items() if key != "fixed 100 ")


@pytest.mark.slow
def test_quick_run_writes_report(micro_checkpoint, tmp_path):
    """The whole command at smoke size: every section (ONNX export, a real `mad serve` on
    loopback with batching off and on, then with gRPC for native vs v2 REST vs v2 gRPC, the
    anytime section's servers) runs and the report files hold the expected keys."""
    out = tmp_path / "benchmarks"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--quick",
            "--checkpoint",
            str(micro_checkpoint),
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    [json_path] = out.glob("bench-*.json")
    [md_path] = out.glob("bench-*.md")
    report = json.loads(json_path.read_text())
    assert set(report) >= REPORT_KEYS
    assert report["errors"] == {}
    assert report["environment"]["versions"]["torch"] == torch.__version__.split("+")[0]
    assert set(report["stage_latency"]["total"]) == SUMMARY_KEYS
    assert report["backends"]["onnx_vs_eager"]["ratio"] > 0
    http = report["http"]
    assert set(http["modes"]) == {"batching_off", "batching_8", "batching_8_fixed_window"}
    window = http["batch_window"]
    assert (
        set(window["p50_ms"])
        == set(window["throughput_rps"])
        == {
            "batching_off",
            "adaptive",
            "fixed",
        }
    )
    assert set(http["modes"]["batching_8"]["levels"]) == {"1", "2"}
    level = http["modes"]["batching_off"]["levels"]["1"]
    assert level["ok"] > 0 and level["errors"] == {}
    assert {"queue", "encode", "total"} <= set(level["server_timings_ms"])
    # Per request, the client's latency holds the model's stage times and more.
    overhead = http["overhead"]
    assert 0 < overhead["share"] < 1 and 0 < overhead["overhead_ms"] < overhead["client_median_ms"]
    assert "ratio" in http["batching_gain"]
    protocols = report["protocols"]
    assert set(protocols["levels"]) == {"native", "v2_rest", "v2_grpc"}
    for levels in protocols["levels"].values():
        assert set(levels) == {"1", "4"}
        assert levels["1"]["ok"] > 0 and levels["1"]["errors"] == {}
    assert "boxes" in protocols["v2_outputs"] and "json" not in protocols["v2_outputs"]
    assert all(r > 0 for r in protocols["p50_vs_native"].values())
    assert len(report["targets"]) == 6
    anytime = report["anytime"]
    assert len(anytime["budgets"]["levels"]) == 7
    refused = anytime["budgets"]["levels"][0]  # far below any draft
    assert refused["refused"] == refused["requests"] and refused["latency"] == {"n": 0}
    generous = anytime["budgets"]["levels"][-1]  # twice the full latency
    assert generous["refused"] == 0 and generous["typical_steps"] is not None
    assert {"caption_BLEU4", "keypoints_AP", "bbox_AP"} <= set(generous["metrics"])
    assert set(anytime["overload"]["runs"]) == {"degradation_off", "degradation_on"}
    for run in anytime["overload"]["runs"].values():
        assert run["ok"] + run["shed_503"] + run["other_errors"] == run["requests"]
    assert anytime["progressive"]["objects_per_request"] >= 2  # the micro model refines
    assert anytime["feature_cache"]["encode_on_hit"]["n"] > 0
    [plot] = out.glob("bench-*-budgets.png")
    assert plot.stat().st_size > 0
    text = md_path.read_text()
    for heading in (
        "## Targets",
        "## Stage latency",
        "## MAD vs autoregressive",
        "## Kept detections",
        "## Eager PyTorch vs ONNX Runtime",
        "## HTTP",
        "## Protocols",
        "## Anytime serving",
        "### Latency budgets",
        "### Overload",
    ):
        assert heading in text
    assert markdown(report, plot.name) == text and f"]({plot.name})" in text
    assert "ar_cache_vs_mad_schedule" in result.output  # the ratios are printed


def test_the_decoding_cost_bench_times_each_variant(micro_checkpoint, capsys):
    from mad.bench.decoding_cost import main

    main(["--checkpoint", str(micro_checkpoint), "--repeats", "1", "--rounds", "1"])
    out = capsys.readouterr().out
    for name in (
        "as the checkpoint sets",
        "no zoomed crops",
        "no crops, mirror image for detection alone",
        "no crops, one view",
        "no crops, one view, one caption",
    ):
        assert name in out
    assert out.count("median") == 5
