"""One JSON shape for every error: {"error": {"code", "message", "request_id"[, "details"]}}.

FastAPI's own validation errors and Starlette's HTTP errors (404, 405, ...) are rewritten into
the same shape, so clients parse exactly one format. The exception: routes under /v2 (the
Open Inference Protocol) answer in that protocol's shape, {"error": "message"}; the request
id is in the X-Request-ID header there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.logging import request_id_var

CLIENT_CLOSED = 499  # nginx's "client closed request": the answer reached no one
V2_PREFIX = "/v2"

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    431: "request_header_fields_too_large",
    CLIENT_CLOSED: "client_closed_request",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class APIError(Exception):
    """An error a client caused or must handle; becomes the JSON error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.details = headers or {}, details


def error_body(
    status: int, message: str, code: str | None = None, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": code or CODES.get(status, "error"),
        "message": message,
        "request_id": request_id_var.get(),
    }
    if details is not None:
        error["details"] = details
    return {"error": error}


def is_v2_path(path: str) -> bool:
    """A route of the Open Inference Protocol (service/routers/v2.py)."""
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
    *,
    path: str = "",
) -> JSONResponse:
    """The error body for a request to `path`: the v2 protocol's shape under /v2."""
    if is_v2_path(path):
        return JSONResponse({"error": message}, status, headers=headers)
    return JSONResponse(error_body(status, message, code, details), status, headers=headers)


# FastAPI's words for a text field where a file part belongs, and what the client should hear.
NOT_A_FILE = "Expected UploadFile, received"
NOT_A_FILE_MESSAGE = "expected a file (a multipart part with a filename), not a text field"


def validation_details(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # Only loc/msg/type: `input` may hold an UploadFile or bytes, which JSON cannot carry.
    return [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": client_message(e),
            "type": e.get("type", ""),
        }
        for e in errors
    ]


def client_message(error: Mapping[str, Any]) -> str:
    message = str(error.get("msg", ""))
    return NOT_A_FILE_MESSAGE if NOT_A_FILE in message else message


async def handle_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(
        exc.status, exc.message, exc.code, exc.headers, exc.details, path=request.url.path
    )


async def handle_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = getattr(exc, "headers", None)
    return error_response(exc.status_code, message, headers=headers, path=request.url.path)


async def handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = validation_details(exc.errors())
    first: dict[str, Any] = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p != "body")
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return error_response(422, message, details=details, path=request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    # The decorator form: add_exception_handler types a handler as taking any Exception,
    # though Starlette calls it only with the class it is registered for.
    app.exception_handler(APIError)(handle_api_error)
    app.exception_handler(StarletteHTTPException)(handle_http_error)
    app.exception_handler(RequestValidationError)(handle_validation_error)
