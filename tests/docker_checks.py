"""The built Docker images, run the way users run them: health, /predict, /metrics, the user,
volumes, a user checkpoint, `docker stop` during requests, compose. `make docker-test`
(scripts/docker-test) builds the images and runs this module and docker_image_checks.py; the
unit suite does not collect them (no `test_` prefix).

Every container uses the host's network (`--network host`, a free MAD_PORT), so all traffic
stays on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy_helpers import COMPOSE, ROOT
from tests.docker_helpers import (
    BUNDLED,
    CPU_IMAGE,
    UID,
    built_images,
    docker,
    in_image,
    inspect,
)
from tests.helpers import encode, free_port, scene_image

pytestmark = built_images


class Container:
    """A `mad serve` container reached at 127.0.0.1:`port`."""

    def __init__(self, container_id: str, port: int) -> None:
        self.id, self.port = container_id, port
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def run(cls, image: str, *options: str) -> Container:
        """`docker run -d` on the host network with a free MAD_PORT."""
        port = free_port()
        run = ["run", "-d", "--network=host", f"--env=MAD_PORT={port}", *options, image]
        container_id = docker(*run).stdout
        return cls(container_id.strip(), port)

    def state(self) -> dict:
        return inspect("container", self.id)["State"]

    def mounts(self) -> dict[str, dict]:
        return {m["Destination"]: m for m in inspect("container", self.id)["Mounts"]}

    def logs(self) -> str:
        result = docker("logs", self.id, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return docker("exec", self.id, *command, check=False)

    def wait_healthy(self, timeout: float = 240) -> float:
        """Seconds until Docker's own HEALTHCHECK reports `healthy`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            state = self.state()
            if not state["Running"]:
                pytest.fail(f"container exited {state['ExitCode']}:\n{self.logs()}")
            if state["Health"]["Status"] == "healthy":
                return time.monotonic() - start
            time.sleep(1)
        pytest.fail(f"not healthy within {timeout:.0f} s:\n{self.logs()}")

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.id, check=False)


@contextmanager
def serving(image: str, *options: str) -> Iterator[Container]:
    container = Container.run(image, *options)
    try:
        container.wait_healthy()
        yield container
    finally:
        container.remove()


def user_models(checkpoint: Path, tmp_path: Path) -> Path:
    """A models directory holding `checkpoint` as `mine`, readable by the image's user."""
    models = tmp_path / "models"
    shutil.copytree(checkpoint, models / "mine")
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return models


def predict(url: str, tasks: str = "detection,caption", timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"{url}/predict",
        files={"image": ("scene.png", encode(scene_image()))},
        data={"tasks": tasks},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[Container]:
    """The CPU image exactly as `docker run -d --network host -e MAD_PORT=...` starts it."""
    with serving(CPU_IMAGE) as container:
        yield container


# --------------------------------------------------------------------------- serving
def test_turns_healthy_and_answers_predict(server):
    response = predict(server.url)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tasks"] == ["detection", "caption"]
    assert isinstance(body["caption"], str) and isinstance(body["detections"], list)
    assert body["image"] == {"width": 160, "height": 120}
    model = httpx.get(f"{server.url}/v1/model").json()
    assert model["device"] == "cpu" and model["backend"] == "torch"


def test_metrics_count_the_requests(server):
    assert predict(server.url, tasks="caption").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    captions = [
        s.value
        for s in samples
        if s.name == "mad_requests_total" and s.labels["task"] == "caption"
        if s.labels["status"] == "200"
    ]
    assert sum(captions) >= 2, text
    assert any(s.name == "mad_model_info" for s in samples)


def test_runs_as_the_unprivileged_user(server):
    status = server.exec("cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {str(UID)}, status
    assert "mad serve" in server.exec("cat", "/proc/1/cmdline").stdout.replace("\0", " ")


def test_bundled_checkpoint_is_read_only_and_volumes_are_writable(server):
    for path in (f"{BUNDLED}/config.json", f"{BUNDLED}/probe"):
        result = server.exec("python", "-c", f"open({path!r}, 'a')")
        assert result.returncode != 0 and "PermissionError" in result.stderr, path
    for directory in ("/cache", "/models"):
        result = server.exec("python", "-c", f"open('{directory}/probe', 'w').write('x')")
        assert result.returncode == 0, result.stderr
    mounts = server.mounts()
    assert mounts["/cache"]["Type"] == mounts["/models"]["Type"] == "volume"


def test_serves_a_user_checkpoint_mounted_into_models(micro_checkpoint, tmp_path):
    models = user_models(micro_checkpoint, tmp_path)
    with serving(
        CPU_IMAGE, "-v", f"{models}:/models:ro", "-e", "MAD_CHECKPOINT=/models/mine"
    ) as container:
        model = httpx.get(f"{container.url}/v1/model").json()
        assert model["input_size"] == [96, 96], "the micro checkpoint, not the bundled one"
        response = predict(container.url)
        assert response.status_code == 200, response.text


def test_docker_stop_finishes_requests_in_flight_and_exits_zero():
    # A long batching window keeps the requests queued when the stop arrives.
    container = Container.run(
        CPU_IMAGE,
        "-e",
        "MAD_BATCH_WINDOW=fixed",  # the adaptive window would start the first one at once
        "-e",
        "MAD_BATCH_DELAY_MS=1500",
        "-e",
        "MAD_MAX_BATCH_SIZE=8",
    )
    try:
        container.wait_healthy()
        results: list[int | str] = []

        def request() -> None:
            try:
                results.append(predict(container.url, tasks="caption").status_code)
            except httpx.HTTPError as error:
                results.append(repr(error))

        threads = [threading.Thread(target=request) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for_inflight(container.url, 4)
        start = time.monotonic()
        docker("stop", "--time", "30", container.id, timeout=60)
        stop_s = time.monotonic() - start
        for thread in threads:
            thread.join(timeout=30)
        state = container.state()
        assert results == [200] * 4, results
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, container.logs())
        assert stop_s < 30, f"docker stop took {stop_s:.1f} s: killed, not stopped"
        assert '"drained": true' in container.logs()
    finally:
        container.remove()


def wait_for_inflight(url: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            if family.name == "mad_inflight_requests" and family.samples[0].value >= count:
                return
        time.sleep(0.05)
    pytest.fail(f"{count} requests were not in flight within {timeout} s")


def test_healthcheck_fails_when_nothing_listens():
    test = inspect("image", CPU_IMAGE)["Config"]["Healthcheck"]["Test"]
    assert test[0] == "CMD-SHELL" and "/readyz" in test[1]
    port = f"--env=MAD_PORT={free_port()}"
    assert in_image(CPU_IMAGE, "sh", "-c", test[1], options=[port]).returncode != 0


# --------------------------------------------------------------------------- compose
def compose_command(tmp_path: Path) -> list[str]:
    """Docker Compose v2 on the repo's file, else docker-compose v1 (Debian's package) on a
    copy without the top-level `name`, the one key of the file v1 does not know."""
    if docker("compose", "version", check=False).returncode == 0:
        return ["docker", "compose", "-f", str(COMPOSE)]
    if shutil.which("docker-compose") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no Docker Compose (apt-get install docker-compose)")
        pytest.skip("no Docker Compose here")
    spec = yaml.safe_load(COMPOSE.read_text())
    del spec["name"]
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(yaml.safe_dump(spec))
    return ["docker-compose", "-f", str(copy), "--project-directory", str(ROOT)]


def test_compose_runs_the_cpu_service(micro_checkpoint, tmp_path):
    """`mad-cpu` alone (Prometheus and Grafana need images from a registry), from the image
    built here: the published port, the /models and /cache volumes, MAD_ variables from the
    shell, the image's healthcheck, a clean stop."""
    compose = [*compose_command(tmp_path), "-p", f"mad-serve-test-{os.getpid()}"]
    port, key = free_port(), "compose-test-key"
    env = {
        **os.environ,
        "MAD_MODELS_DIR": str(user_models(micro_checkpoint, tmp_path)),
        "MAD_CHECKPOINT": "/models/mine",
        "MAD_CPU_HOST_PORT": str(port),
        "MAD_API_KEY": key,
        "MAD_MAX_BATCH_SIZE": "4",
    }

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [*compose, "--profile", "cpu", *args]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stderr[-3000:]}"
        return result

    run("up", "-d", "--no-build", "--no-deps", "mad-cpu")
    try:
        container = Container(run("ps", "-q", "mad-cpu").stdout.strip(), port)
        container.wait_healthy()
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{container.url}/v1/model").status_code == 401
        model = httpx.get(f"{container.url}/v1/model", headers=auth).json()
        assert model["input_size"] == [96, 96] and model["max_batch_size"] == 4
        response = httpx.post(
            f"{container.url}/predict",
            files={"image": ("scene.png", encode(scene_image()))},
            data={"tasks": "caption"},
            headers=auth,
            timeout=60,
        )
        assert response.status_code == 200, response.text
        mounts = container.mounts()
        assert mounts["/models"]["Type"] == "bind" and not mounts["/models"]["RW"]
        assert mounts["/cache"]["Type"] == "volume" and mounts["/cache"]["RW"]
        assert mounts["/cache"]["Name"].endswith("_mad-cache-cpu")
        assert container.exec("touch", "/cache/probe").returncode == 0
        run("stop", "mad-cpu")
        assert container.state()["ExitCode"] == 0, container.logs()
    finally:
        subprocess.run(
            [*compose, "--profile", "cpu", "down", "-v"],
            env=env,
            capture_output=True,
            timeout=300,
            check=False,
        )
