"""The Open Inference Protocol (KServe v2) behind both of its transports.

REST (service/routers/v2.py) and gRPC (service/grpc_server.py) parse their wire format into
an InferRequest; `plan` checks it against the served model and `run` sends it through the
same engine, batching, queue and deadline as POST /predict, returning the output tensors
(service/v2_tensors.py). Errors are APIErrors, with the status the REST routes answer; gRPC
maps them to its codes.

The model has one input, `image`: BYTES, shape [N] (or [N, 1]), N encoded image files
(1..MAX_BATCH_SIZE); each image is one engine request, so it batches with everyone else's.
Request parameters read the request grammar of model/request_spec.py, as POST /predict does:

    tasks               string: task names separated by commas. Default: the tasks the
                        requested outputs come from, else every task
    refine_steps        string or integer: K for every task, or task:K pairs
    score_threshold     number 0..1 (default 0.5)
    max_detections      integer 1..the model's detection slots
    nms_iou             number 0..1 (1: no NMS)
    mask_format         "rle" or "polygon": how the `json` output writes masks
    timeout             integer, microseconds: a shorter deadline than REQUEST_TIMEOUT_S
    latency_budget_ms   number: each task not given in refine_steps gets the refinement steps
                        that fit (docs/service.md, "Latency budgets"); 422 when not one pass fits
    refine_early_stop   bool: a task stops refining once a step changes none of its tokens
    binary_data_output  bool (REST): outputs that do not say otherwise come as binary data

Numbers may be strings too ("0.3"), for clients whose .proto has no double parameter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image
from starlette.requests import Request as HTTPRequest

from model.inference_io import Request as ModelRequest
from model.request_spec import (
    RequestError,
    check_latency_budget,
    check_max_detections,
    check_nms_iou,
    check_score_threshold,
    parse_refine_steps,
    parse_tasks,
)
from service.dependencies import get_engine, not_ready
from service.engine import BatchingEngine
from service.errors import APIError
from service.images import decode_image, image_key
from service.jobs import submit_all, wait_all
from service.postprocess import report_plan, request_stages, respond
from service.schemas import PredictForm
from service.state import LoadedModel, ServiceState
from service.v2_parameters import (
    bad_request,
    check_tensor_parameters,
    flag,
    given,
    integer,
    number,
    text,
)
from service.v2_tensors import OutputSpec, Tensor, output_specs, output_tensor

SERVER_NAME = "mad-serve"
EXTENSIONS = ("binary_tensor_data", "parameters")
INPUT = "image"
PARAMETERS = (
    "tasks",
    "refine_steps",
    "score_threshold",
    "max_detections",
    "nms_iou",
    "mask_format",
    "timeout",
    "latency_budget_ms",
    "refine_early_stop",
    "binary_data_output",
)
MASK_FORMATS = ("rle", "polygon")
DEFAULT_SCORE_THRESHOLD: float = PredictForm.model_fields["score_threshold"].default


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    elements: list[bytes] | None  # a BYTES tensor's elements; None for other datatypes


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # REST `binary_data`; None: the request's default


@dataclass
class InferRequest:
    model_name: str
    model_version: str  # "": the one served
    id: str
    parameters: Mapping[str, Any]
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output the run produces


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[tuple[Tensor, bool]]  # each output, and whether REST sends it as binary


@dataclass(frozen=True)
class Plan:
    """A checked request: what to run and what to answer."""

    request: InferRequest
    model: LoadedModel
    engine: BatchingEngine
    images: list[bytes]
    tasks: tuple[str, ...]
    refine_steps: dict[str, int]
    score_threshold: float
    max_detections: int | None
    nms_iou: float | None
    mask_format: str
    outputs: list[tuple[OutputSpec, bool]]
    timeout_s: float | None
    budget_s: float | None = None  # latency_budget_ms
    early_stop: bool = False


# --- health and metadata --------------------------------------------------------------------
def server_ready(state: ServiceState) -> bool:
    return state.readiness()[0] == "ready"


def server_live(state: ServiceState) -> bool:
    """Liveness, as /healthz: false once the model has failed its self-test, so that the
    liveness probe restarts the server (a loading or draining server is alive)."""
    return state.health.problem is None


def served_model(state: ServiceState, name: str, version: str = "") -> LoadedModel:
    """The model `name` (at `version`, when given); 404 for any other, 503 while loading."""
    if state.model is None:
        raise not_ready()
    served = state.model.description
    if name != served.name:
        raise APIError(
            404, "model_not_found", f"unknown model {name!r}: this server serves {served.name!r}"
        )
    if version and version != served.version:
        raise APIError(
            404,
            "model_not_found",
            f"model {name!r} has no version {version!r}: it has {served.version!r}",
        )
    return state.model


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    d = model.description
    return {
        "name": d.name,
        "versions": [d.version],
        "platform": f"mad_{d.backend}",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
            for s in output_specs(model.mad.config)
        ],
    }


# --- checking a request ---------------------------------------------------------------------
def requested_output(name: str, parameters: Mapping[str, Any]) -> RequestedOutput:
    check_tensor_parameters("output", name, parameters, "binary_data")
    binary = parameters.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise bad_request(f"output {name!r}: binary_data must be true or false")
    return RequestedOutput(name, binary)


def image_input(inputs: list[InputTensor], max_images: int) -> list[bytes]:
    """The encoded images of the one input, `image`: BYTES [N] or [N, 1]."""
    takes = f"the model takes one input, {INPUT!r}: BYTES, shape [N], N encoded image files"
    others = [t.name for t in inputs if t.name != INPUT]
    if others:
        raise bad_request(f"unexpected input {others[0]!r}: {takes}")
    if len(inputs) != 1:
        raise bad_request(f"no input {INPUT!r}: {takes}" if not inputs else f"{INPUT!r} twice")
    tensor = inputs[0]
    if tensor.datatype != "BYTES":
        raise bad_request(f"input {INPUT!r} has datatype {tensor.datatype}: {takes}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise bad_request(f"input {INPUT!r} has shape {shape}: {takes} (or [N, 1]), N >= 1")
    if shape[0] > max_images:
        raise bad_request(
            f"input {INPUT!r} holds {shape[0]} images: at most {max_images} "
            "(the server's MAD_MAX_BATCH_SIZE) per request"
        )
    count = 0 if tensor.elements is None else len(tensor.elements)
    if tensor.elements is None or count != shape[0]:
        raise bad_request(f"input {INPUT!r} has shape {shape} but {count} elements")
    return tensor.elements


def chosen_tasks(
    parameters: Mapping[str, Any],
    requested: list[RequestedOutput] | None,
    specs: dict[str, OutputSpec],
    model_tasks: list[str],
) -> tuple[str, ...]:
    """The `tasks` parameter; else the tasks the requested outputs come from; else all."""
    if "tasks" in parameters:
        return parse_tasks([text("tasks", parameters["tasks"])], model_tasks)
    needed = {specs[o.name].task for o in requested or []} - {None}
    return tuple(t for t in model_tasks if t in needed) if needed else tuple(model_tasks)


def plan(state: ServiceState, request: InferRequest) -> Plan:
    """Check `request` against the served model -> what to run; APIError when it is wrong."""
    model = served_model(state, request.model_name, request.model_version)
    engine = get_engine(state)  # 503 while loading, and once the model is found broken
    images = image_input(request.inputs, state.settings.max_batch_size)
    config, params = model.mad.config, request.parameters
    unknown = [name for name in params if name not in PARAMETERS]
    if unknown:
        raise bad_request(
            f"unknown parameter {unknown[0]!r}: this model takes {', '.join(PARAMETERS)}"
        )
    specs = {spec.name: spec for spec in output_specs(config)}
    requested = request.outputs
    names = [o.name for o in requested or []]
    for name in names:
        if name not in specs:
            raise bad_request(f"unknown output {name!r}: this model has {', '.join(specs)}")
        if names.count(name) > 1:
            raise bad_request(f"output {name!r} requested twice")
    try:
        tasks = chosen_tasks(params, requested, specs, list(config.tasks))
        runs = model.mad.tasks_to_run(tasks)
        steps = given(params, "refine_steps", text)
        refine = parse_refine_steps(None if steps is None else [steps], config.tasks, runs)
        threshold = given(params, "score_threshold", number)
        score_threshold = check_score_threshold(
            DEFAULT_SCORE_THRESHOLD if threshold is None else threshold
        )
        max_detections = check_max_detections(
            given(params, "max_detections", integer), config.num_slots
        )
        nms_iou = check_nms_iou(given(params, "nms_iou", number))
        budget_ms = check_latency_budget(given(params, "latency_budget_ms", number))
    except RequestError as exc:
        raise bad_request(str(exc)) from None
    mask_format = text("mask_format", params.get("mask_format", "rle"))
    if mask_format not in MASK_FORMATS:
        raise bad_request(f"parameter mask_format: {mask_format!r} is not rle or polygon")
    microseconds = given(params, "timeout", integer)
    if microseconds is not None and microseconds <= 0:
        raise bad_request(f"parameter timeout: {microseconds} microseconds is not a deadline")
    timeout_s = None if microseconds is None else microseconds / 1e6
    binary = flag("binary_data_output", params.get("binary_data_output", False))
    early_stop = flag(
        "refine_early_stop", params.get("refine_early_stop", state.settings.refine_early_stop)
    )

    if requested is None:
        outputs = [(s, binary) for s in specs.values() if s.task is None or s.task in runs]
    else:
        outputs = []
        for out in requested:
            spec = specs[out.name]
            if spec.task is not None and spec.task not in runs:
                raise bad_request(
                    f"output {out.name!r} comes from the task {spec.task}, which this request "
                    f"does not run (tasks: {', '.join(tasks)})"
                )
            outputs.append((spec, binary if out.binary is None else out.binary))
    return Plan(
        request,
        model,
        engine,
        images,
        tasks,
        refine,
        score_threshold,
        max_detections,
        nms_iou,
        mask_format,
        outputs,
        timeout_s,
        None if budget_ms is None else budget_ms / 1000,
        early_stop,
    )


# --- running it -----------------------------------------------------------------------------
def decode_images(data: list[bytes], max_pixels: int) -> list[tuple[Image.Image, float]]:
    """-> each image with the seconds its decoding took."""
    decoded = []
    for i, element in enumerate(data):
        start = time.perf_counter()
        try:
            image = decode_image(element, max_pixels)
        except APIError as exc:
            if len(data) > 1:
                exc.message = f"image {i} of {len(data)}: {exc.message}"
            raise
        decoded.append((image, time.perf_counter() - start))
    return decoded


async def run(
    state: ServiceState,
    plan: Plan,
    arrived: float,
    client_deadline_s: float | None = None,
    client: HTTPRequest | None = None,
) -> InferResponse:
    """Run a planned request that arrived at `arrived` (time.perf_counter()). Its deadline:
    REQUEST_TIMEOUT_S, the `timeout` parameter or the client's (gRPC), whichever is first.
    `client`: the REST request, watched for a disconnect (gRPC cancels the call instead)."""
    settings = state.settings
    limit_s = min(
        t for t in (settings.request_timeout_s, plan.timeout_s, client_deadline_s) if t is not None
    )
    decoded = await asyncio.to_thread(decode_images, plan.images, settings.max_image_pixels)
    keys: list[str | None] = [None] * len(decoded)
    if state.features is not None:
        keys = list(await asyncio.to_thread(lambda: [image_key(d) for d in plan.images]))
    requests = [
        ModelRequest(
            image,
            plan.tasks,
            plan.refine_steps,
            plan.score_threshold,
            plan.max_detections,
            plan.nms_iou,
            plan.early_stop,
            key,
        )
        for (image, _), key in zip(decoded, keys, strict=True)
    ]
    jobs = submit_all(plan.engine, requests, plan.budget_s, arrived)
    remaining_s = limit_s - (time.perf_counter() - arrived)
    results = await wait_all(plan.engine, jobs, remaining_s, limit_s, client)
    post_start = time.perf_counter()
    decode_seconds = [seconds for _, seconds in decoded]

    def json_bodies() -> list[bytes]:
        """Each image's POST /predict response."""
        model = plan.model
        bodies = []
        for result, job, decode_s in zip(results, jobs, decode_seconds, strict=True):
            response = respond(
                result,
                model.description.ref(),
                model.mad.codecs,
                plan.mask_format,
                arrived=arrived,
                queue_seconds=job.queue_seconds,
                decode_seconds=decode_s,
            )
            report_plan(response, job.admission)
            bodies.append(response.model_dump_json(exclude_none=True).encode())
        return bodies

    def tensors() -> list[tuple[Tensor, bool]]:
        codecs = plan.model.mad.codecs
        return [(output_tensor(spec, results, json_bodies, codecs), b) for spec, b in plan.outputs]

    outputs = await asyncio.to_thread(tensors)
    postprocess_s = time.perf_counter() - post_start
    total_s = time.perf_counter() - arrived
    for job in jobs:  # what the latency budgets learn (as POST /predict's answers teach)
        steps = job.admission.plan if job.admission is not None else None
        state.costs.learn(steps, total_s, postprocess_s / len(jobs))
    for result, job, decode_s in zip(results, jobs, decode_seconds, strict=True):
        stages = request_stages(result)  # as POST /predict reports them
        stages["preprocess"] = stages.get("preprocess", 0.0) + decode_s
        seconds = {"queue": job.queue_seconds, **stages, "postprocess": postprocess_s}
        state.metrics.observe_stages(
            {stage: s * 1000 for stage, s in seconds.items()},
            {task: result.passes.get(task, 0) for task in result.tasks},
        )
    served = plan.model.description
    return InferResponse(served.name, served.version, plan.request.id, outputs)
