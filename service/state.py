"""What one app instance holds: settings, metrics, and (once loaded) the model and engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.checkpoint import MAD, checkpoint_digest, read_checkpoint_config
from model.decoding import Runner
from model.feature_cache import FeatureCache
from runtime.manifest import is_export, read_manifest
from service.anytime import CostModel
from service.engine import BatchingEngine
from service.metrics import Metrics
from service.model_health import ModelHealth
from service.schemas import ModelDescription, ReadinessStatus
from service.settings import Settings


@dataclass(frozen=True)
class LoadedModel:
    """The served model, published in one step once loaded: the bundle (config, codecs),
    the runner that runs it, and what GET /v1/model says about them."""

    mad: MAD
    runner: Runner[Any]
    description: ModelDescription


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    model: LoadedModel | None = None  # None while loading
    engine: BatchingEngine | None = None  # None until warmed up: requests run from then on
    ready: bool = False  # loaded and warmed up
    draining: bool = False  # shutdown signal received: readiness fails, serving goes on
    stopping: bool = False  # the drain delay is over: listeners close, accepted work finishes
    startup_error: str | None = None  # why the model did not load (the server then stops)
    # Stops the server this app runs in; set by whoever runs it (DrainingServer, a worker).
    stop_server: Callable[[str], None] = lambda message: None
    costs: CostModel = field(default_factory=CostModel)  # what the latency budgets plan with
    features: FeatureCache[Any] | None = None  # encoded images kept (MAD_FEATURE_CACHE_MB)
    health: ModelHealth = field(init=False)  # the engine's outcomes: is the model working?

    def __post_init__(self) -> None:
        self.health = ModelHealth(self.settings.max_consecutive_failures)

    def begin_drain(self) -> None:
        self.draining = True

    def readiness(self) -> tuple[ReadinessStatus, str | None]:
        """Whether the server should get traffic (/readyz, the v2 protocol's readiness, gRPC
        health): "ready", or why not, with the reason when the model is broken."""
        if self.health.problem is not None:
            return "unhealthy", self.health.problem
        if self.draining:
            return "draining", None
        return ("ready" if self.ready else "loading"), None

    def fail_start(self, message: str) -> None:
        """The model cannot be served: record why and stop the server."""
        self.startup_error = message
        self.stop_server(message)


def model_version(checkpoint: Path) -> str:
    """The checkpoint's own version string when it has one, else training step + weights
    digest: two different weight files never share a version."""
    meta = read_checkpoint_config(checkpoint)
    if meta.get("version"):
        return str(meta["version"])
    if is_export(checkpoint):  # the version of the checkpoint it was exported from
        digest = read_manifest(checkpoint)["checkpoint"]["sha256"]
    else:
        digest = checkpoint_digest(checkpoint)
    return f"step{meta.get('step', 0)}-{digest[:12]}"


def describe_model(mad: MAD, runner: Runner[Any], settings: Settings) -> ModelDescription:
    config = mad.config
    info = runner.describe()
    return ModelDescription(
        name=config.name,
        version=model_version(Path(settings.checkpoint)),
        backend=info.get("backend", settings.backend),
        device=info.get("device", settings.device),
        precision=info.get("precision", settings.precision),
        tasks=list(config.tasks),
        class_names=list(config.class_names),
        keypoint_names=list(config.keypoint_names),
        skeleton=[list(pair) for pair in config.skeleton],
        default_refine_steps=mad.refine_steps({}, config.tasks),
        schedules={t: list(config.schedules.get(t, [])) for t in config.tasks},
        decoding={option: getattr(config, option) for option in mad.decoding_options()},
        input_size=list(config.image_size),
        max_detections=config.num_slots,
        nms_iou=config.nms_iou,
        max_batch_size=settings.max_batch_size,
    )
