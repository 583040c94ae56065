"""The HTTP server around the app: uvicorn configured from Settings, the drain on SIGTERM, and
the limits on clients that only the connection can enforce.

Drain (the pattern Kubernetes and Triton document), with one server process:

1. SIGTERM: `/readyz` answers 503 at once; the server keeps listening and serving for
   MAD_DRAIN_DELAY_S, so requests that load balancers send before they notice are answered,
   not refused, and every response says `Connection: close` (service/guards.py).
2. Then the listening socket closes, every accepted request is finished, the model's queue is
   drained, and the process exits with status 0.

SIGINT (Ctrl+C at a terminal: no load balancer to wait for) skips the delay. A second SIGTERM or
SIGINT ends the process at once, by that signal. With `--workers N > 1` uvicorn's supervisor
stops the workers itself: each finishes its requests in flight, without the delay.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import time
from http import HTTPStatus
from types import FrameType
from typing import Any, NoReturn

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from model.startup import StartupError
from service.errors import error_body
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("mad.service")

# After a request's deadline, time left to write its response (a drain waits this long past
# MAD_REQUEST_TIMEOUT_S for connections, then as long again for the model to finish a batch).
SHUTDOWN_MARGIN_S = 5
H11_DEFAULT_HEAD_BYTES = 16 * 1024  # h11's own limit when uvicorn is given none


def listen(
    host: str, port: int, what: str, other_port: str, reuse_port: bool = False
) -> socket.socket:
    """A listening socket on host:port, or a StartupError: "cannot listen {what} host:port:
    why; stop whatever uses it or choose {other_port}"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:  # what socket.create_server does, whose errors name the address a second time
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen()
        return sock
    except OSError as exc:
        sock.close()
        fix = (
            "check --host (MAD_HOST)"
            if isinstance(exc, socket.gaierror)  # a host name that does not resolve
            else f"stop whatever uses it or choose {other_port}"
        )
        raise StartupError(f"cannot listen {what} {host}:{port}: {exc.strerror}; {fix}") from None


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config / uvicorn.run keywords that carry the service's client limits."""
    return {
        "host": settings.host,
        "port": settings.port,
        # By name: worker processes import it once running (importing this module, which
        # loads torch, while unpickling would outlast uvicorn's worker health check).
        "http": f"{__name__}:GuardedH11Protocol",
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        # A backstop: requests end by their deadline; a client that will not read its
        # response is cut off here.
        "timeout_graceful_shutdown": math.ceil(settings.request_timeout_s + SHUTDOWN_MARGIN_S),
        "access_log": False,  # service/middleware.py logs each request, with its id
    }


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain described above; stops when the model fails to load."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.service_state = state
        self.drain_ends: float | None = None  # time.monotonic() at which the listener closes
        state.stop_server = self.stop

    def stop(self, reason: str) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_ends is not None:
            exit_now(sig)
        state = self.service_state
        # A server not yet ready gets no traffic to wait for.
        delay = state.settings.drain_delay_s if sig == signal.SIGTERM and state.ready else 0.0
        state.begin_drain()
        self.drain_ends = time.monotonic() + delay
        if delay == 0:
            self.stop_listening()
        # Not passed on to uvicorn, which would re-raise the signal after its shutdown: a
        # completed drain exits with status 0.
        log.info(
            "draining",
            extra={"signal": signal.Signals(sig).name, "delay_s": delay},
        )

    async def on_tick(self, counter: int) -> bool:
        if self.drain_ends is not None and time.monotonic() >= self.drain_ends:
            self.stop_listening()
        return await super().on_tick(counter)

    def stop_listening(self) -> None:
        """The end of the delay: uvicorn closes its listener and finishes its connections;
        the gRPC server (if any) stops taking calls too (service/grpc_server.py)."""
        self.service_state.stopping = True
        self.should_exit = True


def exit_now(sig: int) -> NoReturn:
    """The second signal: end the process by that signal, whatever is still running."""
    log.warning(
        "second signal: exiting without finishing the requests in flight",
        extra={"signal": signal.Signals(sig).name},
    )
    signal.signal(sig, signal.SIG_DFL)
    signal.raise_signal(sig)
    os._exit(128 + sig)  # only if the signal is blocked


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with two limits on request heads:

    - A connection must deliver a complete request head within `timeout_keep_alive` of opening
      or of its previous response. uvicorn's own keep-alive timer stops at the first byte, so a
      client dribbling a head, or one that connects and never sends, would hold the connection
      forever. A partial head is answered 408, a silent connection just closed.
    - A head over `h11_max_incomplete_event_size` that arrives in pieces is answered 431, like
      a whole one (service/guards.py), where uvicorn answers 400.

    It also sends each write at once (TCP_NODELAY; see connection_made).
    """

    head_timer: Any = None  # an asyncio.TimerHandle while a head is awaited

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # Nagle's algorithm off: asyncio turns it off only where the socket's proto says TCP,
        # and a listener made by socket.create_server (or uvicorn's bind_socket) says 0. With
        # it on, every response after a connection's first sent its body only once the
        # client's delayed ACK of the head came, 40 ms later on Linux (uvicorn issue #3149).
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # a peer already gone: nothing left to send
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a head has arrived: a request is under way
            self._stop_head_timer()
        elif self.head_timer is None:  # the rest of a body answered early, then a new head
            self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or H11_DEFAULT_HEAD_BYTES
        if len(self.conn.trailing_data[0]) > limit:
            self._reject(431, f"request head over the limit of {limit} bytes")
        else:
            super().send_400_response(msg)

    def _await_head(self) -> None:
        self._stop_head_timer()
        self.head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a head
            self._reject(408, f"request head not received within {self.timeout_keep_alive} s")
        else:
            self.transport.close()

    def _reject(self, status: int, message: str) -> None:
        """Answer `status` with the service's JSON error body and close the connection."""
        body = json.dumps(error_body(status, message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(
                status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode()
            ),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()
