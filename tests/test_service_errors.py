"""Bad input gets a clear 4xx in the one error shape, and the server stays ready."""

from __future__ import annotations

import io
import struct
import uuid
import zlib

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import APIError
from service.images import decode_image
from service.settings import Settings
from tests.helpers import encode, scene_image

MAX_UPLOAD = 200_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server_settings(micro_checkpoint):
    return Settings(
        checkpoint=micro_checkpoint,
        max_upload_bytes=MAX_UPLOAD,
        max_image_pixels=MAX_PIXELS,
        batch_delay_ms=1,
    )


def png() -> bytes:
    return encode(scene_image())


def multipart(fields: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{name}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
        )
        body.write(value + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def expect_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) <= {"code", "message", "request_id", "details"}
    assert error["message"] and error["request_id"] == response.headers["x-request-id"]
    if code is not None:
        assert error["code"] == code
    return error


def bomb() -> bytes:
    """2000 x 2000 of one colour: a few KB of PNG, 4 megapixels decoded."""
    return encode(Image.new("L", (2000, 2000), 7), optimize=True)


def png_header(width: int, height: int) -> bytes:
    """A PNG that only declares its size (no pixel data): what Pillow reads on opening."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


IMAGE_CASES = {
    "not_an_image": (lambda: b"hello, this is text", 400, "invalid_image"),
    "empty_file": (lambda: b"", 400, "invalid_image"),
    "truncated_png": (lambda: png()[: len(png()) // 2], 400, "invalid_image"),
    "truncated_jpeg": (lambda: encode(scene_image(), "JPEG")[:400], 400, "invalid_image"),
    "header_only_gif": (lambda: b"GIF89a\x10\x00\x10\x00", 400, "invalid_image"),
    "decompression_bomb": (bomb, 413, "image_too_large"),
    "over_pillows_own_limit": (lambda: png_header(20_000, 20_000), 413, "image_too_large"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_images(client, case):
    make, status, code = IMAGE_CASES[case]
    data = make()
    assert len(data) < MAX_UPLOAD
    response = client.post("/predict", files={"image": ("x.png", data, "image/png")})
    expect_error(response, status, code)
    assert client.get("/readyz").status_code == 200


FIELD_CASES = {
    "unknown_task": {"tasks": "detection,panoptic"},
    "refine_too_many": {"refine_steps": "9"},
    "refine_negative": {"refine_steps": "caption:-1"},
    "refine_unknown_task": {"refine_steps": "depth:1"},
    "refine_not_a_number": {"refine_steps": "caption:many"},
    "refine_empty_item": {"refine_steps": "2,"},
    "refine_task_twice": {"refine_steps": "caption:1,caption:2"},
    "refine_task_not_run": {"refine_steps": "detection:1", "tasks": "caption"},
    "tasks_empty_item": {"tasks": "detection,,caption"},
    "threshold_above_one": {"score_threshold": "1.5"},
    "threshold_not_a_number": {"score_threshold": "high"},
    "threshold_nan": {"score_threshold": "nan"},
    "nms_iou_infinite": {"nms_iou": "inf"},
    "budget_nan": {"latency_budget_ms": "nan"},
    "max_detections_zero": {"max_detections": "0"},
    "max_detections_over_slots": {"max_detections": "7"},
    "mask_format": {"mask_format": "png"},
    "misspelt_field": {"task": "caption"},
}


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_bad_parameters_are_422(client, case):
    response = client.post(
        "/predict", files={"image": ("x.png", png(), "image/png")}, data=FIELD_CASES[case]
    )
    error = expect_error(response, 422, "validation_error")
    field, value = next(iter(FIELD_CASES[case].items()))
    assert field in error["message"] or "task" in error["message"]
    if value in ("nan", "inf"):  # not "should be <= 1", which NaN is not either
        assert error["message"] == f"{field}: Input should be a finite number"


def test_form_fields_in_the_url_are_refused_not_ignored(client):
    response = client.post(
        "/predict?tasks=caption&refine_steps=1", files={"image": ("x.png", png(), "image/png")}
    )
    error = expect_error(response, 422, "validation_error")
    assert error["message"].startswith("refine_steps, tasks: send as multipart form fields")


def test_single_valued_fields_sent_twice_are_refused_not_half_used(client):
    """Two images in one request (or a threshold given twice) would lose all but the last;
    the repeatable fields (tasks, refine_steps) stay repeatable."""
    image = ("image", ("x.png", png(), "image/png"))
    two_images = [image, ("image", ("y.png", png(), "image/png"))]
    error = expect_error(client.post("/predict", files=two_images), 422, "validation_error")
    assert error["message"].startswith("image: sent 2 times; send it once (one image per request")
    thresholds = [("score_threshold", (None, "0.1")), ("score_threshold", (None, "0.9"))]
    error = expect_error(client.post("/predict", files=[image, *thresholds]), 422)
    assert error["message"] == "score_threshold: sent 2 times; send it once"
    tasks = [("tasks", (None, "caption")), ("tasks", (None, "detection"))]
    response = client.post("/predict", files=[image, *tasks])
    assert response.status_code == 200
    assert response.json()["tasks"] == ["detection", "caption"]


def test_missing_image_field(client):
    error = expect_error(
        client.post("/predict", data={"tasks": "caption"}, files={"other": ("x.png", png())}), 422
    )
    assert "image" in error["message"]


def test_an_image_sent_as_text_says_it_must_be_a_file(client):
    as_text = {"image": (None, "hello")}  # a multipart part without a filename: a text field
    error = expect_error(client.post("/predict", files=as_text), 422)
    assert error["message"] == (
        "image: expected a file (a multipart part with a filename), not a text field"
    )


def test_empty_multipart_body(client):
    empty = client.post(
        "/predict", content=b"", headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert "image" in expect_error(empty, 422, "validation_error")["message"]
    no_boundary = client.post(
        "/predict", content=b"", headers={"Content-Type": "multipart/form-data"}
    )
    expect_error(no_boundary, 400, "bad_request")


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "text/plain", "image/png", None, "application/x-www-form-urlencoded"],
)
def test_not_multipart_is_415(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/predict", content=png(), headers=headers)
    expect_error(response, 415, "unsupported_media_type")


def test_body_over_limit_by_content_length_is_413(client):
    body, content_type = multipart({"image": b"\0" * (MAX_UPLOAD + 1)})
    response = client.post("/predict", content=body, headers={"Content-Type": content_type})
    expect_error(response, 413, "payload_too_large")
    assert client.get("/readyz").status_code == 200


def test_streamed_body_over_limit_is_413(client):
    """No Content-Length (chunked): the bytes actually received are counted."""
    body, content_type = multipart({"image": b"\0" * (3 * MAX_UPLOAD)})

    def chunks():
        for start in range(0, len(body), 16_384):
            yield body[start : start + 16_384]

    response = client.post("/predict", content=chunks(), headers={"Content-Type": content_type})
    assert "content-length" not in response.request.headers
    expect_error(response, 413, "payload_too_large")
    assert client.get("/readyz").status_code == 200


def test_unknown_routes_and_methods_use_the_error_shape(client):
    expect_error(client.get("/nope"), 404, "not_found")
    expect_error(client.get("/predict"), 405, "method_not_allowed")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.one_of(
        st.binary(max_size=2000),
        # Valid headers with random continuations reach deeper into the decoders.
        st.tuples(
            st.sampled_from(
                [
                    b"\x89PNG\r\n\x1a\n",
                    b"\xff\xd8\xff\xe0",
                    b"GIF89a",
                    b"BM",
                    b"II*\x00",
                    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
                ]
            ),
            st.binary(max_size=2000),
        ).map(lambda parts: parts[0] + parts[1]),
    )
)
def test_arbitrary_bytes_never_cause_a_server_error(client, data):
    response = client.post("/predict", files={"image": ("x", data)}, data={"tasks": "caption"})
    assert response.status_code in (200, 400, 413), response.text


def test_still_ready_after_all_that(client):
    assert client.get("/readyz").json() == {"status": "ready"}
    assert (
        client.post(
            "/predict", files={"image": ("x.png", png())}, data={"tasks": "caption"}
        ).status_code
        == 200
    )


def test_an_image_beyond_pillows_limit_is_reported_against_ours():
    """Pillow refuses images of over twice its default limit before our own check runs: the
    error still states the service's limit, not Pillow's."""
    with pytest.raises(APIError) as refused:
        decode_image(png_header(20_000, 20_000), 40_000_000)
    assert refused.value.status == 413
    assert refused.value.message == "image has 400000000 pixels; the limit is 40000000"
    # A service limit above Pillow's: Pillow's is the one that holds, and the one named.
    pillows = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(APIError) as refused:
        decode_image(png_header(15_000, 15_000), pillows + 100_000_000)
    assert refused.value.message == f"image has 225000000 pixels; the limit is {pillows}"
