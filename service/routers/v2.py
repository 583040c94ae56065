"""The Open Inference Protocol's REST API (KServe v2; Triton's HTTP API), beside /predict.

Health, server and model metadata, and inference with the binary tensor data extension: with
an `Inference-Header-Content-Length: n` header, the body is n bytes of JSON followed by the
inputs' binary data (each input's `binary_data_size` bytes, in order); without it, the body
is JSON and a BYTES element is base64 text. A response with any output as binary data is
built the same way. Errors are `{"error": "message"}` (service/errors.py). The protocol
itself lives in service/v2_infer.py, shared with gRPC.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service import v2_infer
from service.dependencies import StateDep, require_api_key
from service.errors import APIError, validation_details
from service.middleware import byte_count
from service.v2_infer import InferRequest, InferResponse, InputTensor
from service.v2_parameters import bad_request, check_tensor_parameters
from service.v2_schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    V2Error,
)
from service.v2_tensors import TensorDataError, deserialize_bytes

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])
KeyRequired = [Depends(require_api_key)]
HEADER_LENGTH = "Inference-Header-Content-Length"
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": V2Error, "description": text}
    for status, text in {
        400: "A malformed request: JSON, tensors, parameters, or an unreadable image.",
        401: "API key missing or wrong (only when the server has one).",
        404: "No such model or version.",
        413: "Body over MAD_MAX_UPLOAD_BYTES, or an image over MAD_MAX_IMAGE_PIXELS.",
        503: "Queue full, model loading, or shutting down: retry after Retry-After seconds.",
        504: "Not done within the deadline.",
    }.items()
}


@router.get(
    "/health/live",
    response_model=ServerLive,
    summary="Server liveness (503 once the model has failed its self-test)",
    responses={503: {"model": ServerLive}},
)
async def server_live(state: StateDep) -> Any:
    live = v2_infer.server_live(state)
    return JSONResponse(ServerLive(live=live).model_dump(), 200 if live else 503)


@router.get(
    "/health/ready",
    response_model=ServerReady,
    summary="Server readiness (503 while loading or draining)",
    responses={503: {"model": ServerReady}},
)
async def server_ready(state: StateDep) -> Any:
    ready = v2_infer.server_ready(state)
    return JSONResponse(ServerReady(ready=ready).model_dump(), 200 if ready else 503)


@router.get(
    "",
    response_model=ServerMetadata,
    summary="Server metadata",
    dependencies=KeyRequired,
    responses=ERRORS,
)
async def server_metadata(request: Request) -> dict[str, Any]:
    return v2_infer.server_metadata(request.app.version)


@router.get(
    "/models/{model_name}",
    response_model=ModelMetadata,
    summary="Model metadata: inputs and outputs",
    dependencies=KeyRequired,
    responses=ERRORS,
)
async def model_metadata(state: StateDep, model_name: str) -> dict[str, Any]:
    return v2_infer.model_metadata(v2_infer.served_model(state, model_name))


@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    summary="Model metadata of a version",
    dependencies=KeyRequired,
    responses=ERRORS,
)
async def model_version_metadata(
    state: StateDep, model_name: str, model_version: str
) -> dict[str, Any]:
    return v2_infer.model_metadata(v2_infer.served_model(state, model_name, model_version))


def model_ready_response(state: StateDep, name: str, version: str) -> JSONResponse:
    v2_infer.served_model(state, name, version)
    ready = v2_infer.server_ready(state)
    return JSONResponse(ModelReady(name=name, ready=ready).model_dump(), 200 if ready else 503)


@router.get(
    "/models/{model_name}/ready",
    response_model=ModelReady,
    summary="Model readiness (503 while loading or draining)",
    responses={503: {"model": ModelReady}, 404: ERRORS[404]},
)
async def model_ready(state: StateDep, model_name: str) -> Any:
    return model_ready_response(state, model_name, "")


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    response_model=ModelReady,
    summary="Model readiness of a version",
    responses={503: {"model": ModelReady}, 404: ERRORS[404]},
)
async def model_version_ready(state: StateDep, model_name: str, model_version: str) -> Any:
    return model_ready_response(state, model_name, model_version)


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"With {HEADER_LENGTH}: that many bytes of InferenceRequest "
                "JSON, then the inputs' binary data.",
            },
        },
    }
}
INFER_DOC: dict[str, Any] = {
    "response_model": InferenceResponse,
    "response_model_exclude_none": True,
    "responses": ERRORS,
    "dependencies": KeyRequired,
    "openapi_extra": INFER_BODY,
}


@router.post("/models/{model_name}/infer", summary="Run the model", **INFER_DOC)
async def infer(request: Request, state: StateDep, model_name: str) -> Response:
    """One input, `image`: BYTES [N], N encoded images; outputs `image_size`, `json`,
    `num_detections`, `boxes`, `scores`, `labels`, `masks_rle`, `mask_scores`, `keypoints`,
    `caption` (docs/kserve.md)."""
    return await infer_version(request, state, model_name, "")


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    summary="Run a version of the model",
    **INFER_DOC,
)
async def infer_version(
    request: Request, state: StateDep, model_name: str, model_version: str
) -> Response:
    body = decompressed(await request.body(), request, state.settings.max_upload_bytes)
    plan = v2_infer.plan(state, parse_request(body, request, model_name, model_version))
    request.state.tasks = plan.tasks  # the metrics middleware counts per task asked
    return encode_response(await v2_infer.run(state, plan, request.state.arrived, client=request))


# --- the wire format ------------------------------------------------------------------------
def decompressed(body: bytes, request: Request, limit: int) -> bytes:
    """The body, inflated when sent with Content-Encoding gzip or deflate (at most `limit`
    bytes inflated: a small body must not inflate into a huge one)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        message = f"Content-Encoding {encoding} is not supported (gzip, deflate are)"
        raise APIError(415, "unsupported_media_type", message)
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad_request(f"the body is not valid {encoding}: {exc}") from None
    if len(out) > limit:
        raise APIError(413, "payload_too_large", f"the inflated body is over {limit} bytes")
    return out


def parse_request(body: bytes, request: Request, name: str, version: str) -> InferRequest:
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        header, binary = body, b""
    elif (size := byte_count(length)) is not None and size <= len(body):
        header, binary = body[:size], body[size:]
    else:
        raise bad_request(f"{HEADER_LENGTH} {length!r} is not a length within the body")
    try:
        parsed = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        first = validation_details(exc.errors())[0]
        where = ".".join(first["loc"])
        message = f"{where}: {first['msg']}" if where else first["msg"]
        raise bad_request(f"invalid inference request: {message}") from None
    inputs, at = [], 0
    for tensor in parsed.inputs:
        parameters = tensor.parameters
        check_tensor_parameters("input", tensor.name, parameters, "binary_data_size")
        size = parameters.get("binary_data_size")
        if size is not None:
            if tensor.data is not None:
                raise bad_request(f"input {tensor.name!r} has both data and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_request(
                    f"input {tensor.name!r}: binary_data_size is not a byte count: {size!r}"
                )
            if at + size > len(binary):
                raise bad_request(
                    f"input {tensor.name!r}: binary_data_size {size} is past the end of the "
                    f"binary data ({len(binary) - at} bytes left)"
                )
            elements = binary_elements(tensor.name, tensor.datatype, binary[at : at + size])
            at += size
        elif tensor.data is not None:
            elements = json_elements(tensor.name, tensor.datatype, tensor.data)
        else:
            raise bad_request(f"input {tensor.name!r} has no data and no binary_data_size")
        inputs.append(InputTensor(tensor.name, tensor.datatype, tensor.shape, elements))
    if at != len(binary):
        raise bad_request(f"{len(binary) - at} bytes of binary data belong to no input")
    outputs = None
    if parsed.outputs is not None:
        outputs = [v2_infer.requested_output(o.name, o.parameters) for o in parsed.outputs]
    return InferRequest(name, version, parsed.id or "", parsed.parameters, inputs, outputs)


def binary_elements(name: str, datatype: str, raw: bytes) -> list[bytes] | None:
    if datatype != "BYTES":
        return None
    try:
        return deserialize_bytes(raw)
    except TensorDataError as exc:
        raise bad_request(f"input {name!r}: {exc}") from None


def flat(data: list[Any]) -> Iterator[Any]:
    for item in data:
        if isinstance(item, list):
            yield from flat(item)
        else:
            yield item


def json_elements(name: str, datatype: str, data: list[Any]) -> list[bytes] | None:
    """BYTES elements in JSON: base64 text (JSON cannot carry an image's bytes)."""
    if datatype != "BYTES":
        return None
    elements = []
    for i, item in enumerate(flat(data)):
        try:
            if not isinstance(item, str):
                raise ValueError
            elements.append(base64.b64decode(item, validate=True))
        except (ValueError, binascii.Error):
            raise bad_request(
                f"input {name!r} element {i} is not base64 text: in JSON an encoded image "
                f"is base64; or send it as binary data ({HEADER_LENGTH})"
            ) from None
    return elements


def encode_response(response: InferResponse) -> Response:
    outputs, blobs = [], []
    for tensor, binary in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if binary:
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensor.json_data()
        outputs.append(entry)
    header: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        header["id"] = response.id
    header["outputs"] = outputs
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(
        text + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )


def document_request_body(schema: dict[str, Any]) -> None:
    """Add InferenceRequest (read by hand, for the binary extension) to the OpenAPI
    components that the infer routes' request body refers to."""
    ref = "#/components/schemas/{model}"
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    document = InferenceRequest.model_json_schema(ref_template=ref)
    components.update(document.pop("$defs", {}))
    components["InferenceRequest"] = document
