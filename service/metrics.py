"""Prometheus metrics, on a registry of the app's own (several apps can live in one process).

The names are a contract with deploy/ (alerts, Grafana): see METRIC_NAMES.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from model.request_spec import MAX_REFINE_STEPS
from service.anytime import StepPlan
from service.engine import is_out_of_memory

METRIC_NAMES = (
    "mad_requests_total",
    "mad_request_duration_seconds",
    "mad_stage_duration_seconds",
    "mad_queue_depth",
    "mad_running_requests",
    "mad_inflight_requests",
    "mad_batch_size",
    "mad_decoder_passes_total",
    "mad_model_failures_total",
    "mad_model_info",
    "mad_gpu_memory_bytes",
    "mad_refinement_steps_applied",
    "mad_degraded_requests_total",
    "mad_budget_cut_requests_total",
    "mad_feature_cache_hits_total",
    "mad_feature_cache_misses_total",
    "mad_feature_cache_evictions_total",
    "mad_feature_cache_bytes",
)
# Latency buckets from 1 ms (a stage of a tiny model) to 60 s (past the default deadline).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
STEP_BUCKETS = tuple(range(MAX_REFINE_STEPS + 1))


class CacheStats(Protocol):
    """What the feature cache metrics read (model.feature_cache.FeatureCache)."""

    hits: int
    misses: int
    evictions: int
    bytes: int


class FeatureCacheCollector(Collector):
    """The feature cache's counters, read at each scrape (zeros while there is no cache)."""

    def __init__(self) -> None:
        self.cache: CacheStats | None = None

    def collect(self) -> Iterator[Metric]:
        cache = self.cache
        for name, text, value in (
            ("hits", "Images whose encoded features came from the cache.", "hits"),
            ("misses", "Images looked up in the cache and encoded.", "misses"),
            (
                "evictions",
                "Cache entries dropped to stay within MAD_FEATURE_CACHE_MB.",
                "evictions",
            ),
        ):
            family = CounterMetricFamily(f"mad_feature_cache_{name}", text)
            family.add_metric([], getattr(cache, value) if cache is not None else 0)
            yield family
        size = GaugeMetricFamily("mad_feature_cache_bytes", "Bytes of features the cache holds.")
        size.add_metric([], cache.bytes if cache is not None else 0)
        yield size


CONTENT_TYPE = CONTENT_TYPE_LATEST
FAILURE_KINDS = ("out_of_memory", "error")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mad_requests_total",
            "Inference requests, one count per task asked, by HTTP status (gRPC: its HTTP "
            "equivalent) and protocol.",
            ["status", "task", "protocol"],
            registry=r,
        )
        self.request_duration = Histogram(
            "mad_request_duration_seconds",
            "End-to-end inference request latency, by protocol.",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "mad_stage_duration_seconds",
            "Per-request latency of each inference stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "mad_queue_depth",
            "Requests waiting for the model (not those in the batch it is running).",
            registry=r,
        )
        self.running = Gauge(
            "mad_running_requests", "Requests in the batch the model is running.", registry=r
        )
        self.inflight = Gauge(
            "mad_inflight_requests", "Inference requests being handled (all protocols).", registry=r
        )
        self.batch_size = Histogram(
            "mad_batch_size", "Images per model batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.decoder_passes = Counter(
            "mad_decoder_passes_total", "Decoder passes run, by task.", ["task"], registry=r
        )
        self.model_failures = Counter(
            "mad_model_failures_total",
            "Requests the model raised on (run alone), by kind: out_of_memory or error.",
            ["kind"],
            registry=r,
        )
        for kind in FAILURE_KINDS:  # exported at 0 from the start, so rate() sees the first
            self.model_failures.labels(kind=kind)
        # Info appends `_info` itself.
        self.model_info = Info("mad_model", "The model being served.", registry=r)
        self.gpu_memory = Gauge(
            "mad_gpu_memory_bytes", "GPU memory allocated by torch (0 off CUDA).", registry=r
        )
        self.gpu_memory.set(0)
        self.refinement_steps = Histogram(
            "mad_refinement_steps_applied",
            "Refinement steps each request got, per task (after budgets and degradation).",
            ["task"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.degraded = Counter(
            "mad_degraded_requests_total",
            "Requests that got fewer refinement steps because the queue was deep.",
            registry=r,
        )
        self.budget_cut = Counter(
            "mad_budget_cut_requests_total",
            "Requests whose latency budget lowered their refinement steps.",
            registry=r,
        )
        self.feature_cache = FeatureCacheCollector()
        r.register(self.feature_cache)

    def track_queue(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        self.queue_depth.set_function(waiting)
        self.running.set_function(running)

    def count_model_failure(self, error: BaseException | None) -> None:
        """engine.on_outcome: count what the model raised."""
        if error is not None:
            kind = "out_of_memory" if is_out_of_memory(error) else "error"
            self.model_failures.labels(kind=kind).inc()

    def track_gpu_memory(self, allocated: Callable[[], int]) -> None:
        self.gpu_memory.set_function(allocated)

    def track_feature_cache(self, cache: CacheStats) -> None:
        self.feature_cache.cache = cache

    def record_plan(self, plan: StepPlan) -> None:
        for task, steps in plan.steps.items():
            self.refinement_steps.labels(task=task).observe(steps)
        if plan.degraded:
            self.degraded.inc()
        if plan.budget_cut:
            self.budget_cut.inc()

    def count_request(
        self, status: int, tasks: tuple[str, ...], seconds: float, protocol: str
    ) -> None:
        """protocol: native (POST /predict), v2_rest or v2_grpc (the Open Inference
        Protocol)."""
        for task in tasks or ("none",):
            self.requests.labels(status=str(status), task=task, protocol=protocol).inc()
        self.request_duration.labels(protocol=protocol).observe(seconds)

    def observe_stages(self, timings_ms: Mapping[str, float], passes: Mapping[str, int]) -> None:
        """One image's stage latencies (milliseconds; `total` is left to count_request) and
        decoder passes per task."""
        for stage, ms in timings_ms.items():
            if stage != "total":
                self.stage_duration.labels(stage=stage).observe(ms / 1000)
        for task, count in passes.items():
            self.decoder_passes.labels(task=task).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
