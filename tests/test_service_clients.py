"""Slow, greedy and oversized clients, through the real HTTP stack (uvicorn on loopback, raw
sockets where a client must misbehave): they are cut off, and everyone else is served."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from service.settings import Settings
from tests.helpers import delta, encode, metric_samples, scene_image, until

API_KEY = "clients-key"
READ_TIMEOUT_S = 0.5
REQUEST_TIMEOUT_S = 2.0
LIMIT = 3
MAX_HEAD = 4096


@pytest.fixture(scope="module")
def server_settings(micro_checkpoint):
    return Settings(
        checkpoint=micro_checkpoint,
        batch_delay_ms=1,
        api_key=API_KEY,
        public_docs=False,
        read_timeout_s=READ_TIMEOUT_S,
        request_timeout_s=REQUEST_TIMEOUT_S,
        keep_alive_timeout_s=1,
        limit_concurrency=LIMIT,
        max_header_bytes=MAX_HEAD,
    )


def predict_request(server_url: str) -> httpx.Request:
    return httpx.Request(
        "POST",
        f"{server_url}/predict",
        files={"image": ("s.png", encode(scene_image()), "image/png")},
        data={"tasks": "caption"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )


def raw_head(request: httpx.Request, extra: str = "") -> bytes:
    """The request line and headers of `request`, as a client sends them."""
    lines = [f"{request.method} {request.url.raw_path.decode()} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


@contextmanager
def connection(url: str, timeout_s: float = 10.0) -> Iterator[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    try:
        yield sock
    finally:
        sock.close()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """-> status, headers (lower-case names), the JSON body."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    headers = {name.lower(): value for name, value in response.getheaders()}
    return response.status, headers, json.loads(body) if body else {}


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed the connection (the socket's timeout bounds the wait)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def handling(client: httpx.Client) -> float:
    """Inference requests the server is handling now (its mad_inflight_requests)."""
    return metric_samples(client)[("mad_inflight_requests", ())]


def dribble(url: str, seconds: float, outcome: dict[str, object]) -> None:
    """Send a /predict body one byte per READ_TIMEOUT_S / 3 for `seconds`: never idle long
    enough to time out, slower than any deadline allows."""
    request = predict_request(url)
    body = request.read()
    with connection(url) as sock:
        sock.sendall(raw_head(request))
        try:
            for i in range(int(seconds / (READ_TIMEOUT_S / 3))):
                sock.sendall(body[i : i + 1])
                time.sleep(READ_TIMEOUT_S / 3)
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off: the response is waiting in the socket
        status, headers, body = read_response(sock)
        outcome["status"], outcome["closed"] = status, closed_by_server(sock)
        outcome["connection"], outcome["code"] = headers.get("connection"), body["error"]["code"]


def test_a_stalled_body_gets_408_and_the_connection_closes(server):
    request = predict_request(server.url)
    body = request.read()
    with connection(server.url) as sock:
        sock.sendall(raw_head(request) + body[:100])  # then nothing
        status, headers, error = read_response(sock)
        assert status == 408 and error["error"]["code"] == "request_timeout"
        assert "stalled" in error["error"]["message"]
        assert headers["connection"] == "close"
        assert closed_by_server(sock)


def test_a_client_that_leaves_while_uploading_counts_as_499(server, client):
    before = metric_samples(client)
    request = predict_request(server.url)
    with connection(server.url) as sock:
        sock.sendall(raw_head(request) + request.read()[:100])
    until(
        lambda: (
            delta(
                before,
                metric_samples(client),
                "mad_requests_total",
                status="499",
                task="none",
                protocol="native",
            )
            == 1
        ),
        "the disconnect was not counted",
    )
    after = metric_samples(client)
    assert after[("mad_inflight_requests", ())] == 0


def test_slow_uploaders_are_cut_off_at_the_deadline_and_others_keep_their_latency(server, client):
    outcomes: list[dict[str, object]] = [{}, {}]
    slow = [
        threading.Thread(target=dribble, args=(server.url, 3 * REQUEST_TIMEOUT_S, outcome))
        for outcome in outcomes
    ]
    for thread in slow:
        thread.start()
    until(lambda: handling(client) == len(slow), "the uploaders did not start", 6.0)
    latencies = []
    for _ in range(3):
        start = time.monotonic()
        response = client.send(predict_request(server.url))
        latencies.append(time.monotonic() - start)
        assert response.status_code == 200, response.text
    for thread in slow:
        thread.join(3 * REQUEST_TIMEOUT_S + 10)
    for outcome in outcomes:
        assert outcome == {
            "status": 408,
            "closed": True,
            "connection": "close",
            "code": "request_timeout",
        }
    # Served while the uploaders held their slots, not after them: well inside their deadline.
    assert max(latencies) < REQUEST_TIMEOUT_S


def test_requests_over_the_concurrency_limit_get_503_but_probes_do_not(server, client):
    outcomes: list[dict[str, object]] = [{} for _ in range(LIMIT)]
    slow = [
        threading.Thread(target=dribble, args=(server.url, 3 * REQUEST_TIMEOUT_S, outcome))
        for outcome in outcomes
    ]
    for thread in slow:
        thread.start()
    try:
        # Every slot taken by an uploader: their heads are in, each one's request is running.
        until(lambda: handling(client) == LIMIT, "the uploaders did not all start", 6.0)
        refused = client.send(predict_request(server.url))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200, path
    finally:
        for thread in slow:
            thread.join(3 * REQUEST_TIMEOUT_S + 10)
    assert client.send(predict_request(server.url)).status_code == 200  # the slots are free


def test_a_silent_connection_closes_and_a_dribbled_head_gets_408(server):
    with connection(server.url) as sock:  # connects, never sends
        assert closed_by_server(sock)
    with connection(server.url) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # the rest never comes
        status, _, error = read_response(sock)
        assert status == 408 and error["error"]["code"] == "request_timeout"
        assert closed_by_server(sock)


def test_idle_keep_alive_connections_close(server):
    with connection(server.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        start = time.monotonic()
        assert closed_by_server(sock)
        assert time.monotonic() - start < 5  # keep_alive_timeout_s is 1


def test_responses_are_sent_without_waiting_for_acks(server):
    """Nagle's algorithm is off on every accepted connection. With it on, each response after
    a keep-alive connection's first held its body back until the client's delayed ACK of its
    head: 40 ms more per request on Linux."""
    with connection(server.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        port = sock.getsockname()[1]
        [protocol] = [p for p in server.server.server_state.connections if p.client[1] == port]
        accepted = protocol.transport.get_extra_info("socket")
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_oversized_heads_get_431_whole_or_in_pieces(server, client):
    big = "X-Padding: " + "a" * (2 * MAX_HEAD) + "\r\n"
    whole = client.get("/healthz", headers={"X-Padding": "a" * MAX_HEAD})
    assert whole.status_code == 431
    assert whole.json()["error"]["code"] == "request_header_fields_too_large"
    head = raw_head(httpx.Request("GET", f"{server.url}/healthz"), big)
    with connection(server.url) as sock:
        for start in range(0, len(head), 512):  # arrives in pieces: h11 sees it incomplete
            if select.select([sock], [], [], 0.02)[0]:  # answered: stop sending
                break
            sock.sendall(head[start : start + 512])
        status, headers, error = read_response(sock)
        assert status == 431 and error["error"]["code"] == "request_header_fields_too_large"
        assert "x-request-id" not in headers  # answered by the protocol, before any request
        assert closed_by_server(sock)
    assert client.get("/healthz", headers={"X-Padding": "a" * 1000}).status_code == 200


def test_private_docs_need_the_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            authorized = anonymous.get(path, headers={"Authorization": f"Bearer {API_KEY}"})
            assert authorized.status_code == 200, path
        assert anonymous.get("/healthz").status_code == 200
