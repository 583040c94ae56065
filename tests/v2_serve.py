"""`mad serve` of this checkout in a subprocess, with gRPC on, an API key and small limits,
for the tests that drive it with tritonclient (test_v2_clients.py, test_grpc_lifecycle.py).

A subprocess, not the in-process test server: a process holds one definition of the
protocol's `inference` protobuf package, and tritonclient.grpc brings its own (so no test
in this process may start the gRPC service in-process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.helpers import free_ports
from tests.v2_protocol import MAX_UPLOAD

ROOT = Path(__file__).resolve().parents[1]
KEY = "clients-key"


def auth() -> dict[str, str]:
    """A fresh dict per call: tritonclient's HTTP client writes its own headers into it."""
    return {"Authorization": f"Bearer {KEY}"}


GRPC_AUTH = {"authorization": f"Bearer {KEY}"}


@dataclass
class Serve:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]


def start(checkpoint: Path, log: Path, **env: str) -> Serve:
    """`mad serve` of this checkout on loopback with gRPC on, an API key, small limits."""
    http_port, grpc_port = free_ports(2)
    settings = {
        "MAD_CHECKPOINT": str(checkpoint),
        "MAD_HOST": "127.0.0.1",
        "MAD_PORT": str(http_port),
        "MAD_GRPC_PORT": str(grpc_port),
        "MAD_API_KEY": KEY,
        "MAD_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "MAD_MAX_IMAGE_PIXELS": "1000000",
        "MAD_BATCH_DELAY_MS": "2",
        "MAD_DRAIN_DELAY_S": "0",  # stop() at once; the drain test sets its own
        "OMP_NUM_THREADS": "1",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "mad.cli", "serve"],
        cwd=ROOT,
        env={**os.environ, **settings},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    serve = Serve(process, http_port, grpc_port, log)
    give_up = time.monotonic() + 120
    while time.monotonic() < give_up:
        if process.poll() is not None:
            pytest.fail(f"mad serve exited ({process.returncode}):\n{serve.log_tail()}")
        try:
            if httpx.get(f"{serve.url}/readyz", timeout=2).status_code == 200:
                return serve
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"mad serve not ready in 120 s:\n{serve.log_tail()}")


def stop(serve: Serve) -> int:
    if serve.process.poll() is None:
        serve.process.send_signal(signal.SIGTERM)
        try:
            serve.process.wait(30)
        except subprocess.TimeoutExpired:
            serve.process.kill()
            serve.process.wait()
    return serve.process.returncode


def images_array(*images: bytes) -> np.ndarray:
    return np.array(images, dtype=np.object_)


def grpc_input(*images: bytes) -> grpcclient.InferInput:
    return grpcclient.InferInput("image", [len(images)], "BYTES").set_data_from_numpy(
        images_array(*images)
    )
