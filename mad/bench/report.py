"""The benchmark report: one JSON (everything measured) and one Markdown (tables, targets)
under benchmarks/, stamped with hardware, versions, settings and the git commit
(mad/bench/environment.py), so numbers from different machines and revisions are never
confused; and its headline for the terminal."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from mad.bench.stats import median

SCHEMA = "mad-bench/1"


# --- targets ------------------------------------------------------------------------------
Target = tuple[str, str, float | None, str, Callable[[float], bool], bool]


def target_rows(rows: list[Target]) -> list[dict[str, Any]]:
    """(name, goal, measured, unit, test, conditions apply) -> the report's target entries;
    met is None when nothing was measured, or measured under other conditions (a CPU run
    meets no GPU target)."""
    return [
        {
            "target": name,
            "goal": goal,
            "measured": value,
            "unit": unit,
            "met": None if value is None or not applies else bool(test(value)),
            "applies": applies,
        }
        for name, goal, value, unit, test, applies in rows
    ]


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: reported, never asserted. `applies` says whether this run's
    conditions (device, preset, size) are the ones the target was set for."""
    s = report["settings"]
    on_gpu = s["device"].startswith("cuda")
    paper = s["preset"] == "r50" and tuple(s["image_size"]) == (800, 1333) and s["batch_size"] == 1
    stage = report.get("stage_latency") or {}
    ar = (report.get("mad_vs_ar") or {}).get("ratios", {})
    kept = report.get("kept_vs_fixed") or {}
    onnx = (report.get("backends") or {}).get("onnx_vs_eager") or {}
    http = report.get("http") or {}
    bundled = s.get("bundled_model", False)
    rows = [
        (
            "GPU: r50 800x1333, 4 tasks, default K, batch 1: model median",
            "<= 25 ms",
            median(stage.get("total")),
            "ms",
            lambda v: v <= 25,
            on_gpu and paper,
        ),
        (
            "GPU: autoregressive (KV cache) / MAD, same network",
            ">= 25x",
            ar.get("ar_cache_vs_mad_schedule"),
            "x",
            lambda v: v >= 25,
            on_gpu and paper,
        ),
        (
            "CPU: fixed 100 / kept detections (segmentation + keypoints)",
            ">= 5x",
            kept.get("ratio"),
            "x",
            lambda v: v >= 5,
            not on_gpu and kept.get("fixed", {}).get("per_image") == 100,
        ),
        (
            "CPU: eager PyTorch / ONNX Runtime",
            ">= 1.3x",
            onnx.get("ratio"),
            "x",
            lambda v: v >= 1.3,
            not on_gpu,
        ),
        (
            "CPU: service overhead share of a request (bundled model)",
            "<= 10%",
            _pct(http.get("overhead", {}).get("share")),
            "%",
            lambda v: v <= 10,
            not on_gpu and bundled,
        ),
        (
            "CPU: dynamic batching throughput gain at concurrency 8",
            ">= 1.5x",
            http.get("batching_gain", {}).get("ratio"),
            "x",
            lambda v: v >= 1.5,
            not on_gpu and http.get("batching_gain", {}).get("concurrency") == 8,
        ),
    ]
    if accuracy := report.get("accuracy"):
        from mad.bench.accuracy_bench import accuracy_targets

        rows += accuracy_targets(accuracy, on_gpu, bundled)
    return target_rows(rows)


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


# --- files --------------------------------------------------------------------------------
def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    s = report["settings"]
    stamp = datetime.fromisoformat(report["created"]).strftime("%Y%m%d-%H%M%S")
    stem = f"bench-{stamp}-{s['preset']}-{s['device'].replace(':', '')}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot = None
    if anytime := report.get("anytime"):
        from mad.bench.anytime_report import plot_budgets

        plot = plot_budgets(anytime, out_dir / f"{stem}-budgets.png")
    md_path.write_text(markdown(report, plot.name if plot else None))
    return json_path, md_path


def fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "–"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.{digits}f}{' ' + unit if unit and unit != '%' else unit}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def targets_table(
    targets: list[dict[str, Any]],
    applies: tuple[str, str] = ("this run", "differ (indicative only)"),
) -> str:
    """The targets as a Markdown table; `applies`: the cell when the run's conditions are the
    target's, and when they are not."""
    rows = [
        [
            t["target"],
            t["goal"],
            fmt(t["measured"], t["unit"]),
            "–" if t["met"] is None else ("yes" if t["met"] else "no"),
            applies[0] if t["applies"] else applies[1],
        ]
        for t in targets
    ]
    return table(["target", "goal", "measured", "met", "conditions of the target"], rows)


def ar_table(ar: dict[str, Any]) -> str:
    """mad_vs_autoregressive's result as a Markdown table: per task and in total (median ms)."""
    modes = ("mad_k0", "mad_schedule", "ar_cache", "ar_no_cache")
    rows = [
        [t, v["sequences"], v["tokens"], *(fmt(median(v[m])) for m in modes)]
        for t, v in ar["tasks"].items()
    ]
    rows.append(["encode + all tasks", "", "", *(fmt(ar["totals_ms"][m]) for m in modes)])
    header = ["task", "sequences", "tokens", "MAD K=0", "MAD schedule", "AR + KV cache"]
    return table([*header, "AR no cache"], rows)


def stats_cells(stats: dict[str, Any] | None) -> list[str]:
    stats = stats or {}
    return [fmt(stats.get(k)) for k in ("median_ms", "p90_ms", "p99_ms")]


def markdown(report: dict[str, Any], plot: str | None = None) -> str:
    """The report as Markdown; `plot`: the file name of the latency/quality plot, if any."""
    env, s = report["environment"], report["settings"]
    gpu = env["gpu"]["name"] if env.get("gpu") else "none"
    git = env["git"]
    out = [
        f"# mad bench — {s['preset']} {s['image_size'][0]}x{s['image_size'][1]} on {s['device']}\n",
        f"- created: {report['created']}, took {fmt(report.get('duration_s'), 's', 0)}",
        f"- git: {git.get('commit') or 'unknown'}{' (dirty)' if git.get('dirty') else ''}",
        f"- hardware: {env['cpu']} ({env['cpu_count']} cores, {env['memory_gib']} GiB), "
        f"GPU: {gpu}; load average at start: {env.get('load_average')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- model: {report['model']['source']}",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in s.items()) + "\n",
    ]
    out += [
        "## Targets\n",
        targets_table(report["targets"]),
    ]
    if stage := report.get("stage_latency"):
        rows = [
            [name, *stats_cells(v), stage["passes"].get(name, ""), stage["sequences"].get(name, "")]
            for name, v in stage["stages"].items()
        ]
        rows.append(["**total**", *stats_cells(stage["total"]), "", ""])
        out += [
            "## Stage latency (ms)\n",
            table(["stage", "median", "p90", "p99", "passes", "sequences"], rows),
        ]
    if ar := report.get("mad_vs_ar"):
        out += [
            "## MAD vs autoregressive, same network (median ms)\n",
            ar_table(ar),
            "\n".join(f"- {k}: {fmt(v, 'x')}" for k, v in ar["ratios"].items()) + "\n",
        ]
    if kept := report.get("kept_vs_fixed"):
        rows = [
            [
                name,
                kept[name]["per_image"],
                *(fmt(median(kept[name][k])) for k in ("decode", "postprocess", "total")),
            ]
            for name in ("kept", "fixed")
        ]
        out += [
            f"## Kept detections vs fixed sequences ({', '.join(kept['tasks'])}; median ms)\n",
            table(["prompts", "per image", "decode", "postprocess", "total"], rows),
            f"- ratio: {fmt(kept['ratio'], 'x')} (decode only "
            f"{fmt(kept['ratio_decode_only'], 'x')})\n",
        ]
    out += backends_md(report.get("backends") or {})
    if accuracy := report.get("accuracy"):
        from mad.bench.accuracy_bench import accuracy_md

        out += accuracy_md(accuracy)
    out += http_md(report.get("http") or {})
    out += protocols_md(report.get("protocols") or {})
    if anytime := report.get("anytime"):
        from mad.bench.anytime_report import anytime_md

        out += anytime_md(anytime, plot)
    if report.get("skipped"):
        out += ["## Skipped\n"] + [f"- {k}: {v}" for k, v in report["skipped"].items()] + [""]
    return "\n".join(out) + "\n"


def backends_md(backends: dict[str, Any]) -> list[str]:
    out = []
    if onnx := backends.get("onnx_vs_eager"):
        rows = [[name, *stats_cells(v)] for name, v in onnx["backends"].items()]
        out += [
            "## Eager PyTorch vs ONNX Runtime (pipeline, ms)\n",
            table(["backend", "median", "p90", "p99"], rows),
            f"- ratio ({onnx.get('ratio_of', 'torch / onnx')}): {fmt(onnx.get('ratio'), 'x')}\n",
        ]
    if variants := backends.get("gpu_variants"):
        rows = [
            [
                name,
                *(stats_cells(v.get("total")) if "total" in v else ["–"] * 3),
                fmt(v.get("speedup_vs_fp32"), "x"),
                v.get("error", ""),
            ]
            for name, v in variants.items()
        ]
        out += [
            "## GPU variants (model total, ms)\n",
            table(["variant", "median", "p90", "p99", "vs fp32", "error"], rows),
        ]
    return out


def http_md(http: dict[str, Any]) -> list[str]:
    if not http:
        return []
    rows = []
    for mode, entry in http["modes"].items():
        for c, level in entry["levels"].items():
            errors = sum(level["errors"].values())
            rows.append(
                [
                    mode,
                    c,
                    level["ok"],
                    errors,
                    f"{level['throughput_rps']:.2f}",
                    *stats_cells(level["latency"]),
                ]
            )
    out = [
        "## HTTP end to end (`mad serve` on loopback)\n",
        table(["mode", "concurrency", "ok", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms"], rows),
    ]
    if overhead := http.get("overhead"):
        out.append(
            f"- service overhead at concurrency 1, median per request (its latency minus the "
            f"model's stage times in its response): {fmt(_pct(overhead['share']), '%')}, "
            f"{fmt(overhead['overhead_ms'], 'ms')} (client p50 "
            f"{fmt(overhead['client_median_ms'], 'ms')}); against the same request timed "
            f"in-process before ({fmt(overhead['pipeline_median_ms'], 'ms')}): "
            f"{fmt(_pct(overhead['share_vs_in_process']), '%')}"
        )
    if gain := http.get("batching_gain"):
        out.append(
            f"- dynamic batching at concurrency {gain['concurrency']}: "
            f"{gain['throughput_on_rps']:.2f} vs {gain['throughput_off_rps']:.2f} req/s "
            f"= {fmt(gain['ratio'], 'x')}"
        )
    if window := http.get("batch_window"):
        p50, rps = window["p50_ms"], window["throughput_rps"]
        out.append(
            f"- batching window at concurrency {window['concurrency_low']}, p50: off "
            f"{fmt(p50['batching_off'], 'ms')}, adaptive {fmt(p50['adaptive'], 'ms')}, fixed "
            f"{fmt(p50['fixed'], 'ms')}; at concurrency {window['concurrency_high']}: off "
            f"{fmt(rps['batching_off'])}, adaptive {fmt(rps['adaptive'])}, fixed "
            f"{fmt(rps['fixed'])} req/s"
        )
    if ceiling := http.get("in_process_batching"):
        out.append(
            f"- its ceiling, in process without HTTP: {ceiling['batch']} requests one by "
            f"one {fmt(median(ceiling['one_by_one']), 'ms')} vs one batch "
            f"{fmt(median(ceiling['batched']), 'ms')} = {fmt(ceiling['ratio'], 'x')}"
        )
    return [*out, ""]


def protocols_md(protocols: dict[str, Any]) -> list[str]:
    if not protocols:
        return []
    rows = [
        [
            protocol,
            c,
            level["ok"],
            sum(level["errors"].values()),
            f"{level['throughput_rps']:.2f}",
            *stats_cells(level["latency"]),
        ]
        for protocol, levels in protocols["levels"].items()
        for c, level in levels.items()
    ]
    header = ["protocol", "concurrency", "ok", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms"]
    versus = ", ".join(f"{p} {fmt(r, 'x')}" for p, r in protocols["p50_vs_native"].items())
    return [
        "## Protocols: POST /predict vs KServe v2 REST vs v2 gRPC (same image, one server)\n",
        table(header, rows),
        f"- v2 outputs asked for: {', '.join(protocols['v2_outputs'])}",
        f"- p50 over native /predict at concurrency 1: {versus}",
        "",
    ]


def headline(report: dict[str, Any]) -> str:
    """The ratios and targets, for the terminal."""
    lines = []
    if stage := report.get("stage_latency"):
        parts = ", ".join(f"{k} {v['median_ms']:.1f}" for k, v in stage["stages"].items())
        lines.append(f"model median {median(stage['total']):.1f} ms ({parts})")
    for key, value in (report.get("mad_vs_ar") or {}).get("ratios", {}).items():
        lines.append(f"{key}: {fmt(value, 'x')}")
    if kept := report.get("kept_vs_fixed"):
        lines.append(
            f"fixed {kept['fixed']['per_image']} / kept {kept['kept']['per_image']}: "
            f"{fmt(kept['ratio'], 'x')}"
        )
    if onnx := (report.get("backends") or {}).get("onnx_vs_eager"):
        lines.append(f"eager / onnx: {fmt(onnx.get('ratio'), 'x')}")
    if accuracy := report.get("accuracy"):
        from mad.bench.accuracy_bench import accuracy_headline

        lines += accuracy_headline(accuracy)
    http = report.get("http") or {}
    if overhead := http.get("overhead"):
        lines.append(f"service overhead share: {fmt(100 * overhead['share'], '%')}")
    if gain := http.get("batching_gain"):
        lines.append(
            f"batching throughput gain at concurrency {gain['concurrency']}: "
            f"{fmt(gain['ratio'], 'x')}"
        )
    if window := http.get("batch_window"):
        p50 = window["p50_ms"]
        lines.append(
            f"  p50 at concurrency {window['concurrency_low']}: batching off "
            f"{fmt(p50['batching_off'], 'ms')}, adaptive window {fmt(p50['adaptive'], 'ms')}, "
            f"fixed window {fmt(p50['fixed'], 'ms')}"
        )
    if ceiling := http.get("in_process_batching"):
        lines.append(
            f"  in-process ceiling (batch {ceiling['batch']} vs one by one): "
            f"{fmt(ceiling['ratio'], 'x')}"
        )
    if protocols := report.get("protocols"):
        p50 = [
            f"{p} {fmt(median(by_level.get('1', {}).get('latency')), 'ms')}"
            for p, by_level in protocols["levels"].items()
        ]
        lines.append("p50 at concurrency 1: " + ", ".join(p50))
    if anytime := report.get("anytime"):
        from mad.bench.anytime_report import anytime_headline

        lines += anytime_headline(anytime)
    lines.append(targets_table(report["targets"], ("this run", "differ")))
    for name, error in report["errors"].items():
        lines.append(f"ERROR {name}: {error}")
    return "\n".join(lines)
