"""The anytime section of the `mad bench` report: Markdown tables, terminal lines and the
latency/quality plot (a PNG beside the report; needs matplotlib, the `bench` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mad.bench.report import fmt, stats_cells, table
from mad.bench.stats import median

MIN_PLOTTED = 3  # answers a budget needs to be a point of the plot
# The metrics the refined tasks move (the bundled model refines keypoints and captions).
CURVE_METRICS = (("caption_BLEU4", "caption BLEU-4"), ("keypoints_AP", "keypoint AP"))


def steps_text(steps: dict[str, int] | None) -> str:
    return "–" if not steps else " ".join(f"{t[:3]}{k}" for t, k in steps.items())


def metric_cells(metrics: dict[str, float]) -> list[str]:
    return [fmt(metrics.get(name), "", 3) for name, _ in CURVE_METRICS]


def anytime_md(anytime: dict[str, Any], plot: str | None) -> list[str]:
    out = [
        "## Anytime serving (`mad serve`, concurrency 1 unless said)\n",
        f"Requests ask for the tasks the model refines: {anytime.get('tasks', 'all')}.\n",
    ]
    names = [label for _, label in CURVE_METRICS]
    if budgets := anytime.get("budgets"):
        rows = [
            [
                name,
                *["–"] * 5,
                fmt(median(ref.get("server_latency"))),
                *stats_cells(ref["latency"]),
                "–",
                *metric_cells(ref["metrics"]),
            ]
            for name, ref in (("default steps", budgets["full"]), ("one pass", budgets["one_pass"]))
        ]
        for level in budgets["levels"]:
            n = level["requests"]
            answered = n - level["refused"]
            rows.append(
                [
                    f"budget {level['budget_ms']:g} ms",
                    f"{level['refused']}/{n}",
                    f"{level['cut']}/{answered}",
                    f"{level['within_budget']}/{answered}",
                    f"{level.get('within_budget_server', '–')}/{answered}",
                    fmt(median(level["planned"])),
                    fmt(median(level.get("server_latency"))),
                    *stats_cells(level["latency"]),
                    f"{steps_text(level['typical_steps'])} "
                    f"({fmt(100 * (level['typical_share'] or 0), '%', 0)})",
                    *metric_cells(level["metrics_of_the_mix"]),
                ]
            )
        header = ["request", "422", "cut", "in budget", "in budget (server)", "planned ms"]
        header += ["server p50 ms", "p50 ms", "p90 ms", "p99 ms"]
        out += [
            f"### Latency budgets ({budgets['requests_per_level']} requests per row, each image "
            f"at every row in turn; metrics on {anytime['eval_images']} validation images at the "
            "steps the answers got, weighted by how many got each; steps: the most common)\n",
            table([*header, "steps (share)", *names], rows),
        ]
        if plot:
            out.append(f"![latency/quality]({plot})\n")
    if prog := anytime.get("progressive"):
        out += [
            "### Progressive results (NDJSON)\n",
            f"- first result (the draft) {fmt(median(prog['first_result']), 'ms')} median vs "
            f"final {fmt(median(prog['final_result']), 'ms')} "
            f"({fmt(100 * (prog['first_over_final'] or 0), '%', 0)} of it), "
            f"{prog['objects_per_request']:g} objects per request\n",
        ]
    if overload := anytime.get("overload"):
        rows = []
        for name, run in overload["runs"].items():
            rows.append(
                [
                    name.replace("_", " "),
                    f"{run['ok']}/{run['requests']}",
                    fmt(100 * run["share_503"], "%", 0),
                    fmt(100 * run["goodput"], "%", 0),
                    f"{run['goodput_rps']:.2f}",
                    f"{run.get('answers_per_s', 0):.2f}",
                    *stats_cells(run["latency"])[::2],  # p50, p99
                    run["degraded"],
                    *metric_cells(run["metrics"]),
                ]
            )
        header = ["server", "answered", "503", "goodput", "good req/s", "answers/s", "p50 ms"]
        header.append("p99 ms")
        out += [
            f"### Overload: {overload['rate_rps']:.1f} req/s offered (Poisson, twice what the "
            f"server sustains at full quality), queue {overload['queue_size']}, "
            f"{overload.get('blocks', 1)} alternating blocks; goodput = answered within "
            f"{anytime['slo_s']:g} s\n",
            table([*header, "degraded", *names], rows),
        ]
    if cache := anytime.get("feature_cache"):
        out += [
            "### Feature cache (MAD_FEATURE_CACHE_MB=64)\n",
            f"- caption of an image just encoded for detection: "
            f"{fmt(median(cache['caption_after_detection_same_image']), 'ms')} median (encode "
            f"{fmt(median(cache['encode_on_hit']), 'ms')}) vs a new image "
            f"{fmt(median(cache['caption_new_image']), 'ms')}: "
            f"{fmt(cache['miss_over_hit'], 'x')}\n",
        ]
    return out


def anytime_headline(anytime: dict[str, Any]) -> list[str]:
    lines = []
    if budgets := anytime.get("budgets"):
        for level in budgets["levels"]:
            lines.append(
                f"budget {level['budget_ms']:g} ms: p50 {fmt(median(level['latency']), 'ms')}, "
                f"steps {steps_text(level['typical_steps'])}, "
                + ", ".join(
                    f"{label} {fmt(level['metrics_of_the_mix'].get(name), '', 3)}"
                    for name, label in CURVE_METRICS
                )
            )
    if prog := anytime.get("progressive"):
        lines.append(
            f"progressive: draft {fmt(median(prog['first_result']), 'ms')} vs final "
            f"{fmt(median(prog['final_result']), 'ms')}"
        )
    for name, run in (anytime.get("overload") or {}).get("runs", {}).items():
        lines.append(
            f"overload, {name.replace('_', ' ')}: goodput {fmt(100 * run['goodput'], '%', 0)}, "
            f"503 {fmt(100 * run['share_503'], '%', 0)}, p99 "
            f"{fmt(run['latency'].get('p99_ms'), 'ms')}"
        )
    if cache := anytime.get("feature_cache"):
        lines.append(f"feature cache: new image / cached image {fmt(cache['miss_over_hit'], 'x')}")
    return lines


def plot_budgets(anytime: dict[str, Any], path: Path) -> Path | None:
    """Latency p50 (a bar to the p99) against each curve metric (of the answers' steps), one
    point per budget with enough answers, joined in budget order, and the default and
    one-pass answers. None when matplotlib is missing or there is nothing to plot."""
    budgets = anytime.get("budgets")
    if not budgets:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # A budget most requests could not hold (refused) has too few answers to plot.
    levels = [lv for lv in budgets["levels"] if lv["latency"].get("n", 0) >= MIN_PLOTTED]
    figure, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(11, 4.2))
    for axis, (name, label) in zip(axes, CURVE_METRICS, strict=True):
        curve = [(lv["latency"], lv["metrics_of_the_mix"].get(name), lv) for lv in levels]
        curve = [(lat, value, lv) for lat, value, lv in curve if value is not None]
        if curve:
            axis.plot([c[0]["median_ms"] for c in curve], [c[1] for c in curve], "-", alpha=0.4)
        for i, (latency, value, level) in enumerate(curve):
            p50, p99 = latency["median_ms"], latency["p99_ms"]
            axis.errorbar(p50, value, xerr=[[0], [p99 - p50]], fmt="o", capsize=3, color="C0")
            offset = (4, 6 if i % 2 else -12)  # alternate, so neighbours' labels do not collide
            axis.annotate(
                f"{level['budget_ms']:g}",
                (p50, value),
                textcoords="offset points",
                xytext=offset,
                fontsize=8,
            )
        for ref, colour in (("one_pass", "C3"), ("full", "C2")):
            metrics, latency = budgets[ref]["metrics"], budgets[ref]["latency"]
            if name in metrics and latency.get("n"):
                p50, p99 = latency["median_ms"], latency["p99_ms"]
                text = "one pass" if ref == "one_pass" else "default steps"
                axis.errorbar(
                    p50,
                    metrics[name],
                    xerr=[[0], [p99 - p50]],
                    fmt="s",
                    capsize=3,
                    color=colour,
                    label=text,
                )
        axis.set_xlabel("latency, ms (p50; bar to p99)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle("What a latency budget buys (points: budgets in ms)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
