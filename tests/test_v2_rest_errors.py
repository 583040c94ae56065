"""The Open Inference Protocol's REST API (/v2) refusing what it must: bad requests and
bodies get the protocol's error shape and status, a deadline, the API key, a full queue.
tests/test_v2_rest.py covers the requests that succeed."""

from __future__ import annotations

import base64
import gzip
import struct

import httpx
import pytest

from service.settings import Settings
from tests.helpers import running_server
from tests.v2_protocol import (
    HEADER,
    MAX_UPLOAD,
    binary_request,
    bomb,
    bytes_tensor,
    image_input,
    infer,
    outputs,
    png,
    v2_settings,
    with_input,
)


@pytest.fixture(scope="module")
def server_settings(micro_checkpoint) -> Settings:
    return v2_settings(micro_checkpoint)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_REQUESTS = {
    # name: (model, body, status, words in the message)
    "unknown model": ("nope", with_input(), 404, "unknown model 'nope'"),
    "unknown version": ("{model}/versions/v0", with_input(), 404, "no version 'v0'"),
    "no inputs": ("{model}", {"inputs": []}, 400, "no input 'image'"),
    "other input": ("{model}", with_input(name="pixels"), 400, "unexpected input 'pixels'"),
    "bad datatype": ("{model}", with_input(datatype="FP32", data=[1.0]), 400, "datatype FP32"),
    "bad shape": ("{model}", with_input(shape=[1, 2]), 400, "shape [1, 2]"),
    "shape and data disagree": ("{model}", with_input(shape=[2]), 400, "but 1 elements"),
    "too many images": ("{model}", with_input(shape=[5], data=[b64(b"x")] * 5), 400, "at most 4"),
    "not base64": ("{model}", with_input(data=["not base64!"]), 400, "not base64"),
    "not an image": ("{model}", with_input(data=[b64(b"not an image")]), 400, "not an image"),
    "too many pixels": ("{model}", with_input(data=[b64(bomb())]), 413, "the limit is 1000000"),
    "unknown parameter": (
        "{model}",
        {**with_input(), "parameters": {"task": "caption"}},
        400,
        "unknown parameter 'task'",
    ),
    "unknown task": (
        "{model}",
        {**with_input(), "parameters": {"tasks": "ocr"}},
        400,
        "unknown task 'ocr'",
    ),
    "threshold out of range": (
        "{model}",
        {**with_input(), "parameters": {"score_threshold": 2}},
        400,
        "outside 0..1",
    ),
    "threshold not a number": (
        "{model}",
        {**with_input(), "parameters": {"score_threshold": "high"}},
        400,
        "expected a number",
    ),
    "threshold past float": (  # float(10**400) overflows
        "{model}",
        {**with_input(), "parameters": {"score_threshold": 10**400}},
        400,
        "expected a number",
    ),
    "timeout past int64": (
        "{model}",
        {**with_input(), "parameters": {"timeout": 10**400}},
        400,
        "expected a 64-bit integer",
    ),
    "timeout of 5000 digits": (  # int() refuses such strings
        "{model}",
        {**with_input(), "parameters": {"timeout": "9" * 5000}},
        400,
        "expected a 64-bit integer",
    ),
    "refine_steps of 5000 digits": (
        "{model}",
        {**with_input(), "parameters": {"refine_steps": "9" * 5000}},
        400,
        "is not K or task:K",
    ),
    "refine_steps for a task not run": (
        "{model}",
        {**with_input(), "parameters": {"tasks": "caption", "refine_steps": "detection:1"}},
        400,
        "'detection:1' names detection, which this request does not run (it runs caption)",
    ),
    "bad mask format": (
        "{model}",
        {**with_input(), "parameters": {"mask_format": "png"}},
        400,
        "not rle or polygon",
    ),
    "unknown output": (
        "{model}",
        {**with_input(), "outputs": [{"name": "logits"}]},
        400,
        "unknown output 'logits'",
    ),
    "output of a task not run": (
        "{model}",
        {**with_input(), "outputs": [{"name": "caption"}], "parameters": {"tasks": "detection"}},
        400,
        "task caption",
    ),
    "classification": (
        "{model}",
        {**with_input(), "outputs": [{"name": "scores", "parameters": {"classification": 3}}]},
        400,
        "'classification' is not supported",
    ),
    "shared memory": (
        "{model}",
        with_input(parameters={"shared_memory_region": "r"}),
        400,
        "not supported",
    ),
    "not the protocol's JSON": ("{model}", {"inputs": "image"}, 400, "invalid inference request"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_the_protocols_errors(client, model_name, case):
    path, body, status, words = BAD_REQUESTS[case]
    response = client.post(f"/v2/models/{path.format(model=model_name)}/infer", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert list(error) == ["error"] and words in error["error"], error
    assert response.headers["x-request-id"]


def test_bad_bodies_get_the_protocols_errors(client, model_name):
    url = f"/v2/models/{model_name}/infer"
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": 100},
            }
        ]
    }
    cases = [
        (binary_request(header, b"short"), 400, "past the end"),
        (binary_request(header, bytes_tensor(b"x" * 96) + b"more"), 400, "belong to no input"),
        (binary_request(header, b"\x10\x00"), 400, "past the end"),
        ((b"{}", {HEADER: "999"}), 400, "not a length within the body"),
        ((b"{}", {HEADER: b"\xb2"}), 400, "not a length within the body"),  # "²": isdigit()
        ((b"{}", {HEADER: "9" * 5000}), 400, "not a length within the body"),
        ((b"{not json", {}), 400, "invalid inference request"),
        ((b"x" * (MAX_UPLOAD + 1), {}), 413, "larger than the limit"),
        ((b"abc", {"Content-Encoding": "br"}), 415, "Content-Encoding br"),
        ((gzip.compress(b" " * (MAX_UPLOAD + 10)), {"Content-Encoding": "gzip"}), 413, "inflated"),
    ]
    header["inputs"][0]["parameters"]["binary_data_size"] = 9
    cases.append((binary_request(header, struct.pack("<I", 9) + b"abcde"), 400, "says 9 bytes"))
    for (body, headers), status, words in cases:
        response = client.post(url, content=body, headers=headers)
        assert response.status_code == status, (words, response.text)
        assert list(response.json()) == ["error"] and words in response.json()["error"]


def test_unknown_routes_and_methods_use_the_protocols_error_shape(client, model_name):
    for response, status in (
        (client.get("/v2/nothing/here"), 404),
        (client.get(f"/v2/models/{model_name}/infer"), 405),
        (client.get("/v2/models/nope/ready"), 404),
        (client.get("/v2/models/nope"), 404),
    ):
        assert response.status_code == status
        assert isinstance(response.json()["error"], str)


def test_deadline_from_the_timeout_parameter(client, model_name):
    request = {**with_input(), "parameters": {"timeout": 1}}  # 1 microsecond
    response = infer(client, model_name, request)
    assert response.status_code == 504 and "not done within 0.001 ms" in response.json()["error"]
    assert client.get("/v2/health/ready").status_code == 200


def test_api_key_is_required_except_for_health(server, model_name):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{model_name}/ready"):
            assert anonymous.get(path).status_code == 200, path
        for response in (
            anonymous.get("/v2"),
            anonymous.get(f"/v2/models/{model_name}"),
            infer(anonymous, model_name, with_input()),
            infer(anonymous, model_name, with_input(), headers={"Authorization": "Bearer no"}),
        ):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["error"]


def test_a_full_queue_refuses_every_image_of_a_request(micro_checkpoint):
    """Four images need four places in a queue of three: 503 at once, none left queued."""
    settings = Settings(checkpoint=micro_checkpoint, queue_size=3, max_batch_size=8)
    with running_server(settings) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        name = c.get("/v1/model").json()["name"]
        images = [png()] * 4
        response = infer(c, name, {"inputs": [image_input(*images)]})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "capacity" in response.json()["error"]
        assert server.state.engine is not None and not server.state.engine.waiting
        assert outputs(
            infer(
                c, name, {"inputs": [image_input(*images[:3])], "parameters": {"tasks": "caption"}}
            )
        )
