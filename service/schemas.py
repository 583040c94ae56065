"""Request and response models: what the API accepts and sends, and its OpenAPI schema.

Responses are serialized with exclude_none: a field of a task that was not asked for is
absent, never null. Task names are the loaded model's (checked by model.request_spec); each
task's output sits under the name its codec gives (`TaskCodec.output_field`). The built-in
tasks' fields are declared here; any other task's is an extra field of the response (or of
each detection, for a task prompted by detections), and `model_openapi` adds it, with the
model's task names, to the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from model.codecs import TaskCodec
from model.request_spec import MAX_LATENCY_BUDGET_MS, MAX_REFINE_STEPS


class Strict(BaseModel):
    """No undeclared fields: in the OpenAPI schema (additionalProperties: false) and when
    parsing, so a misspelt form field is an error instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


class PredictForm(Strict):
    """The multipart/form-data body of POST /predict."""

    image: UploadFile = Field(description="The image file (any format Pillow reads).")
    tasks: list[str] | None = Field(
        None,
        description="Tasks to run, comma-separated and/or repeated: any of the model's "
        "tasks (GET /v1/model). Default: every task the model has.",
    )
    refine_steps: list[str] | None = Field(
        None,
        description=f"Refinement steps 0..{MAX_REFINE_STEPS}: one integer for every "
        "task, or task:K pairs (comma-separated and/or repeated; task:K wins over a bare K; "
        "task:K only for a task the request runs). "
        "Default: each task's schedule from the checkpoint.",
    )
    score_threshold: float = Field(
        0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="Drop detections scoring below this."
    )
    max_detections: int | None = Field(
        None, ge=1, description="Keep at most this many detections (1..the model's slots)."
    )
    nms_iou: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Class-wise NMS: drop a detection overlapping a "
        "higher-scored one of its class by more than this IoU (1: off). Default: the model's "
        "(GET /v1/model).",
    )
    mask_format: Literal["rle", "polygon"] = Field(
        "rle", description="rle: COCO compressed RLE; polygon: outer boundary polygons."
    )
    latency_budget_ms: float | None = Field(
        None,
        gt=0,
        le=MAX_LATENCY_BUDGET_MS,
        allow_inf_nan=False,
        description="Milliseconds from arrival to answer: each task not given in refine_steps "
        "gets the refinement steps that fit (at least one pass per task; a budget too small "
        "for that is refused with 422). Also the X-Latency-Budget-Ms header; the field wins.",
    )
    refine_early_stop: bool | None = Field(
        None,
        description="Stop a task's refinement once a step changes none of its tokens "
        "(decoder_passes says what ran). Default: the server's MAD_REFINE_EARLY_STOP.",
    )


class RLEMask(Strict):
    size: Annotated[list[int], Field(min_length=2, max_length=2)] = Field(
        description="[height, width] of the image."
    )
    counts: str = Field(description="COCO compressed RLE counts (pycocotools).")


Polygon = Annotated[list[float], Field(description="Flat [x0, y0, x1, y1, ...] in pixels.")]
Keypoint = Annotated[
    list[float], Field(min_length=3, max_length=3, description="[x, y, score] in pixels.")
]


class Detection(Strict):
    """One detection, with the outputs of the tasks it prompted (other tasks' are extra
    fields)."""

    model_config = ConfigDict(extra="allow")

    label: str = Field(description="Class name.")
    category_id: int = Field(description="Index into the model's class_names (0-based).")
    score: float = Field(
        description="p(class), times the box's confidence to the power of the model's "
        "`box_confidence_exponent` (1 for the bundled model; 0: p(class) alone)."
    )
    box: Annotated[list[float], Field(min_length=4, max_length=4)] = Field(
        description="[x0, y0, x1, y1] in original-image pixels."
    )
    mask: RLEMask | list[Polygon] | None = Field(
        None, description="When segmentation was asked: RLE, or a list of polygons."
    )
    mask_score: float | None = Field(
        None,
        description="With `mask`: the mask's score, the detection's times the model's mean "
        "foreground probability inside the mask where the model scores masks (its "
        "`mask_scoring`), else the detection's; 0 for a mask without pixels.",
    )
    keypoints: list[Keypoint] | None = Field(
        None,
        description="Persons only, when keypoints were asked: one [x, y, score] per keypoint name.",
    )


class ModelRef(Strict):
    name: str
    version: str
    backend: str


class ImageSize(Strict):
    width: int
    height: int


class BudgetReport(Strict):
    latency_budget_ms: float = Field(description="The budget asked for.")
    estimated_ms: float = Field(
        description="What the chosen steps were expected to take, from arrival to answer."
    )
    cut: bool = Field(description="Whether the budget lowered some task's refinement steps.")


class PartialInfo(Strict):
    stage: Literal["draft", "refine"] = Field(
        description="draft: every task after one pass; refine: after a refinement round."
    )
    round: int = Field(description="0 for the draft, then the refinement step just run.")


class PredictResponse(Strict):
    """The outputs of the tasks run (tasks other than the built-in ones: extra fields)."""

    model_config = ConfigDict(extra="allow")

    model: ModelRef
    image: ImageSize
    tasks: list[str] = Field(
        description="Tasks run: the ones asked, plus detection when a task prompted by "
        "detections (segmentation, keypoints) needed its boxes."
    )
    detections: list[Detection] | None = Field(None, description="When detection ran.")
    caption: str | None = Field(None, description="When caption was asked.")
    decoder_passes: dict[str, int] = Field(description="Decoder passes run, per task.")
    refine_steps_applied: dict[str, int] = Field(
        description="Refinement steps each task was given (its schedule's length), after the "
        "latency budget and degradation under load."
    )
    budget: BudgetReport | None = Field(None, description="When a latency budget was given.")
    degraded: bool | None = Field(
        None, description="True when a deep queue lowered the default refinement steps."
    )
    partial: PartialInfo | None = Field(
        None,
        description="Streamed results only: present on every object but the final one.",
    )
    timings_ms: dict[str, float] = Field(
        description="Milliseconds per stage: queue, preprocess, encode, each task, "
        "postprocess, total."
    )


class ModelDescription(Strict):
    name: str
    version: str
    backend: str
    device: str
    precision: str
    tasks: list[str]
    class_names: list[str]
    keypoint_names: list[str]
    skeleton: list[Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(
        description="Keypoint index pairs (0-based) to draw as limbs."
    )
    default_refine_steps: dict[str, int] = Field(
        description="Refinement steps each task runs when a request names none."
    )
    schedules: dict[str, list[float]] = Field(description="Default mask-ratio schedules.")
    decoding: dict[str, bool | int | float | str] = Field(
        description="How the logits are read: the checkpoint's decoding options, or those "
        "`MAD_DECODING` sets (docs/model.md)."
    )
    input_size: Annotated[list[int], Field(min_length=2, max_length=2)] = Field(
        description="[height, width] of the canvas images are letterboxed into; a portrait "
        "image on a landscape canvas runs on the transposed one ([width, height])."
    )
    max_detections: int = Field(description="Detection slots: the most objects per image.")
    nms_iou: float = Field(description="Default class-wise NMS IoU of /predict (1: off).")
    max_batch_size: int

    def ref(self) -> ModelRef:
        """What each response says about the model that answered it."""
        return ModelRef(name=self.name, version=self.version, backend=self.backend)


class Health(Strict):
    status: Literal["ok", "unhealthy"] = "ok"
    reason: str | None = Field(None, description="Why the model is unhealthy.")


ReadinessStatus = Literal["ready", "loading", "draining", "unhealthy"]


class Readiness(Strict):
    status: ReadinessStatus
    reason: str | None = Field(None, description="Why the model is unhealthy.")


class ErrorDetail(Strict):
    code: str = Field(description="Stable machine-readable error code.")
    message: str
    request_id: str | None = None
    details: list[dict] | None = Field(None, description="Validation errors: loc, msg, type.")


class ErrorResponse(Strict):
    error: ErrorDetail


def model_openapi(schema: dict[str, Any], codecs: Mapping[str, TaskCodec]) -> dict[str, Any]:
    """Make the OpenAPI document (`schema`, changed in place) the loaded model's: its task
    names as enums, and the output field (from its codec's `output_schema`) and score field
    of each task not declared above, after which responses hold no other fields."""
    components = schema["components"]["schemas"]
    names = list(codecs)
    for component in ("PredictResponse", "ModelDescription"):
        components[component]["properties"]["tasks"]["items"]["enum"] = names
    form = components["PredictForm"]["properties"]["tasks"]
    form["description"] += f" This model has: {', '.join(names)}."
    for task, codec in codecs.items():
        owner = "Detection" if codec.prompted_by_detections else "PredictResponse"
        properties = components[owner]["properties"]
        if codec.output_field not in properties:
            when = (
                f"When {task} was asked and applies to this detection."
                if codec.prompted_by_detections
                else f"When {task} ran."
            )
            properties[codec.output_field] = {"description": when, **codec.output_schema}
        if codec.score_field is not None and codec.score_field not in properties:
            properties[codec.score_field] = {
                "type": "number",
                "description": f"With `{codec.output_field}`: its own score.",
            }
    for owner in ("Detection", "PredictResponse"):
        components[owner]["additionalProperties"] = False
    return schema
