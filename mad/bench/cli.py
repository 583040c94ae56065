"""`mad bench`: every latency and throughput figure of the issue in one run, one report."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import typer

from mad.bench.report import headline
from mad.bench.run import BenchRun, BenchSettings
from model.request_spec import RequestError
from model.startup import DEVICES, StartupError, output_dir, resolve_device
from service.cli import request_error
from service.setting_options import device_option, precision_option

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


def concurrency_levels(text: str) -> list[int]:
    """ "1,4,8" -> [1, 4, 8]: positive integers separated by commas, sorted, each once."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(
            f"{text!r}: expected positive integers separated by commas (1,4,8)",
            param_hint="--concurrency",
        )
    return sorted({int(p) for p in parts})


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
    device: str = typer.Option("auto", callback=device_option, help=DEVICES),
    precision: str = typer.Option(
        "fp32",
        callback=precision_option,
        help="fp32; bf16 (torch, openvino); fp16 (torch on CUDA); int8 (onnx).",
    ),
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
        help="Backend x precision table: eager fp32/bf16/compile, ONNX fp32/int8, OpenVINO "
        "fp32/bf16, each with "
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

    from mad.bench.workload import parse_size
    from runtime.backends import BACKENDS

    if backend not in BACKENDS:  # before the first section's header
        raise typer.BadParameter(
            f"{backend!r} is not one of {', '.join(BACKENDS)}", param_hint="--backend"
        )
    device = resolve_device(device)
    base = QUICK if quick else DEFAULTS
    if device.startswith("cuda") and not quick:
        base = replace(base, ar_repeats=repeats or base.repeats)  # AR is affordable on a GPU
    size_text = given_or(image_size, base.image_size)
    try:
        size = parse_size(size_text) if size_text else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--image-size") from None
    levels = concurrency_levels(given_or(concurrency, base.concurrency))
    if quick and checkpoint is None and preset is None:
        preset = "tiny"  # never the bundled model: the smoke test must not depend on it
    output_dir(out, "--out")  # now, not after the whole benchmark has run
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
    except StartupError:
        raise  # one line, exit 3, as in every command
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # no model to benchmark
        raise SystemExit(f"mad bench: {exc}") from exc
    from mad.bench.report import write_report

    json_path, md_path = write_report(report, out)
    typer.echo(headline(report))
    typer.echo(f"wrote {json_path}\nwrote {md_path}")
    if report["errors"]:
        raise typer.Exit(1)
