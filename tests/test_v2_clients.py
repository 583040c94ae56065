"""The Open Inference Protocol driven by the clients people already use: tritonclient's HTTP
client (binary data on and off) and its gRPC client, against a real `mad serve` with
MAD_GRPC_PORT set, in a subprocess.

The server is tests/v2_serve.py's subprocess (why a subprocess: see there);
tests/test_grpc_lifecycle.py covers its gRPC drain and start-up.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.helpers import ALL_TASKS, synthetic_images
from tests.v2_protocol import MAX_UPLOAD, bomb, png
from tests.v2_serve import (
    GRPC_AUTH,
    Serve,
    auth,
    grpc_input,
    images_array,
    start,
    stop,
)

OUTPUTS_OF = {
    "detection": {"num_detections", "boxes", "scores", "labels"},
    "segmentation": {"num_detections", "boxes", "scores", "labels", "masks_rle", "mask_scores"},
    "keypoints": {"num_detections", "boxes", "scores", "labels", "keypoints"},
    "caption": {"caption"},
}
TASK_CASES = [(t,) for t in ALL_TASKS] + [ALL_TASKS]
TASK_IDS = [*ALL_TASKS, "all"]


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-logs")


@pytest.fixture(scope="module")
def serve(micro_checkpoint, logs) -> Iterator[Serve]:
    running = start(micro_checkpoint, logs / "serve.log")
    yield running
    stop(running)


@pytest.fixture(scope="module")
def model_name(serve) -> str:
    return httpx.get(f"{serve.url}/v1/model", headers=auth()).json()["name"]


@pytest.fixture(scope="module")
def http(serve) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{serve.http_port}", network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(serve) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{serve.grpc_port}")
    yield client
    client.close()


def http_input(*images: bytes, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    if binary:
        return tensor.set_data_from_numpy(images_array(*images), binary_data=True)
    # In JSON an image travels as base64 text (the client sends str elements as they are).
    encoded = np.array([base64.b64encode(i).decode() for i in images], dtype=np.object_)
    return tensor.set_data_from_numpy(encoded, binary_data=False)


def text(element: bytes | str) -> str:
    """A BYTES element: bytes from binary data and gRPC, str from JSON."""
    return element.decode() if isinstance(element, bytes) else element


def native(result, i: int = 0) -> dict:
    """Image i's POST /predict response from the `json` output, without its timings."""
    body = json.loads(result.as_numpy("json")[i])
    body.pop("timings_ms")
    return body


def check_tensors(result, tasks: tuple[str, ...], names: set[str]) -> None:
    """The tensors say what the image's /predict JSON (the `json` output) says."""
    assert names == {"image_size", "json"}.union(*(OUTPUTS_OF[t] for t in tasks))
    body = native(result)
    assert result.as_numpy("image_size").tolist() == [[120, 160]]
    if "caption" in tasks:
        assert text(result.as_numpy("caption")[0]) == body["caption"]
    if "detections" not in body:
        return
    detections = body["detections"]
    assert result.as_numpy("num_detections").tolist() == [len(detections)]
    assert result.as_numpy("labels").dtype == np.int32
    assert result.as_numpy("labels")[0].tolist() == [d["category_id"] for d in detections]
    boxes, scores = result.as_numpy("boxes")[0], result.as_numpy("scores")[0]
    assert boxes.dtype == np.float32 and boxes.shape == (len(detections), 4)
    for det, box, score in zip(detections, boxes, scores, strict=True):
        assert det["box"] == pytest.approx(box.tolist(), abs=0.01)
        assert det["score"] == pytest.approx(float(score), abs=1e-5)
    if "segmentation" in tasks:
        counts = [text(m) for m in result.as_numpy("masks_rle")[0]]
        assert counts == [d["mask"]["counts"] for d in detections]
    if "keypoints" in tasks:
        points = result.as_numpy("keypoints")[0]
        for det, rows in zip(detections, points, strict=True):
            if "keypoints" in det:
                np.testing.assert_allclose(rows, det["keypoints"], atol=0.01)
            else:
                assert not rows.any()


def output_names(result) -> set[str]:
    response = result.get_response()
    outputs = response["outputs"] if isinstance(response, dict) else response.outputs
    return {o["name"] if isinstance(o, dict) else o.name for o in outputs}


def test_health_and_metadata_through_both_clients(http, grpc_client, model_name):
    assert http.is_server_live() and http.is_server_ready()
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert http.is_model_ready(model_name) and grpc_client.is_model_ready(model_name)
    assert not http.is_model_ready("nope")
    server = http.get_server_metadata(headers=auth())
    assert server["name"] == "mad-serve" and "binary_tensor_data" in server["extensions"]
    assert grpc_client.get_server_metadata(headers=GRPC_AUTH, as_json=True)["name"] == "mad-serve"
    over_http = http.get_model_metadata(model_name, headers=auth())
    over_grpc = grpc_client.get_model_metadata(model_name, headers=GRPC_AUTH, as_json=True)
    assert over_grpc["name"] == over_http["name"] == model_name
    assert over_grpc["versions"] == over_http["versions"]
    # protobuf's JSON writes int64 as strings.
    assert [
        (o["name"], o["datatype"], [int(d) for d in o["shape"]]) for o in over_grpc["outputs"]
    ] == [(o["name"], o["datatype"], o["shape"]) for o in over_http["outputs"]]


@pytest.mark.parametrize("tasks", TASK_CASES, ids=TASK_IDS)
def test_http_client_each_task_alone_and_together(http, model_name, tasks):
    parameters = {"tasks": ",".join(tasks), "score_threshold": 0.0, "refine_steps": "1"}
    result = http.infer(model_name, [http_input(png())], parameters=parameters, headers=auth())
    check_tensors(result, tasks, output_names(result))


@pytest.mark.parametrize("tasks", TASK_CASES, ids=TASK_IDS)
def test_grpc_client_each_task_alone_and_together(grpc_client, model_name, tasks):
    parameters = {"tasks": ",".join(tasks), "score_threshold": 0.0, "refine_steps": 1}
    result = grpc_client.infer(
        model_name, [grpc_input(png())], parameters=parameters, headers=GRPC_AUTH
    )
    check_tensors(result, tasks, output_names(result))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_http_client_binary_data_on_and_off(http, model_name, binary):
    """Inputs and outputs as JSON (base64 images, text and number lists) or as binary data:
    the same answer."""
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=binary)
        for name in ("boxes", "labels", "caption", "json")
    ]
    result = http.infer(
        model_name,
        [http_input(png(), binary=binary)],
        outputs=outputs,
        parameters={"score_threshold": 0.0, "tasks": "detection,caption"},
        headers=auth(),
    )
    assert output_names(result) == {"boxes", "labels", "caption", "json"}
    body = native(result)
    assert text(result.as_numpy("caption")[0]) == body["caption"]
    assert result.as_numpy("labels")[0].tolist() == [d["category_id"] for d in body["detections"]]
    boxes = result.as_numpy("boxes")[0]
    assert boxes.dtype == np.float32 and boxes.shape == (len(body["detections"]), 4)
    for det, box in zip(body["detections"], boxes, strict=True):
        assert det["box"] == pytest.approx(box.tolist(), abs=0.01)


def test_several_images_per_request_over_grpc(grpc_client, model_name):
    images = [png(i) for i in synthetic_images(3, seed=5)]
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("num_detections", "labels", "json")]
    result = grpc_client.infer(
        model_name,
        [grpc_input(*images)],
        outputs=outputs,
        parameters={"tasks": "detection", "score_threshold": 0.2},
        headers=GRPC_AUTH,
    )
    counts, labels = result.as_numpy("num_detections"), result.as_numpy("labels")
    assert labels.shape == (3, max(counts))
    for i in range(3):
        expected = [d["category_id"] for d in native(result, i)["detections"]]
        assert labels[i, : counts[i]].tolist() == expected
        assert (labels[i, counts[i] :] == -1).all()


def test_same_answer_over_every_protocol(serve, http, grpc_client, model_name):
    """POST /predict, v2 REST and v2 gRPC run the same engine: one image, one answer."""
    image = png(synthetic_images(1, seed=9)[0])
    fields = {"tasks": "detection,segmentation,keypoints,caption", "score_threshold": "0.2"}
    answer = httpx.post(
        f"{serve.url}/predict", files={"image": ("a.png", image)}, data=fields, headers=auth()
    ).json()
    answer.pop("timings_ms")
    parameters = {"tasks": fields["tasks"], "score_threshold": 0.2}
    json_only = [httpclient.InferRequestedOutput("json")]
    over_http = http.infer(
        model_name, [http_input(image)], outputs=json_only, parameters=parameters, headers=auth()
    )
    over_grpc = grpc_client.infer(
        model_name,
        [grpc_input(image)],
        outputs=[grpcclient.InferRequestedOutput("json")],
        parameters=parameters,
        headers=GRPC_AUTH,
    )
    assert native(over_http) == answer
    assert native(over_grpc) == answer


def http_error(http, model_name, tensor, headers=None) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        http.infer(model_name, [tensor], headers=auth() if headers is None else headers)
    return caught.value


def grpc_error(grpc_client, model_name, tensor, headers=GRPC_AUTH) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer(model_name, [tensor], headers=headers)
    return caught.value


def test_errors_come_back_as_the_protocols_errors(serve, http, grpc_client, model_name):
    """Unknown model, bad datatype, bad shape, not an image, too large, no key: the status
    each transport uses for it, a message that says what was wrong, never a server error."""
    image = png()

    def typed(cls, datatype, shape, data):
        return cls("image", shape, datatype).set_data_from_numpy(data)

    floats = np.ones(1, dtype=np.float32)
    pair = images_array(image, image).reshape(1, 2)
    not_image = images_array(b"not an image")
    pixels = images_array(bomb())
    huge = images_array(os.urandom(MAX_UPLOAD + 1000))
    cases = [
        # (what, model, http tensor, grpc tensor, http status, grpc status, words)
        (
            "unknown model",
            "nope",
            http_input(image),
            grpc_input(image),
            "404",
            "NOT_FOUND",
            "unknown model",
        ),
        (
            "bad datatype",
            model_name,
            typed(httpclient.InferInput, "FP32", [1], floats),
            typed(grpcclient.InferInput, "FP32", [1], floats),
            "400",
            "INVALID_ARGUMENT",
            "datatype FP32",
        ),
        (
            "bad shape",
            model_name,
            typed(httpclient.InferInput, "BYTES", [1, 2], pair),
            typed(grpcclient.InferInput, "BYTES", [1, 2], pair),
            "400",
            "INVALID_ARGUMENT",
            "shape [1, 2]",
        ),
        (
            "not an image",
            model_name,
            typed(httpclient.InferInput, "BYTES", [1], not_image),
            typed(grpcclient.InferInput, "BYTES", [1], not_image),
            "400",
            "INVALID_ARGUMENT",
            "not an image",
        ),
        (
            "too many pixels",
            model_name,
            typed(httpclient.InferInput, "BYTES", [1], pixels),
            typed(grpcclient.InferInput, "BYTES", [1], pixels),
            "413",
            "INVALID_ARGUMENT",
            "the limit is 1000000",
        ),
        (
            "too large",
            model_name,
            typed(httpclient.InferInput, "BYTES", [1], huge),
            typed(grpcclient.InferInput, "BYTES", [1], huge),
            "413",
            "RESOURCE_EXHAUSTED",
            "",
        ),
    ]
    for what, name, over_http, over_grpc, http_status, grpc_status, words in cases:
        error = http_error(http, name, over_http)
        assert error.status() == http_status and words in error.message(), (what, str(error))
        error = grpc_error(grpc_client, name, over_grpc)
        assert error.status() == f"StatusCode.{grpc_status}", (what, str(error))
        assert words in error.message(), (what, str(error))
    error = http_error(http, model_name, http_input(image), headers={})
    assert error.status() == "401" and "API key" in error.message()
    error = grpc_error(grpc_client, model_name, grpc_input(image), headers={})
    assert error.status() == "StatusCode.UNAUTHENTICATED" and "API key" in error.message()
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer(
            model_name, [grpc_input(image)], parameters={"tasks": "ocr"}, headers=GRPC_AUTH
        )
    assert "unknown task 'ocr'" in caught.value.message()
    assert http.is_server_ready() and grpc_client.is_server_ready()


def test_grpc_health_service_and_metrics(serve, grpc_client, model_name):
    with grpc.insecure_channel(f"127.0.0.1:{serve.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    grpc_client.infer(
        model_name, [grpc_input(png())], parameters={"tasks": "caption"}, headers=GRPC_AUTH
    )
    metrics = httpx.get(f"{serve.url}/metrics").text
    assert 'mad_requests_total{protocol="v2_grpc",status="200",task="caption"}' in metrics
    assert 'mad_request_duration_seconds_count{protocol="v2_grpc"}' in metrics
