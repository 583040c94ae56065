"""A pipeline Result -> the JSON-ready response: each task's codec encodes its own output."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from model.codecs import DetectionCodec, JsonOptions, TaskCodec
from model.inference_io import Result
from service.anytime import Admission
from service.schemas import BudgetReport, ImageSize, ModelRef, PredictResponse

MODEL_STAGES = ("preprocess", "encode")


def outputs_json(
    result: Result, codecs: Mapping[str, TaskCodec], options: JsonOptions
) -> dict[str, Any]:
    """{output field: JSON} of every task run. A task prompted by detections puts its
    outputs into the objects of the detections they belong to (where it applies), with their
    own scores where it has them (`score_field`)."""
    body: dict[str, Any] = {}
    for task in result.tasks:
        codec = codecs[task]
        if not codec.prompted_by_detections:
            body[codec.output_field] = codec.to_json(result.outputs[task], options)
    for task in result.tasks:
        codec = codecs[task]
        if codec.prompted_by_detections:
            objects = body[codecs[DetectionCodec.name].output_field]
            scores = codec.output_scores(result) if codec.score_field is not None else None
            for j, (obj, output) in enumerate(zip(objects, result.outputs[task], strict=True)):
                if output is not None:
                    obj[codec.output_field] = codec.to_json(output, options)
                    if scores is not None:
                        obj[codec.score_field] = round(scores[j], 5)
    return body


def build_response(
    result: Result,
    model: ModelRef,
    codecs: Mapping[str, TaskCodec],
    mask_format: str,
    timings: dict[str, float],
) -> PredictResponse:
    """`timings` (seconds, from the service: queue, decode) are merged with the model's."""
    return PredictResponse(
        model=model,
        image=ImageSize(width=result.image_size[1], height=result.image_size[0]),
        tasks=list(result.tasks),
        decoder_passes={task: result.passes.get(task, 0) for task in result.tasks},
        refine_steps_applied={task: result.refine_steps.get(task, 0) for task in result.tasks},
        timings_ms={k: round(v * 1000, 3) for k, v in timings.items()},
        **outputs_json(result, codecs, JsonOptions(mask_format)),
    )


def request_stages(result: Result) -> dict[str, float]:
    """Model stages that concern this request. A batch's timings cover every task anyone in
    it asked for; the others' tasks are not this request's latency."""
    return {k: v for k, v in result.timings.items() if k in MODEL_STAGES or k in result.tasks}


def respond(
    result: Result,
    model: ModelRef,
    codecs: Mapping[str, TaskCodec],
    mask_format: str,
    *,
    arrived: float,
    queue_seconds: float,
    decode_seconds: float,
) -> PredictResponse:
    """The response to one image, with every timing of `timings_ms`: queue, preprocess
    (decoding the upload, letterboxing), the model's stages, postprocess (building this
    response), total (from `arrived`, a perf_counter reading, to now)."""
    post_start = time.perf_counter()
    stages = request_stages(result)
    stages["preprocess"] = stages.get("preprocess", 0.0) + decode_seconds
    timings = {"queue": queue_seconds, **stages}
    response = build_response(result, model, codecs, mask_format, timings)
    end = time.perf_counter()
    response.timings_ms["postprocess"] = round((end - post_start) * 1000, 3)
    response.timings_ms["total"] = round((end - arrived) * 1000, 3)
    return response


def report_plan(response: PredictResponse, admission: Admission | None) -> None:
    """Say in the response what its latency budget and degradation under load decided."""
    plan = admission.plan if admission is not None else None
    if admission is None or plan is None:
        return
    if admission.budget_s is not None:
        response.budget = BudgetReport(
            latency_budget_ms=round(admission.budget_s * 1000, 3),
            estimated_ms=round((plan.estimated_s or 0.0) * 1000, 3),
            cut=plan.budget_cut,
        )
    if plan.degraded:
        response.degraded = True
