"""One `mad bench` run: the model under test prepared once, each section measured in turn
(a failing section is recorded in the report, not fatal)."""

from __future__ import annotations

import io
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from PIL import Image

from model.request_spec import parse_refine_steps

if TYPE_CHECKING:
    from mad.bench.model_bench import ModelBench

ROOT = Path(__file__).resolve().parents[2]


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
        from mad.bench.environment import environment, now
        from mad.bench.report import targets

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
        from runtime.backends import check_options
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
        # Options that do not go together fail now, before any section exports or runs.
        check_options(s.backend, self.checkpoint, s.device, precision=s.precision)
        self.export_dir = None
        wants_export = (
            s.backend != "torch"
            or s.sections["onnx"]
            or s.sections["accuracy"]
            or (s.device.startswith("cuda") and s.sections["variants"])
        )
        if wants_export:
            self.export(tmp / "onnx")
        options: dict[str, Any] = {}
        if s.backend == "tensorrt":  # engines that take the benchmark's batches
            from export.tensorrt import Profile

            options["profile"] = Profile(max_batch=s.batch_size)
        mad, runner = load_runner(
            s.backend,
            self.checkpoint,
            s.device,
            precision=s.precision,
            compile=s.compile,
            export_dir=self.export_dir,
            **options,
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
