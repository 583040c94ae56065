"""Service configuration: every field can be set by a `MAD_<NAME>` environment variable and
is an option of `mad serve` (service/setting_options.py makes the options and the table of
docs/service.md from these fields and their descriptions).

The k8s manifests reference these exact names; rename nothing lightly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.startup import DEVICE_PATTERN

# The bundled model lives at the repository root, beside the packages.
BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mad-tiny"

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "mad-serve"

Backend = Literal["torch", "onnx", "tensorrt", "openvino"]
Precision = Literal["fp32", "bf16", "fp16", "int8"]
BatchWindow = Literal["adaptive", "fixed"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


def split_list(value: Any) -> Any:
    """`a,b` or a JSON list -> a list; anything else as it is (pydantic judges it)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in text.split(",") if part.strip()]


def decoding_overrides(items: list[str]) -> dict[str, Any]:
    """MAD_DECODING's items -> {option: value}; ValueError for an item that is not KEY=VALUE
    of a decoding option of a registered task (`TaskCodec.decoding_options`) with a value the
    config takes."""
    from model.codecs import CODECS, decoding_option_names  # torch: only when it is given
    from model.config import ModelConfig, parse_overrides

    overrides = parse_overrides(items)
    known = decoding_option_names(CODECS.values())
    for name in overrides:
        if name not in known:
            raise ValueError(f"{name} is not a decoding option (one of {', '.join(known)})")
    dataclasses.replace(ModelConfig(), **overrides)  # its range checks, before any loading
    return overrides


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAD_", extra="ignore")

    checkpoint: Path = Field(
        BUNDLED_CHECKPOINT,
        description="Checkpoint directory, or an export dir (onnx, tensorrt, openvino).",
    )
    backend: Backend = Field(
        "torch", description="Runtime: `torch`, `onnx`, `tensorrt` or `openvino` (CPU)."
    )
    device: str = Field(
        "cpu",
        pattern=DEVICE_PATTERN,
        description="`cpu`, `cuda`, `cuda:N` or `auto` (CUDA when present, else CPU).",
    )
    precision: Precision = Field(
        "fp32",
        description="`fp32`; `bf16` (torch, CPU or CUDA; openvino), `fp16` (torch on CUDA); "
        "`int8` (onnx: a quantised export). tensorrt engines are always FP16 (any value).",
    )
    compile: bool = Field(False, description="`torch.compile` the network (torch backend).")
    cuda_graphs: bool = Field(
        False,
        description="Replay decoder passes from CUDA graphs (torch backend on CUDA; captured "
        "per shape bucket on first use, eager beyond the buckets).",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads the model runs on (PyTorch's intra-op threads, ONNX "
        "Runtime's and OpenVINO's pools); unset: the runtime's default (all cores, or "
        "`OMP_NUM_THREADS` for PyTorch). On a host shared with other work, fewer threads "
        "than cores keep the model from waiting on a descheduled one.",
    )
    export_dir: Path | None = Field(
        None,
        description="A ready ONNX/TensorRT export to run (onnx, tensorrt, openvino; the torch "
        "backend refuses one); unset: the checkpoint is exported into the cache dir at start-up.",
    )
    cache_dir: Path = Field(
        DEFAULT_CACHE_DIR,
        description="Where onnx/tensorrt/openvino export the checkpoint (and build TensorRT "
        "engines) at start-up when no export dir is given; later starts reuse them.",
    )
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    workers: int = Field(
        1, ge=1, description="Server processes, each with its own model and metrics."
    )
    max_batch_size: int = Field(8, ge=1, description="Most images encoded together.")
    batch_delay_ms: float = Field(
        5.0,
        ge=0,
        description="Longest wait for a batch to fill: adaptive, how long the free model waits "
        "for a partly full batch; fixed, how long the oldest request waits.",
    )
    batch_window: BatchWindow = Field(
        "adaptive",
        description="`adaptive`: a request finding the model idle starts at once, requests "
        "arriving while it is busy form the next batch; `fixed`: every batch waits up to "
        "`MAD_BATCH_DELAY_MS` for company.",
    )
    queue_size: int = Field(
        64, ge=1, description="Most requests waiting for the model; beyond: 503."
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Deadline of one inference request (`/predict`, v2 REST or gRPC), from "
        "its arrival; beyond: 504.",
    )
    degrade: bool = Field(
        True,
        description="Past the queue depth `MAD_DEGRADE_QUEUE_DEPTH`, new requests get fewer "
        "default refinement steps (down to one pass) before any is refused with 503.",
    )
    degrade_queue_depth: int | None = Field(
        None,
        ge=0,
        description="The queue depth past which requests are degraded (below the queue "
        "size); unset: half the queue.",
    )
    refine_early_stop: bool = Field(
        False,
        description="Default of the `refine_early_stop` field: a task's refinement stops once "
        "a step changes none of its tokens.",
    )
    decoding: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Decoding options instead of the checkpoint's: `KEY=VALUE` items "
        "(comma-separated, a JSON list, or the option repeated) of those `mad tune --decoding` "
        "chooses (e.g. "
        "`detection_zoom=false,segmentation_zoom=false,keypoints_zoom=false` to read no "
        "zoomed crops, `detection_flip=false,segmentation_flip=false,keypoints_flip=false` to "
        "decode one view, `caption_candidates=1`): the same weights, less work per request for "
        "a little accuracy; unset: the checkpoint's.",
    )
    feature_cache_mb: float = Field(
        0.0,
        ge=0,
        description="MiB of encoded image features kept for later requests on the same image "
        "(0: off).",
    )
    max_upload_bytes: int = Field(
        20 * 1024 * 1024,
        ge=1,
        description="Largest request body (bytes), and gRPC message; beyond: 413.",
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest image (width × height); beyond: 413."
    )
    # Clients, shutdown and failures (service/guards.py, service/server.py,
    # service/model_health.py; docs/service.md, "Failure behaviour").
    drain_delay_s: float = Field(
        5.0,
        ge=0,
        description="After SIGTERM, how long the server keeps serving (with `/readyz` at 503) "
        "before it stops listening, finishes what it accepted and exits 0.",
    )
    limit_concurrency: int = Field(
        256,
        ge=1,
        description="Most requests handled at once (probes and `/metrics` aside); beyond: 503 "
        "`overloaded`. Keep it above the queue size plus the batch size.",
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest pause while a request body arrives; beyond: 408. The whole body "
        "must also arrive within the request timeout.",
    )
    keep_alive_timeout_s: int = Field(
        5,
        ge=1,
        description="A connection closes when it has not sent a complete request head this "
        "long after opening or after its last response (a partial head gets 408). Behind a "
        "proxy that keeps connections open, set it above the proxy's idle timeout.",
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest request line + headers (bytes); beyond: 431."
    )
    max_consecutive_failures: int = Field(
        5,
        ge=0,
        description="Model failures in a row that trigger a self-test; if it fails too, "
        "`/healthz` and `/readyz` answer 503 (0: never).",
    )
    public_docs: bool = Field(
        True,
        description="`/docs`, `/redoc`, `/docs/oauth2-redirect` and `/openapi.json` need no "
        "API key; false: they need it too.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set (non-empty), requests need `Authorization: Bearer <key>`; "
        "`/healthz`, `/readyz`, `/metrics`, `/` and the v2 health and readiness routes stay "
        "open, and the documentation unless public docs are off (gRPC: metadata "
        "`authorization`). Prefer the variable: a command line is visible to other users.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API: comma-separated, a JSON list, "
        "or the option repeated.",
    )
    log_level: LogLevel = Field(
        "info", description="`debug`, `info`, `warning`, `error` or `critical`."
    )
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve the Open Inference Protocol (KServe v2) over gRPC on this port "
        "(0: any free port; docs/kserve.md). Unset: no gRPC.",
    )

    @field_validator("cors_origins", "decoding", mode="before")
    @classmethod
    def split_lists(cls, value: Any) -> Any:
        """Accept `a,b`, a JSON list, or a list (a repeated option: each item may be `a,b`)."""
        if isinstance(value, list | tuple):
            items = (split_list(item) for item in value)
            return [part for item in items for part in (item if isinstance(item, list) else [item])]
        return split_list(value)

    @field_validator("decoding")
    @classmethod
    def known_decoding_options(cls, items: list[str]) -> list[str]:
        """Each item KEY=VALUE of a decoding option some task has, of the field's type (the
        model's own tasks are checked when it loads: `decoding_overrides`)."""
        if items:
            decoding_overrides(items)
        return items

    @field_validator("log_level", mode="before")
    @classmethod
    def lower_log_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def blank_cache_is_default(cls, value: Any) -> Any:
        # An empty MAD_CACHE_DIR (a blank in a templated manifest) means the default.
        return DEFAULT_CACHE_DIR if isinstance(value, str) and not value.strip() else value

    @field_validator("grpc_port", mode="before")
    @classmethod
    def blank_port_is_none(cls, value: Any) -> Any:
        # An empty MAD_GRPC_PORT (a blank in a templated manifest) means "no gRPC".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key", mode="before")
    @classmethod
    def blank_key_is_none(cls, value: Any) -> Any:
        # An empty MAD_API_KEY (common in templated manifests) means "no key", not "key ''".
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def watermark_below_the_queue(self) -> Settings:
        if self.degrade_queue_depth is not None and self.degrade_queue_depth >= self.queue_size:
            raise ValueError(
                f"degrade_queue_depth ({self.degrade_queue_depth}) must be below queue_size "
                f"({self.queue_size}): degradation starts before the queue is full"
            )
        return self

    def degrade_depth(self) -> int | None:
        """The queue depth past which requests are degraded; None when degradation is off."""
        if not self.degrade:
            return None
        return (
            self.queue_size // 2 if self.degrade_queue_depth is None else self.degrade_queue_depth
        )

    def env(self) -> dict[str, str]:
        """These settings as MAD_* variables, for worker processes that rebuild them."""
        out = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = json.dumps(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out[f"MAD_{name.upper()}"] = str(value)
        return out
