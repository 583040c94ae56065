"""The Open Inference Protocol's REST requests, built by hand for the /v2 tests: the
protocol's JSON, its binary tensor data extension, and the server settings both modules use."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import httpx
from PIL import Image

from service.settings import Settings
from tests.helpers import encode, scene_image

API_KEY = "v2-key"
MAX_UPLOAD = 300_000
MAX_PIXELS = 1_000_000
MAX_BATCH = 4
HEADER = "Inference-Header-Content-Length"


def v2_settings(checkpoint: Path) -> Settings:
    """An API key, small upload and pixel limits and batches of four: every limit a test hits."""
    return Settings(
        checkpoint=checkpoint,
        api_key=API_KEY,
        max_upload_bytes=MAX_UPLOAD,
        max_image_pixels=MAX_PIXELS,
        max_batch_size=MAX_BATCH,
        batch_delay_ms=2,
    )


def bomb() -> bytes:
    """2000 x 2000 of one colour: a few KB of PNG, 4 megapixels decoded."""
    return encode(Image.new("L", (2000, 2000), 7), optimize=True)


def png(image: Image.Image | None = None) -> bytes:
    return encode(image or scene_image())


def image_input(*images: bytes) -> dict:
    """The protocol's JSON form of a BYTES input: base64 text elements."""
    data = [base64.b64encode(i).decode() for i in images]
    return {"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": data}


def with_input(**changes) -> dict:
    """A request of one image input, with `changes` made to that input."""
    return {"inputs": [{**image_input(png()), **changes}]}


def infer(client, name, body: dict, **kwargs) -> httpx.Response:
    return client.post(f"/v2/models/{name}/infer", json=body, **kwargs)


def outputs(response: httpx.Response) -> dict[str, dict]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def binary_request(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {
        HEADER: str(len(text)),
        "Content-Type": "application/octet-stream",
    }


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)
