"""The HTTP service end to end: real uvicorn on loopback, httpx, the micro checkpoint."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import jsonschema
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pycocotools import mask as mask_utils

from service.metrics import METRIC_NAMES
from service.schemas import ModelDescription, PredictResponse
from service.settings import Settings
from tests.helpers import ALL_TASKS, delta, encode, metric_samples, scene_image

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def server_settings(micro_checkpoint):
    """`client` sends this key; probes and /metrics must work without it."""
    return Settings(checkpoint=micro_checkpoint, api_key=API_KEY, batch_delay_ms=2)


@pytest.fixture(scope="module")
def openapi(client):
    return client.get("/openapi.json").json()


def post_image(client, image_bytes=None, **fields) -> httpx.Response:
    data = image_bytes if image_bytes is not None else encode(scene_image())
    return client.post(
        "/predict",
        files={"image": ("scene.png", data, "image/png")},
        data={k: v for k, v in fields.items() if v is not None},
    )


def check_against_openapi(body: dict, openapi: dict, component: str) -> None:
    schema = {"$ref": f"#/components/schemas/{component}", "components": openapi["components"]}
    jsonschema.Draft202012Validator(schema).validate(body)


def check_detections(body: dict, asked: set[str], class_names: list[str]) -> None:
    width, height = body["image"]["width"], body["image"]["height"]
    for det in body["detections"]:
        x0, y0, x1, y1 = det["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height, det["box"]
        assert det["label"] == class_names[det["category_id"]]
        assert 0.0 <= det["score"] <= 1.0
        assert ("mask" in det) == ("segmentation" in asked)
        if "mask" in det:
            decoded = mask_utils.decode(det["mask"])
            assert decoded.shape == (height, width)
        if "keypoints" in det:
            assert "keypoints" in asked and det["label"] == "person"
            assert np.asarray(det["keypoints"]).shape == (17, 3)


def test_every_operation_has_its_own_id(openapi):
    """Client generators need unique operationIds (the HEAD probes stay out of the document)."""
    ids = [op["operationId"] for path in openapi["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), ids
    assert list(openapi["paths"]["/healthz"]) == ["get"]


@pytest.mark.parametrize(
    "tasks", [("detection",), ("segmentation",), ("keypoints",), ("caption",), ALL_TASKS]
)
def test_tasks_alone_and_together(client, openapi, tasks):
    response = post_image(client, tasks=",".join(tasks), score_threshold="0")
    assert response.status_code == 200, response.text
    body = response.json()
    PredictResponse.model_validate(body)
    check_against_openapi(body, openapi, "PredictResponse")
    ran = set(tasks) | ({"detection"} if {"segmentation", "keypoints"} & set(tasks) else set())
    assert set(body["tasks"]) == ran
    assert body["image"] == {"width": 160, "height": 120}
    assert body["model"]["backend"] == "torch"
    assert set(body["decoder_passes"]) == ran
    # Absent, not null: tasks not run leave no trace in the JSON.
    assert ("detections" in body) == ("detection" in ran)
    assert ("caption" in body) == ("caption" in tasks)
    assert "null" not in response.text
    expected_stages = {"queue", "preprocess", "encode", "postprocess", "total"} | ran
    assert set(body["timings_ms"]) == expected_stages
    if "detections" in body:
        if {"detection", "segmentation"} & set(tasks):
            # Threshold 0 keeps every slot whose box has an area (the micro model has 6).
            assert 0 < len(body["detections"]) <= 6
        else:  # keypoints alone: only the boxes it answers for
            assert all(det["label"] == "person" for det in body["detections"])
        check_detections(body, set(tasks), client.get("/v1/model").json()["class_names"])
    if "caption" in body:
        assert isinstance(body["caption"], str)


def test_repeated_tasks_fields_and_polygon_masks(client):
    response = client.post(
        "/predict",
        files={"image": ("s.png", encode(scene_image()))},
        data={
            "tasks": ["caption", "segmentation"],
            "mask_format": "polygon",
            "max_detections": "2",
            "score_threshold": "0",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tasks"] == ["detection", "segmentation", "caption"]
    assert len(body["detections"]) == 2
    for det in body["detections"]:
        assert isinstance(det["mask"], list)
        for polygon in det["mask"]:
            assert len(polygon) % 2 == 0 and len(polygon) >= 6
            assert all(0 <= v <= 160 for v in polygon[0::2])
            assert all(0 <= v <= 120 for v in polygon[1::2])


def test_default_tasks_are_all_the_model_has(client):
    body = post_image(client).json()
    assert body["tasks"] == list(ALL_TASKS)


def test_refine_steps_change_decoder_passes(client):
    before = metric_samples(client)
    few = post_image(client, tasks="caption", refine_steps="0").json()
    many = post_image(
        client, tasks="caption,detection", refine_steps="caption:3,detection:2"
    ).json()
    after = metric_samples(client)
    assert few["decoder_passes"] == {"caption": 1}
    assert many["decoder_passes"] == {"detection": 3, "caption": 4}
    assert delta(before, after, "mad_decoder_passes_total", task="caption") == 5
    assert delta(before, after, "mad_decoder_passes_total", task="detection") == 3
    # A bare K applies to every task.
    assert post_image(client, tasks="detection", refine_steps="1").json()["decoder_passes"] == {
        "detection": 2
    }


def test_metrics_count_what_was_sent(client):
    before = metric_samples(client)
    for _ in range(2):
        assert post_image(client, tasks="detection,caption").status_code == 200
    assert post_image(client, b"not an image", tasks="caption").status_code == 400
    assert client.post("/predict", json={"image": "x"}).status_code == 415
    after = metric_samples(client)
    assert (
        delta(
            before, after, "mad_requests_total", status="200", task="detection", protocol="native"
        )
        == 2
    )
    assert (
        delta(before, after, "mad_requests_total", status="200", task="caption", protocol="native")
        == 2
    )
    assert (
        delta(before, after, "mad_requests_total", status="400", task="caption", protocol="native")
        == 1
    )
    assert (
        delta(before, after, "mad_requests_total", status="415", task="none", protocol="native")
        == 1
    )
    assert delta(before, after, "mad_request_duration_seconds_count", protocol="native") == 4
    for stage in ("queue", "preprocess", "encode", "detection", "caption", "postprocess"):
        assert delta(before, after, "mad_stage_duration_seconds_count", stage=stage) == 2
    assert delta(before, after, "mad_stage_duration_seconds_count", stage="keypoints") == 0
    assert delta(before, after, "mad_batch_size_sum") == 2
    assert after[("mad_inflight_requests", ())] == 0
    assert after[("mad_queue_depth", ())] == 0
    assert after[("mad_gpu_memory_bytes", ())] == 0
    info = [k for k in after if k[0] == "mad_model_info"]
    assert dict(info[0][1])["backend"] == "torch" and dict(info[0][1])["device"] == "cpu"


def test_metric_names_are_exposed_and_pass_promtool(client):
    text = client.get("/metrics").text
    families = {f.name for f in text_string_to_metric_families(text)}
    exposed = {n for f in text_string_to_metric_families(text) for n in {s.name for s in f.samples}}
    for name in METRIC_NAMES:
        assert name in exposed or name in families, name
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not shutil.which(promtool):
        pytest.skip("promtool not installed (apt-get install prometheus): lint not run")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_api_key_is_required_except_for_probes_and_metrics(server, client):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert anonymous.get(path).status_code == 200, path
        for path in ("/healthz", "/readyz"):  # probes that want the status alone
            head = anonymous.head(path)
            assert head.status_code == 200 and head.content == b"", path
        missing = anonymous.get("/v1/model")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "unauthorized"
        assert post_image(anonymous).status_code == 401
        wrong = {"Authorization": "Bearer not-the-key"}
        assert anonymous.get("/v1/model", headers=wrong).status_code == 401
    assert client.get("/v1/model").status_code == 200


def test_request_id_is_echoed_or_made_up(client):
    response = client.get("/v1/model", headers={"X-Request-ID": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    made_up = client.get("/v1/model").headers["x-request-id"]
    assert len(made_up) == 32
    error = post_image(
        client,
        b"",
        tasks="caption",
    ).json()
    assert error["error"]["request_id"]
    hostile = client.get("/healthz", headers={"X-Request-ID": "a b\tc" * 50})
    assert hostile.headers["x-request-id"] != "a b\tc" * 50


def test_model_description(client, micro_model):
    body = client.get("/v1/model").json()
    ModelDescription.model_validate(body)
    config = micro_model.config
    assert body["class_names"] == config.class_names
    assert body["keypoint_names"] == config.keypoint_names
    assert body["skeleton"] == [list(p) for p in config.skeleton]
    assert body["default_refine_steps"] == {
        "detection": 0,
        "segmentation": 0,
        "keypoints": 1,
        "caption": 3,
    }
    assert body["input_size"] == [96, 96] and body["max_detections"] == 6
    assert body["decoding"]["detection_flip"] is False
    assert body["decoding"]["caption_candidates"] == 1
    assert set(body["decoding"]) == set(micro_model.decoding_options())
    assert (body["device"], body["precision"], body["backend"]) == ("cpu", "fp32", "torch")


def test_public_docs_are_open_without_the_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert anonymous.get(path).status_code == 200, path


def test_openapi_documents_the_api(client, openapi):
    assert client.get("/docs").status_code == 200
    post = openapi["paths"]["/predict"]["post"]
    body_schema = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body_schema["$ref"].endswith("/PredictForm")
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/PredictResponse"
    )
    for status in ("400", "413", "415", "422", "503", "504"):
        assert post["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
    assert "mask" not in openapi["components"]["schemas"]["Detection"]["required"]


def test_demo_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'fetchJson("/predict"' in page.text


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "1", "LA", "F"])
def test_image_modes(client, mode):
    image = scene_image(mode=mode)
    fmt = {"CMYK": "JPEG", "F": "TIFF"}.get(mode, "PNG")
    response = post_image(client, encode(image, fmt), tasks="detection")
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": 160, "height": 120}


def test_exif_orientation_and_animation(client):
    image = scene_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rotated = post_image(client, encode(image, "JPEG", exif=exif.tobytes()), tasks="caption")
    assert rotated.json()["image"] == {"width": 20, "height": 40}
    frames = [scene_image(50, 30), scene_image(50, 30, "L").convert("RGB")]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert post_image(client, gif, tasks="caption").json()["image"] == {"width": 50, "height": 30}
