"""End-to-end HTTP benchmark: a real `mad serve` subprocess on loopback, loaded by asyncio
clients at several concurrency levels, with dynamic batching off (MAD_MAX_BATCH_SIZE=1) and
on (8).

The service's own overhead (HTTP, multipart, queueing, threads, building the JSON) is measured
per request at concurrency 1, batching off: the client's latency minus the model's stage times
that the same response reports (preprocess, which includes decoding the upload, the encoder and
each task with the decoding of its outputs), as a share of that latency; the median of those
shares is the figure. Paired on each request, it does not drift with the machine's load the
way a comparison with the same request timed in-process earlier does (that comparison is
reported beside it, as a cross-check).
"""

from __future__ import annotations

import asyncio
import gc
import io
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from mad.bench.serve_process import Server
from mad.bench.stats import median, percentile, ratio, summarize
from model.inference_io import Request
from model.pipeline import Pipeline

# The response's timings that are not the model's: waiting in the queue, building the
# response, and the total they and the model's stages add up to.
SERVICE_STAGES = ("queue", "postprocess", "total")


def form_fields(tasks: list[str], kept: int, refine: dict[str, int]) -> dict[str, str]:
    """Threshold 0, NMS off and max_detections=kept: exactly `kept` detections prompt
    segmentation and keypoints whatever the weights, like the in-process benchmarks."""
    fields = {
        "tasks": ",".join(tasks),
        "score_threshold": "0",
        "nms_iou": "1",
        "max_detections": str(kept),
    }
    if refine:
        fields["refine_steps"] = ",".join(f"{t}:{k}" for t, k in refine.items())
    return fields


class RequestFailed(Exception):
    """A request the server answered with an error; str(): the errors table's key for it."""


async def closed_loop(
    send: Callable[[], Awaitable[object]], concurrency: int, max_requests: int, duration_s: float
) -> dict[str, Any]:
    """`concurrency` clients each calling `send` back to back until `max_requests` were sent
    or `duration_s` is up -> latency percentiles of the successes, throughput, errors (by
    status or exception type)."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.perf_counter() + duration_s

    async def client_loop() -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            start = time.perf_counter()
            try:
                await send()
            except Exception as exc:
                key = str(exc) if isinstance(exc, RequestFailed) else type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
                continue
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": issued,
        "ok": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "throughput_rps": len(latencies) / elapsed,
        "latency": summarize(latencies),
    }


async def load(
    url: str,
    payload: bytes,
    fields: dict[str, str],
    concurrency: int,
    max_requests: int,
    duration_s: float,
) -> dict[str, Any]:
    """Closed-loop POST /predict clients -> closed_loop's figures, the median count of
    detections per response, the server's median stage timings and each request's service
    overhead (its latency minus the model's stage times in its response)."""
    stage_ms: dict[str, list[float]] = {}
    detections: list[float] = []
    overhead_s: list[float] = []
    shares: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def send() -> None:
            start = time.perf_counter()
            response = await client.post(
                f"{url}/predict",
                data=fields,
                files={"image": ("bench.jpg", payload, "image/jpeg")},
            )
            body = response.json()  # parsing is part of what a client pays
            latency = time.perf_counter() - start
            if response.status_code != 200:
                raise RequestFailed(str(response.status_code))
            detections.append(len(body.get("detections") or []))
            timings = body.get("timings_ms", {})
            for stage, ms in timings.items():
                stage_ms.setdefault(stage, []).append(ms)
            model = sum(ms for stage, ms in timings.items() if stage not in SERVICE_STAGES) / 1000
            overhead_s.append(latency - model)
            shares.append((latency - model) / latency)

        result = await closed_loop(send, concurrency, max_requests, duration_s)
    return {
        **result,
        "detections_median": percentile(detections, 50) if detections else None,
        "server_timings_ms": {
            k: summarize([v / 1000 for v in vals])["median_ms"] for k, vals in stage_ms.items()
        },
        "overhead": summarize(overhead_s),
        "overhead_share_median": percentile(shares, 50) if shares else None,
    }


def bench_request(payload: bytes, tasks: list[str], kept: int, refine: dict[str, int]) -> Request:
    """The benchmark's request, its image decoded as the service decodes it."""
    image = Image.open(io.BytesIO(payload)).convert("RGB")
    return Request(image, tuple(tasks), dict(refine), 0.0, kept)


def in_process(
    pipeline: Pipeline,
    payload: bytes,
    tasks: list[str],
    kept: int,
    refine: dict[str, int],
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """The same request through the Pipeline in this process (decoded image as the service
    decodes it): the model's share of a request."""
    request = bench_request(payload, tasks, kept, refine)
    for _ in range(warmup):
        pipeline([request])
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipeline([request])
        times.append(time.perf_counter() - start)
    return summarize(times)


def in_process_batching(
    pipeline: Pipeline,
    payload: bytes,
    tasks: list[str],
    kept: int,
    refine: dict[str, int],
    batch: int,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """The ceiling on what dynamic batching can gain: `batch` requests run one by one vs as
    one batch, in this process (no HTTP). On a small CPU, per-image model cost does not fall
    with batch size, so neither can the service's throughput rise."""
    request = bench_request(payload, tasks, kept, refine)

    def one_by_one() -> None:
        for _ in range(batch):
            pipeline([request])

    timings: dict[str, dict[str, float]] = {}
    for name, run in (("one_by_one", one_by_one), ("batched", lambda: pipeline([request] * batch))):
        for _ in range(warmup):
            run()
        times: list[float] = []
        for _ in range(max(1, repeats // batch)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        timings[name] = summarize(times)
    return {
        "batch": batch,
        **timings,
        "ratio": ratio(median(timings["one_by_one"]), median(timings["batched"])),
    }


def http_benchmark(
    checkpoint: Path,
    backend: str,
    device: str,
    payload: bytes,
    tasks: list[str],
    kept: int,
    refine: dict[str, int],
    concurrency: list[int],
    max_requests: int,
    duration_s: float,
    repeats: int,
    warmup: int,
    export_dir: Path | None = None,
    batch_sizes: tuple[int, ...] = (1, 8),
    echo: Callable[[str], object] = print,
    runner_options: dict[str, Any] | None = None,
    windows: tuple[str, ...] = ("adaptive", "fixed"),
) -> dict[str, Any]:
    """runner_options: torch runner options (precision, compile, cuda_graphs) for the
    in-process baseline and, as MAD_* settings, for the server. windows: the batching
    windows each batch size above 1 is served with (MAD_BATCH_WINDOW)."""
    from service.model_cache import load_runner

    options = runner_options or {}
    mad, runner = load_runner(backend, checkpoint, device, export_dir=export_dir, **options)
    pipeline = Pipeline(mad, runner)
    pipeline_ms = in_process(pipeline, payload, tasks, kept, refine, repeats, warmup)
    # What the requests cost depends on how many detections prompt the other tasks: up to
    # `kept`, fewer where the model finds fewer boxes with an area (random weights: none).
    found = pipeline([bench_request(payload, tasks, kept, refine)])[0].detections
    ceiling = in_process_batching(
        pipeline, payload, tasks, kept, refine, max(batch_sizes), repeats, min(warmup, 1)
    )
    del pipeline
    del mad, runner  # the server loads its own copy
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    fields = form_fields(tasks, kept, refine)
    modes: dict[str, Any] = {}
    # Batching off, on (the adaptive window), and on with the classic fixed window, so one
    # run shows what the adaptive window saves a lone request and keeps of the batching gain.
    runs = [(1, "adaptive")] + [(b, w) for b in batch_sizes if b > 1 for w in windows]
    for batch, window in runs:
        name = mode_name(batch, window)
        env = {
            "MAD_MAX_BATCH_SIZE": str(batch),
            "MAD_BATCH_WINDOW": window,
            "MAD_QUEUE_SIZE": str(4 * max(concurrency)),
            **{f"MAD_{k.upper()}": str(v).lower() for k, v in options.items()},
        }
        echo(f"  starting mad serve (MAD_MAX_BATCH_SIZE={batch}, MAD_BATCH_WINDOW={window})")
        with Server(checkpoint, backend, device, env, export_dir) as server:
            asyncio.run(load(server.url, payload, fields, 1, max(warmup, 1), 60.0))  # warm
            levels: dict[str, dict[str, Any]] = {}
            for c in concurrency:
                result = asyncio.run(load(server.url, payload, fields, c, max_requests, duration_s))
                echo(
                    f"    concurrency {c:>3}: {result['throughput_rps']:.2f} req/s, "
                    f"p50 {median(result['latency']) or float('nan'):.1f} ms, "
                    f"{sum(result['errors'].values())} errors"
                )
                levels[str(c)] = result
        modes[name] = {"max_batch_size": batch, "batch_window": window, "levels": levels}
    return {
        "pipeline_in_process": pipeline_ms,
        "detections": None if found is None else len(found),
        "in_process_batching": ceiling,
        "form": fields,
        "image_bytes": len(payload),
        "modes": modes,
        **summary(modes, pipeline_ms, concurrency),
    }


def mode_name(batch: int, window: str) -> str:
    if batch == 1:
        return "batching_off"
    return f"batching_{batch}" + ("" if window == "adaptive" else "_fixed_window")


def summary(
    modes: dict[str, Any], pipeline_ms: dict[str, float], concurrency: list[int]
) -> dict[str, Any]:
    """Overhead share (concurrency 1, batching off) and batching's throughput gain at the
    highest concurrency measured."""
    out: dict[str, Any] = {}
    off = modes.get("batching_off", {}).get("levels", {})
    base = off.get("1") or (off[str(min(concurrency))] if off else None)
    if base and base["ok"] and base.get("overhead_share_median") is not None:
        client, in_process = median(base["latency"]), median(pipeline_ms)
        out["overhead"] = {
            "client_median_ms": client,
            "overhead_ms": median(base["overhead"]),
            "share": base["overhead_share_median"],  # per request, paired (module docstring)
            # The cross-check: the same request timed through the Pipeline in this process
            # before the server started (unpaired: it moves with the machine's load).
            "pipeline_median_ms": in_process,
            "share_vs_in_process": None
            if client is None or in_process is None
            else (client - in_process) / client,
        }
    top = str(max(concurrency))
    adaptive = [
        m for m in modes.values() if m["max_batch_size"] > 1 and m["batch_window"] == "adaptive"
    ]
    fixed = [m for m in modes.values() if m["max_batch_size"] > 1 and m["batch_window"] == "fixed"]
    if off.get(top) and adaptive and adaptive[-1]["levels"].get(top):
        on = adaptive[-1]["levels"][top]
        out["batching_gain"] = {
            "concurrency": int(top),
            "throughput_off_rps": off[top]["throughput_rps"],
            "throughput_on_rps": on["throughput_rps"],
            "ratio": ratio(on["throughput_rps"], off[top]["throughput_rps"]),
        }
    low = str(min(concurrency))
    if adaptive and fixed and base:
        levels = {"adaptive": adaptive[-1]["levels"], "fixed": fixed[-1]["levels"]}
        out["batch_window"] = {
            "concurrency_low": int(low),
            "p50_ms": {
                "batching_off": median(base["latency"]),
                **{w: median(lv.get(low, {}).get("latency")) for w, lv in levels.items()},
            },
            "concurrency_high": int(top),
            "throughput_rps": {
                "batching_off": (off.get(top) or {}).get("throughput_rps"),
                **{w: (lv.get(top) or {}).get("throughput_rps") for w, lv in levels.items()},
            },
        }
    return out
