"""`mad bench --accuracy`: rows per backend x precision with latency and `mad eval` metrics,
the best row within the accuracy bounds, the report's section and targets (no timing is
asserted)."""

from __future__ import annotations

import pytest

from export.onnx_export import export_onnx
from export.quantize import quantize_export
from mad.bench import accuracy_bench
from mad.bench.accuracy_bench import BASELINE, METRICS, accuracy_benchmark, accuracy_md, best_row
from mad.bench.report import targets
from mad.bench.workload import synthetic_image


@pytest.fixture(scope="module")
def exports(micro_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    export_onnx(micro_checkpoint, root / "fp32")
    quantize_export(root / "fp32", root / "int8", calibration_images=2)
    return {"fp32": root / "fp32", "int8": root / "int8"}


def test_rows_carry_latency_speedup_and_metrics(micro_checkpoint, exports, monkeypatch):
    variants = {
        name: accuracy_bench.CPU_VARIANTS[name]
        for name in ("eager fp32", "eager bf16", "onnx fp32", "onnx int8")
    }
    variants["torch fp16 on cpu"] = ("torch", {"precision": "fp16"})  # cannot run: an error
    monkeypatch.setattr(accuracy_bench, "CPU_VARIANTS", variants)
    result = accuracy_benchmark(
        micro_checkpoint,
        "cpu",
        synthetic_image((64, 64)),
        kept=2,
        refine_steps={},
        repeats=2,
        warmup=0,
        eval_images=2,
        exports=exports,
        echo=lambda text: None,
    )
    rows = result["rows"]
    assert "fp16" in rows["torch fp16 on cpu"]["error"]
    assert rows[BASELINE]["speedup"] == 1.0
    assert all(value == 0 for value in rows[BASELINE]["lost"].values())
    for name in ("eager fp32", "eager bf16", "onnx fp32", "onnx int8"):
        row = rows[name]
        assert row["total"]["n"] == 2 and row["speedup"] > 0
        assert {"encode", "caption", "postprocess"} <= set(row["stages"])
        assert set(METRICS) <= set(row["metrics"]) and set(row["lost"]) == set(METRICS)
        assert isinstance(row["within_bounds"], bool)
    assert rows["onnx int8"]["describe"]["precision"] == "int8"
    assert result["best"] in rows and "error" not in rows[result["best"]]
    text = "\n".join(accuracy_md(result))
    assert "## Backends x precision" in text and "torch fp16 on cpu" in text
    report = {
        "settings": {
            "device": "cpu",
            "preset": "micro",
            "image_size": [64, 64],
            "batch_size": 1,
            "bundled_model": True,
        },
        "accuracy": result,
    }
    [best, onnx] = [t for t in targets(report) if "accuracy" in t["target"]]
    assert best["measured"] == rows[result["best"]]["speedup"] and best["applies"]
    assert onnx["measured"] == rows["onnx fp32"]["speedup"]


def test_the_best_row_is_the_fastest_within_the_bounds():
    def row(median: float, within: bool) -> dict:
        return {"total": {"median_ms": median}, "within_bounds": within}

    rows = {BASELINE: row(100, True), "fast but wrong": row(10, False), "ok": row(50, True)}
    assert best_row(rows) == "ok"
    rows["ok"]["error"] = "eval: failed"
    assert best_row(rows) == BASELINE
