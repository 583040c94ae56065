"""POST /predict: one image in, the asked tasks' results out (or streamed, draft first)."""

from __future__ import annotations

import time
from typing import Annotated, Any, get_args, get_origin

from fastapi import APIRouter, Depends, Form, Header, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from model.inference_io import Request as ModelRequest
from model.inference_io import Result
from model.request_spec import (
    RequestError,
    check_latency_budget,
    check_max_detections,
    check_nms_iou,
    check_score_threshold,
    parse_latency_budget,
    parse_refine_steps,
    parse_tasks,
)
from service.dependencies import EngineDep, ModelDep, StateDep, require_api_key
from service.engine import Job
from service.errors import APIError
from service.images import decode_image, image_key
from service.jobs import submit_all, wait_all
from service.postprocess import report_plan, respond
from service.schemas import ErrorResponse, PartialInfo, PredictForm, PredictResponse
from service.state import LoadedModel, ServiceState
from service.streaming import PartialResults, stream_format, streaming_response

router = APIRouter(dependencies=[Depends(require_api_key)])

ERROR_TEXTS = {
    400: "The file is not a readable image.",
    401: "API key missing or wrong (only when the server has one).",
    408: "The body stalled for MAD_READ_TIMEOUT_S, or was still arriving at MAD_REQUEST_TIMEOUT_S.",
    413: "Body over MAD_MAX_UPLOAD_BYTES, or image over MAD_MAX_IMAGE_PIXELS.",
    415: "The body is not multipart/form-data.",
    422: "Unknown task, a parameter out of range, or a latency budget too small for one pass.",
    503: "Queue full, overloaded, out of memory, model loading or broken, or shutting down: "
    "retry after Retry-After seconds.",
    504: "Not done within MAD_REQUEST_TIMEOUT_S.",
}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in ERROR_TEXTS.items()
}


STREAMED = {
    "description": "With `Accept: application/x-ndjson` or `text/event-stream`: the draft, "
    "each refinement round, then the final response (docs/service.md).",
    "content": {"application/x-ndjson": {}, "text/event-stream": {}},
}


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses={**ERRORS, 200: STREAMED},
    summary="Run the model on one image",
)
async def predict(
    request: Request,
    form: Annotated[PredictForm, Form(media_type="multipart/form-data")],
    state: StateDep,
    engine: EngineDep,
    model: ModelDep,
    x_latency_budget_ms: Annotated[
        str | None, Header(description="latency_budget_ms as a header (the form field wins).")
    ] = None,
) -> Response:
    """Detection, instance segmentation, person keypoints and captioning (the model's tasks)
    in one call.

    Segmentation and keypoints are prompted by detections, so asking for them runs (and
    returns) detection as well. `category_id` indexes the model's `class_names` (0-based).
    """
    settings, config = state.settings, model.mad.config
    arrived = request.state.arrived
    try:
        check_no_form_fields_in_query(request)
        check_fields_sent_once(await request.form())  # parsed already: the form is cached
        tasks = parse_tasks(form.tasks, config.tasks)
        request.state.tasks = tasks  # the metrics middleware counts per task asked
        refine = parse_refine_steps(form.refine_steps, config.tasks, model.mad.tasks_to_run(tasks))
        score_threshold = check_score_threshold(form.score_threshold)
        max_detections = check_max_detections(form.max_detections, config.num_slots)
        nms_iou = check_nms_iou(form.nms_iou)
        budget_ms = check_latency_budget(form.latency_budget_ms)
        if budget_ms is None:
            budget_ms = parse_latency_budget(x_latency_budget_ms)
    except RequestError as exc:
        raise APIError(422, "validation_error", str(exc)) from None
    early_stop = form.refine_early_stop
    stream = stream_format(request.headers.get("accept", ""))

    data = await form.image.read()
    decode_start = time.perf_counter()
    image = await run_in_threadpool(decode_image, data, settings.max_image_pixels)
    # The feature cache knows an image by its bytes (hashing 20 MiB takes ~10 ms).
    digest = await run_in_threadpool(image_key, data) if state.features is not None else None
    decode_seconds = time.perf_counter() - decode_start

    job_request = ModelRequest(
        image,
        tasks,
        refine,
        score_threshold,
        max_detections,
        nms_iou,
        settings.refine_early_stop if early_stop is None else early_stop,
        digest,
    )
    partials = PartialResults() if stream else None
    [job] = submit_all(
        engine,
        [job_request],
        None if budget_ms is None else budget_ms / 1000,
        arrived,
        on_partial=partials.put if partials is not None else None,
    )

    async def respond(result: Result, partial_round: int | None = None) -> PredictResponse:
        return await answer(
            state,
            model,
            job,
            result,
            form.mask_format,
            decode_seconds,
            arrived,
            partial_round,
            streamed=stream is not None,
        )

    limit_s = settings.request_timeout_s
    if stream is not None and partials is not None:
        deadline = arrived + limit_s
        return streaming_response(stream, engine, job, partials, respond, deadline, limit_s)
    remaining_s = limit_s - (time.perf_counter() - arrived)
    [result] = await wait_all(engine, [job], remaining_s, limit_s, request)

    response = await respond(result)
    # Already a validated PredictResponse: serialise it once, here, rather than have FastAPI
    # validate it again against response_model (which still documents it in OpenAPI).
    return Response(response.model_dump_json(exclude_none=True), media_type="application/json")


async def answer(
    state: ServiceState,
    model: LoadedModel,
    job: Job,
    result: Result,
    mask_format: str,
    decode_seconds: float,
    arrived: float,
    partial_round: int | None,
    streamed: bool = False,
) -> PredictResponse:
    """The response for `result`: the final one (partial_round None; counted in the
    metrics), or a partial one after that refinement round (0: the draft)."""
    response = await run_in_threadpool(
        lambda: respond(
            result,
            model.description.ref(),
            model.mad.codecs,
            mask_format,
            arrived=arrived,
            queue_seconds=job.queue_seconds,
            decode_seconds=decode_seconds,
        )
    )
    report_plan(response, job.admission)
    if partial_round is not None:
        stage = "draft" if partial_round == 0 else "refine"
        response.partial = PartialInfo(stage=stage, round=partial_round)
        return response
    if not streamed:
        plan = job.admission.plan if job.admission is not None else None
        timings = response.timings_ms
        state.costs.learn(plan, timings["total"] / 1000, timings["postprocess"] / 1000)
    record(state, response)
    return response


def record(state: ServiceState, response: PredictResponse) -> None:
    metrics = state.metrics
    for stage, ms in response.timings_ms.items():
        if stage != "total":
            metrics.stage_duration.labels(stage=stage).observe(ms / 1000)
    for task, passes in response.decoder_passes.items():
        metrics.decoder_passes.labels(task=task).inc(passes)


def takes_many(annotation: Any) -> bool:
    """Whether a form field's type is a list (may be repeated), possibly optional."""
    return get_origin(annotation) is list or any(
        get_origin(a) is list for a in get_args(annotation)
    )


SINGLE_VALUED = tuple(
    name for name, field in PredictForm.model_fields.items() if not takes_many(field.annotation)
)


def check_fields_sent_once(form: FormData) -> None:
    """A field other than the repeatable `tasks` and `refine_steps` sent twice (two images in
    one request) would silently lose all but its last value: refuse it."""
    for name in SINGLE_VALUED:
        count = len(form.getlist(name))
        if count > 1:
            hint = " (one image per request: send several requests, the server batches them)"
            raise RequestError(
                name, f"sent {count} times; send it once{hint if name == 'image' else ''}"
            )


def check_no_form_fields_in_query(request: Request) -> None:
    """A form field sent in the URL (`/predict?tasks=caption`) would be ignored and the
    request answered with the defaults: refuse it, naming where it belongs."""
    misplaced = sorted(set(request.query_params) & set(PredictForm.model_fields))
    if misplaced:
        raise RequestError(
            ", ".join(misplaced), "send as multipart form fields (-F), not URL query parameters"
        )
