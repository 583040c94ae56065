"""`mad serve` / `mad predict`, settings from the environment, rendering and response
building on results a random model would never produce (persons, real masks)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pydantic import ValidationError
from scipy import ndimage
from typer.testing import CliRunner

from mad.cli import app as mad_cli
from model.codecs import build_codecs
from model.codecs.detection import Detections
from model.config import COCO_SKELETON
from model.inference_io import Result
from model.mask_formats import BoxMask, mask_to_polygons
from model.vocab import VocabLayout
from service.postprocess import build_response
from service.render import render
from service.schemas import ModelRef, PredictResponse
from service.settings import BUNDLED_CHECKPOINT, Settings
from tests.helpers import encode, free_port, micro_config, scene_image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["person", "circle", "square"]
MODEL = ModelRef(name="micro", version="test", backend="torch")
CONFIG = micro_config(class_names=CLASSES)
CODECS = build_codecs(CONFIG, VocabLayout.from_config(CONFIG))  # what responses need


def test_settings_defaults_and_environment(monkeypatch):
    for name in [k for k in os.environ if k.startswith("MAD_")]:
        monkeypatch.delenv(name)
    defaults = Settings()
    assert defaults.checkpoint == REPO / "checkpoints" / "mad-tiny" == BUNDLED_CHECKPOINT
    assert (defaults.host, defaults.port, defaults.device, defaults.backend) == (
        "0.0.0.0",
        8000,
        "cpu",
        "torch",
    )
    assert (defaults.max_batch_size, defaults.batch_delay_ms, defaults.queue_size) == (8, 5, 64)
    assert defaults.max_upload_bytes == 20 * 2**20 and defaults.max_image_pixels == 40_000_000
    assert (defaults.drain_delay_s, defaults.read_timeout_s, defaults.keep_alive_timeout_s) == (
        5,
        10,
        5,
    )
    assert (defaults.limit_concurrency, defaults.max_header_bytes) == (256, 16384)
    assert defaults.public_docs and defaults.max_consecutive_failures == 5
    monkeypatch.setenv("MAD_PORT", "9001")
    monkeypatch.setenv("MAD_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("MAD_API_KEY", "s3cret")
    monkeypatch.setenv("MAD_BATCH_DELAY_MS", "2.5")
    monkeypatch.setenv("MAD_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MAD_COMPILE", "true")
    monkeypatch.setenv("MAD_EXPORT_DIR", "/models/export")
    monkeypatch.setenv("MAD_PUBLIC_DOCS", "false")
    monkeypatch.setenv("MAD_DRAIN_DELAY_S", "12.5")
    configured = Settings()
    assert configured.port == 9001 and configured.batch_delay_ms == 2.5
    assert configured.cors_origins == ["http://a.example", "http://b.example"]
    assert configured.api_key.get_secret_value() == "s3cret"
    assert configured.log_level == "debug" and configured.compile
    assert configured.export_dir == Path("/models/export")
    assert not configured.public_docs and configured.drain_delay_s == 12.5
    # What `mad serve --workers N` hands its worker processes rebuilds the same settings.
    for name, value in configured.env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == configured
    monkeypatch.setenv("MAD_API_KEY", "")
    assert Settings().api_key is None
    monkeypatch.setenv("MAD_BACKEND", "tflite")
    with pytest.raises(ValidationError):
        Settings()


def test_mad_predict_prints_json_and_renders(micro_checkpoint, tmp_path):
    images = []
    for name, size in (("a", (160, 120)), ("b", (90, 200))):
        path = tmp_path / f"{name}.png"
        scene_image(*size).save(path)
        images.append(path)
    result = CliRunner().invoke(
        mad_cli,
        [
            "predict",
            *map(str, images),
            "--checkpoint",
            str(micro_checkpoint),
            "--tasks",
            "detection,segmentation",
            "--tasks",
            "caption",
            "--score-threshold",
            "0",
            "--refine-steps",
            "caption:2",
            "--json",
            "--render",
            str(tmp_path / "out.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    for line, size in zip(lines, ((160, 120), (90, 200)), strict=True):
        response = PredictResponse.model_validate(line)
        assert (response.image.width, response.image.height) == size
        assert response.tasks == ["detection", "segmentation", "caption"]
        assert response.decoder_passes["caption"] == 3
        # The same timings as POST /predict's (docs/service.md): no queue here, but measured.
        stages = {"queue", "preprocess", "encode", "detection", "segmentation", "caption"}
        assert set(response.timings_ms) == stages | {"postprocess", "total"}
        assert response.timings_ms["total"] >= sum(response.timings_ms[s] for s in stages)
    for name, path in (("a", images[0]), ("b", images[1])):
        drawn, source = Image.open(tmp_path / f"out-{name}.png"), Image.open(path)
        # As wide as the image; taller by the caption band below it.
        assert drawn.width == source.width and drawn.height > source.height
        above = np.asarray(drawn.convert("RGB"))[: source.height]
        assert np.any(above != np.asarray(source))


def test_mad_predict_reports_unreadable_files(micro_checkpoint, tmp_path):
    """One line each, and the other images are still answered; exit status 1 at the end."""
    bad, good = tmp_path / "bad.png", tmp_path / "good.png"
    bad.write_bytes(b"not an image")
    scene_image(64, 64).save(good)
    args = ["predict", str(bad), str(good), "--checkpoint", str(micro_checkpoint)]
    result = CliRunner().invoke(mad_cli, [*args, "--tasks", "caption"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"mad predict: {bad}: not an image Pillow can read (corrupt or unsupported format)"
    )
    assert f"{good} (64x64)" in result.stdout


def test_mad_predict_reports_a_drawing_it_cannot_write(micro_checkpoint, tmp_path, monkeypatch):
    """A file system that refuses the drawing only when it is written (a full disk, /proc)
    gets the one-line error of the checks made before the work, not a traceback."""
    path = tmp_path / "a.png"
    scene_image(160, 120).save(path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out.png"
    arguments = ["predict", str(path), "--checkpoint", str(micro_checkpoint), "--tasks", "caption"]
    result = CliRunner().invoke(mad_cli, [*arguments, "--render", str(out)])
    assert result.exit_code == 3  # start-up errors' status (mad/help.py)
    assert isinstance(result.exception, SystemExit), result.exception
    assert f"--render {out} cannot be written (No space left on device)" in result.output


def test_mad_serve_without_a_checkpoint_says_so(tmp_path):
    result = CliRunner().invoke(mad_cli, ["serve", "--checkpoint", str(tmp_path / "none")])
    assert result.exit_code == 3 and "no checkpoint" in result.stderr


def test_mad_serve_runs_logs_json_and_stops_cleanly_on_sigterm(micro_checkpoint):
    port = free_port()
    env = {
        **os.environ,
        "MAD_CHECKPOINT": str(micro_checkpoint),
        "OMP_NUM_THREADS": "1",
        "MAD_HOST": "127.0.0.1",
        "MAD_DRAIN_DELAY_S": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "mad.cli", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, give_up = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while time.monotonic() < give_up and process.poll() is None:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        response = httpx.post(
            f"{url}/predict",
            files={"image": ("s.png", encode(scene_image()))},
            data={"tasks": "caption"},
            headers={"X-Request-ID": "cli-1"},
        )
        assert response.status_code == 200, response.text
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]  # drained (tests/test_service_drain.py)
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(entry["message"] == "ready" for entry in logs)
    assert any(e["message"] == "stopped" and e["drained"] is True for e in logs)
    assert not any("color_message" in entry for entry in logs)
    access = [e for e in logs if e.get("path") == "/predict"]
    assert access and access[0]["request_id"] == "cli-1" and access[0]["status"] == 200


# --- response building and drawing on hand-made results -------------------------------------
def hand_made_result(height=60, width=80) -> Result:
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[10:30, 20:50] = True
    mask[15:20, 30:40] = False  # a hole
    boxes = torch.tensor([[20.0, 10.0, 50.0, 30.0], [5.0, 5.0, 15.0, 50.0]])
    dets = Detections(
        boxes,
        boxes / 100,
        torch.tensor([0.9, 0.8]),
        torch.tensor([1, 0]),
        torch.zeros(2, 5, dtype=torch.long),
    )
    keypoints = torch.stack(
        [torch.full((17,), 10.0), torch.linspace(8, 48, 17), torch.full((17,), 0.9)], -1
    )
    outputs = {
        "detection": dets,
        "segmentation": [
            BoxMask(mask[10:30, 20:50], 10, 20, (height, width)),
            BoxMask(torch.zeros(0, 0, dtype=torch.bool), 0, 0, (height, width)),
        ],
        "keypoints": [None, keypoints],
        "caption": "a circle and a person",
    }
    return Result(
        (height, width),
        tuple(outputs),
        outputs,
        timings={"encode": 0.01},
        passes={"detection": 1, "caption": 4},
    )


def test_build_response_serializes_masks_and_person_keypoints():
    result = hand_made_result()
    body = build_response(result, MODEL, CODECS, "rle", {"queue": 0.002}).model_dump(
        exclude_none=True
    )
    circle, person = body["detections"]
    assert (circle["label"], circle["category_id"], person["label"]) == ("circle", 1, "person")
    assert "keypoints" not in circle and np.asarray(person["keypoints"]).shape == (17, 3)
    decoded = mask_utils.decode(circle["mask"]).astype(bool)
    assert np.array_equal(decoded, result.masks[0].full().numpy())
    assert circle["mask_score"] == circle["score"]  # BoxMask's quality defaults to 1
    assert body["decoder_passes"] == {
        "detection": 1,
        "segmentation": 0,
        "keypoints": 0,
        "caption": 4,
    }
    assert body["timings_ms"] == {"queue": 2.0}
    polygons = build_response(result, MODEL, CODECS, "polygon", {}).detections[0].mask
    assert polygons == [[20.0, 10.0, 50.0, 10.0, 50.0, 30.0, 20.0, 30.0]]  # the hole dropped


def test_polygons_cover_exactly_the_mask_without_holes():
    rng = np.random.default_rng(0)
    for _ in range(60):
        mask = rng.random(tuple(rng.integers(1, 16, 2))) < rng.random()
        covered = np.zeros_like(mask)
        centres = np.stack(
            np.meshgrid(np.arange(mask.shape[1]) + 0.5, np.arange(mask.shape[0]) + 0.5), -1
        )
        for polygon in mask_to_polygons(mask):
            covered |= points_in_polygon(centres, polygon[0::2], polygon[1::2])
        # Outer boundaries of 4-connected regions: the mask with its holes filled.
        assert np.array_equal(covered, ndimage.binary_fill_holes(mask, np.ones((3, 3))))


def points_in_polygon(points: np.ndarray, xs, ys) -> np.ndarray:
    """Even-odd rule at each point of [..., 2]."""
    px, py, inside = points[..., 0], points[..., 1], np.zeros(points.shape[:-1], bool)
    for (x0, y0), (x1, y1) in zip(
        zip(xs, ys, strict=True), zip(xs[1:] + xs[:1], ys[1:] + ys[:1], strict=True), strict=True
    ):
        if y0 != y1:
            inside ^= ((y0 > py) != (y1 > py)) & (px < (x1 - x0) * (py - y0) / (y1 - y0) + x0)
    return inside


def test_render_draws_masks_boxes_skeletons_and_caption():
    result = hand_made_result(120, 160)
    response = build_response(result, MODEL, CODECS, "rle", {})
    image = Image.new("RGB", (160, 120), (255, 255, 255))
    pixels = np.asarray(render(image, response, COCO_SKELETON))
    assert tuple(pixels[25, 45]) != (255, 255, 255)  # inside the mask: tinted
    assert tuple(pixels[100, 150]) == (255, 255, 255)  # nowhere near anything
    assert tuple(pixels[30, 35]) == (60, 180, 75)  # the circle's box edge, its class colour
    assert pixels.shape[1] == 160 and pixels.shape[0] > 120
    assert pixels[-3:, 100].max() < 50  # the caption band, added below the image
    limb = pixels[20:40, 9:12]  # keypoints run down x=10: skeleton lines are drawn there
    assert (limb != 255).any()


def test_cors_origins_are_configurable(tmp_path):
    """CORS is answered by middleware, before any model work: the app need not be loaded."""
    import asyncio

    from service.app import create_app

    app = create_app(Settings(checkpoint=tmp_path, cors_origins=["https://ui.example"]))

    async def preflight(origin: str, path: str, headers: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.options(
                path,
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": headers,
                },
            )

    # The headers the documented requests send: /predict's budget, v2's binary and gzip bodies.
    for path, headers in [
        ("/predict", "authorization, x-latency-budget-ms, x-request-id"),
        ("/v2/models/tiny/infer", "content-type, inference-header-content-length"),
        ("/v2/models/tiny/infer", "content-encoding"),
    ]:
        allowed = asyncio.run(preflight("https://ui.example", path, headers))
        assert allowed.status_code == 200, (headers, allowed.text)
        assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
    refused = asyncio.run(preflight("https://evil.example", "/predict", "authorization"))
    assert "access-control-allow-origin" not in refused.headers


def test_help_keeps_bracketed_text():
    """Help texts are plain text: "[env MAD_CHECKPOINT; ...]" is shown, not eaten as markup."""
    from typer.testing import CliRunner

    from mad.cli import app

    for command in ("serve", "predict"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        assert "[env MAD_CHECKPOINT; default: checkpoints/mad-tiny]" in text
