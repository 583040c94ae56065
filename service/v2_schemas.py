"""The JSON objects of the Open Inference Protocol's REST API (service/routers/v2.py): what
its routes accept and answer, and their OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# Some clients send `"parameters": null` for none.
Parameters = Annotated[
    dict[str, Any], BeforeValidator(lambda value: {} if value is None else value)
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerLive(Strict):
    live: bool


class ServerReady(Strict):
    ready: bool


class ModelReady(Strict):
    name: str
    ready: bool


class ServerMetadata(Strict):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(Strict):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: a dimension of any size.")


class ModelMetadata(Strict):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(Strict):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters = Field(
        default_factory=dict,
        description="binary_data_size: the bytes of this input in the binary data after the "
        "JSON (binary tensor data extension).",
    )
    data: list[Any] | None = Field(
        None, description="The elements, row-major (may be nested); BYTES elements as base64."
    )


class RequestOutput(Strict):
    name: str
    parameters: Parameters = Field(
        default_factory=dict, description="binary_data: return this output as binary data."
    )


class InferenceRequest(Strict):
    id: str | None = None
    parameters: Parameters = Field(
        default_factory=dict,
        description="tasks, refine_steps, score_threshold, max_detections, nms_iou, "
        "mask_format, timeout (microseconds), binary_data_output.",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(
        None, description="The outputs to return. Default: every output the request produces."
    )


class ResponseOutput(Strict):
    name: str
    datatype: str
    shape: list[int]
    parameters: Parameters | None = Field(
        None, description="binary_data_size when the output follows the JSON as binary data."
    )
    data: list[Any] | None = Field(None, description="Flat, row-major; BYTES as text.")


class InferenceResponse(Strict):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class V2Error(Strict):
    error: str
