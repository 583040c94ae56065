"""Limits on clients, in front of every route (pure ASGI middleware).

- A request head (request line and headers) over MAX_HEADER_BYTES: 431. (A head that arrives in
  pieces is cut off by the HTTP protocol at the same size: service/server.py.)
- More than LIMIT_CONCURRENCY requests being handled at once (receiving, waiting for the model
  or answering): 503 with Retry-After. Probes and /metrics are never refused: an overloaded
  server is alive, and says so.
- A request body must keep coming: a pause over READ_TIMEOUT_S, or a body still arriving at the
  request's deadline (REQUEST_TIMEOUT_S from its arrival), ends the request with 408 and
  closes the connection, so slow uploaders cannot hold slots for long.
- While the server drains, every response says `Connection: close`: keep-alive clients
  reconnect, to a server that is staying.
- With an API key and PUBLIC_DOCS off, the documentation needs the key too.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import HTTPException
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.dependencies import api_key_accepted
from service.errors import error_response
from service.state import ServiceState

# Never refused for load: the orchestrator's probes and the scraper.
PROBE_PATHS = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")
# The OpenAPI documentation, its UI pages and what they load.
DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")


def head_bytes(scope: Scope) -> int:
    """The size of the request head as sent: request line and header lines."""
    line = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope["query_string"])
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


def is_docs(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in DOCS_PATHS)


class ReadTimeout(HTTPException):
    """Raised from receive(); FastAPI lets HTTPExceptions from body reading through."""

    def __init__(self, message: str):
        super().__init__(408, message, headers={"Connection": "close"})


class ClientGuardMiddleware:
    def __init__(self, app: ASGIApp, state: ServiceState):
        self.app, self.state = app, state
        self.active = 0  # requests being handled, probes aside

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings, path = self.state.settings, scope["path"]
        if head_bytes(scope) > settings.max_header_bytes:
            message = f"request head over the limit of {settings.max_header_bytes} bytes"
            return await error_response(431, message, path=path)(scope, receive, send)
        if is_docs(path) and not settings.public_docs and not self.authorized(scope):
            return await error_response(
                401,
                "the documentation needs the API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
                path=path,
            )(scope, receive, send)
        send = self.closing_while_draining(send)
        if path in PROBE_PATHS:
            return await self.app(scope, receive, send)
        if self.active >= settings.limit_concurrency:
            return await error_response(
                503,
                f"the server is handling {self.active} requests already; retry shortly",
                code="overloaded",
                headers={"Retry-After": "1"},
                path=path,
            )(scope, receive, send)
        self.active += 1
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self.timed_receive(receive), tracked_send)
        except ReadTimeout as exc:  # raised outside FastAPI's handlers
            if started:
                raise
            await error_response(408, exc.detail, headers=exc.headers, path=path)(
                scope, receive, send
            )
        finally:
            self.active -= 1

    def authorized(self, scope: Scope) -> bool:
        scheme, credentials = get_authorization_scheme_param(
            Headers(scope=scope).get("authorization")
        )
        given = credentials if scheme.lower() == "bearer" else ""
        return api_key_accepted(self.state.settings, given)

    def closing_while_draining(self, send: Send) -> Send:
        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.state.draining:
                MutableHeaders(scope=message)["Connection"] = "close"
            await send(message)

        return closing_send

    def timed_receive(self, receive: Receive) -> Receive:
        """`receive`, bounded in time while the body is still arriving."""
        settings = self.state.settings
        deadline = time.monotonic() + settings.request_timeout_s
        body_done = False

        async def receive_in_time() -> Message:
            nonlocal body_done
            if body_done:  # past the body, receive() waits for the disconnect: no limit
                return await receive()
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), min(settings.read_timeout_s, left))
            except TimeoutError:
                if left <= settings.read_timeout_s:
                    raise ReadTimeout(
                        f"request body not received within {settings.request_timeout_s} s"
                    ) from None
                raise ReadTimeout(f"request body stalled for {settings.read_timeout_s} s") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return receive_in_time
