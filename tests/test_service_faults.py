"""Faults in the model path and clients that leave, through the real HTTP stack: a pipeline
wrapper injects the faults on the model thread of a running server."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch

from model.inference_io import Request, Result
from service.engine import Batch
from service.settings import Settings
from tests.helpers import (
    RunningServer,
    delta,
    encode,
    metric_samples,
    running_server,
    scene_image,
    until,
)
from tests.v2_protocol import image_input, infer, png

# The width of an uploaded image picks its fault (the model sees the image as uploaded).
RAISES, OUT_OF_MEMORY = 131, 137


class FaultyPipeline:
    """The served pipeline behind injected faults; records the width of every image run.
    While `gate` is clear, a model call waits for it: the test decides when the model is
    done, so what waits and what runs is known exactly."""

    def __init__(self, inner: Batch) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.fail_everything = False  # a broken device: every call raises
        self.widths: list[int] = []

    def __call__(self, requests: list[Request]) -> list[Result]:
        widths = [r.image.width for r in requests]
        self.widths += widths
        self.gate.wait(30)
        if self.fail_everything:
            raise RuntimeError("injected: device lost")
        if RAISES in widths:
            raise ValueError("injected: a bad request")
        if OUT_OF_MEMORY in widths:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return self.inner(requests)


@contextmanager
def injected(server: RunningServer) -> Iterator[FaultyPipeline]:
    engine = server.state.engine
    real = engine.pipeline
    faulty = FaultyPipeline(real)
    engine.pipeline = faulty
    try:
        yield faulty
    finally:
        faulty.gate.set()
        engine.pipeline = real


@contextmanager
def batches_of(server: RunningServer, size: int) -> Iterator[None]:
    """Batches start when `size` requests wait, not when a time window ends: a test's
    concurrent requests share one batch however slowly a loaded machine sends them."""
    engine = server.state.engine
    kept = engine.max_batch_size, engine.batch_delay_s
    engine.max_batch_size, engine.batch_delay_s = size, 60.0
    try:
        yield
    finally:
        engine.max_batch_size, engine.batch_delay_s = kept


def post(client: httpx.Client, width: int = 160) -> httpx.Response:
    image = encode(scene_image(width, 120))
    return client.post("/predict", files={"image": ("s.png", image)}, data={"tasks": "caption"})


@pytest.fixture(scope="module")
def server_settings(micro_checkpoint):
    # Batches form by a fixed window (a test sets how many requests fill one); the deadline
    # is the one a hung request meets.
    return Settings(
        checkpoint=micro_checkpoint,
        batch_delay_ms=1,
        batch_window="fixed",
        request_timeout_s=3.0,
        max_consecutive_failures=3,
    )


def test_failing_requests_do_not_fail_their_batch_mates(server, client):
    before = metric_samples(client)
    with injected(server) as faulty, batches_of(server, 4), ThreadPoolExecutor(4) as pool:
        good, bad, oom, other = pool.map(
            lambda width: post(client, width), (160, RAISES, OUT_OF_MEMORY, 161)
        )
    after = metric_samples(client)
    assert sorted(faulty.widths[:4]) == [131, 137, 160, 161]  # one batch, then one by one
    assert sorted(faulty.widths[4:]) == [131, 137, 160, 161]
    assert good.status_code == other.status_code == 200
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "inference_failed"
    assert oom.status_code == 503 and oom.json()["error"]["code"] == "out_of_memory"
    assert oom.headers["retry-after"] == "1"
    assert delta(before, after, "mad_model_failures_total", kind="error") == 1
    assert delta(before, after, "mad_model_failures_total", kind="out_of_memory") == 1
    assert (
        delta(before, after, "mad_requests_total", status="500", task="caption", protocol="native")
        == 1
    )
    assert (
        delta(before, after, "mad_requests_total", status="503", task="caption", protocol="native")
        == 1
    )
    assert (
        delta(before, after, "mad_requests_total", status="200", task="caption", protocol="native")
        == 2
    )
    assert client.get("/readyz").json() == {"status": "ready"}


def test_a_hung_request_gets_504_and_the_server_stays_ready(server, client):
    engine = server.state.engine
    with injected(server) as faulty:
        faulty.gate.clear()  # the model hangs on the request until the test lets it go
        hung = post(client, 139)
        assert hung.status_code == 504 and hung.json()["error"]["code"] == "timeout"
        assert client.get("/readyz").status_code == 200  # while the model still runs it
        faulty.gate.set()
        until(lambda: not engine.running, "the hung request did not end")
        assert post(client).status_code == 200  # served once the model is free
    assert faulty.widths == [139, 160]


def test_failures_of_some_requests_pass_the_self_test(server, client, caplog):
    with injected(server), caplog.at_level(logging.WARNING, logger="mad.service"):
        assert post(client).status_code == 200  # a success: counting starts here
        for _ in range(3):  # max_consecutive_failures
            assert post(client, RAISES).status_code == 500
        until(
            lambda: any("self-test passed" in r.getMessage() for r in caplog.records),
            "no self-test",
        )
    assert server.state.health.failures_in_a_row == 0  # counting starts anew
    assert server.state.health.problem is None
    assert client.get("/readyz").status_code == 200 and client.get("/healthz").status_code == 200


def test_a_model_that_keeps_failing_is_reported_unhealthy(micro_checkpoint, caplog):
    settings = Settings(checkpoint=micro_checkpoint, batch_delay_ms=1, max_consecutive_failures=2)
    with (
        running_server(settings) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
        injected(server) as faulty,
        caplog.at_level(logging.ERROR, logger="mad.service"),
    ):
        faulty.fail_everything = True
        assert post(client).status_code == 500
        assert client.get("/readyz").status_code == 200  # one failure says little
        assert post(client).status_code == 500
        until(lambda: server.state.health.problem is not None, "no verdict from the self-test")
        ready, live = client.get("/readyz"), client.get("/healthz")
        assert ready.status_code == 503 and ready.json()["status"] == "unhealthy"
        assert live.status_code == 503 and live.json()["status"] == "unhealthy"
        assert "2 requests failed in a row" in ready.json()["reason"]
        refused = post(client)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unhealthy"
        # The inference protocol's routes say the same: not live (the probe restarts the
        # server), not ready, and inference refused without running the broken model.
        v2_live, v2_ready = client.get("/v2/health/live"), client.get("/v2/health/ready")
        assert v2_live.status_code == 503 and v2_live.json() == {"live": False}
        assert v2_ready.status_code == 503 and v2_ready.json() == {"ready": False}
        name = client.get("/v1/model").json()["name"]
        v2_refused = infer(client, name, {"inputs": [image_input(png())]})
        assert v2_refused.status_code == 503 and "not working" in v2_refused.json()["error"]
        assert v2_refused.headers["retry-after"] == "1"
        assert len(faulty.widths) == 3  # two requests and the self-test; nothing after
    [line] = [r for r in caplog.records if r.getMessage().startswith("model unhealthy")]
    assert "device lost" in line.getMessage() and "restarts" in line.getMessage()


# --- clients that leave ---------------------------------------------------------------------
def raw_predict(url: str, width: int) -> bytes:
    request = httpx.Request(
        "POST",
        f"{url}/predict",
        files={"image": ("s.png", encode(scene_image(width, 120)))},
        data={"tasks": "caption"},
    )
    body = request.read()
    head = ["POST /predict HTTP/1.1", f"Host: {request.url.host}"]
    head += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() != "host"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_requests_whose_clients_left_never_reach_the_model(micro_checkpoint):
    """20 clients send a request and hang up while the model is busy with the first: none of
    the others is run, all count as 499, the gauges return to 0, and the next live request
    is served at once."""
    settings = Settings(checkpoint=micro_checkpoint, batch_delay_ms=0, max_batch_size=1)
    abandoned = 20
    with (
        running_server(settings) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
        injected(server) as faulty,
    ):
        engine = server.state.engine
        before = metric_samples(client)
        faulty.gate.clear()  # the model holds on to the first request
        host, port = server.url.removeprefix("http://").split(":")
        sockets = []
        for _ in range(abandoned):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(raw_predict(server.url, 150))
            sockets.append(sock)
        until(lambda: len(engine.waiting) == abandoned - 1, "the requests never queued")
        busy = metric_samples(client)
        assert busy[("mad_running_requests", ())] == 1
        assert busy[("mad_queue_depth", ())] == abandoned - 1
        assert busy[("mad_inflight_requests", ())] == abandoned
        for sock in sockets:
            sock.close()
        # Out of the queue as soon as their clients are gone, while the model is still busy.
        until(lambda: not engine.waiting, "abandoned requests stayed queued")
        faulty.gate.set()
        until(lambda: not engine.running, "the model never finished")
        live = post(client, 170)
        assert live.status_code == 200, live.text
        # A request is answered as soon as its last pass has run; its batch ends just after.
        until(lambda: not engine.running, "the live request's batch never ended")
        after = metric_samples(client)
    assert faulty.widths == [150, 170]  # the one running when its client left, then the live one
    assert (
        delta(before, after, "mad_requests_total", status="499", task="caption", protocol="native")
        == abandoned
    )
    assert (
        delta(before, after, "mad_requests_total", status="200", task="caption", protocol="native")
        == 1
    )
    assert after[("mad_queue_depth", ())] == 0
    assert after[("mad_running_requests", ())] == 0
    assert after[("mad_inflight_requests", ())] == 0
