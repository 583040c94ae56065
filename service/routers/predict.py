"""POST /predict: one image in, the asked tasks' results out."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request, Response
from starlette.concurrency import run_in_threadpool

from model.pipeline import Request as ModelRequest
from model.request_spec import (
    RequestError,
    check_max_detections,
    check_nms_iou,
    check_score_threshold,
    parse_refine_steps,
    parse_tasks,
)
from service.dependencies import EngineDep, ModelDep, StateDep, require_api_key
from service.errors import APIError
from service.images import decode_image
from service.jobs import submit_all, wait_all
from service.postprocess import respond
from service.schemas import ErrorResponse, PredictForm, PredictResponse
from service.state import ServiceState

router = APIRouter(dependencies=[Depends(require_api_key)])

ERROR_TEXTS = {
    400: "The file is not a readable image.",
    401: "API key missing or wrong (only when the server has one).",
    408: "The body stalled for READ_TIMEOUT_S, or was still arriving at REQUEST_TIMEOUT_S.",
    413: "Body over MAX_UPLOAD_BYTES, or image over MAX_IMAGE_PIXELS.",
    415: "The body is not multipart/form-data.",
    422: "Unknown task, or a parameter out of range.",
    503: "Queue full, overloaded, out of memory, model loading or broken, or shutting down: "
    "retry after Retry-After seconds.",
    504: "Not done within REQUEST_TIMEOUT_S.",
}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in ERROR_TEXTS.items()
}


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Run the model on one image",
)
async def predict(
    request: Request,
    form: Annotated[PredictForm, Form(media_type="multipart/form-data")],
    state: StateDep,
    engine: EngineDep,
    model: ModelDep,
) -> Response:
    """Detection, instance segmentation, person keypoints and captioning (the model's tasks)
    in one call.

    Segmentation and keypoints are prompted by detections, so asking for them runs (and
    returns) detection as well. `category_id` indexes the model's `class_names` (0-based).
    """
    settings, config = state.settings, model.mad.config
    arrived = request.state.arrived
    try:
        tasks = parse_tasks(form.tasks, config.tasks)
        request.state.tasks = tasks  # the metrics middleware counts per task asked
        refine = parse_refine_steps(form.refine_steps, config.tasks)
        score_threshold = check_score_threshold(form.score_threshold)
        max_detections = check_max_detections(form.max_detections, config.num_slots)
        nms_iou = check_nms_iou(form.nms_iou)
    except RequestError as exc:
        raise APIError(422, "validation_error", str(exc)) from None

    data = await form.image.read()
    decode_start = time.perf_counter()
    image = await run_in_threadpool(decode_image, data, settings.max_image_pixels)
    decode_seconds = time.perf_counter() - decode_start

    job_request = ModelRequest(image, tasks, refine, score_threshold, max_detections, nms_iou)
    [job] = submit_all(engine, [job_request])
    limit_s = settings.request_timeout_s
    [result] = await wait_all([job], limit_s - (time.perf_counter() - arrived), limit_s, request)

    response = await run_in_threadpool(
        lambda: respond(
            result,
            model.description.ref(),
            model.mad.codecs,
            form.mask_format,
            arrived=arrived,
            queue_seconds=job.queue_seconds,
            decode_seconds=decode_seconds,
        )
    )
    record(state, response)
    # Already a validated PredictResponse: serialise it once, here, rather than have FastAPI
    # validate it again against response_model (which still documents it in OpenAPI).
    return Response(response.model_dump_json(exclude_none=True), media_type="application/json")


def record(state: ServiceState, response: PredictResponse) -> None:
    metrics = state.metrics
    for stage, ms in response.timings_ms.items():
        if stage != "total":
            metrics.stage_duration.labels(stage=stage).observe(ms / 1000)
    for task, passes in response.decoder_passes.items():
        metrics.decoder_passes.labels(task=task).inc(passes)
