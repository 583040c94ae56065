"""Graceful drain of a real `mad serve` process, signalled like Kubernetes and a terminal do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.helpers import encode, free_port, scene_image, until

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a process start (model load) each


@contextmanager
def mad_serve(checkpoint: Path, **env: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`mad serve` of this checkout on a free loopback port, ready; killed if still running."""
    port = free_port()
    variables = {
        **os.environ,
        "MAD_CHECKPOINT": str(checkpoint),
        "MAD_HOST": "127.0.0.1",
        "MAD_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "mad.cli", "serve"],
        cwd=REPO,
        env=variables,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its worker processes, if any, can be killed with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        give_up = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < give_up, "mad serve did not become ready"
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def logs(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def post(url: str) -> httpx.Response:
    return httpx.post(
        f"{url}/predict",
        files={"image": ("s.png", encode(scene_image()))},
        data={"tasks": "caption"},
        timeout=60,
    )


def gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_sigterm_keeps_serving_for_the_delay_then_finishes_everything_and_exits_0(
    micro_checkpoint,
):
    drain_delay_s = 3.0
    # A fixed batch window longer than the delay: the requests in flight outlast the listener.
    with mad_serve(
        micro_checkpoint,
        MAD_DRAIN_DELAY_S=str(drain_delay_s),
        MAD_BATCH_DELAY_MS="6000",
        MAD_BATCH_WINDOW="fixed",
    ) as (process, url):
        responses: list[httpx.Response] = []
        callers = [threading.Thread(target=lambda: responses.append(post(url))) for _ in range(6)]
        for caller in callers:
            caller.start()
        give_up = time.monotonic() + 30
        while gauge(url, "mad_queue_depth") < 6:
            assert time.monotonic() < give_up, "the requests never queued"
            time.sleep(0.05)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        until(lambda: httpx.get(f"{url}/readyz").status_code == 503, "still ready", 10)
        readiness = httpx.get(f"{url}/readyz")
        assert (readiness.status_code, readiness.json()) == (503, {"status": "draining"})
        assert httpx.get(f"{url}/healthz").status_code == 200
        late = threading.Thread(target=lambda: responses.append(post(url)))
        late.start()  # sent during the delay: accepted and served
        while True:  # listening until the delay is over, then refused
            try:
                httpx.get(f"{url}/healthz", timeout=2)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                # refused; or reset: the kernel resets a connection still in the listening
                # socket's backlog when that socket closes
                break
            assert time.monotonic() - signalled < drain_delay_s + 10, "still listening"
            time.sleep(0.05)
        listened = time.monotonic() - signalled
        _, stderr = process.communicate(timeout=60)
        for caller in (*callers, late):
            caller.join(30)
    assert process.returncode == 0, stderr[-3000:]
    assert listened >= drain_delay_s
    assert [r.status_code for r in responses] == [200] * 7, [r.text for r in responses]
    assert all(r.headers["connection"] == "close" for r in responses)  # answered while draining
    entries = logs(stderr)
    [draining] = [e for e in entries if e["message"] == "draining"]
    assert draining["signal"] == "SIGTERM" and draining["delay_s"] == drain_delay_s
    assert any(e["message"] == "stopped" and e["drained"] is True for e in entries)


def test_sigint_skips_the_delay(micro_checkpoint):
    with mad_serve(micro_checkpoint, MAD_DRAIN_DELAY_S="60") as (process, url):
        assert post(url).status_code == 200
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-3000:]
    [draining] = [e for e in logs(stderr) if e["message"] == "draining"]
    assert draining["signal"] == "SIGINT" and draining["delay_s"] == 0


def test_a_second_signal_exits_at_once(micro_checkpoint):
    with mad_serve(micro_checkpoint, MAD_DRAIN_DELAY_S="60") as (process, url):
        process.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + 30
        while httpx.get(f"{url}/readyz").status_code != 503:  # draining: 60 s to go
            assert time.monotonic() < give_up
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # Ctrl+C, or a second SIGTERM: the same
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGINT, stderr[-3000:]
    assert any(e["message"].startswith("second signal") for e in logs(stderr))


def test_a_stop_during_the_model_load_exits_0_at_once(micro_checkpoint):
    """An export or engine build at start-up takes minutes: SIGTERM does not wait for it (and
    the interpreter's teardown under a running load would abort with 134)."""
    port = free_port()
    stalled_load = (  # `mad serve` whose model load takes a minute
        "import sys, time, service.app; service.app.load_model = lambda s: time.sleep(60); "
        "from mad.cli import app; sys.argv = ['mad', 'serve']; app()"
    )
    env = {
        **os.environ,
        "MAD_CHECKPOINT": str(micro_checkpoint),
        "MAD_HOST": "127.0.0.1",
        "MAD_PORT": str(port),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", stalled_load], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        until(lambda: healthz(url) == 200, "it never listened", timeout_s=60)
        assert httpx.get(f"{url}/readyz").json() == {"status": "loading"}
        tic = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert time.monotonic() - tic < 15  # not the minute the load still had to go
        assert process.returncode == 0, stderr[-3000:]
        assert any(e["message"] == "stopped" for e in logs(stderr))
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def healthz(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/healthz").status_code
    except httpx.TransportError:
        return None


def test_worker_processes_serve_with_the_same_limits(micro_checkpoint):
    with mad_serve(micro_checkpoint, MAD_WORKERS="2", MAD_MAX_HEADER_BYTES="4096") as (
        process,
        url,
    ):
        # /readyz answered for one worker; the other may still be loading its model (503).
        until(lambda: post(url).status_code == 200, "no worker served /predict", 120, 0.2)
        oversized = httpx.get(f"{url}/healthz", headers={"X-Padding": "a" * 5000})
        assert oversized.status_code == 431
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    assert "died" not in stderr  # uvicorn's supervisor restarted no worker
