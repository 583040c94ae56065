"""Pure ASGI middleware (streaming-safe, unlike BaseHTTPMiddleware).

RequestContext: request id (accepted from X-Request-ID or made up), echoed on the response,
one JSON log line per request, inference metrics (POST /predict and the v2 infer routes,
labelled by protocol), and a last-resort JSON 500. A request whose client left before its
response was complete is logged and counted as 499, whatever the app answered into the closed
connection.
UploadGuard: an inference request is at most MAX_UPLOAD_BYTES, judged from Content-Length
before anything is read and again from the bytes actually received; POST /predict must also
be multipart.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import HTTPException
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import CLIENT_CLOSED, error_response
from service.logging import request_id_var
from service.metrics import Metrics

log = logging.getLogger("mad.access")

PREDICT_PATH = "/predict"
V2_INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
# Probes (ours and KServe's) and scrapes: debug level only.
QUIET_PATHS = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics")
# An incoming id is echoed into headers and logs: accept only short, plain tokens.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
BYTE_COUNT = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also takes "²"
MAX_BYTE_COUNT = 10**18  # more than any body; int() refuses thousands of digits


def byte_count(header: str) -> int | None:
    """A length header ("1024") -> bytes, saturating at MAX_BYTE_COUNT; None when malformed."""
    text = header.strip()
    if not BYTE_COUNT.fullmatch(text):
        return None
    return MAX_BYTE_COUNT if len(text) > 18 else int(text)


def is_predict(scope: Scope) -> bool:
    return scope["method"] == "POST" and scope["path"] == PREDICT_PATH


def inference_protocol(scope: Scope) -> str | None:
    """The `protocol` metrics label of an inference request (None: not one)."""
    if scope["method"] != "POST":
        return None
    if scope["path"] == PREDICT_PATH:
        return "native"
    return "v2_rest" if V2_INFER_PATH.match(scope["path"]) else None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if REQUEST_ID.match(incoming) else uuid.uuid4().hex
        request_id_var.set(request_id)
        state = scope.setdefault("state", {})
        state["request_id"], state["arrived"] = request_id, start
        protocol = inference_protocol(scope)
        status, started, complete, client_left = 500, False, False, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started, complete
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        async def receive_watched() -> Message:
            nonlocal client_left
            message = await receive()
            client_left = client_left or (message["type"] == "http.disconnect" and not complete)
            return message

        if protocol:
            self.metrics.inflight.inc()
        try:
            await self.app(scope, receive_watched, send_with_id)
        except Exception:
            log.exception("unhandled error")
            if started:
                raise  # the response is half sent: only closing the connection is left
            await error_response(500, "internal server error", path=scope["path"])(
                scope, receive, send_with_id
            )
        finally:
            if client_left:
                status = CLIENT_CLOSED
            seconds = time.perf_counter() - start
            if protocol:
                self.metrics.inflight.dec()
                self.metrics.count_request(status, state.get("tasks", ()), seconds, protocol)
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            log.log(
                level,
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                },
            )


class BodyTooLarge(HTTPException):
    """Raised from receive(); FastAPI lets HTTPExceptions from body reading through."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than the limit of {limit} bytes")


class UploadGuardMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not inference_protocol(scope):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if is_predict(scope) and media_type != "multipart/form-data":
            message = (
                f"expected multipart/form-data with an 'image' file, got "
                f"{media_type or 'no content type'}"
            )
            return await error_response(415, message)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (byte_count(length) or 0) > self.max_bytes:
            # Rejected unread; uvicorn discards the rest of the body for keep-alive.
            too_large = BodyTooLarge(self.max_bytes).detail
            return await error_response(413, too_large, path=scope["path"])(scope, receive, send)
        received, started = 0, False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a lying or missing Content-Length
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await error_response(413, exc.detail, path=scope["path"])(scope, receive, send)
