"""`mad bench`: every latency and throughput figure of the issue in one run, one report."""

from __future__ import annotations

import io
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from PIL import Image

from model.request_spec import RequestError, parse_refine_steps
from service.cli import request_error

if TYPE_CHECKING:
    from mad.bench.model_bench import ModelBench

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    """How much each section measures: what an option left out falls back to."""

    repeats: int
    warmup: int
    ar_repeats: int
    kept: int
    fixed: int
    concurrency: str
    http_requests: int
    http_seconds: float
    anytime_images: int
    anytime_requests: int
    anytime_overload: int
    accuracy_images: int
    image_size: str | None = None  # None: the model's


# Defaults fit a 2-core CPU in well under 10 minutes (15 with the anytime section); --quick
# is the smoke-test size.
DEFAULTS = Sizes(
    repeats=20,
    warmup=3,
    ar_repeats=3,
    kept=7,
    fixed=100,
    concurrency="1,4,8",
    http_requests=200,
    http_seconds=8.0,
    anytime_images=100,
    anytime_requests=20,
    anytime_overload=150,
    accuracy_images=100,
)
QUICK = Sizes(
    repeats=3,
    warmup=1,
    ar_repeats=1,
    kept=2,
    fixed=10,
    concurrency="1,2",
    http_requests=6,
    http_seconds=2.0,
    anytime_images=4,
    anytime_requests=2,
    anytime_overload=8,
    accuracy_images=4,
    image_size="96x96",
)


@dataclass(frozen=True)
class BenchSettings:
    """One `mad bench` invocation's options, defaults filled in."""

    preset: str | None
    checkpoint: Path | None
    size: tuple[int, int] | None
    backend: str
    device: str
    precision: str
    compile: bool
    batch_size: int
    refine: list[str]
    levels: list[int]
    sections: dict[str, bool]  # http, protocols, onnx, ar, variants, anytime, accuracy
    quick: bool
    repeats: int
    warmup: int
    ar_repeats: int
    kept: int
    fixed: int
    http_requests: int
    http_seconds: float
    anytime_images: int
    anytime_requests: int
    anytime_overload: int
    accuracy_images: int


def given_or(value: T | None, default: T) -> T:
    return default if value is None else value


def bench(
    preset: str | None = typer.Option(
        None,
        help="tiny, r50, swin-b or vit-b with random "
        "weights (default: the bundled model if present, "
        "else tiny).",
    ),
    checkpoint: Path | None = typer.Option(
        None, help="Checkpoint directory (default: the bundled checkpoints/mad-tiny if present)."
    ),
    image_size: str | None = typer.Option(
        None, help="HxW of the input image and canvas (default: the model's, r50: 800x1333)."
    ),
    backend: str = typer.Option("torch", help="torch, onnx, tensorrt or openvino."),
    device: str = typer.Option("auto", help="auto (cuda when available), cpu or cuda:N."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 (torch on CUDA)."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile."),
    batch_size: int = typer.Option(1, min=1, help="Images per model call."),
    refine_steps: list[str] = typer.Option(
        [],
        help="K for every task, or task:K, "
        "comma-separated or repeated (default: the "
        "checkpoint's schedules).",
    ),
    repeats: int | None = typer.Option(None, min=1, help="Timed runs (20; quick 3)."),
    warmup: int | None = typer.Option(None, min=0, help="Untimed runs first (3; quick 1)."),
    ar_repeats: int | None = typer.Option(
        None, min=1, help="Timed autoregressive runs (CPU 3, GPU = repeats; quick 1)."
    ),
    kept: int | None = typer.Option(
        None, min=1, help="Detections per image prompting segmentation and keypoints (7; quick 2)."
    ),
    fixed: int | None = typer.Option(
        None,
        min=1,
        help="Sequences of the fixed-slots comparison (100, the paper's num_slots; quick 10).",
    ),
    concurrency: str | None = typer.Option(
        None, help="HTTP client concurrency levels (1,4,8; quick 1,2)."
    ),
    http_requests: int | None = typer.Option(
        None, min=1, help="Most requests per HTTP level (200; quick 6)."
    ),
    http_seconds: float | None = typer.Option(
        None, min=0.1, help="Most seconds per HTTP level (8; quick 2)."
    ),
    http: bool = typer.Option(True, "--http/--no-http", help="End-to-end HTTP benchmark."),
    protocols: bool = typer.Option(
        True,
        "--protocols/--no-protocols",
        help="POST /predict vs KServe v2 REST vs v2 gRPC (needs tritonclient).",
    ),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Eager vs ONNX Runtime."),
    ar: bool = typer.Option(True, "--ar/--no-ar", help="Autoregressive baseline."),
    variants: bool = typer.Option(
        True,
        "--variants/--no-variants",
        help="GPU only: bf16, fp16, compile, CUDA graphs, TensorRT.",
    ),
    anytime: bool = typer.Option(
        True,
        "--anytime/--no-anytime",
        help="Latency budgets, degradation under overload, progressive results, feature cache.",
    ),
    anytime_images: int | None = typer.Option(
        None, min=1, help="Validation images the anytime metrics are computed on (100; quick 4)."
    ),
    anytime_requests: int | None = typer.Option(
        None, min=1, help="Requests per budget level and progressive run (20; quick 2)."
    ),
    anytime_overload: int | None = typer.Option(
        None, min=1, help="Requests of each overload run (150; quick 8)."
    ),
    accuracy: bool = typer.Option(
        False,
        "--accuracy/--no-accuracy",
        help="Backend x precision table: eager fp32/bf16/compile, ONNX fp32/int8, each with "
        "its latency and its mad eval metrics on held-out images.",
    ),
    accuracy_images: int | None = typer.Option(
        None, min=1, help="Held-out images each accuracy row is evaluated on (100; quick 4)."
    ),
    out: Path = typer.Option(Path("benchmarks"), help="Report directory."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (smoke test)."),
) -> None:
    """Benchmark the model and the service: stage latency, MAD vs autoregressive, kept vs
    fixed sequences, eager vs ONNX Runtime (and GPU variants), HTTP latency and throughput
    with and without dynamic batching, native vs KServe v2 REST vs v2 gRPC. Prints the
    ratios; writes JSON + Markdown to --out."""
    import torch

    from mad.bench.workload import parse_size

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base = QUICK if quick else DEFAULTS
    if device.startswith("cuda") and not quick:
        base = replace(base, ar_repeats=repeats or base.repeats)  # AR is affordable on a GPU
    size_text = given_or(image_size, base.image_size)
    try:
        size = parse_size(size_text) if size_text else None
        levels = sorted(
            {int(c) for c in given_or(concurrency, base.concurrency).split(",") if c.strip()}
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if quick and checkpoint is None and preset is None:
        preset = "tiny"  # never the bundled model: the smoke test must not depend on it
    run = BenchRun(
        BenchSettings(
            preset=preset,
            checkpoint=checkpoint,
            size=size,
            backend=backend,
            device=device,
            precision=precision,
            compile=compile,
            batch_size=batch_size,
            refine=refine_steps,
            levels=levels,
            sections={
                "http": http,
                "protocols": protocols,
                "onnx": onnx,
                "ar": ar,
                "variants": variants,
                "anytime": anytime,
                "accuracy": accuracy,
            },
            quick=quick,
            repeats=given_or(repeats, base.repeats),
            warmup=given_or(warmup, base.warmup),
            ar_repeats=given_or(ar_repeats, base.ar_repeats),
            kept=given_or(kept, base.kept),
            fixed=given_or(fixed, base.fixed),
            http_requests=given_or(http_requests, base.http_requests),
            http_seconds=given_or(http_seconds, base.http_seconds),
            anytime_images=given_or(anytime_images, base.anytime_images),
            anytime_requests=given_or(anytime_requests, base.anytime_requests),
            anytime_overload=given_or(anytime_overload, base.anytime_overload),
            accuracy_images=given_or(accuracy_images, base.accuracy_images),
        )
    )
    try:
        report = run.execute()
    except RequestError as exc:  # --refine-steps against the model's tasks
        request_error("bench", exc)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # no model to benchmark
        raise SystemExit(f"mad bench: {exc}") from exc
    from mad.bench.report import write_report

    json_path, md_path = write_report(report, out)
    typer.echo(headline(report))
    typer.echo(f"wrote {json_path}\nwrote {md_path}")
    if report["errors"]:
        raise typer.Exit(1)


class BenchRun:
    """One `mad bench` invocation: sections run in order, each failure recorded, not fatal."""

    def __init__(self, settings: BenchSettings) -> None:
        self.s = settings
        self.report: dict[str, Any] = {"errors": {}, "skipped": {}}
        self.bench: ModelBench | None = None  # the model under test, once prepared
        self.export_dir: Path | None = None  # its ONNX export, when one was made

    def echo(self, text: str) -> None:
        typer.echo(text, err=True)

    def model(self) -> ModelBench:
        """The model under test; from prepare() until the HTTP section frees it."""
        if self.bench is None:
            raise RuntimeError("no model loaded here (prepare() loads it, http frees it)")
        return self.bench

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        self.echo(f"[{name}]")
        started = time.perf_counter()
        try:
            self.report[name] = fn()
        except Exception as exc:
            self.report["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.echo(traceback.format_exc(limit=4))
        self.echo(f"  {time.perf_counter() - started:.1f} s")

    def execute(self) -> dict[str, Any]:
        from mad.bench.report import environment, now, targets

        started, s = time.perf_counter(), self.s
        self.report.update(schema="mad-bench/1", created=now(), environment=environment(ROOT))
        with tempfile.TemporaryDirectory(prefix="mad-bench-") as tmp:
            self.prepare(Path(tmp))
            self.section("stage_latency", lambda: self.model().stage_latency(s.repeats, s.warmup))
            if s.sections["ar"]:
                self.section("mad_vs_ar", self.mad_vs_ar)
            else:
                self.report["skipped"]["mad_vs_ar"] = "--no-ar"
            self.section("kept_vs_fixed", self.kept_vs_fixed)
            self.section("backends", self.backends)
            if s.sections["accuracy"]:
                self.section("accuracy", self.accuracy)
            else:
                self.report["skipped"]["accuracy"] = "off (--accuracy runs it)"
            self.bench = None  # free the model before the server loads its own
            if s.sections["http"]:
                self.section("http", self.http)
            else:
                self.report["skipped"]["http"] = "--no-http"
            if not s.sections["protocols"]:
                self.report["skipped"]["protocols"] = "--no-protocols"
            elif not tritonclient_installed():
                self.report["skipped"]["protocols"] = "no tritonclient (the dev extra)"
            else:
                self.section("protocols", self.protocols)
            if s.sections["anytime"]:
                self.section("anytime", self.anytime)
            else:
                self.report["skipped"]["anytime"] = "--no-anytime"
        self.report["duration_s"] = time.perf_counter() - started
        self.report["targets"] = targets(self.report)
        return self.report

    def prepare(self, tmp: Path) -> None:
        from mad.bench.model_bench import ModelBench, schedules
        from mad.bench.workload import (
            BUNDLED_CHECKPOINT,
            jpeg_bytes,
            load_model,
            prepare_checkpoint,
            synthetic_image,
        )
        from service.model_cache import load_runner

        s = self.s
        self.checkpoint, source = prepare_checkpoint(s.preset, s.checkpoint, s.size, tmp)
        mad = load_model(self.checkpoint)
        config, parameters = mad.config, sum(p.numel() for p in mad.required_network().parameters())
        self.refine = parse_refine_steps(s.refine, config.tasks)
        size = config.image_size
        self.payload = jpeg_bytes(synthetic_image(size))
        # The JPEG round trip gives every section the pixels the service will decode.
        self.image = Image.open(io.BytesIO(self.payload)).convert("RGB")
        self.export_dir = None
        wants_export = (
            s.backend != "torch"
            or s.sections["onnx"]
            or s.sections["accuracy"]
            or (s.device.startswith("cuda") and s.sections["variants"])
        )
        if wants_export:
            self.export(tmp / "onnx")
        mad, runner = load_runner(
            s.backend,
            self.checkpoint,
            s.device,
            precision=s.precision,
            compile=s.compile,
            export_dir=self.export_dir,
        )
        self.bench = ModelBench(
            mad, runner, [self.image] * s.batch_size, s.kept, schedules(mad, self.refine)
        )
        self.report["model"] = {
            "source": source,
            "name": config.name,
            "backbone": config.backbone,
            "d_model": config.d_model,
            "layers": [config.encoder_layers, config.decoder_layers],
            "num_slots": config.num_slots,
            "tasks": list(config.tasks),
            "parameters": parameters,
            "runner": runner.describe(),
            "image_jpeg_bytes": len(self.payload),
        }
        self.report["settings"] = {
            "preset": config.name,
            "image_size": list(size),
            "backend": s.backend,
            "device": s.device,
            "precision": s.precision,
            "compile": s.compile,
            "batch_size": s.batch_size,
            "refine_steps": self.refine,
            "repeats": s.repeats,
            "warmup": s.warmup,
            "ar_repeats": s.ar_repeats,
            "kept": s.kept,
            "fixed": s.fixed,
            "concurrency": s.levels,
            "http_requests": s.http_requests,
            "http_seconds": s.http_seconds,
            "anytime_images": s.anytime_images,
            "anytime_requests": s.anytime_requests,
            "anytime_overload": s.anytime_overload,
            "accuracy_images": s.accuracy_images,
            "quick": s.quick,
            "bundled_model": Path(self.checkpoint).resolve() == BUNDLED_CHECKPOINT.resolve(),
        }

    def export(self, target: Path) -> None:
        from export.onnx_export import export_onnx

        self.echo("[onnx export]")
        try:
            export_onnx(self.checkpoint, target)
            self.export_dir = target
        except Exception as exc:  # ONNX sections are skipped, the rest still runs
            self.report["errors"]["onnx_export"] = f"{type(exc).__name__}: {exc}"

    def accuracy(self) -> dict[str, Any]:
        from export.quantize import quantize_export
        from mad.bench.accuracy_bench import accuracy_benchmark

        s, exports = self.s, {}
        if self.export_dir is not None:
            exports["fp32"] = self.export_dir
            if not s.device.startswith("cuda"):
                self.echo("[int8 export]")
                int8 = self.export_dir.with_name("onnx-int8")
                try:
                    quantize_export(self.export_dir, int8)
                    exports["int8"] = int8
                except Exception as exc:  # its row says so; the others still run
                    self.report["errors"]["int8_export"] = f"{type(exc).__name__}: {exc}"
        return accuracy_benchmark(
            self.checkpoint,
            s.device,
            self.image,
            s.kept,
            self.refine,
            s.repeats,
            s.warmup,
            s.accuracy_images,
            exports,
            echo=self.echo,
        )

    def mad_vs_ar(self) -> dict[str, Any]:
        from mad.bench.model_bench import ModelBench, mad_vs_autoregressive
        from model.runner import EagerRunner
        from runtime.backends import create_runner

        s, bench = self.s, self.model()
        if not isinstance(bench.runner, EagerRunner):  # AR needs the PyTorch network
            mad, runner = create_runner("torch", self.checkpoint, s.device)
            bench = ModelBench(mad, runner, bench.images, bench.kept, bench.ratios)
        return mad_vs_autoregressive(bench, s.repeats, s.ar_repeats, s.warmup)

    def kept_vs_fixed(self) -> dict[str, Any]:
        from mad.bench.model_bench import kept_vs_fixed

        s = self.s
        return kept_vs_fixed(self.model(), s.kept, s.fixed, s.repeats, s.warmup)

    def backends(self) -> dict[str, Any]:
        s, out = self.s, {}
        if not s.sections["onnx"]:
            self.report["skipped"]["onnx_vs_eager"] = "--no-onnx"
        elif self.export_dir is None:
            self.report["skipped"]["onnx_vs_eager"] = "the ONNX export failed"
        else:
            from mad.bench.backends_bench import compare_backends

            out["onnx_vs_eager"] = compare_backends(
                self.checkpoint,
                [self.image] * s.batch_size,
                tuple(self.model().tasks),
                s.repeats,
                s.warmup,
                device=s.device,
                refine_steps=self.refine,
                export_dir=self.export_dir,
            )
        if not s.device.startswith("cuda"):
            self.report["skipped"]["gpu_variants"] = "no CUDA device"
        elif not s.sections["variants"]:
            self.report["skipped"]["gpu_variants"] = "--no-variants"
        else:
            from mad.bench.model_bench import gpu_variants

            out["gpu_variants"] = gpu_variants(
                self.checkpoint,
                s.device,
                [self.image] * s.batch_size,
                s.kept,
                self.refine,
                s.repeats,
                s.warmup,
                self.export_dir,
            )
        return out

    def http(self) -> dict[str, Any]:
        from mad.bench.http_bench import http_benchmark

        s = self.s
        return http_benchmark(
            self.checkpoint,
            s.backend,
            s.device,
            self.payload,
            # The service refuses max_detections above the model's slots.
            list(self.report["model"]["tasks"]),
            min(s.kept, self.report["model"]["num_slots"]),
            self.refine,
            s.levels,
            s.http_requests,
            s.http_seconds,
            s.repeats,
            s.warmup,
            export_dir=self.export_dir if s.backend != "torch" else None,
            echo=self.echo,
        )

    def protocols(self) -> dict[str, Any]:
        from mad.bench.protocols_bench import protocols_benchmark

        s = self.s
        return protocols_benchmark(
            self.checkpoint,
            s.backend,
            s.device,
            self.payload,
            list(self.report["model"]["tasks"]),
            min(s.kept, self.report["model"]["num_slots"]),
            self.refine,
            s.http_requests,
            s.http_seconds,
            s.warmup,
            export_dir=self.export_dir if s.backend != "torch" else None,
            echo=self.echo,
        )

    def anytime(self) -> dict[str, Any]:
        from mad.bench.anytime_bench import anytime_benchmark

        s = self.s
        return anytime_benchmark(
            self.checkpoint,
            s.backend,
            s.device,
            s.anytime_images,
            s.anytime_requests,
            s.anytime_overload,
            export_dir=self.export_dir if s.backend != "torch" else None,
            echo=self.echo,
        )


def tritonclient_installed() -> bool:
    import importlib.util

    return all(
        importlib.util.find_spec(name) is not None
        for name in ("tritonclient", "tritonclient.http.aio", "tritonclient.grpc.aio")
    )


def headline(report: dict[str, Any]) -> str:
    """The ratios and targets, for the terminal."""
    from mad.bench.report import fmt, targets_table
    from mad.bench.stats import median

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
