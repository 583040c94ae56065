"""The server listens before its model is loaded: liveness answers 200 at once, readiness
and work 503 until the model is loaded and warm (as Kubernetes probes and Triton expect)."""

from __future__ import annotations

import threading
import time

import httpx

import service.app
from service.settings import Settings
from tests.helpers import encode, running_server, scene_image, until


def test_it_listens_while_the_model_loads(micro_checkpoint, monkeypatch):
    release = threading.Event()
    load = service.app.load_model

    def held_load(settings):
        assert release.wait(60), "the test never released the load"
        return load(settings)

    warmed = threading.Event()
    calibrate = service.app.calibrate

    def held_calibration(*args):  # the last step of the warm-up
        assert warmed.wait(60), "the test never released the warm-up"
        return calibrate(*args)

    monkeypatch.setattr(service.app, "load_model", held_load)
    monkeypatch.setattr(service.app, "calibrate", held_calibration)
    image = {"image": ("s.png", encode(scene_image()))}
    with (
        running_server(Settings(checkpoint=micro_checkpoint), ready=False) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        assert client.get("/healthz").json() == {"status": "ok"}
        readiness = client.get("/readyz")
        assert readiness.status_code == 503 and readiness.json() == {"status": "loading"}
        refused = client.post("/predict", files=image)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "not_ready"
        assert client.get("/v1/model").status_code == 503
        release.set()
        # Loaded, still warming up: the model's description is not published yet.
        until(lambda: server.state.health.self_test is not None, "the load never ended")
        assert client.get("/v1/model").status_code == 503
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").status_code == 503
        warmed.set()
        give_up = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < give_up, "never ready"
            time.sleep(0.05)
        assert client.post("/predict", files=image).status_code == 200
