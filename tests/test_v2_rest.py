"""The Open Inference Protocol's REST API (/v2), driven with plain httpx and the protocol's
own JSON: health, metadata, inference (JSON and the binary tensor data extension), its error
shape, the API key and metrics. tests/test_v2_clients.py drives it with tritonclient."""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct

import httpx
import jsonschema
import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.helpers import (
    ALL_TASKS,
    encode,
    metric_samples,
    running_server,
    scene_image,
    synthetic_images,
)

API_KEY = "v2-key"
MAX_UPLOAD = 300_000
MAX_PIXELS = 1_000_000
MAX_BATCH = 4
DETECTION_OUTPUTS = ("num_detections", "boxes", "scores", "labels")
OUTPUTS_OF = {
    "detection": DETECTION_OUTPUTS,
    "segmentation": (*DETECTION_OUTPUTS, "masks_rle"),
    "keypoints": (*DETECTION_OUTPUTS, "keypoints"),
    "caption": ("caption",),
}
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def server_settings(micro_checkpoint):
    return Settings(
        checkpoint=micro_checkpoint,
        api_key=API_KEY,
        max_upload_bytes=MAX_UPLOAD,
        max_image_pixels=MAX_PIXELS,
        max_batch_size=MAX_BATCH,
        batch_delay_ms=2,
    )


@pytest.fixture(scope="module")
def model_name(client) -> str:
    return client.get("/v1/model").json()["name"]


@pytest.fixture(scope="module")
def openapi(client) -> dict:
    return client.get("/openapi.json").json()


def png(image: Image.Image | None = None) -> bytes:
    return encode(image or scene_image())


def image_input(*images: bytes) -> dict:
    """The protocol's JSON form of a BYTES input: base64 text elements."""
    data = [base64.b64encode(i).decode() for i in images]
    return {"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": data}


def infer(client, name, body: dict, **kwargs) -> httpx.Response:
    return client.post(f"/v2/models/{name}/infer", json=body, **kwargs)


def outputs(response: httpx.Response) -> dict[str, dict]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def array(output: dict) -> np.ndarray:
    dtype = {"FP32": np.float32, "INT32": np.int32, "BYTES": object}[output["datatype"]]
    return np.array(output["data"], dtype=dtype).reshape(output["shape"])


def predict_body(output: dict, i: int = 0) -> dict:
    """Image i's POST /predict response from the `json` output, its timings left out."""
    body = json.loads(output["data"][i])
    body.pop("timings_ms")
    return body


def check_against_openapi(body: dict, openapi: dict, component: str) -> None:
    schema = {"$ref": f"#/components/schemas/{component}", "components": openapi["components"]}
    jsonschema.Draft202012Validator(schema).validate(body)


def test_health_and_metadata(client, model_name, openapi):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "mad-serve" and server["version"] == openapi["info"]["version"]
    assert set(server["extensions"]) == {"binary_tensor_data", "parameters"}
    described = client.get("/v1/model").json()
    metadata = client.get(f"/v2/models/{model_name}").json()
    check_against_openapi(metadata, openapi, "ModelMetadata")
    assert metadata["versions"] == [described["version"]]
    assert metadata["platform"] == "mad_torch"
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    shapes = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert shapes == {
        "image_size": ("INT32", [-1, 2]),
        "json": ("BYTES", [-1]),
        "num_detections": ("INT32", [-1]),
        "boxes": ("FP32", [-1, -1, 4]),
        "scores": ("FP32", [-1, -1]),
        "labels": ("INT32", [-1, -1]),
        "masks_rle": ("BYTES", [-1, -1]),
        "keypoints": ("FP32", [-1, -1, len(described["keypoint_names"]), 3]),
        "caption": ("BYTES", [-1]),
    }
    version = described["version"]
    assert client.get(f"/v2/models/{model_name}/versions/{version}").json() == metadata
    ready = {"name": model_name, "ready": True}
    assert client.get(f"/v2/models/{model_name}/ready").json() == ready
    assert client.get(f"/v2/models/{model_name}/versions/{version}/ready").json() == ready


def test_the_protocols_json_example(client, model_name, openapi):
    """Request and response in the shape of the protocol's own example: an id, named
    outputs, flat row-major data. The outputs asked for choose the tasks run."""
    request = {
        "id": "42",
        "inputs": [image_input(png())],
        "outputs": [{"name": name} for name in ("boxes", "scores", "labels", "json")],
        "parameters": {"score_threshold": 0.0, "max_detections": 3},
    }
    check_against_openapi(request, openapi, "InferenceRequest")
    response = infer(client, model_name, request)
    body = response.json()
    check_against_openapi(body, openapi, "InferenceResponse")
    assert response.headers["content-type"] == "application/json"
    assert body["id"] == "42" and body["model_name"] == model_name
    assert [o["name"] for o in body["outputs"]] == ["boxes", "scores", "labels", "json"]
    out = outputs(response)
    assert out["boxes"]["shape"] == [1, 3, 4] and len(out["boxes"]["data"]) == 12
    native = predict_body(out["json"])
    assert native["tasks"] == ["detection"]
    boxes, scores, labels = array(out["boxes"])[0], array(out["scores"])[0], array(out["labels"])[0]
    for det, box, score, label in zip(native["detections"], boxes, scores, labels, strict=True):
        assert det["box"] == pytest.approx(box.tolist(), abs=0.01)
        assert det["score"] == pytest.approx(float(score), abs=1e-5)
        assert det["category_id"] == label
    # Some clients send null for "no parameters".
    nulls = {"parameters": None, "inputs": [{**image_input(png()), "parameters": None}]}
    assert set(outputs(infer(client, model_name, nulls))) >= {"image_size", "json"}


@pytest.mark.parametrize("tasks", [(t,) for t in ALL_TASKS] + [ALL_TASKS], ids=[*ALL_TASKS, "all"])
def test_each_task_alone_and_together(client, model_name, tasks):
    """Every output a run produces comes back (no outputs asked for), and says what the
    /predict JSON of the same run says."""
    parameters = {"tasks": ",".join(tasks), "score_threshold": 0.0, "refine_steps": 1}
    response = infer(client, model_name, {"inputs": [image_input(png())], "parameters": parameters})
    out = outputs(response)
    expected = {"image_size", "json"}.union(*(OUTPUTS_OF[t] for t in tasks))
    assert set(out) == expected
    native = predict_body(out["json"])
    assert array(out["image_size"]).tolist() == [[120, 160]]
    if "caption" in tasks:
        assert array(out["caption"]).tolist() == [native["caption"]]
    if "detection" not in native["tasks"]:
        return
    detections = native["detections"]
    assert array(out["num_detections"]).tolist() == [len(detections)]
    assert array(out["labels"])[0].tolist() == [d["category_id"] for d in detections]
    if "segmentation" in tasks:
        masks = array(out["masks_rle"])[0]
        assert [m for m in masks] == [d["mask"]["counts"] for d in detections]
    if "keypoints" in tasks:
        points = array(out["keypoints"])[0]
        assert points.shape[0] == len(detections)
        for det, rows in zip(detections, points, strict=True):
            if "keypoints" in det:
                np.testing.assert_allclose(rows, det["keypoints"], atol=0.01)
            else:  # not a person: zeros
                assert not rows.any()


def test_same_result_as_predict(client, model_name):
    image = png(synthetic_images(1, seed=3)[0])
    fields = {"tasks": "detection,segmentation,caption", "score_threshold": "0.1"}
    native = client.post("/predict", files={"image": ("a.png", image)}, data=fields).json()
    native.pop("timings_ms")
    parameters = {"tasks": fields["tasks"], "score_threshold": 0.1}
    request = {
        "inputs": [image_input(image)],
        "outputs": [{"name": "json"}],
        "parameters": parameters,
    }
    assert predict_body(outputs(infer(client, model_name, request))["json"]) == native


def test_several_images_in_one_request(client, model_name):
    """Shape [N]: N images, each run as its own request; per-image outputs are padded to
    the most detections, num_detections says how many rows are real."""
    images = [png(i) for i in synthetic_images(3, seed=1)] + [png(scene_image(64, 200))]
    parameters = {"tasks": "detection,keypoints", "score_threshold": 0.3}
    request = {"inputs": [image_input(*images)], "parameters": parameters}
    out = outputs(infer(client, model_name, request))
    sizes = [list(Image.open(io.BytesIO(i)).size[::-1]) for i in images]
    assert array(out["image_size"]).tolist() == sizes
    counts = array(out["num_detections"])
    labels, boxes, points = array(out["labels"]), array(out["boxes"]), array(out["keypoints"])
    assert labels.shape == (4, max(counts)) and boxes.shape == (4, max(counts), 4)
    for i, image in enumerate(images):
        assert (labels[i, counts[i] :] == -1).all() and not boxes[i, counts[i] :].any()
        assert not points[i, counts[i] :].any()
        alone = {"inputs": [image_input(image)], "parameters": parameters}
        same_detections(
            predict_body(out["json"], i),
            predict_body(outputs(infer(client, model_name, alone))["json"]),
        )
    # An input of shape [N, 1] is read the same way.
    request["inputs"][0]["shape"] = [4, 1]
    assert (
        array(outputs(infer(client, model_name, request))["num_detections"]).tolist()
        == counts.tolist()
    )


def same_detections(a: dict, b: dict) -> None:
    """The same answer, up to the float noise of other batch mates (test_batch_independence)."""
    assert [d["category_id"] for d in a["detections"]] == [
        d["category_id"] for d in b["detections"]
    ]
    for da, db in zip(a["detections"], b["detections"], strict=True):
        assert da["box"] == pytest.approx(db["box"], abs=0.01)
        assert da["score"] == pytest.approx(db["score"], abs=1e-3)


def binary_request(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {
        HEADER: str(len(text)),
        "Content-Type": "application/octet-stream",
    }


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def split_binary(response: httpx.Response) -> tuple[dict, dict[str, bytes]]:
    """A binary-extension response -> its JSON and each binary output's bytes."""
    length = int(response.headers[HEADER])
    header, at, blobs = json.loads(response.content[:length]), length, {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            blobs[output["name"]] = response.content[at : at + size]
            at += size
    assert at == len(response.content)
    return header, blobs


def test_binary_tensor_data_extension(client, model_name):
    """Images as binary data after the JSON (no base64); outputs back as binary data when
    asked for, per output or for all (binary_data_output)."""
    image = png()
    tensor = bytes_tensor(image, image)
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": [2],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(tensor)},
            }
        ],
        "outputs": [{"name": "scores", "parameters": {"binary_data": True}}, {"name": "caption"}],
        "parameters": {"tasks": "detection,caption", "score_threshold": 0},
    }
    body, headers = binary_request(header, tensor)
    response = client.post(f"/v2/models/{model_name}/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    meta, blobs = split_binary(response)
    scores_meta, caption_meta = meta["outputs"]
    assert "data" not in scores_meta and set(blobs) == {"scores"}
    scores = np.frombuffer(blobs["scores"], "<f4").reshape(scores_meta["shape"])
    assert scores.shape[0] == 2 and (scores[0] == scores[1]).all()  # one image, twice
    assert len(caption_meta["data"]) == 2
    header["parameters"]["binary_data_output"] = True
    del header["outputs"]
    body, headers = binary_request(header, tensor)
    meta, blobs = split_binary(
        client.post(f"/v2/models/{model_name}/infer", content=body, headers=headers)
    )
    assert set(blobs) == {o["name"] for o in meta["outputs"]}
    captions = blobs["caption"]
    (size,) = struct.unpack_from("<I", captions)
    assert captions[4 : 4 + size].decode() == caption_meta["data"][0]


def test_gzip_request_body(client, model_name):
    request = {"inputs": [image_input(png())], "parameters": {"tasks": "caption"}}
    body = gzip.compress(json.dumps(request).encode())
    response = client.post(
        f"/v2/models/{model_name}/infer",
        content=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert set(outputs(response)) == {"image_size", "json", "caption"}


def bomb() -> bytes:
    """2000 x 2000 of one colour: a few KB of PNG, 4 megapixels decoded."""
    return encode(Image.new("L", (2000, 2000), 7), optimize=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def with_input(**changes) -> dict:
    return {"inputs": [{**image_input(png()), **changes}]}


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
    assert response.status_code == 504 and "not done within 1e-06 s" in response.json()["error"]
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


def test_metrics_count_v2_requests_by_protocol(client, model_name):
    def count(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    before = metric_samples(client)
    assert (
        infer(client, model_name, {**with_input(), "parameters": {"tasks": "caption"}}).status_code
        == 200
    )
    assert infer(client, model_name, with_input(datatype="FP32")).status_code == 400
    after = metric_samples(client)
    ok = dict(status="200", task="caption", protocol="v2_rest")
    assert count(after, "mad_requests_total", **ok) - count(before, "mad_requests_total", **ok) == 1
    bad = dict(status="400", task="none", protocol="v2_rest")
    assert (
        count(after, "mad_requests_total", **bad) - count(before, "mad_requests_total", **bad) == 1
    )
    name = "mad_request_duration_seconds_count"
    assert count(after, name, protocol="v2_rest") - count(before, name, protocol="v2_rest") == 2
    passes = ("mad_decoder_passes_total", (("task", "caption"),))
    assert after[passes] > before.get(passes, 0.0)
    assert after[("mad_inflight_requests", ())] == 0


def test_openapi_documents_the_v2_routes(openapi):
    paths = openapi["paths"]
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/ready",
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{model_version}/infer",
    ):
        assert path in paths, path
    body = paths["/v2/models/{model_name}/infer"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/InferenceRequest"}
    assert {"InferenceRequest", "RequestInput", "RequestOutput"} <= set(
        openapi["components"]["schemas"]
    )


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
