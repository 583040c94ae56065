"""Backend x precision: speed and accuracy of each, measured in one run (`mad bench --accuracy`).

One row per way of running the same checkpoint (eager fp32, eager bf16, eager +
torch.compile, ONNX Runtime fp32 and int8, OpenVINO fp32 and bf16; CUDA rows on a GPU): the
model's latency on the four-task request (the stage workload of mad/bench/model_bench.py:
detection, segmentation and keypoints prompted by `kept` boxes, caption), its speed-up over
eager fp32, and the metrics `mad eval` computes (model/evaluate.py) on the same held-out
images of the synthetic world, run by that row's runner. The rows alternate every repeat, so
load from other processes hits them alike; a row that cannot run here (no bf16 kernels, a
failed compile) records its error.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from mad.bench.model_bench import ModelBench, schedules
from mad.bench.stats import ratio, summarize
from runtime.backends import create_runner

if TYPE_CHECKING:
    from mad.bench.report import Target

# name -> (backend, runner options); export_dir is added for the onnx rows.
CPU_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "eager fp32": ("torch", {}),
    "eager bf16": ("torch", {"precision": "bf16"}),
    "eager compile": ("torch", {"compile": True}),
    "onnx fp32": ("onnx", {"precision": "fp32"}),
    "onnx int8": ("onnx", {"precision": "int8"}),
    "openvino fp32": ("openvino", {"precision": "fp32"}),
    "openvino bf16": ("openvino", {"precision": "bf16"}),
}
GPU_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "eager fp32": ("torch", {}),
    "eager bf16": ("torch", {"precision": "bf16"}),
    "eager fp16": ("torch", {"precision": "fp16"}),
    "onnx fp32": ("onnx", {"precision": "fp32"}),
}
BASELINE = "eager fp32"
# The metrics of each task, and how much of each a row may lose against eager fp32
# (the bounds: AP points on bbox/segm/keypoints, BLEU-4 on captions).
METRICS = {"bbox_AP": 1.0, "segm_AP": 1.0, "keypoints_AP": 2.0, "caption_BLEU4": 0.01}
AP_SCALE = {"bbox_AP": 100, "segm_AP": 100, "keypoints_AP": 100, "caption_BLEU4": 1}


def accuracy_benchmark(
    checkpoint: Path,
    device: str,
    image: Image.Image,
    kept: int,
    refine_steps: dict[str, int],
    repeats: int,
    warmup: int,
    eval_images: int,
    exports: dict[str, Path],
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """-> {"rows": {name: {describe, total (summary), stages (median ms), speedup, metrics,
    lost (vs eager fp32, in AP points / BLEU), error}}, "best", "eval_images", ...}.
    exports: {"fp32": dir, "int8": dir} of the checkpoint (the onnx rows need them)."""
    from model.data.synth import write_synthetic_dataset
    from model.evaluate import evaluate

    variants = GPU_VARIANTS if device.startswith("cuda") else CPU_VARIANTS
    rows: dict[str, dict[str, Any]] = {}
    benches: dict[str, ModelBench] = {}
    for name, (backend, options) in variants.items():
        try:
            if backend in ("onnx", "openvino"):
                held = "int8" if options["precision"] == "int8" else "fp32"
                if held not in exports:
                    raise RuntimeError(f"no {held} export was made")
                options = {**options, "export_dir": exports[held]}
            mad, runner = create_runner(backend, checkpoint, device, **options)
            bench = ModelBench(mad, runner, [image], kept, schedules(mad, refine_steps))
            started = time.perf_counter()
            bench.run()  # the first run compiles (torch.compile) and warms the caches
            rows[name] = {
                "describe": runner.describe(),
                "first_run_s": time.perf_counter() - started,
            }
            benches[name] = bench
        except Exception as exc:  # the row says why; the others still run
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
            echo(f"  {name}: {rows[name]['error']}")
    laps: dict[str, list[dict[str, float]]] = {name: [] for name in benches}
    for i in range(warmup + repeats):
        for name, bench in benches.items():
            run = bench.run()
            if i >= warmup:
                laps[name].append(run)
    for name, runs in laps.items():
        rows[name]["total"] = summarize([run["total"] for run in runs])
        rows[name]["stages"] = {
            stage: summarize([run[stage] for run in runs])["median_ms"]
            for stage in runs[0]
            if stage != "total"
        }
    baseline = rows.get(BASELINE, {}).get("total", {}).get("median_ms")
    for name in laps:
        rows[name]["speedup"] = ratio(baseline, rows[name]["total"]["median_ms"])

    with tempfile.TemporaryDirectory(prefix="mad-bench-eval-") as tmp:
        data = Path(tmp)
        # The distribution of data/synth-val (world v1, seed 1), as the anytime section's.
        write_synthetic_dataset(data, train=0, val=eval_images, seed=1, world="v1")
        for name, bench in benches.items():
            echo(f"  eval {name}")
            try:
                rows[name]["metrics"] = evaluate(
                    bench.mad,
                    data,
                    device=device,
                    refine_steps=refine_steps,
                    limit=eval_images,
                    runner=bench.runner,
                )
            except Exception as exc:
                rows[name]["error"] = f"eval: {type(exc).__name__}: {exc}"
    reference = rows.get(BASELINE, {}).get("metrics")
    for row in rows.values():
        if reference and "metrics" in row:
            row["lost"] = {
                metric: (reference[metric] - row["metrics"][metric]) * AP_SCALE[metric]
                for metric in METRICS
                if metric in reference and metric in row["metrics"]
            }
            row["within_bounds"] = all(
                lost <= METRICS[metric] for metric, lost in row["lost"].items()
            )
    return {
        "rows": rows,
        "best": best_row(rows),
        "baseline": BASELINE,
        "eval_images": eval_images,
        "eval_data": "mad data synth --world v1 --val N --seed 1 (as data/synth-val)",
        "repeats": repeats,
        "warmup": warmup,
        "kept": kept,
        "bounds": METRICS,
    }


def best_row(rows: dict[str, dict[str, Any]]) -> str | None:
    """The fastest row whose accuracy stays within the bounds (METRICS) of eager fp32."""
    eligible = [
        (row["total"]["median_ms"], name)
        for name, row in rows.items()
        if "total" in row and row.get("within_bounds", name == BASELINE) and "error" not in row
    ]
    return min(eligible)[1] if eligible else None


# --- report ---------------------------------------------------------------------------------
def accuracy_md(accuracy: dict[str, Any]) -> list[str]:
    from mad.bench.report import fmt, table

    header = ["backend x precision", "median ms", "p90 ms", "vs eager fp32"]
    header += [*METRICS, "within bounds", "error"]
    rows = []
    for name, row in accuracy["rows"].items():
        total, metrics = row.get("total", {}), row.get("metrics", {})
        rows.append(
            [
                f"**{name}**" if name == accuracy["best"] else name,
                fmt(total.get("median_ms")),
                fmt(total.get("p90_ms")),
                fmt(row.get("speedup"), "x"),
                *(metric_cell(metric, metrics, row.get("lost", {})) for metric in METRICS),
                {True: "yes", False: "no"}.get(row.get("within_bounds"), "–"),
                row.get("error", ""),
            ]
        )
    timed = [row for row in accuracy["rows"].values() if "stages" in row]
    stage_names = list(timed[0]["stages"]) if timed else []  # pipeline order
    stage_rows = [
        [name, *(fmt(row["stages"].get(stage)) for stage in stage_names)]
        for name, row in accuracy["rows"].items()
        if "stages" in row
    ]
    bounds = ", ".join(f"{m} {b:g}" for m, b in METRICS.items())
    return [
        "## Backends x precision: speed and accuracy (one run)\n",
        f"Model latency of the four-task request ({accuracy['kept']} prompted boxes, "
        f"{accuracy['repeats']} repeats, rows alternating); metrics of `mad eval` on "
        f"{accuracy['eval_images']} held-out images ({accuracy['eval_data']}) run by each "
        f"row's runner. AP in points (x100), in brackets the loss against eager fp32; "
        f"bounds: {bounds}. Best (fastest within bounds) in bold.\n",
        table(header, rows),
        "Stages (median ms):\n",
        table(["backend x precision", *stage_names], stage_rows),
    ]


def metric_cell(metric: str, metrics: dict[str, float], lost: dict[str, float]) -> str:
    if metric not in metrics:
        return "–"
    scale = AP_SCALE[metric]
    value = f"{metrics[metric] * scale:.{1 if scale > 1 else 3}f}"
    if metric in lost:
        value += f" ({0.0 - lost[metric]:+.{1 if scale > 1 else 3}f})"
    return value


def accuracy_targets(accuracy: dict[str, Any], on_gpu: bool, bundled: bool) -> list[Target]:
    """Rows for mad.bench.report.targets: (target, goal, measured, unit, met, applies)."""
    rows = accuracy.get("rows", {})
    best = accuracy.get("best")
    best_speedup = rows.get(best, {}).get("speedup") if best else None
    onnx = rows.get("onnx fp32", {}).get("speedup")
    return [
        (
            f"CPU: best backend within the accuracy bounds ({best or 'none'}) / eager fp32",
            ">= 1.5x",
            best_speedup,
            "x",
            lambda v: v >= 1.5,
            not on_gpu and bundled,
        ),
        (
            "CPU: ONNX fp32 / eager fp32 (accuracy section)",
            ">= 1.3x",
            onnx,
            "x",
            lambda v: v >= 1.3,
            not on_gpu and bundled,
        ),
    ]


def accuracy_headline(accuracy: dict[str, Any]) -> list[str]:
    from mad.bench.report import fmt

    parts = [
        f"{name} {fmt(row['total']['median_ms'], 'ms')} ({fmt(row.get('speedup'), 'x')})"
        for name, row in accuracy["rows"].items()
        if "total" in row
    ]
    best = f"  best within the accuracy bounds: {accuracy['best']}"
    return ["backends x precision: " + ", ".join(parts), best]
