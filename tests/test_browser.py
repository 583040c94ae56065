"""The demo page in a real headless Chromium: it submits an image and draws the result.

`/?demo=1` makes the page build a test scene on a canvas and submit it through the same code
path as a picked file. The page reads the answer as a stream (the draft, each refinement,
the final result), which a one-shot `--dump-dom` does not wait for; so the test drives
Chromium over the DevTools protocol (`--remote-debugging-pipe`: JSON messages on file
descriptors 3 and 4) and reads the DOM once the page says it is done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.helpers import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)"
)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe."""

    def __init__(self, profile) -> None:
        to_browser, self.commands = os.pipe()
        self.replies, from_browser = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        flags += ["--disable-background-networking", "--disable-component-update"]
        flags += ["--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        # The protocol runs on the browser's fds 3 (in) and 4 (out); bash wires them up.
        self.process = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$@" 3<&{to_browser} 4>&{from_browser}',
                "bash",
                CHROMIUM,
                *flags,
            ],
            pass_fds=(to_browser, from_browser),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self.next_id, self.buffer = 0, b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:  # replies and events, NUL-separated; events are not needed here
            while b"\0" not in self.buffer:
                chunk = os.read(self.replies, 1 << 16)
                assert chunk, "Chromium closed the DevTools pipe"
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", self.session, expression=expression)
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", self.session, url=url)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)
        os.close(self.commands)
        os.close(self.replies)


def page_when_settled(url: str, profile, timeout_s: float = 60.0) -> str:
    """The page's DOM once its status is done or an error (or the time is up)."""
    browser = Chromium(profile)
    try:
        browser.open(url)
        state = "document.getElementById('status')?.dataset.state"
        give_up = time.monotonic() + timeout_s
        while browser.evaluate(state) not in ("done", "error") and time.monotonic() < give_up:
            time.sleep(0.1)
        return browser.evaluate("document.documentElement.outerHTML")
    finally:
        browser.close()


def test_demo_page_submits_an_image_and_draws_the_result(micro_checkpoint, tmp_path):
    with running_server(Settings(checkpoint=micro_checkpoint)) as server:
        dom = page_when_settled(f"{server.url}/?demo=1&threshold=0", tmp_path / "profile")
        metrics = httpx.get(f"{server.url}/metrics").text
    status = re.search(r'<p id="status"([^>]*)>([^<]*)</p>', dom)
    assert status, dom[-3000:]
    attributes, text = status.groups()
    assert 'data-state="done"' in attributes, text
    # Threshold 0 keeps all 6 slots of the micro model; every one was drawn on the canvas.
    assert 'data-detections="6"' in attributes and 'data-drawn-boxes="6"' in attributes
    assert "data-caption=" in attributes and "6 detections" in text
    # Streamed: the one-pass draft was drawn first, then each caption refinement (the micro
    # model refines captions 3 times), then the final answer.
    assert 'data-stages="draft,refine,refine,final"' in attributes
    assert '"decoder_passes"' in dom  # the JSON response is shown beneath the drawing
    # The page's model description came from /v1/model; the request reached the server.
    assert "tiny step0-" in dom
    assert 'mad_requests_total{status="200",task="detection"} 1.0' in metrics
