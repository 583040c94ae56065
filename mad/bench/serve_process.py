"""`mad serve` in a subprocess on a free loopback port: what the HTTP, gRPC and anytime
benchmarks load."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

READY_TIMEOUT_S = 300.0  # a fresh r50 on CPU loads and warms up for a while


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mad serve` in a subprocess, bound to 127.0.0.1 only; stopped with SIGTERM (drain)."""

    def __init__(
        self,
        checkpoint: Path,
        backend: str,
        device: str,
        env: dict[str, str],
        export_dir: Path | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Open as long as the server lives; closed (and deleted) by stop().
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "w+", prefix="mad-bench-serve-", suffix=".log"
        )
        command = [
            sys.executable,
            "-m",
            "mad.cli",
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--backend",
            backend,
            "--device",
            device,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # No load balancer to wait for: stop() drains at once.
        extra = {"MAD_LOG_LEVEL": "warning", "MAD_DRAIN_DELAY_S": "0", **env}
        if export_dir is not None:
            extra["MAD_EXPORT_DIR"] = str(export_dir)
        self.process = subprocess.Popen(
            command, env={**os.environ, **extra}, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mad serve exited ({self.process.returncode}):\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"mad serve not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __enter__(self) -> Server:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
