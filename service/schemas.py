"""Request and response models: what the API accepts and sends, and its OpenAPI schema.

Responses are serialized with exclude_none: a field of a task that was not asked for is
absent, never null.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from model.request_spec import MAX_REFINE_STEPS

TaskName = Literal["detection", "segmentation", "keypoints", "caption"]


class Strict(BaseModel):
    """No undeclared fields: in the OpenAPI schema (additionalProperties: false) and when
    parsing, so a misspelt form field is an error instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


class PredictForm(Strict):
    """The multipart/form-data body of POST /predict."""

    image: UploadFile = Field(description="The image file (any format Pillow reads).")
    tasks: list[str] | None = Field(
        None, description="Tasks to run, comma-separated and/or repeated: detection, "
        "segmentation, keypoints, caption. Default: every task the model has.")
    refine_steps: list[str] | None = Field(
        None, description=f"Refinement steps 0..{MAX_REFINE_STEPS}: one integer for every "
        "task, or task:K pairs (comma-separated and/or repeated; task:K wins over a bare K). "
        "Default: each task's schedule from the checkpoint.")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0,
                                   description="Drop detections scoring below this.")
    max_detections: int | None = Field(
        None, ge=1, description="Keep at most this many detections (1..the model's slots).")
    mask_format: Literal["rle", "polygon"] = Field(
        "rle", description="rle: COCO compressed RLE; polygon: outer boundary polygons.")


class RLEMask(Strict):
    size: Annotated[list[int], Field(min_length=2, max_length=2)] = Field(
        description="[height, width] of the image.")
    counts: str = Field(description="COCO compressed RLE counts (pycocotools).")


Polygon = Annotated[list[float], Field(description="Flat [x0, y0, x1, y1, ...] in pixels.")]
Keypoint = Annotated[list[float], Field(min_length=3, max_length=3,
                                        description="[x, y, score] in pixels.")]


class Detection(Strict):
    label: str = Field(description="Class name.")
    category_id: int = Field(description="Index into the model's class_names (0-based).")
    score: float
    box: Annotated[list[float], Field(min_length=4, max_length=4)] = Field(
        description="[x0, y0, x1, y1] in original-image pixels.")
    mask: RLEMask | list[Polygon] | None = Field(
        None, description="When segmentation was asked: RLE, or a list of polygons.")
    keypoints: list[Keypoint] | None = Field(
        None, description="Persons only, when keypoints were asked: one [x, y, score] per "
        "keypoint name.")


class ModelRef(Strict):
    name: str
    version: str
    backend: str


class ImageSize(Strict):
    width: int
    height: int


class PredictResponse(Strict):
    model: ModelRef
    image: ImageSize
    tasks: list[TaskName] = Field(
        description="Tasks run: the ones asked, plus detection when segmentation or "
        "keypoints needed its boxes.")
    detections: list[Detection] | None = Field(None, description="When detection ran.")
    caption: str | None = Field(None, description="When caption was asked.")
    decoder_passes: dict[str, int] = Field(description="Decoder passes run, per task.")
    timings_ms: dict[str, float] = Field(
        description="Milliseconds per stage: queue, preprocess, encode, each task, "
        "postprocess, total.")


class ModelDescription(Strict):
    name: str
    version: str
    backend: str
    device: str
    precision: str
    tasks: list[TaskName]
    class_names: list[str]
    keypoint_names: list[str]
    skeleton: list[Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(
        description="Keypoint index pairs (0-based) to draw as limbs.")
    default_refine_steps: dict[str, int] = Field(
        description="Refinement steps each task runs when a request names none.")
    schedules: dict[str, list[float]] = Field(description="Default mask-ratio schedules.")
    input_size: Annotated[list[int], Field(min_length=2, max_length=2)] = Field(
        description="[height, width] of the letterboxed network input.")
    max_detections: int = Field(description="Detection slots: the most objects per image.")
    max_batch_size: int


class Health(Strict):
    status: Literal["ok"] = "ok"


class Readiness(Strict):
    status: Literal["ready", "loading", "draining"]


class ErrorDetail(Strict):
    code: str = Field(description="Stable machine-readable error code.")
    message: str
    request_id: str | None = None
    details: list[dict] | None = Field(None, description="Validation errors: loc, msg, type.")


class ErrorResponse(Strict):
    error: ErrorDetail
