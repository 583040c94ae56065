"""The Open Inference Protocol's REST API (/v2), driven with plain httpx and the protocol's
own JSON: health, metadata, inference (JSON, gzip and the binary tensor data extension),
metrics and the OpenAPI document. tests/test_v2_rest_errors.py covers what it refuses;
tests/test_v2_clients.py drives it with tritonclient."""

from __future__ import annotations

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
from tests.helpers import ALL_TASKS, metric_samples, scene_image, synthetic_images
from tests.v2_protocol import (
    HEADER,
    binary_request,
    bytes_tensor,
    image_input,
    infer,
    outputs,
    png,
    v2_settings,
    with_input,
)

DETECTION_OUTPUTS = ("num_detections", "boxes", "scores", "labels")
OUTPUTS_OF = {
    "detection": DETECTION_OUTPUTS,
    "segmentation": (*DETECTION_OUTPUTS, "masks_rle", "mask_scores"),
    "keypoints": (*DETECTION_OUTPUTS, "keypoints"),
    "caption": ("caption",),
}


@pytest.fixture(scope="module")
def server_settings(micro_checkpoint) -> Settings:
    return v2_settings(micro_checkpoint)


@pytest.fixture(scope="module")
def openapi(client) -> dict:
    return client.get("/openapi.json").json()


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
        "mask_scores": ("FP32", [-1, -1]),
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
        mask_scores = array(out["mask_scores"])[0]
        np.testing.assert_allclose(mask_scores, [d["mask_score"] for d in detections], atol=1e-5)
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
