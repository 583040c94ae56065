"""The Open Inference Protocol driven by the clients people already use: tritonclient's HTTP
client (binary data on and off) and its gRPC client, against a real `mad serve` with
MAD_GRPC_PORT set, in a subprocess.

A subprocess, not the in-process test server: a process holds one definition of the
protocol's `inference` protobuf package, and tritonclient.grpc brings its own (so no test
in this process may start the gRPC service in-process).
"""

from __future__ import annotations

import base64
import filecmp
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.helpers import ALL_TASKS, encode, free_port, scene_image, synthetic_images

ROOT = Path(__file__).resolve().parents[1]
KEY = "clients-key"


def auth() -> dict[str, str]:
    """A fresh dict per call: tritonclient's HTTP client writes its own headers into it."""
    return {"Authorization": f"Bearer {KEY}"}


GRPC_AUTH = {"authorization": f"Bearer {KEY}"}
MAX_UPLOAD = 300_000
OUTPUTS_OF = {
    "detection": {"num_detections", "boxes", "scores", "labels"},
    "segmentation": {"num_detections", "boxes", "scores", "labels", "masks_rle"},
    "keypoints": {"num_detections", "boxes", "scores", "labels", "keypoints"},
    "caption": {"caption"},
}
TASK_CASES = [(t,) for t in ALL_TASKS] + [ALL_TASKS]
TASK_IDS = [*ALL_TASKS, "all"]


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


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-logs")


def start(checkpoint: Path, log: Path, **env: str) -> Serve:
    """`mad serve` of this checkout on loopback with gRPC on, an API key, small limits."""
    http_port, grpc_port = free_port(), free_port()
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


def png(image: Image.Image | None = None) -> bytes:
    return encode(image or scene_image())


def images_array(*images: bytes) -> np.ndarray:
    return np.array(images, dtype=np.object_)


def http_input(*images: bytes, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    if binary:
        return tensor.set_data_from_numpy(images_array(*images), binary_data=True)
    # In JSON an image travels as base64 text (the client sends str elements as they are).
    encoded = np.array([base64.b64encode(i).decode() for i in images], dtype=np.object_)
    return tensor.set_data_from_numpy(encoded, binary_data=False)


def grpc_input(*images: bytes) -> grpcclient.InferInput:
    return grpcclient.InferInput("image", [len(images)], "BYTES").set_data_from_numpy(
        images_array(*images)
    )


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


def bomb() -> bytes:
    """2000 x 2000 of one colour: a few KB of PNG, 4 megapixels decoded."""
    return encode(Image.new("L", (2000, 2000), 7), optimize=True)


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


def test_grpc_drains_with_http(micro_checkpoint, logs):
    """SIGTERM: health turns NOT_SERVING at once; calls are still served for the drain delay
    (load balancers catch up), then refused; every call accepted is answered, and the
    process exits 0."""
    serve = start(
        micro_checkpoint,
        logs / "drain.log",
        MAD_BATCH_DELAY_MS="2500",
        MAD_BATCH_WINDOW="fixed",  # the call waits in the queue for company
        MAD_DRAIN_DELAY_S="1",
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
        time.sleep(0.3)
        with grpc.insecure_channel(f"127.0.0.1:{serve.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status = stub.Check(health_pb2.HealthCheckRequest(service="")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        call()  # within the delay: accepted
        time.sleep(max(0.0, signalled + 1.5 - time.monotonic()))
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
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("mad serve: cannot listen for gRPC on 127.0.0.1:")
        and "MAD_GRPC_PORT" in last
    )


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
