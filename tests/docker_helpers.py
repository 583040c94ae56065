"""What the Docker checks share: the images under test (set by scripts/docker-test) and
`docker` run as a subprocess that fails the test with its stderr."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence

import pytest

CPU_IMAGE = os.environ.get("MAD_DOCKER_CPU_IMAGE", "")
GPU_IMAGE = os.environ.get("MAD_DOCKER_GPU_IMAGE", "")
GPU_EXTRAS = set(filter(None, os.environ.get("MAD_DOCKER_GPU_EXTRAS", "gpu,tensorrt").split(",")))
UID = 10001
BUNDLED = "/opt/mad/checkpoints/mad-tiny"

built_images = pytest.mark.skipif(
    not CPU_IMAGE or not GPU_IMAGE, reason="run by `make docker-test`, which builds the images"
)


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def inspect(kind: str, name: str) -> dict:
    return json.loads(docker(kind, "inspect", name).stdout)[0]


def in_image(image: str, *command: str, options: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run a command in a fresh container of `image` (instead of its entrypoint)."""
    entrypoint, *args = command
    run = ["run", "--rm", "--network=host", f"--entrypoint={entrypoint}", *options, image]
    return docker(*run, *args, check=False, timeout=300)
