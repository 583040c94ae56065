"""The GPU check's report: gpu-check-<stamp>-<device>.json (everything) and .md (tables and
the issue's GPU targets), small enough to come back from a short GPU lease."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from mad.bench.report import Target, ar_table, fmt, table, target_rows, targets_table
from mad.bench.stats import median


def best_variant(rows: dict[str, Any]) -> tuple[str | None, float | None]:
    """The fastest variant that ran -> (name, median ms)."""
    timed = {name: median(row["total"]) for name, row in rows.items() if "total" in row}
    if not timed:
        return None, None
    name = min(timed, key=lambda n: timed[n] or float("inf"))
    return name, timed[name]


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's GPU targets; they apply only to r50 at 800x1333 on CUDA."""
    s = report["settings"]
    applies = s["device"].startswith("cuda") and tuple(s["r50_size"]) == (800, 1333)
    r50 = report.get("r50") or {}
    batch1 = r50.get("batches", {}).get("1", {})
    name, best = best_variant(batch1)
    ar = (r50.get("mad_vs_ar") or {}).get("ratios", {}).get("ar_cache_vs_mad_schedule")
    gains = {k: v for k, v in (r50.get("throughput_batch_vs_1") or {}).items() if v is not None}
    gain_name = name if name in gains else (max(gains, key=lambda k: gains[k]) if gains else None)
    rows: list[Target] = [
        (
            f"r50 800x1333, 4 tasks, default K, batch 1: model median ({name or '-'})",
            "<= 25 ms",
            best,
            "ms",
            lambda v: v <= 25,
            applies,
        ),
        (
            "autoregressive (KV cache) / MAD, same network, fp32",
            ">= 25x",
            ar,
            "x",
            lambda v: v >= 25,
            applies,
        ),
        (
            f"batch {max(s['batches'])} / batch 1 throughput ({gain_name or '-'})",
            ">= 4x",
            gains.get(gain_name) if gain_name else None,
            "x",
            lambda v: v >= 4,
            applies,
        ),
    ]
    return target_rows(rows)


def write_check_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report["targets"] = targets(report)
    stamp = datetime.fromisoformat(report["created"]).strftime("%Y%m%d-%H%M%S")
    stem = f"gpu-check-{stamp}-{report['settings']['device'].replace(':', '')}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    # Rewritten after every section: a kill mid-write must leave the previous whole file.
    for path, text in (
        (json_path, json.dumps(report, indent=2, default=str) + "\n"),
        (md_path, markdown(report)),
    ):
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text)
        partial.replace(path)
    return json_path, md_path


def headline(report: dict[str, Any]) -> str:
    lines = [
        f"{t['target']}: {fmt(t['measured'], t['unit'])} (goal {t['goal']}"
        f"{'' if t['applies'] else ', conditions differ'})"
        for t in report["targets"]
    ]
    parity = report.get("parity") or {}
    if "fp32_pass" in parity:
        lines.append(
            f"parity fp32: {'pass' if parity['fp32_pass'] else 'FAIL'}"
            + (
                f", bf16: {'pass' if parity['bf16_pass'] else 'FAIL'}"
                if "bf16_pass" in parity
                else ""
            )
        )
    lines += [f"ERROR {k}: {v}" for k, v in report["errors"].items()]
    lines += [f"skipped {k}: {v}" for k, v in report["skipped"].items()]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    d, env, s = report["device"], report["environment"], report["settings"]
    git = env.get("git") or {}
    out = [
        f"# GPU check: {d.get('name')} ({s['device']})",
        "",
        f"- created {report['created']}, took {report['duration_s']} s"
        f" (budget {s['budget_s']:.0f} s){', quick' if s['quick'] else ''}",
        *(
            []
            if report.get("finished", True)
            else ["- cut off before the end: a section missing here was running or yet to run"]
        ),
        f"- device: {d.get('name')}, capability {d.get('capability', '-')}, "
        f"{d.get('memory_gib', '-')} GiB, driver {d.get('driver', '-')}",
        f"- torch {d['torch']}, CUDA {d['cuda']}, cuDNN {d['cudnn']}; "
        f"cpu: {env.get('cpu')} ({env.get('cpu_count')} cores)",
        f"- git {git.get('commit')}{' (dirty)' if git.get('dirty') else ''}",
        f"- workload: {s['kept']} kept detections per image prompt segmentation and "
        f"keypoints, default schedules, {s['repeats']} timed runs after {s['warmup']} "
        "warm-up runs; model time = preprocess + encode + every task + postprocess",
        "",
        "## Targets",
        "",
    ]
    out.append(targets_table(report["targets"], ("this run", "differ")))
    if parity := report.get("parity"):
        out += ["", "## Parity with the CPU (bundled model)", "", parity_md(parity)]
    for key, title in (
        ("r50", f"r50 {s['r50_size'][0]}x{s['r50_size'][1]}, random weights"),
        ("bundled", "bundled model (mad-tiny, 256x256)"),
    ):
        if section := report.get(key):
            out += ["", f"## {title}: model time per batch (median ms)", "", variants_md(section)]
            if ar := section.get("mad_vs_ar"):
                out += ["", ar_md(ar)]
    if http := report.get("http"):
        out += ["", "## HTTP service on the device (bundled model)", "", http_md(http)]
    problems = [f"- error {k}: {v}" for k, v in report["errors"].items()]
    problems += [f"- skipped {k}: {v}" for k, v in report["skipped"].items()]
    if problems:
        out += ["", "## Errors and skipped sections", "", *problems]
    return "\n".join(out) + "\n"


def parity_md(parity: dict[str, Any]) -> str:
    rows = []
    for variant in ("fp32", "bf16"):
        for task, v in (parity.get(variant) or {}).get("logits", {}).items():
            rows.append(
                [
                    variant,
                    task,
                    f"{v['max_abs_diff']:.2e}",
                    f"{v['mean_abs_diff']:.2e}",
                    f"{100 * v['argmax_agreement']:.2f}%",
                    margin_cell(v),
                ]
            )
    header = [
        "variant",
        "task",
        "max abs logit diff",
        "mean abs diff",
        "argmax agreement",
        "fp32 top-2 margin: changed / all (median)",
    ]
    lines = [table(header, rows), ""]
    n = len(parity["images"])
    for variant in ("fp32", "bf16"):
        if variant in parity:
            lines.append(
                f"- {variant}: decoded results the same as on the CPU for "
                f"{parity[variant]['same_decoded']}/{n} images"
            )
    lines.append(
        f"- fp32 (TF32 off) {'pass' if parity.get('fp32_pass') else 'FAIL'}"
        + (
            f"; bf16 {'pass' if parity.get('bf16_pass') else 'FAIL'}"
            if "bf16_pass" in parity
            else ""
        )
    )
    lines.append(f"- tolerances: {parity['tolerances']}")
    return "\n".join(lines)


def margin_cell(logits: dict[str, Any]) -> str:
    """How close fp32's top two logits were where the argmax changed, against everywhere."""
    if "margin_median" not in logits:  # a report from before the margins were recorded
        return "-"
    changed = logits["flipped_margin_median"]
    return f"{'none' if changed is None else f'{changed:.3f}'} / {logits['margin_median']:.3f}"


def variants_md(section: dict[str, Any]) -> str:
    batches = section["batches"]
    names = list(next(iter(batches.values()), {}))
    header = (
        ["variant"]
        + [f"batch {b}" for b in batches]
        + [f"images/s (batch {b})" for b in batches]
        + ["throughput gain"]
    )
    rows = []
    for name in names:
        cells = [name]
        cells += [
            fmt(median(batches[b][name].get("total")), "ms")
            if "total" in batches[b].get(name, {})
            else (
                batches[b].get(name, {}).get("error")
                or batches[b].get(name, {}).get("skipped")
                or "-"
            )[:80]
            for b in batches
        ]
        cells += [fmt(batches[b].get(name, {}).get("images_per_s")) for b in batches]
        cells.append(fmt((section.get("throughput_batch_vs_1") or {}).get(name), "x"))
        rows.append(cells)
    lines = [table(header, rows)]
    first = batches.get("1", {})
    name, _ = best_variant(first)
    if name:
        stages = first[name]["stages_ms"]
        lines += [
            "",
            f"Stages of the fastest batch-1 variant ({name}, median ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()),
        ]
        if graphs := first[name]["runner"].get("cuda_graphs"):
            lines.append(f"CUDA graphs: {graphs}")
    return "\n".join(lines)


def ar_md(ar: dict[str, Any]) -> str:
    ratios = ", ".join(f"{k} {fmt(v, 'x')}" for k, v in ar["ratios"].items())
    return (
        "MAD vs autoregressive on the same network (fp32, batch 1, median ms):\n\n"
        + ar_table(ar)
        + f"\n\n{ratios}"
    )


def http_md(http: dict[str, Any]) -> str:
    rows = []
    for mode, data in http.get("modes", {}).items():
        for level, r in data["levels"].items():
            rows.append(
                [
                    mode,
                    level,
                    fmt(r.get("throughput_rps")),
                    fmt(median(r.get("latency"))),
                    fmt((r.get("latency") or {}).get("p99_ms")),
                    sum(r.get("errors", {}).values()),
                ]
            )
    return f"Runner options: {http.get('runner_options')}\n\n" + table(
        ["mode", "concurrency", "req/s", "p50 ms", "p99 ms", "errors"], rows
    )
