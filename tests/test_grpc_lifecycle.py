"""`mad serve`'s gRPC service over its lifetime: SIGTERM drains it with HTTP, a port in use
fails the start in one line, and the generated protobuf code matches its .proto."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.helpers import free_port, until
from tests.v2_protocol import png
from tests.v2_serve import GRPC_AUTH, ROOT, auth, grpc_input, start, stop


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-logs")


DRAIN_DELAY_S = 4.0


def health(port: int) -> str:
    """The gRPC health service's answer on a fresh channel: SERVING, NOT_SERVING, or the
    status code of a failed call (UNAVAILABLE once the server stopped listening)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_grpc_drains_with_http(micro_checkpoint, logs):
    """SIGTERM: health turns NOT_SERVING at once; calls are still served for the drain delay
    (load balancers catch up), then refused; every call accepted is answered, and the
    process exits 0."""
    serve = start(
        micro_checkpoint,
        logs / "drain.log",
        MAD_BATCH_DELAY_MS="8000",
        MAD_BATCH_WINDOW="fixed",  # the call waits in the queue for company past the delay
        MAD_DRAIN_DELAY_S=str(DRAIN_DELAY_S),
    )
    try:
        name = httpx.get(f"{serve.url}/v1/model", headers=auth()).json()["name"]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{serve.grpc_port}")
        answers: list = []

        def call() -> None:
            client.async_infer(
                name,
                [grpc_input(png())],
                callback=lambda result, error: answers.append((result, error)),
                parameters={"tasks": "caption"},
                headers=GRPC_AUTH,
            )

        call()
        give_up = time.monotonic() + 10
        while "mad_queue_depth 1.0" not in httpx.get(f"{serve.url}/metrics").text:
            assert time.monotonic() < give_up, "the call never reached the queue"
            time.sleep(0.02)
        signalled = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        until(lambda: health(serve.grpc_port) == "NOT_SERVING", "health still SERVING", 10)
        call()  # within the delay: accepted
        until(lambda: health(serve.grpc_port) == "UNAVAILABLE", "gRPC still listening", 30)
        assert time.monotonic() - signalled >= DRAIN_DELAY_S
        with pytest.raises(InferenceServerException) as refused:
            client.infer(name, [grpc_input(png())], headers=GRPC_AUTH, client_timeout=10)
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert serve.process.wait(30) == 0
        assert len(answers) == 2 and all(error is None for _, error in answers), answers
        assert all(result.as_numpy("caption").shape == (1,) for result, _ in answers)
        client.close()
    finally:
        stop(serve)
    lines = serve.log.read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(e["message"] == "stopped" and e["drained"] for e in entries)


def test_a_grpc_port_in_use_fails_at_start(micro_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "MAD_CHECKPOINT": str(micro_checkpoint), "MAD_HOST": "127.0.0.1"}
        env["MAD_GRPC_PORT"] = str(port)
        done = subprocess.run(
            [sys.executable, "-m", "mad.cli", "serve", "--port", str(free_port())],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 3, done.stderr[-2000:]
    errors = [line for line in done.stderr.strip().splitlines() if not line.startswith("{")]
    assert errors == [  # one line: no C-core log of gRPC's own failure before it
        f"mad serve: cannot listen for gRPC on 127.0.0.1:{port}: Address already in use; "
        "stop whatever uses it or choose another MAD_GRPC_PORT"
    ]


def test_generated_grpc_code_is_up_to_date(tmp_path):
    """service/proto/*_pb2*.py(i) are what `make proto` makes of the .proto."""
    proto = "service/proto/grpc_predict_v2.proto"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            proto,
        ],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    generated = sorted((tmp_path / "service" / "proto").iterdir())
    assert [p.name for p in generated] == [
        "grpc_predict_v2_pb2.py",
        "grpc_predict_v2_pb2.pyi",
        "grpc_predict_v2_pb2_grpc.py",
    ]
    for path in generated:
        assert filecmp.cmp(path, ROOT / "service" / "proto" / path.name, shallow=False), (
            f"{path.name} is stale: run `make proto`"
        )
