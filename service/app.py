"""The FastAPI application: factory, lifespan (load, warm up, serve, drain), middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline
from PIL import Image

from model.decoding import Runner, closing_passes
from model.feature_cache import FeatureCache
from model.inference_io import Request as ModelRequest
from model.pipeline import Pipeline
from model.startup import StartupError
from service.anytime import CostModel, RefinementPlanner
from service.engine import BatchingEngine
from service.errors import install_error_handlers
from service.guards import ClientGuardMiddleware
from service.middleware import RequestContextMiddleware, UploadGuardMiddleware
from service.model_cache import load_configured
from service.postprocess import build_response
from service.routers import health, predict, v2
from service.schemas import model_openapi
from service.server import SHUTDOWN_MARGIN_S
from service.settings import Settings
from service.state import LoadedModel, ServiceState, describe_model

if TYPE_CHECKING:
    from service.grpc_server import GrpcServer

log = logging.getLogger("mad.service")
STATIC = Path(__file__).parent / "static"

try:
    SERVICE_VERSION = version("mad-serve")
except PackageNotFoundError:  # running from a plain checkout
    SERVICE_VERSION = "0.0.0"


def load_model(s: Settings) -> LoadedModel:
    log.info(
        "loading model",
        extra={
            "checkpoint": str(s.checkpoint),
            "backend": s.backend,
            "device": s.device,
            "precision": s.precision,
        },
    )
    mad, runner = load_configured(s)
    return LoadedModel(mad, runner, describe_model(mad, runner, s))


def warm_up_requests(pipeline: Pipeline, max_detections: int | None = None) -> list[ModelRequest]:
    """Every task on a grey image, on the canvas and on its transpose (portrait images): run
    once at start-up, so the first request pays no lazy initialisation (allocator, kernels,
    torch.compile). Threshold 0 keeps detections (up to `max_detections`), so prompted
    tasks run too."""
    height, width = pipeline.config.image_size
    tasks = tuple(pipeline.config.tasks)
    return [
        ModelRequest(
            Image.new("RGB", size, (128, 128, 128)),
            tasks,
            score_threshold=0.0,
            max_detections=max_detections,
        )
        for size in dict.fromkeys([(width, height), (height, width)])
    ]


# Objects per image of the calibration request: COCO's mean (what `mad bench` uses).
TYPICAL_DETECTIONS = 7


def calibration_request(pipeline: Pipeline) -> ModelRequest:
    """Every task, with a typical number of detections, on a grey canvas."""
    return warm_up_requests(pipeline, min(TYPICAL_DETECTIONS, pipeline.config.num_slots))[0]


def calibrate(pipeline: Pipeline, costs: CostModel, model: LoadedModel) -> None:
    """Seed the cost estimates the latency budgets plan with: a warmed-up request of every
    task (with a typical number of detections) measured, and its response built."""
    costs.clear()  # the warm-up paid lazy initialisation
    [result] = pipeline([calibration_request(pipeline)])
    start = time.perf_counter()
    build_response(result, model.description.ref(), model.mad.codecs, "rle", {})
    costs.observe("postprocess", 1, time.perf_counter() - start)


def gpu_memory_reader(runner: Runner[Any]) -> Callable[[], int]:
    device = getattr(runner, "device", torch.device("cpu"))
    if getattr(device, "type", "cpu") == "cuda":
        return lambda: torch.cuda.memory_allocated(device)
    return lambda: 0


async def serve_grpc(state: ServiceState, version: str) -> GrpcServer | None:
    """The gRPC service (MAD_GRPC_PORT), serving from now on as HTTP does (health
    NOT_SERVING until the model is warm). None when it is off, or when its port cannot be
    bound: the start then fails, as for a model that does not load."""
    if state.settings.grpc_port is None:
        return None
    from service.grpc_server import GrpcServer  # grpcio and the generated code: only when on

    try:
        server = GrpcServer(state, version)
    except StartupError as exc:
        log.error("start-up failed", extra={"error": str(exc)})
        state.fail_start(str(exc))
        return None
    await server.start()
    return server


async def load_and_warm_up(state: ServiceState, engine: BatchingEngine) -> None:
    """Load the model, warm it up and start the engine, while the server already answers
    (/healthz 200; /readyz and /predict 503 until ready). A failure stops the server
    (ServiceState.fail_start) and `mad serve` exits with its message."""
    s = state.settings
    if state.startup_error is not None:  # the start failed already (the gRPC port)
        return
    try:
        # All torch work (loading, warm-up, requests) happens on the one model thread.
        model = await engine.run_on_model_thread(load_model, s)
        d = model.description
        if s.feature_cache_mb > 0:
            state.features = FeatureCache(int(s.feature_cache_mb * 2**20), d.version)
            state.metrics.track_feature_cache(state.features)
        pipeline = await engine.load(
            lambda: Pipeline(model.mad, model.runner, state.features, state.costs.observe)
        )
        engine.batch_key = pipeline.canvas  # portrait and landscape images batch apart
        state.metrics.model_info.info(
            {
                "name": d.name,
                "version": d.version,
                "backend": d.backend,
                "device": d.device,
                "precision": d.precision,
            }
        )
        state.metrics.track_queue(lambda: len(engine.waiting), lambda: engine.running)
        state.metrics.track_gpu_memory(gpu_memory_reader(model.runner))
        # Compiled graphs and CUDA state belong to the model thread too.
        warm_ups = warm_up_requests(pipeline)
        for warm_up in warm_ups:  # one canvas per batch
            await engine.run_on_model_thread(pipeline, [warm_up])
        # The self-test runs the calibration request: a typical request, so what it costs
        # (the budgets' estimates learn from it) is no outlier.
        self_test = calibration_request(pipeline)
        state.health.self_test = lambda: engine.run_alone(self_test)
        await engine.run_on_model_thread(calibrate, pipeline, state.costs, model)
        engine.planner = RefinementPlanner(
            pipeline.mad.tasks_to_run,
            d.default_refine_steps,
            state.costs,
            s.queue_size,
            s.degrade_depth(),
            record=state.metrics.record_plan,
            closing_passes={t: closing_passes(c) for t, c in pipeline.codecs.items()},
            views=pipeline.mad.views,
            reads_crops=pipeline.mad.reads_crops,
        )
    except StartupError as exc:  # expected (model/startup.py): one log line, no traceback
        log.error("start-up failed", extra={"error": str(exc)})
        state.fail_start(str(exc))
        return
    except Exception as exc:  # a bug: the traceback goes to the log
        log.exception("start-up failed")
        state.fail_start(
            f"loading the model failed ({type(exc).__name__}: {exc}); "
            "the traceback is in the log above"
        )
        return
    engine.start()
    # Published together: /v1/model and the v2 metadata answer 503 until the model is warm.
    state.model, state.engine, state.ready = model, engine, True
    log.info("ready", extra={"model": d.name, "version": d.version})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    s = state.settings
    metrics, health = state.metrics, state.health

    def on_outcome(error: BaseException | None) -> None:
        metrics.count_model_failure(error)
        health.record(error)

    engine = BatchingEngine(
        max_batch_size=s.max_batch_size,
        batch_delay_s=s.batch_delay_ms / 1000,
        adaptive=s.batch_window == "adaptive",
        queue_size=s.queue_size,
        on_batch=metrics.batch_size.observe,
        on_outcome=on_outcome,
    )
    grpc = await serve_grpc(state, app.version)  # before loading: a taken port fails at once
    # Serve at once: probes get answers (liveness 200, readiness 503) while the model loads.
    loading = asyncio.create_task(load_and_warm_up(state, engine), name="mad-load")
    try:
        yield
    finally:
        # uvicorn has finished the requests in flight by now (or given up on them after
        # their deadline): what is left is at most a batch nobody waits for.
        state.draining = True
        if grpc is not None:  # its calls in flight still need the engine
            await grpc.stop(s.request_timeout_s)
        if not loading.done():
            loading.cancel()  # a load step under way still ends on the model thread
            with contextlib.suppress(asyncio.CancelledError):
                await loading
        finished = await engine.drain(SHUTDOWN_MARGIN_S)
        state.ready = False
        log.info("stopped", extra={"drained": finished})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServiceState(settings)
    # /docs and /redoc with Swagger UI and ReDoc from the package, not a CDN: they work offline.
    app = FastAPIOffline(
        title="MAD Serve",
        version=SERVICE_VERSION,
        lifespan=lifespan,
        description="Detection, instance segmentation, person keypoints and "
        "captioning with one Masked AutoDecoder. Errors are always "
        '`{"error": {"code", "message", "request_id"}}`.',
    )
    app.state.service = state
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(v2.router)

    def openapi() -> dict[str, Any]:
        """The OpenAPI document of the loaded model (its task names and outputs); before it
        has loaded, the generic one, not kept."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # builds and keeps app.openapi_schema
        v2.document_request_body(schema)
        if state.model is None:
            app.openapi_schema = None
        else:
            model_openapi(schema, state.model.mad.codecs)
        return schema

    # FastAPI's documented way to customise the schema; mypy forbids assigning a method.
    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/", include_in_schema=False)
    async def demo_page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    # Added innermost first: RequestContext wraps everything, so even 413/415/431/503 answers
    # carry the request id and are counted.
    app.add_middleware(UploadGuardMiddleware, max_bytes=settings.max_upload_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            # Every request header a route reads (the v2 protocol's too), and the response
            # headers a browser client needs (the v2 binary answer's JSON length).
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Content-Encoding",
                "X-Request-ID",
                "X-Latency-Budget-Ms",
                v2.HEADER_LENGTH,
            ],
            expose_headers=["X-Request-ID", "Retry-After", v2.HEADER_LENGTH],
        )
    app.add_middleware(ClientGuardMiddleware, state=state)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    return app
