"""The demo page in a real headless Chromium: it submits an image and draws the result.

`/?demo=1` makes the page build a test scene on a canvas and submit it through the same code
path as a picked file. Chromium's --dump-dom prints the DOM once the page has settled; with
--virtual-time-budget it first waits for the page's fetches and timers.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

from service.settings import Settings
from tests.helpers import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)"
)


def dump_dom(url: str, profile) -> str:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, timeout=90, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_demo_page_submits_an_image_and_draws_the_result(micro_checkpoint, tmp_path):
    with running_server(Settings(checkpoint=micro_checkpoint)) as server:
        dom = dump_dom(f"{server.url}/?demo=1&threshold=0", tmp_path / "profile")
        metrics = httpx.get(f"{server.url}/metrics").text
    status = re.search(r'<p id="status"([^>]*)>([^<]*)</p>', dom)
    assert status, dom[-3000:]
    attributes, text = status.groups()
    assert 'data-state="done"' in attributes, text
    # Threshold 0 keeps all 6 slots of the micro model; every one was drawn on the canvas.
    assert 'data-detections="6"' in attributes and 'data-drawn-boxes="6"' in attributes
    assert "data-caption=" in attributes and "6 detections" in text
    assert '"decoder_passes"' in dom  # the JSON response is shown beneath the drawing
    # The page's model description came from /v1/model; the request reached the server.
    assert "tiny step0-" in dom
    assert 'mad_requests_total{protocol="native",status="200",task="detection"} 1.0' in metrics
